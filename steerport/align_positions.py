"""Pair token positions of two tokenizations of the same text, and collect paired hidden states.

Two models with different tokenizers see the same text as different token sequences.
A position of model a and a position of model b have *read the same text* when both
tokens end at the same character offset: the hidden state there summarises exactly the
prefix ``text[:end]`` in both models. Pairing those positions gives rows (h_a, h_b) to fit
a least-squares map between the two models' hidden spaces, at any layer.

Used by ActAdd transfer (residual stream at decoder layer L; several layers from one forward
pass with ``paired_hidden_states_at``) and reusable for the final hidden state
(``layer=None``: the LM-head input) by LM-Steer transfer.

Example::

    ia, ib = paired_positions(tok_a, tok_b, "The cat sat.")      # index arrays, same length
    Xa, Xb = paired_hidden_states(lm_a, lm_b, texts, layer_a=9, layer_b=5)   # (n, d_a), (n, d_b)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from steerport.errors import SteerportError
from steerport.models import LoadedModel


def token_end_offsets(tokenizer, text: str, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (with the tokenizer's special tokens) and each token's end offset.

    Special tokens (BOS, ...) get end offset -1 so they never pair. Needs a fast tokenizer.
    """
    try:
        enc = tokenizer(text, return_offsets_mapping=True, truncation=max_tokens is not None, max_length=max_tokens)
    except NotImplementedError:
        raise SteerportError("position pairing needs a fast tokenizer (offset mapping)") from None
    ids = list(enc["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []))
    ends = [(-1 if (tid in special or (s == 0 and e == 0)) else int(e)) for tid, (s, e) in zip(ids, enc["offset_mapping"])]
    return ids, ends


def pair_by_end_offset(ends_a: Sequence[int], ends_b: Sequence[int], *, skip_first: bool = True) -> tuple[list[int], list[int]]:
    """Indices (i, j) with ends_a[i] == ends_b[j] >= 1, in text order.

    When several tokens end at the same offset (a character split over byte tokens), the
    last one is used: it has read the whole prefix. ``skip_first`` drops each sequence's
    position 0 (attention-sink activations are orders of magnitude off and would dominate a
    least-squares fit).
    """
    last_a = {e: i for i, e in enumerate(ends_a) if e > 0 and not (skip_first and i == 0)}
    last_b = {e: j for j, e in enumerate(ends_b) if e > 0 and not (skip_first and j == 0)}
    common = sorted(set(last_a) & set(last_b))
    return [last_a[e] for e in common], [last_b[e] for e in common]


def paired_positions(tok_a, tok_b, text: str, *, max_tokens: int | None = None, skip_first: bool = True) -> tuple[list[int], list[int]]:
    """Positions of ``text`` under tokenizers a and b that end on the same character."""
    _, ea = token_end_offsets(tok_a, text, max_tokens)
    _, eb = token_end_offsets(tok_b, text, max_tokens)
    return pair_by_end_offset(ea, eb, skip_first=skip_first)


def _capture_hook(lm: LoadedModel, layer: int | None, keep: Callable[[torch.Tensor], None]):
    """Hook ``keep(h)`` on the wanted hidden state: the stream entering decoder layer ``layer``
    (``layer`` = n_layers: leaving the last one) or, for None, the LM head input. Returns the handle."""
    if layer is None:
        return lm.lm_head.register_forward_pre_hook(lambda m, args, kwargs: keep(args[0] if args else kwargs["input"]), with_kwargs=True)
    from steerport.capture import block_output as _block_hidden
    from steerport.models import decoder_layers

    blocks = decoder_layers(lm.model)
    if layer == len(blocks):
        return blocks[-1].register_forward_hook(lambda m, args, output: keep(_block_hidden(output)))
    return blocks[layer].register_forward_pre_hook(lambda m, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)


@torch.no_grad()
def hidden_states_at(lm: LoadedModel, text: str, layers: Sequence[int | None], max_tokens: int | None = None) -> list[torch.Tensor]:
    """Hidden states (T, d) of one text at each of ``layers``, from one forward pass (stopped once all are seen).

    A layer L is the residual stream entering decoder layer L (L = n_layers: leaving the last
    one); None is the LM head input.
    """
    got: dict[int, torch.Tensor] = {}

    def keeper(i: int) -> Callable[[torch.Tensor], None]:
        def keep(h: torch.Tensor) -> None:
            got[i] = h[0].detach().float().cpu()
            if len(got) == len(layers):
                raise _Stop

        return keep

    enc = lm.tokenizer(text, return_tensors="pt", truncation=max_tokens is not None, max_length=max_tokens)
    handles = [_capture_hook(lm, layer, keeper(i)) for i, layer in enumerate(layers)]
    try:
        lm.model(input_ids=enc["input_ids"].to(lm.device))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [got[i] for i in range(len(layers))]


def hidden_states(lm: LoadedModel, text: str, layer: int | None, max_tokens: int | None = None) -> torch.Tensor:
    """Hidden states (T, d) of one text: input of decoder layer ``layer`` (residual stream) or of the LM head (None)."""
    return hidden_states_at(lm, text, [layer], max_tokens)[0]


class _Stop(Exception):
    """Raised in a hook to skip the rest of the forward pass once the wanted state is captured."""


def paired_hidden_states_at(
    lm_a: LoadedModel,
    lm_b: LoadedModel,
    texts: Sequence[str],
    *,
    layers_a: Sequence[int | None],
    layers_b: Sequence[int | None],
    max_tokens: int = 128,
    skip_first: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows (h_a, h_b) at positions where both tokenizations end on the same character, for
    each layer pair (layers_a[k], layers_b[k]); one forward pass per text and model.

    Returns [(Xa (n, d_a), Xb (n, d_b)), ...], float32, one per layer pair, all on the same
    positions. Texts are truncated to ``max_tokens`` tokens per model; pairs only cover the
    text both models saw.
    """
    if len(layers_a) != len(layers_b):
        raise SteerportError(f"give one layer of model b per layer of model a (got {len(layers_a)} and {len(layers_b)})")
    ua, ub = list(dict.fromkeys(layers_a)), list(dict.fromkeys(layers_b))  # each layer captured once
    xa: list[list[torch.Tensor]] = [[] for _ in layers_a]
    xb: list[list[torch.Tensor]] = [[] for _ in layers_b]
    for text in texts:
        if not text.strip():
            continue
        _, ea = token_end_offsets(lm_a.tokenizer, text, max_tokens)
        _, eb = token_end_offsets(lm_b.tokenizer, text, max_tokens)
        ia, ib = pair_by_end_offset(ea, eb, skip_first=skip_first)
        if ia:
            ha = dict(zip(ua, hidden_states_at(lm_a, text, ua, max_tokens)))
            hb = dict(zip(ub, hidden_states_at(lm_b, text, ub, max_tokens)))
            for k, (la, lb) in enumerate(zip(layers_a, layers_b)):
                xa[k].append(ha[la][ia])
                xb[k].append(hb[lb][ib])
        if progress:
            progress(1)
    if not xa[0]:
        raise SteerportError("no positions pair up between the two tokenizations; give more (or longer) text")
    return [(torch.cat(a), torch.cat(b)) for a, b in zip(xa, xb)]


def paired_hidden_states(
    lm_a: LoadedModel,
    lm_b: LoadedModel,
    texts: Sequence[str],
    *,
    layer_a: int | None,
    layer_b: int | None,
    max_tokens: int = 128,
    skip_first: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (h_a, h_b) at positions where both tokenizations end on the same character.

    Returns Xa (n, d_a) and Xb (n, d_b), float32. Texts are truncated to ``max_tokens``
    tokens per model; pairs only cover the text both models saw.
    """
    return paired_hidden_states_at(lm_a, lm_b, texts, layers_a=[layer_a], layers_b=[layer_b], max_tokens=max_tokens,
                                   skip_first=skip_first, progress=progress)[0]

"""Pair token positions of two tokenizations of the same text, and collect paired hidden states.

Two models with different tokenizers see the same text as different token sequences.
A position of model a and a position of model b have *read the same text* when both
tokens end at the same character offset: the hidden state there summarises exactly the
prefix ``text[:end]`` in both models. Pairing those positions gives rows (h_a, h_b) to fit
a least-squares map between the two models' hidden spaces, at any layer.

Used by ActAdd transfer (residual stream at decoder layer L) and reusable for the final
hidden state (``layer=None``: the LM-head input) by LM-Steer transfer.

Example::

    ia, ib = paired_positions(tok_a, tok_b, "The cat sat.")      # index arrays, same length
    Xa, Xb = paired_hidden_states(lm_a, lm_b, texts, layer_a=9, layer_b=5)   # (n, d_a), (n, d_b)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from steerport.errors import SteerportError
from steerport.hooks import input_of
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


@torch.no_grad()
def hidden_states(lm: LoadedModel, text: str, layer: int | None, max_tokens: int | None = None) -> torch.Tensor:
    """Hidden states (T, d) of one text: input of decoder layer ``layer`` (residual stream) or of the LM head (None)."""
    from steerport.actadd import decoder_layers

    module = lm.lm_head if layer is None else decoder_layers(lm.model)[layer]
    enc = lm.tokenizer(text, return_tensors="pt", truncation=max_tokens is not None, max_length=max_tokens)
    return input_of(lm.model, module, input_ids=enc["input_ids"].to(lm.device))[0].float().cpu()


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
    xa, xb = [], []
    for text in texts:
        if not text.strip():
            continue
        _, ea = token_end_offsets(lm_a.tokenizer, text, max_tokens)
        _, eb = token_end_offsets(lm_b.tokenizer, text, max_tokens)
        ia, ib = pair_by_end_offset(ea, eb, skip_first=skip_first)
        if ia:
            ha = hidden_states(lm_a, text, layer_a, max_tokens)
            hb = hidden_states(lm_b, text, layer_b, max_tokens)
            xa.append(ha[ia])
            xb.append(hb[ib])
        if progress:
            progress(1)
    if not xa:
        raise SteerportError("no positions pair up between the two tokenizations; give more (or longer) text")
    return torch.cat(xa), torch.cat(xb)

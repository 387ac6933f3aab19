"""Positions where two tokenizations of the same text end on the same character, and the two
models' states there: after such a token both models have read the same prefix.

* :func:`token_end_offsets`, :func:`pair_by_end_offset`, :func:`paired_positions` — the pairing;
* :func:`paired_states` — rows (h_a, h_b) at the paired positions, each model running once over the
  texts in the batches of :func:`steerport.capture.batch_plan`; rows for hidden-state maps (LM-Steer
  transfer) and residual-stream maps (ActAdd transfer).

Example::

    (Xa, Xb), = paired_states(lm_a, lm_b, texts, ["head"], ["head"])       # (n, d_a), (n, d_b)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from steerport.capture import Point, batch_plan, forward_rows, packs_texts
from steerport.errors import SteerportError
from steerport.models import LoadedModel


def token_end_offsets(tokenizer: Any, text: str, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (with the tokenizer's special tokens) and each token's end offset.

    Special and zero-width tokens (BOS, ...) get end offset -1 so they never pair. Needs a fast tokenizer.
    """
    try:
        enc = tokenizer(text, return_offsets_mapping=True, truncation=max_tokens is not None, max_length=max_tokens)
    except NotImplementedError:
        raise SteerportError("position pairing needs a fast tokenizer (character offsets)") from None
    ids = list(enc["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []))
    ends = [(-1 if (tid in special or s == e) else int(e)) for tid, (s, e) in zip(ids, enc["offset_mapping"])]
    return ids, ends


def pair_by_end_offset(ends_a: Sequence[int], ends_b: Sequence[int]) -> tuple[list[int], list[int]]:
    """Indices (i, j) with ends_a[i] == ends_b[j] >= 1, in text order.

    When several tokens end at the same offset (a character split over byte tokens), the last
    one is used: it has read the whole prefix. Position 0 of each sequence never pairs: its
    states (the attention sink) are orders of magnitude off and would dominate a least-squares fit.
    """
    last_a = {e: i for i, e in enumerate(ends_a) if e > 0 and i > 0}
    last_b = {e: j for j, e in enumerate(ends_b) if e > 0 and j > 0}
    common = sorted(set(last_a) & set(last_b))
    return [last_a[e] for e in common], [last_b[e] for e in common]


def paired_positions(tok_a: Any, tok_b: Any, text: str, *, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Positions of ``text`` under tokenizers a and b that end on the same character."""
    _, ea = token_end_offsets(tok_a, text, max_tokens)
    _, eb = token_end_offsets(tok_b, text, max_tokens)
    return pair_by_end_offset(ea, eb)


def paired_states(
    lm_a: LoadedModel,
    lm_b: LoadedModel,
    texts: Sequence[str],
    points_a: Sequence[Point],
    points_b: Sequence[Point],
    *,
    max_tokens: int = 128,
    min_pairs: int = 1,
    progress: Callable[[int], None] | None = None,
    tokens_per_batch: int = 4096,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows (h_a, h_b) at positions where both tokenizations end on the same character, for each
    point pair (points_a[k], points_b[k]); one pass of each model over the texts, in the batches of
    :func:`batch_plan`.

    Returns [(Xa (n, d_a), Xb (n, d_b)), ...] float32 on the CPU, all on the same positions.
    Texts are truncated to ``max_tokens`` tokens per model; pairs cover the text both models saw.
    Fewer than ``min_pairs`` pairs is a one-line error.
    """
    if len(points_a) != len(points_b):
        raise SteerportError(f"give one point of model b per point of model a (got {len(points_a)} and {len(points_b)})")
    ids_a: list[list[int]] = []  # texts that pair at all: token ids per model and the paired positions
    ids_b: list[list[int]] = []
    pos_a: list[list[int]] = []
    pos_b: list[list[int]] = []
    for text in texts:
        if text.strip():
            a, ea = token_end_offsets(lm_a.tokenizer, text, max_tokens)
            b, eb = token_end_offsets(lm_b.tokenizer, text, max_tokens)
            ia, ib = pair_by_end_offset(ea, eb)
            if ia:
                ids_a.append(a)
                ids_b.append(b)
                pos_a.append(ia)
                pos_b.append(ib)
    if progress and len(texts) > len(ids_a):
        progress(len(texts) - len(ids_a))
    xa = _states_at(lm_a, ids_a, pos_a, points_a, tokens_per_batch)
    xb = _states_at(lm_b, ids_b, pos_b, points_b, tokens_per_batch, progress)
    n = sum(len(p) for p in pos_a)
    if n < max(min_pairs, 1):
        raise SteerportError(f"only {n} positions pair up between the two tokenizations (need {max(min_pairs, 1)}); "
                             "give more (or longer) neutral text")
    return list(zip(xa, xb))


def _states_at(lm: LoadedModel, token_lists: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
               points: Sequence[Point], tokens_per_batch: int, progress: Callable[[int], None] | None = None
               ) -> list[torch.Tensor]:
    """For each point, the states (Σ len(positions), d) of every text at its ``positions``, float32 on
    the CPU, in text order; one pass in the batches of :func:`batch_plan`."""
    got: list[list[torch.Tensor | None]] = [[None] * len(token_lists) for _ in points]
    pad = lm.tokenizer.pad_token_id or 0
    for batch in batch_plan(token_lists, tokens_per_batch, packed=packs_texts(lm)):
        order = [i for row in batch for i in row]
        for k, states in forward_rows(lm, [[token_lists[i] for i in row] for row in batch], points, pad, torch.float32):
            for j, h in enumerate(states):
                got[j][order[k]] = h[positions[order[k]]]
        if progress:
            progress(len(order))
    d = lm.hidden_size
    return [torch.cat([x for x in per_text if x is not None]) if token_lists else torch.zeros(0, d) for per_text in got]

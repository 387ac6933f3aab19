"""Removing output-embedding dimensions (Cho et al.: dimensions that carry little of the
probability encoding can be dropped).

Zeroing output-embedding columns S equals zeroing h[S] at the LM-head input, so neither the
curve nor :func:`removed_dims` ever copies E (V, d). Importance of dimension i is the
standardized slope |A_i| · std(E[:, i]) (or |t_i|, or random: the baseline).

Example::

    rows = prune_curve(lm, enc, stats, prompts, fractions=(0.0, 0.3), rank_by="slope")
    rows[1]["kl_avg"], rows[1]["gen_sim"]
    with removed_dims(lm, torch.tensor([0, 5])):
        generate(lm, ["The movie"])
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from steerport.capture import edit_input
from steerport.errors import SteerportError
from steerport.metrics import kl_divergence
from steerport.models import LoadedModel
from steerport.tokenencoding import Encoding
from steerport.tokenstats import TokenStats, chunk_rows, head_logits, head_weights

RANKINGS = ("slope", "t", "random")
FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def importance(enc: Encoding, E: torch.Tensor, rank_by: str = "slope", seed: int = 0) -> torch.Tensor:
    """Per-dimension importance (d,): |A_i| · std(E[:, i]) (standardized slope), |t_i|, or random."""
    if rank_by == "slope":
        return enc.slopes.abs().float() * E.detach().float().std(0).cpu()
    if rank_by == "t":
        return enc.t.abs().float()
    if rank_by == "random":
        return torch.rand(enc.hidden_size, generator=torch.Generator().manual_seed(seed))
    raise SteerportError(f"rank_by must be one of {', '.join(RANKINGS)}, got {rank_by!r}")


@contextmanager
def removed_dims(lm: LoadedModel, dims: torch.Tensor) -> Iterator[LoadedModel]:
    """Zero output-embedding columns ``dims`` for the block: done as h[..., dims] = 0 at the LM head input."""
    keep = torch.ones(lm.hidden_size, device=lm.device, dtype=lm.dtype)
    keep[dims.to(lm.device)] = 0
    remove = edit_input(lm.lm_head, lambda h: h * keep)
    try:
        yield lm
    finally:
        remove()


def _token_ratio(tok, a: str, b: str) -> float:
    """difflib similarity of two texts' token-id sequences."""
    return difflib.SequenceMatcher(a=tok(a, add_special_tokens=False)["input_ids"],
                                   b=tok(b, add_special_tokens=False)["input_ids"], autojunk=False).ratio()


@torch.no_grad()
def prune_curve(
    lm: LoadedModel,
    enc: Encoding,
    stats: TokenStats,
    prompts: Sequence[str],
    fractions: Sequence[float] = FRACTIONS,
    *,
    rank_by: str = "slope",
    seed: int = 0,
    max_new_tokens: int = 24,
    max_positions: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Zero the least important fraction of output-embedding dims; measure the damage.

    Per fraction: ``kl_avg`` = KL(ᾱ ‖ ᾱ_pruned) of the average distribution, ``kl_pos`` = mean
    per-position KL(p ‖ p_pruned) (both on the first ``max_positions`` cached head inputs),
    ``gen_sim`` = mean difflib ratio between greedy continuations (token ids) of ``prompts``
    with and without the removal (NaN without prompts).
    """
    from steerport.hooks import generate

    E, bias, cap = head_weights(lm)
    order = torch.argsort(importance(enc, E, rank_by, seed))  # least important first
    n = min(max_positions, stats.positions)
    H = stats.H[:n]  # (n, d)
    rows_per_chunk = chunk_rows(E.shape[0])
    base_gen = generate(lm, prompts, max_new_tokens=max_new_tokens) if prompts else []
    rows = []
    for f in fractions:
        k = round(f * lm.hidden_size)
        dims = order[:k]
        log_avg0 = torch.full((E.shape[0],), -math.inf, dtype=torch.float64)  # (V,)
        log_avg1 = log_avg0.clone()
        kl_pos = 0.0
        for i in range(0, n, rows_per_chunk):
            h0 = H[i : i + rows_per_chunk]
            h1 = h0.clone()
            h1[:, dims] = 0
            lp0 = torch.log_softmax(head_logits(h0, E, bias, cap), -1)  # (c, V)
            lp1 = torch.log_softmax(head_logits(h1, E, bias, cap), -1)
            kl_pos += float(kl_divergence(lp0, lp1).sum())
            log_avg0 = torch.logaddexp(log_avg0, torch.logsumexp(lp0.double(), 0))
            log_avg1 = torch.logaddexp(log_avg1, torch.logsumexp(lp1.double(), 0))
        kl_avg = float(kl_divergence(log_avg0 - math.log(n), log_avg1 - math.log(n)))
        sim = float("nan")
        if prompts:
            with removed_dims(lm, dims):
                gen = generate(lm, prompts, max_new_tokens=max_new_tokens)
            sim = sum(_token_ratio(lm.tokenizer, x, y) for x, y in zip(base_gen, gen)) / len(gen)
        rows.append({"fraction": f, "dims_removed": k, "kl_avg": kl_avg, "kl_pos": kl_pos / n, "gen_sim": sim})
        if progress:
            progress(1)
    return rows

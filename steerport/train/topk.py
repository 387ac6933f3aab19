"""The opt-in ``head="topk"`` approximation of the steered LM-head loss.

Instead of the full softmax of every step, keep the base model's top candidates of each cached
position plus a first-order tail term, computed once after the body pass (:class:`TopKStats`);
steps then cost O(N·K·r) instead of O(N·V·d). Held-out evaluations and the final summary
always use the exact head (:mod:`steerport.train.headloss`).

Example::

    stats = topk_stats(cache, lm.output_embeddings, lm.lm_head_bias, k=64)
    loss = topk_token_loss(stats, idx, u, B, lm.output_embeddings)     # (n,)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from steerport.capture import HiddenCache
from steerport.fileio import read_json_safetensors, write_json_safetensors
from steerport.train.headloss import CHUNK_ELEMENTS

STATS_FIELDS = ("ids", "z0", "log_tail", "e_tail")


@dataclass
class TopKStats:
    """Per-token statistics of the *unsteered* head for ``head="topk"`` (computed once).

    For each cached position: ``ids`` (N, K) = the target followed by the K−1 highest other
    logits, ``z0`` (N, K) their base logits, ``log_tail`` (N,) = log Σ_{v ∉ ids} exp(z0_v) and
    ``e_tail`` (N, d) = Σ_{v ∉ ids} q_v e_v, the tail's probability-weighted mean embedding.
    The steered normaliser is then approximated as::

        logsumexp_v z_v ≈ logsumexp( z0_ids + (E B)_ids u ,  log_tail + u·(Bᵀ e_tail) )

    exact on the K candidates and first-order (Jensen) on the tail, whose logits shift by
    δ_v = u·(Bᵀ e_v): a step costs O(N·K·r + V·d·r) instead of O(N·V·d).
    """

    ids: torch.Tensor
    z0: torch.Tensor
    log_tail: torch.Tensor
    e_tail: torch.Tensor


@torch.no_grad()
def topk_stats(cache: HiddenCache, E: torch.Tensor, bias: torch.Tensor | None, k: int,
               progress: Callable[[int], None] | None = None) -> TopKStats:
    """One pass of the unsteered head over the cache, keeping :class:`TopKStats`."""
    N, d = cache.h.shape
    V = E.shape[0]
    k = min(k, V)
    ids = torch.empty(N, k, dtype=torch.int32)
    z0 = torch.empty(N, k, dtype=torch.float32)
    log_tail = torch.empty(N, dtype=torch.float32)
    e_tail = torch.empty(N, d, dtype=cache.h.dtype)
    rows = max(16, CHUNK_ELEMENTS // V)
    Ef = E.float()
    for i in range(0, N, rows):
        h = cache.h[i : i + rows].float()
        y = cache.targets[i : i + rows].long()
        z = h @ Ef.T  # (M, V)
        if bias is not None:
            z += bias.float()
        others = z.scatter(1, y[:, None], -math.inf)
        top = torch.cat([y[:, None], others.topk(k - 1, dim=1).indices], 1)  # (M, k), target first
        lse = torch.logsumexp(z, 1)
        p_tail = torch.exp(z - lse[:, None]).scatter_(1, top, 0.0)  # (M, V) tail probabilities
        mass = p_tail.sum(1).clamp_min(1e-30)
        ids[i : i + rows] = top.int()
        z0[i : i + rows] = z.gather(1, top)
        log_tail[i : i + rows] = lse + torch.log(mass)
        e_tail[i : i + rows] = ((p_tail @ Ef) / mass[:, None]).to(e_tail.dtype)
        if progress:
            progress(min(i + rows, N))
    return TopKStats(ids, z0, log_tail, e_tail)


def topk_token_loss(stats: TopKStats, idx: torch.Tensor, u: torch.Tensor, B: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """Per-token loss under the :class:`TopKStats` approximation; u (n, R), B (d, R)."""
    EB = E.float() @ B.float()  # (V, R)
    ids = stats.ids[idx].long()  # (n, K)
    z = stats.z0[idx] + (EB[ids] * u[:, None, :]).sum(-1)  # (n, K)
    tail = stats.log_tail[idx] + (u * (stats.e_tail[idx].float() @ B.float())).sum(-1)  # (n,)
    return torch.logsumexp(torch.cat([z, tail[:, None]], 1), 1) - z[:, 0]


# --------------------------------------------------------------------------- kept in the work folder


def stats_path(workdir: Path, k: int) -> Path:
    """Where a run's top-k statistics live in its work folder."""
    return workdir / f"topk{k}.safetensors"


def load_topk_stats(path: Path, cache_key: str) -> TopKStats | None:
    """The statistics saved at ``path`` if they were computed for this cache, else None."""
    if not path.exists():
        return None
    doc, tensors = read_json_safetensors(path, "topk", "top-k statistics of a training run")
    if not isinstance(doc, dict) or doc.get("cache_key") != cache_key or set(tensors) != set(STATS_FIELDS):
        return None  # computed for another cache (or by an older steerport): recompute
    return TopKStats(**tensors)


def save_topk_stats(path: Path, stats: TopKStats, cache_key: str) -> None:
    """Write the statistics atomically, tagged with the cache they belong to."""
    write_json_safetensors(path, {f: getattr(stats, f) for f in STATS_FIELDS}, "topk", {"cache_key": cache_key})

"""What the LM head sees on a text set, and exact token-probability effects computed from it.

One pass over a text set caches the LM-head inputs h_t (via :func:`steerport.capture.cache_hidden`)
and the per-position log-normalizers; the average next-token distribution is

    α_w = mean_t p(w | x_<t)                                   α: (V,)

A ``token-prob`` steer changes only the logits of its tokens (z_w += s·(delta_w · h), before
any final soft-cap), so the steered α'_w, the factor r̂ = α'_w / α_w and the KL of the other
tokens follow exactly from the cache, without running the model again.

Soft-capping (``cap · tanh(z / cap)``, read through :func:`steerport.models.logit_softcap`) is
applied after the offset, as the model does after its LM head.

Example::

    stats = collect_head_stats(lm, texts.neutral("fit", 100))
    log_a, rho = steered_log_alpha(lm, stats, tid, delta)      # log α'_w, ρ_t = Z_t / Z'_t
    r_hat = math.exp(log_a - float(stats.log_alpha[tid]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from steerport.capture import cache_hidden
from steerport.errors import SteerportError
from steerport.metrics import kl_divergence
from steerport.models import LoadedModel

LOGIT_BUDGET = 1 << 25  # float32 logits held at once (rows · V) when sweeping the vocabulary


@dataclass
class TokenStats:
    """What the LM head saw on a text set.

    H: (N, d) hidden states at the LM head input (float32, every real token position);
    lse: (N,) log Σ_v exp z_v per position (soft-capped logits where the model caps);
    log_alpha: (V,) float64 log of the average next-token distribution.
    """

    H: torch.Tensor
    lse: torch.Tensor
    log_alpha: torch.Tensor

    @property
    def positions(self) -> int:
        return self.H.shape[0]

    def head(self, n: int) -> TokenStats:
        """The first ``n`` positions (log_alpha kept as is)."""
        return TokenStats(self.H[:n], self.lse[:n], self.log_alpha)


HeadStats = TokenStats  # the older name


def chunk_rows(V: int) -> int:
    """Positions per chunk when computing (rows, V) logits."""
    return max(16, LOGIT_BUDGET // max(V, 1))


def head_weights(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """E (V, d) float32 on the CPU, the head bias (V,) or None, and the soft-cap or None."""
    bias = lm.lm_head_bias
    return (lm.output_embeddings.detach().float().cpu(), None if bias is None else bias.detach().float().cpu(),
            lm.softcap)


def cap_logits(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(z / cap), or z when the model does not cap."""
    return z if cap is None else cap * torch.tanh(z / cap)


def head_logits(H: torch.Tensor, E: torch.Tensor, bias: torch.Tensor | None, cap: float | None) -> torch.Tensor:
    """The model's logits (n, V) float32 from head inputs H (n, d): cap(H Eᵀ + b)."""
    z = H @ E.T
    if bias is not None:
        z = z + bias
    return cap_logits(z, cap)


@torch.no_grad()
def collect_head_stats(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    progress: Callable[[int], None] | None = None,
) -> TokenStats:
    """One pass over ``texts``: LM-head inputs, log-normalizers and log α (log-mean-exp over positions).

    ``progress(n)`` is called with the number of texts finished since the last call.
    """
    if not texts:
        raise SteerportError("no text to measure the average distribution on")
    seen = [0]

    def step(texts_done: int, _positions: int) -> None:
        if progress and texts_done > seen[0]:
            progress(texts_done - seen[0])
        seen[0] = texts_done

    cache = cache_hidden(lm, list(texts), point="head", max_tokens=max_tokens, progress=step)
    H = cache.h  # (N, d) float32
    E, bias, cap = head_weights(lm)
    n = chunk_rows(E.shape[0])
    lses, log_sum = [], torch.full((E.shape[0],), -math.inf, dtype=torch.float64)  # log Σ_t p_t
    for i in range(0, H.shape[0], n):
        z = head_logits(H[i : i + n], E, bias, cap)  # (c, V): float32 logits, as the evaluation uses
        lse = torch.logsumexp(z, -1)  # (c,)
        log_sum = torch.logaddexp(log_sum, torch.logsumexp((z - lse[:, None]).double(), 0))
        lses.append(lse)
    if not lses:
        raise SteerportError("no text to measure the average distribution on")
    return TokenStats(H=H, lse=torch.cat(lses), log_alpha=log_sum - math.log(H.shape[0]))


# --------------------------------------------------------------------------- exact effects of a row change


def token_logits(lm: LoadedModel, stats: TokenStats, tid: int) -> torch.Tensor:
    """Pre-cap logits z_w at every cached position, (N,) float64."""
    z = stats.H @ lm.output_embeddings[tid].detach().float().cpu()
    bias = lm.lm_head_bias
    if bias is not None:
        z = z + float(bias[tid])
    return z.double()


def steered_log_alpha_from(z: torch.Tensor, lse: torch.Tensor, shift: torch.Tensor, cap: float | None) -> tuple[float, torch.Tensor]:
    """log α'_w and ρ (N,) from pre-cap logits z (N,), normalizers lse (N,) and offsets shift (N,).

    With c the cap function, the token's logit moves by dz = c(z + shift) - c(z), and
    log Z' - log Z = log(1 + p (e^dz - 1)), p = e^(c(z) - lse).
    """
    cz = cap_logits(z, cap)
    dz = cap_logits(z + shift, cap) - cz  # (N,)
    log_p = (cz - lse.double()).clamp(max=0.0)  # log p_t,w
    # exact near dz = 0 (log1p/expm1); for large offsets the saturating forms (no inf - inf)
    dlse = torch.log1p(torch.exp(log_p) * torch.expm1(dz.clamp(max=30)))  # (N,)
    new_log_p = log_p + dz - dlse
    big = dz >= 30
    if bool(big.any()):
        log_q = torch.log1p(-torch.exp(log_p))  # log(1 - p)
        dlse = torch.where(big, torch.logaddexp(log_q, log_p + dz), dlse)
        new_log_p = torch.where(big, -torch.logaddexp(torch.zeros_like(dz), log_q - log_p - dz), new_log_p)
    return float(torch.logsumexp(new_log_p, 0) - math.log(len(z))), torch.exp(-dlse)


def steered_log_alpha(lm: LoadedModel, stats: TokenStats, tid: int, delta: torch.Tensor, value: float = 1.0) -> tuple[float, torch.Tensor]:
    """log α'_w of token w after z_w += value · (delta · h), exactly, from cached head inputs.

    Returns (log α'_w, ρ) with ρ_t = Z_t / Z'_t (N,): how much every other token's probability
    at position t is scaled.
    """
    shift = value * (stats.H @ delta.float().cpu()).double()  # (N,)
    return steered_log_alpha_from(token_logits(lm, stats, tid), stats.lse, shift, lm.softcap)


@dataclass
class ScaleResult:
    token: str
    token_id: int
    r: float
    r_hat: float

    @property
    def error(self) -> float:
        """|log r − log r̂|."""
        return abs(math.log(self.r) - math.log(self.r_hat))


def scale_errors(lm: LoadedModel, stats: TokenStats, u: torch.Tensor, tokens: dict[str, int], scales: Sequence[float]) -> list[ScaleResult]:
    """r̂ = α'_w / α_w for each token and requested r, with the paper's delta = log(r) · u."""
    return [
        ScaleResult(surface, tid, r, math.exp(steered_log_alpha(lm, stats, tid, math.log(r) * u)[0] - float(stats.log_alpha[tid])))
        for surface, tid in tokens.items()
        for r in scales
    ]


def deltas_scale_errors(lm: LoadedModel, stats: TokenStats, rows: Sequence[tuple[str, int, float, torch.Tensor]]) -> list[ScaleResult]:
    """r̂ for given (token, id, requested r, delta (d,)) rows: any step rule, measured on ``stats``."""
    return [
        ScaleResult(surface, tid, r, math.exp(steered_log_alpha(lm, stats, tid, delta)[0] - float(stats.log_alpha[tid])))
        for surface, tid, r, delta in rows
    ]


@torch.no_grad()
def remaining_kls(lm: LoadedModel, stats: TokenStats, rows: Sequence[tuple[int, torch.Tensor]], *,
                  max_positions: int = 2048) -> list[float]:
    """KL(ᾱ' ‖ ᾱ) of the average distribution over all tokens but w, each renormalized, for
    several (token id w, delta (d,)) rows in one sweep over the vocabulary.

    Only z_w changes, so p'_t,v = p_t,v · ρ_t for v ≠ w; computed on the first ``max_positions``
    positions. Cost: one (n, V) logit pass plus a (K, n) x (n, V) product for K rows.
    """
    part = stats.head(min(max_positions, stats.positions))
    rho = torch.stack([steered_log_alpha(lm, part, tid, delta)[1] for tid, delta in rows])  # (K, n)
    E, bias, cap = head_weights(lm)
    old = torch.zeros(E.shape[0], dtype=torch.float64)  # (V,)
    new = torch.zeros(len(rows), E.shape[0], dtype=torch.float32)  # (K, V); float32 keeps K·V in memory
    n = chunk_rows(E.shape[0])
    for i in range(0, part.positions, n):
        p = torch.exp(head_logits(part.H[i : i + n], E, bias, cap) - part.lse[i : i + n, None])  # (c, V)
        old += p.sum(0).double()
        new += rho[:, i : i + n].float() @ p
    out = []
    for k, (tid, _) in enumerate(rows):
        keep = old > 0  # tokens whose probability underflows everywhere add nothing
        keep[tid] = False
        a = new[k, keep].double()
        a, b = a / a.sum(), old[keep] / old[keep].sum()  # (V - 1,) each
        out.append(float(kl_divergence(a.log(), b.log())))
    return out


def remaining_kl(lm: LoadedModel, stats: TokenStats, tid: int, delta: torch.Tensor, *, max_positions: int = 2048) -> float:
    """KL(ᾱ' ‖ ᾱ) of the average distribution over all tokens but w (see :func:`remaining_kls`)."""
    return remaining_kls(lm, stats, [(tid, delta)], max_positions=max_positions)[0]

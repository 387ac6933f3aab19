"""Value calibration of a carried steer: make a value mean on the target what it meant on the source.

Two ways, chosen by :class:`steerport.transfer.TransferOptions` (``calibrate``):

* :func:`kl_calibration` (both full models): the factor f with κ_t(f·s₀) = κ_s(s₀), κ the mean
  KL from the unsteered model on neutral text (:func:`steerport.scoring.mean_kl`), solved by
  the one value-for-κ solver, :func:`steerport.metrics.find_value_for_kl`. Works for any kind.
* :func:`embed_calibration` (output embeddings only, LM-Steer): the factor that matches the RMS
  centred logit shift over the aligned vocabulary at proxy hidden states.

Both return a JSON-able dict with ``method`` and ``factor`` (recorded in the lineage); the
carried steer's ε₀ is multiplied by the factor.

Example::

    cal = kl_calibration(steer, carried, src_lm, tgt_lm, neutral("calib", limit=32), 1.0, 64)
    carried.epsilon *= cal["factor"]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from steerport.errors import SteerportError
from steerport.linmap import fit_linear
from steerport.metrics import find_value_for_kl
from steerport.models import LoadedModel
from steerport.steer import Steer


def require_finite(what: str, *tensors: torch.Tensor) -> None:
    """A one-line error when any of ``tensors`` holds NaN or ±inf (a fit on non-finite numbers)."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise SteerportError(f"{what} has NaN or infinite entries; the model's weights or hidden states are not "
                             "finite numbers (try --dtype float32)")


def rms_logit_shift(P: torch.Tensor, A: torch.Tensor, X: torch.Tensor, B: torch.Tensor) -> float:
    """RMS over proxy hidden states p (rows of P) and tokens (rows of X, centred) of (pᵀA)(Bᵀx).

    ‖(P A)(X̃ B)ᵀ‖²_F = trace[(PA)ᵀ(PA) · (X̃B)ᵀ(X̃B)] with r x r matrices only; never n x n.
    """
    PA = P.double() @ A.double()  # (m, r)
    XB = X.double() @ B.double()  # (n, r)
    XB = XB - XB.mean(0)  # a shift shared by all tokens does not change the distribution
    sq = torch.trace((PA.T @ PA) @ (XB.T @ XB))
    return math.sqrt(max(float(sq), 0.0) / (len(P) * len(X)))


def calibration_rows(n_pairs: int, max_pairs: int = 16384, seed: int = 0) -> tuple[torch.Tensor, torch.Generator]:
    """The aligned pairs :func:`embed_calibration` uses (a random subset of at most ``max_pairs``
    of ``n_pairs``: plenty), and the generator it goes on drawing from."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_pairs, generator=g)[:max_pairs], g


PROXY_MAP_FORMAT = "steerport.proxy-map"


def proxy_map(X_s: torch.Tensor, X_t: torch.Tensor) -> torch.Tensor:
    """T (d_t x d_s) = X_t⁺ X_s, float32: the least-squares solution of X_s ≈ X_t T (rows (n, d_s), (n, d_t))."""
    T, _ = fit_linear(X_t, X_s, "lstsq")
    require_finite("the embed calibration's proxy map", T)
    return T


def cached_proxy_map(X_s: torch.Tensor, X_t: torch.Tensor, key: str) -> torch.Tensor:
    """:func:`proxy_map`, kept in ``STEERPORT_HOME/calibration/<key>.safetensors``.

    T depends only on the two models and the sampled pairs, not on the steer, so ``key`` must name
    exactly those (both fingerprints and a digest of the sampled token ids). A missing, unreadable or
    ill-shaped file is recomputed; an unwritable cache only costs time. The value is stored exactly,
    so a cached T gives the same calibration as a fresh one.
    """
    from steerport.catalog import steerport_home
    from steerport.fileio import read_json_safetensors, write_json_safetensors

    path = steerport_home() / "calibration" / f"{key}.safetensors"
    want = (X_t.shape[1], X_s.shape[1])
    if path.is_file():
        try:
            _, tensors = read_json_safetensors(path, PROXY_MAP_FORMAT, "a cached proxy map")
            T = tensors.get("T")
            if T is not None and tuple(T.shape) == want and T.dtype == torch.float32 and bool(torch.isfinite(T).all()):
                return T
        except SteerportError:
            pass
    T = proxy_map(X_s, X_t)
    try:
        write_json_safetensors(path, {"T": T}, PROXY_MAP_FORMAT, {"key": key, "n_pairs": len(X_s)})
    except OSError:
        pass
    return T


def embed_calibration(steer: Steer, factors: dict[str, torch.Tensor], X_s: torch.Tensor, X_t: torch.Tensor,
                      max_proxies: int = 4096, max_pairs: int = 16384, seed: int = 0, *,
                      sampled_from: int | None = None, T: torch.Tensor | None = None) -> dict[str, Any]:
    """Factor f for ε₀ so the target's RMS logit shift equals the source's (see module doc).

    X_s, X_t: aligned output-embedding rows (n, d_s), (n, d_t); or, with ``sampled_from`` = n,
    only the rows ``calibration_rows(n, max_pairs, seed)[0]`` of them (what an embeddings-only
    transfer reads from disk) — the same result. Proxy source hidden states p_s are unit aligned
    source rows; their target partners p_t = T p_s solve X_t p_t ≈ X_s p_s in least squares (the
    same logits on shared tokens), T = X_t⁺ X_s (d_t x d_s) — fitted here, independent of the map
    used to carry the steer, so a mis-scaled map is corrected. ``T`` given (from
    :func:`cached_proxy_map` of the same sampled rows) skips fitting it.
    """
    rows, g = calibration_rows(len(X_s) if sampled_from is None else sampled_from, max_pairs, seed)
    if sampled_from is None:
        X_s, X_t = X_s[rows], X_t[rows]
    elif not len(X_s) == len(X_t) == len(rows):
        raise SteerportError(f"embed calibration: got {len(X_s)} and {len(X_t)} rows, expected the {len(rows)} "
                             f"sampled from {sampled_from} pairs")
    idx = torch.randperm(len(X_s), generator=g)[:max_proxies]
    P_s = X_s[idx] / X_s[idx].norm(dim=1, keepdim=True).clamp_min(1e-12)  # (m, d_s)
    if T is None:
        T = proxy_map(X_s, X_t)  # (d_t, d_s): X_s ≈ X_t T
    elif tuple(T.shape) != (X_t.shape[1], X_s.shape[1]):
        raise SteerportError(f"embed calibration: proxy map is {tuple(T.shape)}, expected {(X_t.shape[1], X_s.shape[1])}")
    P_t = P_s @ T.T  # (m, d_t)
    rms_s = rms_logit_shift(P_s, steer.A, X_s, steer.B)
    rms_t = rms_logit_shift(P_t, factors["A"], X_t, factors["B"])
    if rms_t <= 0 or not math.isfinite(rms_t):
        raise SteerportError("transferred steer has no effect on the target's logits; cannot calibrate")
    return {"method": "embed", "factor": rms_s / rms_t, "rms_logit_shift_src": rms_s,
            "rms_logit_shift_tgt_uncalibrated": rms_t, "n_proxy_states": len(P_s), "n_pairs": len(X_s)}


def kl_calibration(steer_s: Steer, steer_t: Steer, src_lm: LoadedModel, tgt_lm: LoadedModel,
                   texts: Sequence[str], value: float, max_tokens: int, *, rel_tol: float = 0.02,
                   max_evals: int = 12, force: bool = False, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Factor f with κ_t(f·value) = κ_s(value), κ = mean KL from the unsteered model on ``texts``.

    The target value comes from :func:`steerport.metrics.find_value_for_kl` started at ``value``
    (an exact transfer stops at the first evaluation, f = 1). ``force`` is the caller's waiver
    of the source-fingerprint check, passed on to the source's scoring.
    """
    from steerport.scoring import mean_kl

    k_s = mean_kl(src_lm, texts, [(steer_s, value)], max_tokens=max_tokens, force=force)
    if not k_s > 0:
        raise SteerportError("the steer does not change the source's outputs at the reference value; cannot calibrate")

    def kl_at(s: float) -> float:
        k = mean_kl(tgt_lm, texts, [(steer_t, s)], max_tokens=max_tokens)
        log(f"  calibration: value {s:.4g} -> κ_tgt {k:.4g} (κ_src {k_s:.4g})")
        if s == value and k <= 0:
            raise SteerportError("transferred steer does not change the target's outputs; cannot calibrate")
        return k

    found = find_value_for_kl(kl_at, k_s, start=value, rel_tol=rel_tol, max_evals=max_evals)
    trace = [{"factor": s / value, "kappa_tgt": k} for s, k in found.history]
    converged = abs(found.kl - k_s) <= rel_tol * k_s  # else the closest value within max_evals evaluations
    return {"method": "kl", "factor": found.value / value, "reference_value": value, "kappa_src": k_s,
            "kappa_tgt": found.kl, "converged": converged, "n_texts": len(texts), "max_tokens": max_tokens,
            "iterations": trace}



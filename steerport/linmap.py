"""Least-squares linear maps: the one fit every map in steerport uses.

Vocabulary maps between output embeddings (:mod:`steerport.mapping`), hidden-state maps between
two models' final hidden states (LM-Steer transfer) and residual-stream maps (ActAdd transfer)
are all the same problem: rows X (n, p) and Y (n, q) of paired vectors, find M (p, q) with::

    minimise  Σ_i w_i ‖(X_i − μ_x) M − (Y_i − μ_y)‖²        (μ = 0 unless centred)

solved in closed form from the Gram products XᵀWX, XᵀWY in float64 (``lstsq``: Cholesky, or the
minimum-norm solution when X is rank deficient; ``ridge``: λ relative to the mean Gram
diagonal; ``procrustes``: a semi-orthogonal M times the best global scale). Quality is R²,
mean cosine and nearest-neighbour retrieval accuracy on held-out rows (a seeded random split).

Example::

    fit = fit_map(Xs, Xt, method="ridge", ridge=1e-3, center=True, holdout=0.2)
    pred = fit.predict(Xs_new)              # (m, q)
    fit.heldout["r2"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

METHODS = ("lstsq", "ridge", "procrustes")


def gram(X: torch.Tensor, Y: torch.Tensor, weights: torch.Tensor | None = None,
         chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """XᵀWX (p, p) and XᵀWY (p, q) in float64, accumulated over row blocks (bounded memory)."""
    p, q = X.shape[1], Y.shape[1]
    XtX = torch.zeros(p, p, dtype=torch.float64)
    XtY = torch.zeros(p, q, dtype=torch.float64)
    for i in range(0, len(X), chunk):
        x, y = X[i : i + chunk].double(), Y[i : i + chunk].double()
        if weights is not None:
            sw = weights[i : i + chunk].double().sqrt()[:, None]
            x, y = x * sw, y * sw
        XtX += x.T @ x
        XtY += x.T @ y
    return XtX, XtY


def solve_map(XtX: torch.Tensor, XtY: torch.Tensor, method: str = "lstsq",
              ridge: float = 1e-2) -> tuple[torch.Tensor, dict[str, float]]:
    """The map M (p x q) from the Gram products; see :func:`fit_linear`."""
    info: dict[str, float] = {}
    if method == "procrustes":  # max trace(Mᵀ XᵀY) over semi-orthogonal M, then the best scale
        U, S, Vh = torch.linalg.svd(XtY, full_matrices=False)  # U (p,k), Vh (k,q)
        scale = float(S.sum() / XtX.trace())
        info["scale"] = scale
        return (scale * (U @ Vh)).float(), info
    if method == "ridge":
        lam = ridge * float(XtX.diagonal().mean())
        info["lambda"] = lam
        M = torch.linalg.solve(XtX + lam * torch.eye(XtX.shape[0], dtype=XtX.dtype), XtY)
    else:  # lstsq: Cholesky when X has full column rank, else the minimum-norm (pseudo-inverse) solution
        L, bad = torch.linalg.cholesky_ex(XtX)
        diag = L.diagonal()
        if int(bad) == 0 and float((diag.min() / diag.max()) ** 2) > 1e-12:  # well enough conditioned
            M = torch.cholesky_solve(XtY, L)
        else:
            lam, V = torch.linalg.eigh(XtX)  # XtX = V diag(λ) Vᵀ, λ ≥ 0
            keep = lam > lam.max() * XtX.shape[0] * torch.finfo(XtX.dtype).eps
            M = V[:, keep] @ ((V[:, keep].T @ XtY) / lam[keep, None])
            info["rank"] = int(keep.sum())
    return M.float(), info


def fit_linear(X: torch.Tensor, Y: torch.Tensor, method: str = "lstsq", *, ridge: float = 1e-2,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """M (p x q) minimising Σ_i w_i ||X_i M − Y_i||²; X: (n, p), Y: (n, q). Float64 inside.

    Returns M (float32) and fit facts (Procrustes scale, ridge λ). Cost: O(n p (p + q)) for the
    Gram products plus O(p³) for the solve.
    """
    XtX, XtY = gram(X, Y, weights)
    return solve_map(XtX, XtY, method, ridge)


def map_quality(pred: torch.Tensor, Y: torch.Tensor, candidates: torch.Tensor | None = None,
                answer: torch.Tensor | None = None, chunk: int = 2048) -> dict[str, float]:
    """R² (pooled over all coordinates), mean cosine, and top-1 retrieval accuracy.

    pred, Y: (m, q). Retrieval: is row ``answer[i]`` of ``candidates`` (N, q) the nearest
    (by cosine) to ``pred[i]``? Defaults: candidates = Y (the m evaluated rows, so on held-out
    pairs: among the held-out rows), answer = arange(m).
    """
    ss_res = float(((Y - pred) ** 2).sum())
    ss_tot = float(((Y - Y.mean(0)) ** 2).sum())
    cos = torch.nn.functional.cosine_similarity(pred, Y, dim=1)
    cand = Y if candidates is None else candidates
    ans = torch.arange(len(Y)) if answer is None else answer
    cand_n = cand / cand.norm(dim=1, keepdim=True).clamp_min(1e-12)
    hits = 0
    for i in range(0, len(pred), chunk):
        q = pred[i : i + chunk]
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        hits += int(((q @ cand_n.T).argmax(1) == ans[i : i + chunk]).sum())
    return {"r2": 1 - ss_res / max(ss_tot, 1e-30), "cosine": float(cos.mean()),
            "nn_acc": hits / max(len(pred), 1), "n": len(pred)}


def split_pairs(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (train, held-out) index split of n pairs; held-out = round(holdout * n)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(holdout * n))
    return perm[k:].sort().values, perm[:k].sort().values


@dataclass
class LinearFit:
    """Y ≈ (X − μ_x) M + μ_y, with quality on the training rows (a subsample) and held-out rows."""

    M: torch.Tensor  # (p, q)
    mu_x: torch.Tensor | None = None  # (p,) when centred
    mu_y: torch.Tensor | None = None  # (q,)
    info: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """(m, p) -> (m, q)."""
        x = X.float() - self.mu_x if self.mu_x is not None else X.float()
        y = x @ self.M
        return y + self.mu_y if self.mu_y is not None else y


def _rounded(q: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()}


def fit_map(X: torch.Tensor, Y: torch.Tensor, *, method: str = "lstsq", ridge: float = 1e-2, center: bool = False,
            weights: torch.Tensor | None = None, holdout: float = 0.0, seed: int = 0,
            train_rows: torch.Tensor | None = None, held_rows: torch.Tensor | None = None,
            diagnostic_rows: int | None = 5000, refit_on_all: bool = False) -> LinearFit:
    """Fit Y ≈ (X − μ_x) M + μ_y on a seeded random split and measure it on the held-out rows.

    ``train_rows``/``held_rows`` give the split explicitly (else ``split_pairs(n, holdout, seed)``).
    Training quality is measured on at most ``diagnostic_rows`` training rows (None: all).
    ``refit_on_all`` refits on every row after measuring (the held-out numbers describe the
    held-out fit; the returned M uses all the data).
    """
    n = X.shape[0]
    if train_rows is None or held_rows is None:
        train_rows, held_rows = split_pairs(n, holdout, seed)
    w = None if weights is None else weights[train_rows]
    Xtr, Ytr = X[train_rows].float(), Y[train_rows].float()
    mu_x: torch.Tensor | None = None
    mu_y: torch.Tensor | None = None
    if center:
        mu_x, mu_y = Xtr.mean(0), Ytr.mean(0)
        Xtr, Ytr = Xtr - mu_x, Ytr - mu_y
    M, info = fit_linear(Xtr, Ytr, method, ridge=ridge, weights=w)
    fit = LinearFit(M, mu_x, mu_y, info)
    sub = train_rows
    if diagnostic_rows is not None and len(sub) > diagnostic_rows:
        sub = sub[torch.randperm(len(sub), generator=torch.Generator().manual_seed(seed))[:diagnostic_rows]]
    fit.train = _rounded(map_quality(fit.predict(X[sub]), Y[sub].float()))
    if len(held_rows):
        fit.heldout = _rounded(map_quality(fit.predict(X[held_rows]), Y[held_rows].float()))
    if refit_on_all and len(held_rows):
        every = torch.arange(n)
        again = fit_map(X, Y, method=method, ridge=ridge, center=center, weights=weights, train_rows=every,
                        held_rows=every[:0], diagnostic_rows=0)
        fit.M, fit.mu_x, fit.mu_y, fit.info = again.M, again.mu_x, again.mu_y, again.info
    return fit

"""The anchor baseline: the original LM-Steer code's transfer map, kept to compare against.

From random starts, Adam fits X_s B_f ≈ X_t and X_t B_b ≈ X_s on the first shared tokens of the
two vocabularies (raw token strings, no alignment), then scales B_b's rows to unit length; the
steer is carried as A_t = N A_s, B_t = N B_s with N = B_b. It is an iterative fit on purpose (the
baseline's recipe, not a least-squares map) and is never calibrated.

Example::

    N, record = carry_anchor(load_embeddings("smollm2-135m"), load_embeddings("gemma3-270m"))
    N.shape  # (640, 576): d_t x d_s
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from steerport.calibration import require_finite
from steerport.embeddings import ModelEmbeddings
from steerport.errors import SteerportError
from steerport.vocab import raw_shared_tokens


def anchor_fit(X_s: torch.Tensor, X_t: torch.Tensor, *, steps: int = 10_000, lr: float = 1e-3,
               top_k: int = 4000, seed: int = 0, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """N = B_b (d_t x d_s) with unit rows, from Adam on the mean squared errors of both directions
    over the first ``top_k`` rows of X_s (n, d_s) and X_t (n, d_t)."""
    torch.manual_seed(seed)
    Xs, Xt = X_s[:top_k].float(), X_t[:top_k].float()
    B_f = torch.randn(Xs.shape[1], Xt.shape[1], device=Xs.device, requires_grad=True)  # on the pairs' device (cuda too)
    B_b = torch.randn(Xt.shape[1], Xs.shape[1], device=Xs.device, requires_grad=True)
    opt = torch.optim.Adam([B_f, B_b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (Xs @ B_f - Xt).pow(2).mean() + (Xt @ B_b - Xs).pow(2).mean()
        loss.backward()
        opt.step()
        if progress:
            progress(1)
    N = B_b.detach()
    require_finite("the anchor map", N)
    return N / N.norm(dim=1, keepdim=True)


def carry_anchor(src_e: ModelEmbeddings, tgt_e: ModelEmbeddings, *, steps: int = 10_000, lr: float = 1e-3,
                 top_k: int = 4000, log: Callable[[str], None] = lambda m: None,
                 progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The anchor map N (d_t x d_s) between two models' output embeddings, and its lineage record."""
    s_ids, t_ids = raw_shared_tokens(src_e.tokenizer, tgt_e.tokenizer)
    if len(s_ids) == 0:
        raise SteerportError(f"{src_e.spec} and {tgt_e.spec} share no token strings; the anchor recipe cannot run")
    log(f"anchor baseline: Adam {steps} steps on the first {min(top_k, len(s_ids))} of {len(s_ids)} raw shared tokens")
    N = anchor_fit(src_e.embeddings[s_ids], tgt_e.embeddings[t_ids], steps=steps, lr=lr, top_k=top_k, progress=progress)
    return N, {"raw_shared_tokens": len(s_ids), "top_k": top_k, "steps": steps, "lr": lr, "optimizer": "Adam",
               "init": "randn, seed 0", "rows": "unit-normalized", "form": "W_t = N W_s Nᵀ (paper form with H = Nᵀ)"}

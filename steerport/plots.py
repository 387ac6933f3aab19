"""Pictures (PNG) of token-probability analyses, drawn with matplotlib's object API.

Each function builds its own :class:`matplotlib.figure.Figure` (no pyplot state, no backend
switch) and writes the PNG bytes atomically.

Example::

    plot_pca(lm.output_embeddings, stats.log_alpha, "pca.png", title="smollm2-135m")
    plot_prune(prune_curve(lm, enc, stats, prompts), "prune.png")
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

from steerport.fileio import atomic_write_bytes


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> None:
    """Lay out ``fig`` and write it as a PNG at ``path`` (atomically; parent folders created)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def plot_pca(E: torch.Tensor, log_alpha: torch.Tensor, path: str | os.PathLike, *, title: str = "",
             max_points: int = 30000) -> None:
    """PCA (2 components) of the output embeddings E (V, d), coloured by the rank percentile of α (V,)."""
    X = E.detach().float().cpu()
    X = X - X.mean(0)
    sample = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:20000]
    _, _, Vt = torch.linalg.svd(X[sample], full_matrices=False)
    P = X @ Vt[:2].T  # (V, 2)
    rank = torch.argsort(torch.argsort(log_alpha)).float() / (len(log_alpha) - 1) * 100  # 100 = most probable
    idx = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(1))[:max_points]
    idx = idx[torch.argsort(rank[idx])]  # draw frequent tokens on top
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    sc = ax.scatter(P[idx, 0], P[idx, 1], c=rank[idx], s=2, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="rank percentile of average probability")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "output embeddings")
    save_png(fig, path)


def plot_prune(rows: Sequence[dict], path: str | os.PathLike, *, title: str = "",
               baseline: Sequence[dict] | None = None) -> None:
    """KL of the average distribution and generation similarity against the fraction of dims
    removed (rows from :func:`steerport.tokenprune.prune_curve`); ``baseline``: the random ranking."""
    f = [r["fraction"] for r in rows]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(f, [r["kl_avg"] for r in rows], "o-", label="KL of average distribution")
    ax.plot(f, [r["kl_pos"] for r in rows], "s-", label="mean per-position KL")
    if baseline:
        ax.plot([r["fraction"] for r in baseline], [r["kl_avg"] for r in baseline], "o--", color="gray",
                label="KL of average distribution (random dims)")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of output-embedding dims removed (least important first)")
    ax.set_ylabel("KL (nats)")
    ax2 = ax.twinx()
    ax2.plot(f, [r["gen_sim"] for r in rows], "^-", color="tab:red", label="generation similarity")
    ax2.set_ylabel("generation similarity")
    ax2.set_ylim(0, 1.05)
    lines = [*ax.get_lines(), *ax2.get_lines()]
    ax.legend(lines, [str(ln.get_label()) for ln in lines], loc="center right", fontsize=7)
    ax.set_title(title or "dimension removal")
    save_png(fig, path)

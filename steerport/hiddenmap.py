"""The hidden-state map between two models: h_s ≈ K h_t on final hidden states.

Both models run over the same texts; the rows are the LM-head inputs at the positions where the
two tokenizations end on the same character (:func:`steerport.pairing.paired_states`; position 0
never pairs), and K comes from the one least-squares fit of :func:`steerport.linmap.fit_map`. The
``hidden`` transfer form carries a steer with it (A_t = Kᵀ A_s); the ``refined`` form starts there.

Example::

    hm = fit_hidden_map(load_model("smollm2-135m"), load_model("gemma3-270m"), neutral("fit"))
    hm.K.shape  # (576, 640): d_s x d_t
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerport.calibration import require_finite
from steerport.linmap import fit_map
from steerport.models import LoadedModel
from steerport.pairing import paired_states


@dataclass
class HiddenMap:
    """K (d_s x d_t) with h_s ≈ K h_t on final hidden states at character-aligned positions."""

    K: torch.Tensor
    diagnostics: dict[str, Any]


def fit_hidden_map(src_lm: LoadedModel, tgt_lm: LoadedModel, texts: Sequence[str], *, max_tokens: int = 128,
                   ridge: float = 0.0, holdout: float = 0.1, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> HiddenMap:
    """Run both models on the same texts, pair positions whose tokenizations end at the same
    character, and fit h_s ≈ K h_t by least squares (ridge relative, 0 = none)."""
    t0 = time.perf_counter()
    d_t = tgt_lm.hidden_size
    ((Ys, Xt),) = paired_states(src_lm, tgt_lm, texts, ["head"], ["head"], max_tokens=max_tokens,
                                min_pairs=d_t + 1, progress=progress)  # (n, d_s), (n, d_t)
    require_finite("a hidden state of the source or target", Ys, Xt)
    fit = fit_map(Xt, Ys, method="ridge" if ridge > 0 else "lstsq", ridge=ridge, holdout=holdout, seed=seed)
    require_finite("the hidden-state map", fit.M)  # M: (d_t, d_s) = Kᵀ
    diag: dict[str, Any] = {"n_positions": len(Ys), "n_texts": len(texts), "max_tokens": max_tokens, "ridge": ridge,
                            "train": fit.train}
    if fit.heldout:
        diag["heldout"] = fit.heldout
    diag["seconds"] = round(time.perf_counter() - t0, 2)
    return HiddenMap(K=fit.M.T.contiguous(), diagnostics=diag)

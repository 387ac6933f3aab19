"""The refinement's data, kept per model pair so that only the first steer carried pays for it.

:func:`steerport.refine.prepare_refine` runs both models over the neutral text and builds the
fit's problem (paired hidden states, the shared tokens each position weighs, the hidden-state map
K). None of it depends on the steer, so :func:`cached_prepare_refine` stores it under
``STEERPORT_HOME/refine/<key>.safetensors``, keyed by everything it does depend on
(:func:`data_key`: both models' weights, the aligned vocabulary, the texts, the shaping options).

Example::

    data = cached_prepare_refine(src_lm, tgt_lm, al.src_ids, al.tgt_ids, neutral("fit"))
    carry = refined_carry(steer, H, data)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from steerport.errors import SteerportError
from steerport.fileio import read_json_safetensors, write_json_safetensors
from steerport.models import LoadedModel
from steerport.refine import RefineData, RefineOptions, ShiftProblem, prepare_refine

DATA_FORMAT = "steerport.refine-data"
_PROBLEM_TENSORS = ("h_s", "h_t", "ids", "w", "cen_s", "cen_t", "slope_s", "slope_t", "pairs")


def weights_digest(lm: LoadedModel) -> str:
    """A short digest of a model's weights: each parameter's name, shape, dtype and first 16 values
    (an offloaded parameter: name and shape). Two checkpoints that share output embeddings (the same
    :attr:`LoadedModel.fingerprint`) but not their bodies get different digests."""
    h = hashlib.sha256()
    for name, p in lm.model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        if p.device.type != "meta":
            h.update(p.detach().reshape(-1)[:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def data_key(src_lm: LoadedModel, tgt_lm: LoadedModel, src_ids: torch.Tensor, tgt_ids: torch.Tensor,
             texts: Sequence[str], max_tokens: int, ridge: float, opts: RefineOptions) -> str:
    """Everything :func:`prepare_refine`'s result depends on, as a digest: both models' weights, the
    aligned vocabulary, the texts and the options that shape the data (not the fit's rounds)."""
    h = hashlib.sha256()
    for lm in (src_lm, tgt_lm):
        h.update(f"{lm.fingerprint}:{weights_digest(lm)}:{lm.dtype}:{lm.device.type}|".encode())
    h.update(src_ids.to(torch.int64).numpy().tobytes() + tgt_ids.to(torch.int64).numpy().tobytes())
    h.update(json.dumps([list(texts), max_tokens, ridge, opts.top_k, opts.weight, opts.holdout, opts.max_positions,
                         opts.seed]).encode())
    return h.hexdigest()[:24]


def save_refine_data(path: Path, data: RefineData) -> None:
    """Write ``data`` (without the embedding rows, which the models give back) as safetensors, atomically."""
    tensors = {"K": data.K, "fit_idx": data.fit_idx, "held_idx": data.held_idx,
               **{f"problem.{k}": getattr(data.problem, k) for k in _PROBLEM_TENSORS}}
    write_json_safetensors(path, tensors, DATA_FORMAT, {"hidden_map": data.hidden_map, "seconds": data.seconds})


def load_refine_data(path: Path, src_lm: LoadedModel, tgt_lm: LoadedModel, src_ids: torch.Tensor,
                     tgt_ids: torch.Tensor) -> RefineData:
    """Read what :func:`save_refine_data` wrote; the shared tokens' embedding rows come from the models."""
    doc, t = read_json_safetensors(path, DATA_FORMAT, "refinement data")
    parts = {k: t[f"problem.{k}"] for k in _PROBLEM_TENSORS}
    E_s, E_t = src_lm.output_embeddings.detach().float(), tgt_lm.output_embeddings.detach().float()
    pairs = parts["pairs"]
    prob = ShiftProblem(**parts, X_s=E_s[src_ids[pairs]], X_t=E_t[tgt_ids[pairs]])
    if (t["K"].shape != (src_lm.hidden_size, tgt_lm.hidden_size) or prob.h_s.shape[1] != src_lm.hidden_size
            or prob.h_t.shape[1] != tgt_lm.hidden_size):
        raise SteerportError(f"{path}: refinement data of other shapes")
    return RefineData(K=t["K"], hidden_map=doc["hidden_map"], problem=prob, fit_idx=t["fit_idx"],
                      held_idx=t["held_idx"], seconds=float(doc["seconds"]), cached=True)


def cached_prepare_refine(src_lm: LoadedModel, tgt_lm: LoadedModel, src_ids: torch.Tensor, tgt_ids: torch.Tensor,
                          texts: Sequence[str], *, max_tokens: int = 128, ridge: float = 0.0,
                          opts: RefineOptions = RefineOptions(), log: Callable[[str], None] = lambda m: None,
                          progress: Callable[[int], None] | None = None) -> RefineData:
    """:func:`prepare_refine`, kept in ``STEERPORT_HOME/refine/<key>.safetensors`` (:func:`data_key`).

    The data does not depend on the steer, so every later steer carried between the same two models
    skips both models' pass over the neutral text (about a minute on 2 CPU cores for the catalog's small models). A missing, unreadable or
    ill-shaped file is recomputed; an unwritable cache only costs time. The tensors are stored
    exactly, so a cached transfer gives the same steer as a fresh one.
    """
    from steerport.catalog import steerport_home

    texts = [t for t in texts if t.strip()]
    path = steerport_home() / "refine" / f"{data_key(src_lm, tgt_lm, src_ids, tgt_ids, texts, max_tokens, ridge, opts)}.safetensors"
    if path.is_file():
        try:
            data = load_refine_data(path, src_lm, tgt_lm, src_ids, tgt_ids)
            log(f"refinement data: reused {path}")
            return data
        except (SteerportError, KeyError, IndexError, TypeError, ValueError, RuntimeError):
            log(f"refinement data: {path} is unreadable; recomputing")
    data = prepare_refine(src_lm, tgt_lm, src_ids, tgt_ids, texts, max_tokens=max_tokens, ridge=ridge, opts=opts,
                          log=log, progress=progress)
    try:
        save_refine_data(path, data)
    except OSError:
        pass
    return data

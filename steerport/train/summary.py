"""What a finished fit measured on the held-out texts (stored in the steer's metadata).

All numbers use the exact head. The steered versions (at +1, at −1, and with the domain
component) share one head pass (:meth:`Fitter.exact_losses`); with labels of ±1 the loss of
each text at its label is the +1 or the −1 version's, so it costs nothing more; the unsteered
loss comes free from the top-k statistics of the body pass when the run has them.

Example::

    results = summarize(fitter, held_idx, n_train_texts)
    results["heldout_loss_steered"], results["separation"], results["heldout_auc"]
"""

from __future__ import annotations

from typing import Any

import torch

from steerport.metrics import roc_auc, separation
from steerport.train.fitter import Fitter


@torch.no_grad()
def summarize(fitter: Fitter, held_idx: torch.Tensor, n_train_texts: int, data: Any = None) -> dict[str, Any]:
    """Held-out loss without/with the steer, separation and steer-as-classifier AUC (value 1).

    ``held_idx``: the cache positions of the held-out texts, whose text ids are
    ``n_train_texts ..`` (the last ones of ``fitter.labels``). ``data`` is not read (kept so
    older callers that pass the dataset still work).
    """
    if not len(held_idx):
        return {"note": "no held-out texts (held-out fraction 0): nothing measured"}
    s = fitter.labels[fitter.cache.text_id[held_idx].long()]  # (n,) each position's steer value
    signed = bool(torch.all(s.abs() == 1))  # every value ±1: the steered loss is the +1 or −1 version's
    versions: list[tuple[float | None, bool]] = [(1.0, False), (-1.0, False)] + ([] if signed else [(None, False)])
    if fitter.config.domain:
        versions.append((None, True))
    if fitter.stats is None:
        versions.append((0.0, False))
    losses = fitter.exact_losses(held_idx, versions).double()  # (versions, n)
    base = losses[-1] if fitter.stats is None else fitter.stats.base_loss(held_idx).double()
    steered = torch.where(s > 0, losses[0], losses[1]) if signed else losses[2]
    out: dict[str, Any] = {
        "heldout_loss_unsteered": float(base.mean()),
        "heldout_loss_steered": float(steered.mean()),
    }
    if fitter.config.domain:
        out["heldout_loss_steered_with_domain"] = float(losses[versions.index((None, True))].mean())
    held_texts = torch.arange(n_train_texts, len(fitter.labels))
    lp0 = fitter.text_means(held_idx, -base)[held_texts]  # (n_held,) mean log-likelihood per text
    lpp = fitter.text_means(held_idx, -losses[0])[held_texts]
    lpn = fitter.text_means(held_idx, -losses[1])[held_texts]
    y = fitter.labels[held_texts]
    pos, neg = y > 0, y < 0
    if pos.any() and neg.any():
        out["separation"] = separation(lpp[pos], lp0[pos], lpp[neg], lp0[neg])
        out["heldout_auc"] = roc_auc(lpp - lpn, y)  # the steer as a classifier: log p(+1) − log p(−1)
    out["heldout_texts"] = len(held_texts)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}

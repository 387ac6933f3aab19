"""LM-Steer training at close to the cost of one forward pass.

The model body is frozen, so its output does not change while the steer learns. We run it
**once** over the training (and held-out) tokens and cache the final hidden states ``h``
(the LM head's input) with their next-token ids; the fit then touches only the LM head::

    u   = s · ε₀ · (Aᵀ h)                    h: (N, d) cached   A, B: (d, r)   s: (N,) text label
    z   = E h + (E B) u (+ bias)             E: (V, d)          z: (N, V) in vocabulary chunks
    L   = mean_n [ logsumexp(z_n) − z_n[y_n] ]

which is exactly the model's loss with the hook ``h ← h + s·ε₀·B(Aᵀh)`` (steerport.hooks).

Modules, one job each:

* :mod:`~steerport.train.config` — :class:`TrainConfig`, the settings and their checks;
* :mod:`~steerport.train.headloss` — the exact chunked head loss :func:`head_token_loss`;
* :mod:`~steerport.train.topk` — the default ``head="topk"`` approximation (:class:`TopKStats`, filled during the body pass);
* :mod:`~steerport.train.fitter` — :class:`Fitter`, Adam on the factors over the cache;
* :mod:`~steerport.train.checkpoint` — the work folder: keys, checkpoints, resume, stop signals;
* :mod:`~steerport.train.summary` — held-out loss, separation and AUC of the result;
* :mod:`~steerport.train.run` — :func:`train`, the whole run.

The cache itself is :func:`steerport.capture.cache_hidden` (``predicted_only=True``).

The optional always-on *domain* component (the anchor code's ``dummy_steer``) adds
``ε₀·B_d(A_dᵀh)`` to every text whatever its label; it absorbs what positive and negative
texts share (their domain), is stored as ``domain.A``/``domain.B`` and is applied by
``steerport.hooks.steered`` only with ``include_domain=True``.

Example::

    lm = load_model("smollm2-135m")
    data = load_data(DataOptions(files=["sst2"]))
    result = train(lm, data, TrainConfig(rank=8), workdir="pos.st.work")
    result.steer.save("pos.st")
"""

from steerport.capture import HiddenCache
from steerport.train.checkpoint import StopFlag, remove_workdir
from steerport.train.config import TrainConfig
from steerport.train.fitter import Fitter, batch_for_step, epoch_order
from steerport.train.headloss import check_head_matches, head_token_loss
from steerport.train.run import TrainResult, train
from steerport.train.summary import summarize
from steerport.train.topk import TopKStats, TopKWriter, topk_stats, topk_token_loss

__all__ = [
    "Fitter",
    "HiddenCache",
    "StopFlag",
    "TopKStats",
    "TopKWriter",
    "TrainConfig",
    "TrainResult",
    "batch_for_step",
    "check_head_matches",
    "epoch_order",
    "head_token_loss",
    "remove_workdir",
    "summarize",
    "topk_stats",
    "topk_token_loss",
    "train",
]

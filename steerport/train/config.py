"""The settings of one training run, checked before any work starts.

Example::

    config = TrainConfig(rank=8, lr=1e-2, steps=200)
    config.check()          # a SteerportError naming the first bad setting
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from steerport.errors import SteerportError
from steerport.models import parse_dtype

INT_AT_LEAST_ONE = ("rank", "tokens_per_batch", "max_tokens", "patience", "cache_tokens_per_batch", "checkpoint_every",
                    "eval_tokens")
FLOAT_SETTINGS = ("epsilon", "init_scale", "lr", "epochs", "weight_decay", "min_improvement")


@dataclass
class TrainConfig:
    """Settings of one training run (all recorded in the steer's metadata)."""

    rank: int = 8
    epsilon: float = 1e-3  # base scale ε₀ stored in the file
    init_scale: float = 1e-2  # std of the random initial A, B (anchor: init_var)
    lr: float = 1e-2
    epochs: float = 8.0  # upper bound; early stopping usually ends sooner
    steps: int | None = None  # if given, overrides epochs
    tokens_per_batch: int = 512
    weight_decay: float = 0.0  # L2 on A, B (Adam's coupled weight decay, as the anchor's regularization)
    seed: int = 0
    domain: bool = False  # learn the always-on domain component too
    max_tokens: int = 128  # per text
    eval_every: int | None = None  # steps between held-out evaluations; None: so that they cost ~10 % of the fit
    eval_tokens: int = 2048  # held-out positions per evaluation (a fixed seeded subset); the summary uses all
    patience: int = 3  # evaluations without a real improvement before stopping
    min_improvement: float = 0.02  # an improvement counts if it is this share of the steer's gain so far
    #                                (held-out loss unsteered − best); smaller gains do not reset patience
    dtype: str = "auto"  # compute dtype of the body pass and the fit
    cache_dtype: str = "bfloat16"  # storage dtype of the cached hidden states
    cache_tokens_per_batch: int = 4096  # tokens per forward batch while caching (packed rows, or padded ones)
    checkpoint_every: int = 25  # steps between checkpoints (when a workdir is given)
    head: str = "auto"  # "topk": candidates + tail statistics from the body pass (steerport.train.topk); "exact": full
    #                     softmax every step; "auto": topk, or exact for heads with a logit soft-cap
    topk: int = 64  # candidates per token kept by head="topk" (the target is always one of them)

    def check(self) -> None:
        """Refuse settings the run cannot use, with a one-line :class:`SteerportError`."""
        for name in INT_AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise SteerportError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        for name in ("epsilon", "lr", "init_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise SteerportError(f"{name} must be a positive number, got {v}")
        for name in FLOAT_SETTINGS:  # NaN slips through every comparison below, inf through most
            v = getattr(self, name)
            if not math.isfinite(v):
                raise SteerportError(f"{name.replace('_', ' ')} must be a finite number, got {v}")
        if self.steps is None and not (self.epochs > 0):
            raise SteerportError(f"epochs must be positive, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise SteerportError(f"steps must be at least 1, got {self.steps}")
        if self.weight_decay < 0:
            raise SteerportError(f"weight decay must be >= 0, got {self.weight_decay}")
        parse_dtype(self.cache_dtype)
        if self.head not in ("auto", "exact", "topk"):
            raise SteerportError(f"head must be 'auto', 'exact' or 'topk', got {self.head!r}")
        if self.min_improvement < 0:
            raise SteerportError(f"min improvement must be >= 0, got {self.min_improvement}")
        if self.topk < 2:
            raise SteerportError(f"topk must be at least 2, got {self.topk}")

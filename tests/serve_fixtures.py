"""Shared pieces of the serve tests: steers of all three kinds on a tiny model, a live server."""

from __future__ import annotations

import torch

from steerport.actadd import make_actadd
from steerport.steer import Steer
from tests.tiny import random_steer_factors


def tiny_steers(lm) -> dict[str, Steer]:
    """One steer of each kind (and an all-positions ActAdd) for a tiny model."""
    made_for = {"spec": lm.spec, "fingerprint": lm.fingerprint}
    A, B = random_steer_factors(seed=1)
    A2, B2 = random_steer_factors(r=2, seed=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([5, 17, 40], dtype=torch.int64)
    delta = torch.randn(3, lm.hidden_size, generator=g) * 2.0
    return {
        "pos": Steer.lm_steer(A, B, epsilon=1.0, positive="positive sentiment", model=made_for),
        "calm": Steer.lm_steer(A2, B2, epsilon=0.5, positive="calm", model=made_for),
        "love": make_actadd(lm, [(" love", " hate")], layer=1, coeff=4.0, positions="front"),
        "wide": make_actadd(lm, [(" good", " bad")], layer=0, coeff=2.0, positions="all"),
        "tok": Steer("token-prob", {"token_ids": ids, "delta": delta}, epsilon=1.0, positive="tokens 5, 17, 40 up",
                     model=made_for),
    }

"""The anchor baseline (the original LM-Steer code's transfer map)."""

import math

import pytest
import torch

from steerport.anchor import anchor_fit, carry_anchor
from steerport.embeddings import ModelEmbeddings
from steerport.errors import SteerportError
from tests.tiny import tiny_model


def _planted(n=500, ds=8, dt=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    Xt = torch.randn(n, dt, generator=g)
    Xs = Xt @ (torch.randn(ds, dt, generator=g) / math.sqrt(dt)).T
    return Xs, Xt


def test_anchor_fit_reduces_loss_and_has_unit_rows():
    Xs, Xt = _planted()
    N = anchor_fit(Xs, Xt, steps=300, lr=1e-2, top_k=400)
    assert N.shape == (12, 8)
    assert torch.allclose(N.norm(dim=1), torch.ones(12), atol=1e-5)
    N0 = anchor_fit(Xs, Xt, steps=0, top_k=400)
    err = lambda M: float(((Xt[:400] @ (M / M.norm(dim=1, keepdim=True)) - Xs[:400]) ** 2).mean())
    assert err(N) < err(N0)


def test_carry_anchor_records_its_recipe_and_refuses_disjoint_vocabularies(monkeypatch):
    a, b = ModelEmbeddings.from_loaded(tiny_model("llama", seed=0)), ModelEmbeddings.from_loaded(tiny_model("qwen2", seed=1))
    N, record = carry_anchor(a, b, steps=5, top_k=50)
    assert N.shape == (b.hidden_size, a.hidden_size)
    assert record["steps"] == 5 and record["top_k"] == 50 and record["raw_shared_tokens"] > 0
    monkeypatch.setattr("steerport.anchor.raw_shared_tokens", lambda s, t: (torch.empty(0, dtype=torch.long),) * 2)
    with pytest.raises(SteerportError, match="share no token strings"):
        carry_anchor(a, b, steps=1)

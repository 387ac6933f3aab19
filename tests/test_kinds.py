"""The registry of steer kinds, and per-row steer values: a batch row at its own values must equal
the same row run alone at those values, for every kind and for mixed kinds."""

import pytest
import torch

from steerport import Steer, SteerportError, steered
from steerport.kinds import get_kind, kind_names
from tests.tiny import ARCHS, D, random_steer_factors, tiny_model

TEXT = ["The movie was wonderful and the food is good.", "The weather today is mild with a light breeze."]


def batch(lm):
    return lm.tokenizer(TEXT, return_tensors="pt", padding=True)


def logits(lm, enc):
    with torch.no_grad():
        return lm.model(**enc).logits


def make_steers(lm):
    fp = {"spec": lm.spec, "fingerprint": lm.fingerprint}
    A, B = random_steer_factors(r=3, seed=1)
    lm_s = Steer.lm_steer(A, B, epsilon=0.5, model=fp)
    g = torch.Generator().manual_seed(2)
    tp = Steer("token-prob", {"token_ids": torch.tensor([5, 17, 60]), "delta": torch.randn(3, D, generator=g)},
               epsilon=0.3, model=fp)
    front = Steer("actadd", {"vector": torch.randn(3, D, generator=g)}, epsilon=0.7, model=fp,
                  meta={"layer": 1, "positions": "front"})
    multi = Steer("actadd", {"vector": torch.randn(2, D, generator=g)}, epsilon=0.4, model=fp,
                  meta={"layers": [1, 2], "positions": "all"})
    return [lm_s, tp, front, multi]


def test_registry_knows_the_three_kinds():
    assert sorted(kind_names()) == ["actadd", "lm-steer", "token-prob"]
    assert get_kind("lm-steer").fold is not None and get_kind("actadd").fold is None
    with pytest.raises(SteerportError, match="unknown steer kind 'nope'"):
        get_kind("nope")
    with pytest.raises(SteerportError, match="cannot be exported as 'peft'"):
        get_kind("actadd").export("peft")


@pytest.mark.parametrize("arch", ARCHS)
def test_each_row_equals_the_row_alone(arch):
    lm = tiny_model(arch)
    enc = batch(lm)
    steers = make_steers(lm)
    rows = torch.tensor([[2.0, -1.0, 0.5, 1.5], [-3.0, 2.0, 0.0, -0.5]])  # (b, k)
    with steered(lm, [(s, 0.0) for s in steers], rows=rows):
        mixed = logits(lm, enc)
    for i in range(2):
        with steered(lm, [(s, float(v)) for s, v in zip(steers, rows[i])]):
            alone = logits(lm, enc)[i]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5)
    with steered(lm, [(s, 0.0) for s in steers]):
        unsteered = logits(lm, enc)
    assert not torch.allclose(mixed, unsteered, atol=1e-3)


def test_constant_rows_equal_plain_values():
    lm = tiny_model("llama")
    enc = batch(lm)
    steers = make_steers(lm)
    values = [1.5, -0.5, 2.0, 1.0]
    with steered(lm, list(zip(steers, values))):
        plain = logits(lm, enc)
    with steered(lm, [(s, 0.0) for s in steers], rows=torch.tensor([values, values])):
        per_row = logits(lm, enc)
    torch.testing.assert_close(per_row, plain, atol=1e-5, rtol=1e-5)


def test_bad_values_are_refused():
    lm = tiny_model("gpt2")
    s = make_steers(lm)[0]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(SteerportError, match="finite"):
            with steered(lm, [(s, bad)]):
                pass
    with pytest.raises(SteerportError, match=r"per-row values must be \(batch, 1\)"):
        with steered(lm, [(s, 1.0)], rows=torch.ones(2, 3)):
            pass
    with pytest.raises(SteerportError, match="finite"):
        with steered(lm, [(s, 1.0)], rows=torch.tensor([[float("nan")], [1.0]])):
            pass
    with pytest.raises(SteerportError, match="rows"):
        with steered(lm, [(s, 1.0)], rows=torch.ones(3, 1)):
            logits(lm, batch(lm))  # 2 rows in the batch, values for 3


def test_fingerprint_of_bf16_tensors():
    A, B = random_steer_factors()
    s32 = Steer.lm_steer(A, B, epsilon=1.0)
    s16 = Steer("lm-steer", {"A": A.bfloat16(), "B": B.bfloat16()}, 1.0)
    assert len(s16.fingerprint) == 16 and s16.fingerprint != s32.fingerprint
    assert Steer("lm-steer", {"A": A.bfloat16(), "B": B.bfloat16()}, 1.0).fingerprint == s16.fingerprint

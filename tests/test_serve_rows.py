"""Per-row steer values (as the server applies them) equal the hooks with one value, row by row,
for every steer kind."""

from __future__ import annotations

import pytest
import torch

from steerport.errors import SteerportError
from steerport.hooks import steered
from steerport.serve.rows import apply_rows
from tests.serve_fixtures import tiny_steers
from tests.tiny import tiny_model

PROMPTS = ["The movie was wonderful", "I hate", "What a waste of time, I hate it.", "The"]


def _batch(lm, prompts):
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")  # the shared tokenizer stays as is
    mask = enc["attention_mask"]
    return {"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_rows_match_hooks_for_every_kind(arch):
    lm = tiny_model(arch)
    steers = tiny_steers(lm)
    names = list(steers)
    values = torch.tensor([
        [3.0, 0.0, 1.0, 0.0, 0.0],
        [-2.0, 1.5, 0.0, 1.0, 2.0],
        [0.0, 0.0, -1.0, 0.0, -1.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ])
    batch = _batch(lm, PROMPTS)
    remove = apply_rows(lm, [steers[n] for n in names], values)
    try:
        got = lm.model(**batch).logits
    finally:
        remove()
    assert not lm.lm_head._forward_pre_hooks and not lm.lm_head._forward_hooks  # all hooks removed
    for i, prompt in enumerate(PROMPTS):
        one = _batch(lm, [prompt])
        pairs = [(steers[n], float(values[i, j])) for j, n in enumerate(names) if values[i, j] != 0]
        with steered(lm, pairs):
            want = lm.model(**one).logits[0]
        n = one["input_ids"].shape[1]
        torch.testing.assert_close(got[i, -n:], want, atol=2e-5, rtol=1e-5)


def test_zero_values_change_nothing_bitwise():
    lm = tiny_model("llama")
    steers = tiny_steers(lm)
    batch = _batch(lm, PROMPTS[:2])
    base = lm.model(**batch).logits
    vals = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    remove = apply_rows(lm, list(steers.values()), vals)
    try:
        got = lm.model(**batch).logits
    finally:
        remove()
    assert torch.equal(got[0], base[0])  # the unsteered row sees exact zeros
    assert not torch.allclose(got[1], base[1])


def test_rows_shape_is_checked():
    lm = tiny_model("llama")
    with pytest.raises(SteerportError, match="per-row values must be"):
        apply_rows(lm, list(tiny_steers(lm).values()), torch.ones(2, 5)[:, :3])

"""Merged checkpoints: folded heads give the hooked logits, and reload with plain transformers."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steerport import Steer, SteerportError, steered
from steerport.merge import merge_into_model, merge_to_dir, merged_head
from tests.tiny import ARCHS, D, random_steer_factors, tiny_model

TEXT = ["The movie was wonderful and the food is good.", "I hate it."]


def logits(lm, model=None):
    batch = lm.tokenizer(TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        return (model or lm.model)(**batch).logits


def lm_steer(lm, seed, eps=0.5, r=3):
    A, B = random_steer_factors(r=r, seed=seed)
    return Steer.lm_steer(A, B, epsilon=eps, positive="x", model={"spec": lm.spec, "fingerprint": lm.fingerprint})


def token_prob(lm, ids, seed=5, eps=0.7):
    g = torch.Generator().manual_seed(seed)
    return Steer("token-prob", {"token_ids": torch.tensor(ids, dtype=torch.int64), "delta": torch.randn(len(ids), D, generator=g)},
                 epsilon=eps, model={"spec": lm.spec, "fingerprint": lm.fingerprint})


def hidden(lm):
    """The LM-head input h for TEXT, (b, T, d)."""
    got = []
    remove = lm.lm_head.register_forward_pre_hook(lambda m, a: got.append(a[0].detach())).remove
    try:
        logits(lm)
    finally:
        remove()
    return got[-1]


VARIANTS = [(arch, None, False) for arch in ARCHS] + [
    ("llama", True, False), ("gpt2", False, False), ("qwen2", True, True), ("gpt_neox", None, True), ("gptj", None, False),
]


@pytest.mark.parametrize("arch,tied,bias", VARIANTS)
def test_merged_head_equals_hooked(arch, tied, bias):
    lm = tiny_model(arch, tied=tied, head_bias=bias)
    s1, s2 = lm_steer(lm, 1), lm_steer(lm, 2, r=2)
    with steered(lm, [(s1, 3.0), (s2, -2.0)]):
        hooked = logits(lm)
    base = logits(lm)
    inputs_before = lm.model.get_input_embeddings().weight.detach().clone()
    was_tied = lm.model.get_input_embeddings().weight is lm.lm_head.weight
    bias_before = None if lm.lm_head_bias is None else lm.lm_head_bias.detach().clone()
    merge_into_model(lm, [(s1, 3.0), (s2, -2.0)])
    merged = logits(lm)
    assert not torch.allclose(merged, base, atol=1e-3)
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-5)
    # the input embeddings are untouched (tied heads were untied), the bias kept
    assert torch.equal(lm.model.get_input_embeddings().weight, inputs_before)
    assert lm.model.get_input_embeddings().weight is not lm.lm_head.weight
    if was_tied:
        assert lm.model.config.tie_word_embeddings is False
    if bias_before is not None:
        assert torch.equal(lm.lm_head_bias, bias_before)


def test_merged_head_is_the_definition():
    """E' = E (I + Σ s ε W)ᵀ, written out with the d x d matrix."""
    lm = tiny_model("llama")
    s1, s2 = lm_steer(lm, 1), lm_steer(lm, 2)
    W = 3.0 * s1.epsilon * s1.A @ s1.B.T - 1.5 * s2.epsilon * s2.A @ s2.B.T
    expected = lm.output_embeddings.detach() @ (torch.eye(D) + W).T
    torch.testing.assert_close(merged_head(lm, [(s1, 3.0), (s2, -1.5)]), expected, atol=1e-5, rtol=1e-5)


def test_domain_component_follows_include_domain():
    lm = tiny_model("gpt2")
    A, B = random_steer_factors(seed=1)
    dA, dB = random_steer_factors(seed=9)
    s = Steer("lm-steer", {"A": A, "B": B, "domain.A": dA, "domain.B": dB}, epsilon=0.5)
    for include in (False, True):
        with steered(lm, [(s, 2.0)], include_domain=include):
            hooked = logits(lm)
        head = merged_head(lm, [(s, 2.0)], include_domain=include)
        model_logits = torch.nn.functional.linear(hidden(lm), head)
        torch.testing.assert_close(model_logits, hooked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_token_prob_fold(arch):
    lm = tiny_model(arch)
    ids = [5, 17, 17, 60]  # a repeated id adds up
    tp = token_prob(lm, ids)
    h = hidden(lm)  # (b, T, d)
    expected = logits(lm).clone()
    for k, tid in enumerate(ids):
        expected[..., tid] += 2.5 * tp.epsilon * (h @ tp.tensors["delta"][k])
    with steered(lm, [(tp, 2.5)]):  # the kind's hook must agree with the fold
        torch.testing.assert_close(logits(lm), expected, atol=1e-5, rtol=1e-5)
    merge_into_model(lm, [(tp, 2.5)])
    torch.testing.assert_close(logits(lm), expected, atol=1e-5, rtol=1e-5)


def test_lm_steer_and_token_prob_together():
    lm = tiny_model("qwen2")
    s, tp = lm_steer(lm, 1), token_prob(lm, [3, 4, 99])
    with steered(lm, [(s, 2.0)]):
        expected = logits(lm).clone()
        h = hidden(lm)  # the token-prob shift sees the LM-Steer-shifted h, as the hooks do
    with steered(lm, [(s, 2.0), (tp, -1.0)]):
        hooked = logits(lm)
    for k, tid in enumerate([3, 4, 99]):
        expected[..., tid] += -1.0 * tp.epsilon * (h @ tp.tensors["delta"][k])
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=1e-5)
    merge_into_model(lm, [(s, 2.0), (tp, -1.0)])
    torch.testing.assert_close(logits(lm), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,tied", [("gpt2", None), ("llama", False), ("gemma3_text", None), ("gptj", None), ("opt", None)])
def test_merged_dir_reloads_with_plain_transformers(tmp_path, arch, tied):
    lm = tiny_model(arch, tied=tied)
    s = lm_steer(lm, 1)
    with steered(lm, [(s, 4.0)]):
        hooked = logits(lm)
    inputs_before = lm.model.get_input_embeddings().weight.detach().clone()
    base_fp = lm.fingerprint
    path, diff = merge_to_dir(lm.spec, [(s, 4.0)], tmp_path / "merged", paths=["pos.st"], lm=lm)
    assert diff is not None and diff < 1e-4
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.get_vocab() == lm.tokenizer.get_vocab()
    torch.testing.assert_close(logits(lm, model), hooked, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.get_input_embeddings().weight, inputs_before)
    if arch == "gptj":  # GPT-J's head has a bias: kept through save and reload
        assert model.get_output_embeddings().bias is not None
    card = (path / "README.md").read_text()
    assert "pos.st" in card and base_fp in card and s.fingerprint in card and "| 4 |" in card
    record = json.loads(card.split("```json")[1].split("```")[0])
    assert record["steers"][0]["value"] == 4.0 and record["base"]["fingerprint"] == base_fp
    assert not list(tmp_path.glob(".merged*")), "no temporary directory left behind"


def test_refuses_bias_that_would_be_lost(tmp_path):
    lm = tiny_model("llama", head_bias=True)  # LlamaForCausalLM has no lm_head.bias slot
    with pytest.raises(SteerportError, match="bias"):
        merge_to_dir(lm.spec, [(lm_steer(lm, 1), 1.0)], tmp_path / "m", lm=lm)
    assert not (tmp_path / "m").exists()


def test_refuses_existing_directory(tmp_path):
    lm = tiny_model("gpt2")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    with pytest.raises(SteerportError, match="not empty"):
        merge_to_dir(lm.spec, [(lm_steer(lm, 1), 1.0)], tmp_path / "m", lm=lm)
    assert (tmp_path / "m" / "keep.txt").exists()


@pytest.mark.parametrize("positions,vector,match", [
    ("front", torch.ones(3, D), "first prompt positions"),
    ("all", torch.ones(D), "bias"),
])
def test_refuses_actadd(positions, vector, match):
    lm = tiny_model("gpt2")
    act = Steer("actadd", {"vector": vector}, meta={"layer": 1, "positions": positions})
    with pytest.raises(SteerportError, match=match):
        merge_into_model(lm, [(act, 2.0)])
    with pytest.raises(SteerportError, match="cannot be folded"):
        merge_into_model(lm, [(act, 2.0)])


def test_refuses_foreign_steer_and_empty_list():
    lm = tiny_model("gpt2")
    A, B = random_steer_factors()
    other = Steer.lm_steer(A, B, epsilon=1.0, model={"spec": "elsewhere", "fingerprint": "0123456789abcdef"})
    with pytest.raises(SteerportError, match="fingerprint"):
        merge_into_model(lm, [(other, 1.0)])
    merge_into_model(lm, [(other, 1.0)], force=True)
    with pytest.raises(SteerportError, match="nothing to merge"):
        merge_into_model(lm, [])
    with pytest.raises(SteerportError, match="vocabulary"):
        merge_into_model(tiny_model("gpt2"), [(Steer("token-prob", {"token_ids": torch.tensor([10**6]), "delta": torch.ones(1, D)}), 1.0)])


def test_refuses_multi_layer_actadd():
    lm = tiny_model("gpt2")
    act = Steer("actadd", {"vector": torch.ones(3, D)}, meta={"layers": [0, 1, 2], "positions": "all"})
    with pytest.raises(SteerportError, match=r"cannot be folded.*decoder layers 0, 1, 2 \(all positions\).*bias") as err:
        merge_into_model(lm, [(act, 2.0)])
    assert "\n" not in str(err.value)


def test_verification_above_the_tolerance_leaves_nothing(tmp_path):
    lm = tiny_model("gpt2")
    with pytest.raises(SteerportError, match="tolerance"):
        merge_to_dir(lm.spec, [(lm_steer(lm, 1), 1.0)], tmp_path / "m", lm=lm, tolerance=-1.0)
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir()), "no checkpoint, no temporary folder"
    lm = tiny_model("gpt2")
    path, diff = merge_to_dir(lm.spec, [(lm_steer(lm, 1), 1.0)], tmp_path / "m", lm=lm, tolerance=1e-3)
    assert path.is_dir() and diff < 1e-3


def test_save_merged_is_atomic(tmp_path, monkeypatch):
    from steerport.merge import save_merged

    lm = tiny_model("gpt2")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "old.txt").write_text("old")

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lm.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_merged(lm, tmp_path / "m", card="x", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and (tmp_path / "m" / "old.txt").read_text() == "old"


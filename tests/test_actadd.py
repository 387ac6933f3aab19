"""ActAdd steers: exact additions at the chosen layer and positions, layer lookup, transfer, files."""

import pytest
import torch

from steerport import Steer, SteerportError, generate, steered
from steerport.actadd import (
    compute_vector,
    decoder_layers,
    make_actadd,
    padded_pair,
    resolve_layer,
    transfer_actadd,
)
from steerport.align_positions import pair_by_end_offset, paired_positions, token_end_offsets
from steerport.scoring import mean_kl
from tests.tiny import ARCHS, CORPUS, D, random_steer_factors, tiny_model, tiny_tokenizer

TEXT = ["The movie was wonderful and the food is good.", "I hate it."]
LAYER_NAMES = {
    "gpt2": "transformer.h", "gptj": "transformer.h", "gpt_neox": "gpt_neox.layers", "llama": "model.layers",
    "qwen2": "model.layers", "gemma3_text": "model.layers", "opt": "model.decoder.layers",
}


def batch_of(lm, texts=TEXT, side="right"):
    tok = lm.tokenizer
    old, tok.padding_side = tok.padding_side, side
    try:
        return tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old


def layer_inputs(lm, layer, batch):
    """Residual stream entering ``layer`` in a full forward pass (captured after any steering hooks)."""
    got = []
    h = decoder_layers(lm.model)[layer].register_forward_pre_hook(
        lambda m, a, k: got.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            lm.model(**batch)
    finally:
        h.remove()
    return got[0]


def actadd_steer(lm, vector, layer=1, eps=2.0, positions="front"):
    return Steer("actadd", {"vector": vector}, epsilon=eps, model={"spec": lm.spec, "fingerprint": lm.fingerprint},
                 meta={"layer": layer, "n_layers": 2, "positions": positions, "pairs": [[" love", " hate"]]})


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_lookup_finds_the_decoder_blocks(arch):
    lm = tiny_model(arch)
    names = {id(m): n for n, m in lm.model.named_modules()}
    layers = decoder_layers(lm.model)
    assert names[id(layers)] == LAYER_NAMES[arch]
    assert resolve_layer(lm, 1) == 1 and resolve_layer(lm, -1) == 1
    assert resolve_layer(lm, 0.0) == 0 and resolve_layer(lm, "0.5") == 1 and resolve_layer(lm, 1.0) == 1
    for bad in (2, -3, 1.5, "x"):
        with pytest.raises(SteerportError):
            resolve_layer(lm, bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_vector_changes_nothing(arch):
    lm = tiny_model(arch)
    batch = batch_of(lm)
    with torch.no_grad():
        base = lm.model(**batch).logits
    for positions, shape in (("front", (5, D)), ("all", (D,))):
        with steered(lm, [(actadd_steer(lm, torch.zeros(shape), positions=positions), 9.0)]):
            with torch.no_grad():
                assert torch.equal(lm.model(**batch).logits, base)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_hook_adds_c_v_at_the_front_positions_of_each_row(arch, side):
    lm = tiny_model(arch)
    batch = batch_of(lm, side=side)
    v = torch.randn(3, D, generator=torch.Generator().manual_seed(3))
    s = actadd_steer(lm, v, layer=1, eps=2.0)
    before0, before1 = layer_inputs(lm, 0, batch), layer_inputs(lm, 1, batch)
    with steered(lm, [(s, 1.5)]):
        after0, after1 = layer_inputs(lm, 0, batch), layer_inputs(lm, 1, batch)
    torch.testing.assert_close(after0, before0, atol=0, rtol=0)  # earlier layer untouched
    expected = torch.zeros_like(before1)
    mask = batch["attention_mask"]
    for row in range(mask.shape[0]):
        start = int(mask[row].nonzero()[0])  # first real token (left padding)
        expected[row, start : start + 3] = 3.0 * v
    torch.testing.assert_close(after1 - before1, expected, atol=1e-5, rtol=0)


def test_all_positions_mode_adds_everywhere():
    lm = tiny_model("llama")
    batch = batch_of(lm)
    v = torch.randn(D, generator=torch.Generator().manual_seed(4))
    before = layer_inputs(lm, 1, batch)
    with steered(lm, [(actadd_steer(lm, v, positions="all"), -0.5)]):
        after = layer_inputs(lm, 1, batch)
    torch.testing.assert_close(after - before, (-1.0 * v).expand_as(before), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text"])
def test_cached_generation_equals_uncached_recomputation(arch):
    """With a KV cache the vector lands on positions 0..P-1 of the sequence once, as without a cache."""
    lm = tiny_model(arch)
    s = actadd_steer(lm, torch.randn(4, D, generator=torch.Generator().manual_seed(5)), eps=3.0)
    prompts = ["The movie was", "I love this place; the food"]
    got = generate(lm, prompts, [(s, 1.0)], max_new_tokens=6)
    for prompt, text in zip(prompts, got):
        ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with steered(lm, [(s, 1.0)]), torch.no_grad():
            for _ in range(6):
                nxt = lm.model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
        n = len(lm.tokenizer(prompt)["input_ids"])
        assert lm.tokenizer.decode(ids[0, n:], skip_special_tokens=True) == text
    assert got != generate(lm, prompts, [], max_new_tokens=6), "a strong vector should change greedy text"


def test_compute_vector_is_the_padded_difference_and_averages_pairs():
    lm = tiny_model("gpt2")
    a, b = padded_pair(lm.tokenizer, " love", " hate it")
    assert len(a) == len(b) and len(lm.tokenizer(" hate it")["input_ids"]) == len(b)
    h = layer_inputs(lm, 1, {"input_ids": torch.tensor([a, b])})
    v1 = compute_vector(lm, [(" love", " hate it")], 1)
    torch.testing.assert_close(v1, h[0] - h[1], atol=1e-5, rtol=0)
    v2 = compute_vector(lm, [(" good", " bad")], 1)
    both = compute_vector(lm, [(" love", " hate it"), (" good", " bad")], 1)
    P = max(len(v1), len(v2))
    pad = lambda v: torch.cat([v, torch.zeros(P - len(v), D)])  # noqa: E731
    torch.testing.assert_close(both, (pad(v1) + pad(v2)) / 2, atol=1e-5, rtol=0)
    last = compute_vector(lm, [(" love", " hate it")], 1, positions="all")
    torch.testing.assert_close(last, (h[0] - h[1])[-1], atol=1e-5, rtol=0)
    with pytest.raises(SteerportError):
        compute_vector(lm, [], 1)


def test_st_round_trip_keeps_vector_layer_and_effect(tmp_path):
    lm = tiny_model("qwen2")
    s = make_actadd(lm, [(" love", " hate")], layer=0.5, coeff=3.0)
    assert s.meta["layer"] == 1 and s.epsilon == 3.0 and s.meta["pairs"] == [[" love", " hate"]]
    back = Steer.load(s.save(tmp_path / "love.st"))
    assert back.kind == "actadd" and torch.equal(back.tensors["vector"], s.tensors["vector"])
    assert back.meta["layer"] == 1 and back.meta["positions"] == "front" and back.epsilon == 3.0
    batch = batch_of(lm)
    with steered(lm, [(s, 1.0)]), torch.no_grad():
        a = lm.model(**batch).logits
    with steered(lm, [(back, 1.0)]), torch.no_grad():
        b = lm.model(**batch).logits
    assert torch.equal(a, b)


def test_bad_layer_in_file_is_a_clear_error():
    lm = tiny_model("llama")
    s = actadd_steer(lm, torch.ones(2, D), layer=7)
    with pytest.raises(SteerportError, match="layer"):
        with steered(lm, [(s, 1.0)]):
            pass


def test_composes_with_an_lm_steer_steer():
    lm = tiny_model("gpt2")
    act = actadd_steer(lm, torch.randn(3, D, generator=torch.Generator().manual_seed(6)))
    A, B = random_steer_factors()
    lms = Steer.lm_steer(A, B, epsilon=0.5, model={"spec": lm.spec, "fingerprint": lm.fingerprint})
    batch = batch_of(lm)
    heads = []
    hook = lm.lm_head.register_forward_pre_hook(lambda m, a: heads.append(a[0].clone()))
    try:
        with steered(lm, [(act, 1.0)]), torch.no_grad():
            lm.model(**batch)
    finally:
        hook.remove()
    h = heads[0]  # final hidden state with the vector added
    expected = (h + 2.0 * 0.5 * (h @ A) @ B.T) @ lm.output_embeddings.T
    with steered(lm, [(act, 1.0), (lms, 2.0)]), torch.no_grad():
        both = lm.model(**batch).logits
    torch.testing.assert_close(both, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- positions pairing and transfer


def test_end_offset_pairs_have_read_the_same_text():
    ta, tb = tiny_tokenizer(vocab_size=300), tiny_tokenizer(vocab_size=400)
    text = "The weather today is mild, and the food was wonderful."
    ia, ib = paired_positions(ta, tb, text)
    ids_a, ends_a = token_end_offsets(ta, text)
    ids_b, ends_b = token_end_offsets(tb, text)
    assert len(ia) == len(ib) >= 5 and len(ids_a) != len(ids_b)
    for i, j in zip(ia, ib):
        assert ends_a[i] == ends_b[j]
        assert ta.decode(ids_a[: i + 1]) == tb.decode(ids_b[: j + 1]) == text[: ends_a[i]]
    assert pair_by_end_offset([-1, 3, 5, 5, 9], [-1, 5, 9], skip_first=True) == ([3, 4], [1, 2])


def test_map_transfer_to_the_same_model_returns_the_same_vector():
    lm = tiny_model("llama")
    s = make_actadd(lm, [(" love", " hate")], layer=1, coeff=2.0)
    texts = list(dict.fromkeys(CORPUS)) * 6
    t = transfer_actadd(s, lm, lm, texts, method="map", calibrate=False)
    assert t.meta["lineage"]["map_heldout_r2"] > 0.99
    torch.testing.assert_close(t.tensors["vector"], s.tensors["vector"], atol=0.05, rtol=0.05)
    assert t.epsilon == s.epsilon and t.meta["layer"] == 1


def test_recipe_transfer_matches_the_source_kl():
    src, tgt = tiny_model("gpt2"), tiny_model("gemma3_text")
    s = make_actadd(src, [(" love", " hate")], layer=0.5, coeff=2.0)
    texts = list(dict.fromkeys(CORPUS))
    t = transfer_actadd(s, src, tgt, texts, method="recipe")
    lin = t.meta["lineage"]
    assert t.model["fingerprint"] == tgt.fingerprint and t.meta["layer"] == 1
    k_src = mean_kl(src, texts, [(s, 1.0)], max_tokens=64)
    k_tgt = mean_kl(tgt, texts, [(t, 1.0)], max_tokens=64)
    assert lin["kappa_source"] == pytest.approx(k_src, rel=1e-4)
    assert k_tgt == pytest.approx(k_src, rel=0.05)
    with pytest.raises(SteerportError, match="recompute"):
        transfer_actadd(Steer("actadd", s.tensors, 1.0, meta={"layer": 1, "n_layers": 2}), src, tgt, texts)

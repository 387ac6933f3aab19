"""ActAdd steers: exact additions at the chosen layer and positions, layer lookup, transfer, files."""

from contextlib import contextmanager

import pytest
import torch

from steerport import Steer, SteerportError, generate, steered
from steerport.actadd import (
    compute_vector,
    make_actadd,
    padded_pair,
    resolve_layer,
    transfer_actadd,
)
from steerport.models import decoder_layers
from steerport.scoring import mean_kl
from tests.tiny import ARCHS, CORPUS, D, random_steer_factors, tiny_model

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


# ---------------------------------------------------------------- transfer


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


# ---------------------------------------------------------------- several layers, and layer n_layers

FINAL_NORMS = {
    "gpt2": "transformer.ln_f", "gptj": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm",
    "llama": "model.norm", "qwen2": "model.norm", "gemma3_text": "model.norm", "opt": "model.decoder.final_layer_norm",
}
MULTI_ARCHS = ["llama", "gpt2", "qwen2", "gemma3_text", "gptj"]  # gptj blocks return tuples, the others tensors


def multi_steer(lm, rows, layers, eps=2.0):
    return Steer("actadd", {"vector": rows}, epsilon=eps, model={"spec": lm.spec, "fingerprint": lm.fingerprint},
                 meta={"layers": layers, "positions": "all"})


@contextmanager
def added_by_hand(lm, adds):
    """Reference: adds[L] goes to the stream entering block L the llama.cpp way, i.e. onto the *output* of
    block L - 1 (forward hook); only L = 0 uses a pre-hook on block 0."""
    blocks = decoder_layers(lm.model)

    def pre(v):
        return lambda m, a, k: ((a[0] + v, *a[1:]), k) if a else (a, {**k, "hidden_states": k["hidden_states"] + v})

    def post(v):
        return lambda m, a, o: (o[0] + v, *o[1:]) if isinstance(o, tuple) else o + v

    handles = [blocks[0].register_forward_pre_hook(pre(v), with_kwargs=True) if L == 0 else
               blocks[L - 1].register_forward_hook(post(v)) for L, v in adds.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def logits_of(lm, batch):
    with torch.no_grad():
        return lm.model(**batch).logits


@pytest.mark.parametrize("arch", MULTI_ARCHS)
def test_multi_layer_steer_adds_each_row_at_its_layer_and_every_position(arch):
    lm = tiny_model(arch, n_layers=4)
    batch = batch_of(lm, side="left")
    layers = [3, 0, 4, 1]  # unsorted; 4 = after the last block
    rows = torch.randn(4, D, generator=torch.Generator().manual_seed(7))
    s = multi_steer(lm, rows, layers, eps=2.0)
    c = -0.75 * 2.0
    before = layer_inputs(lm, 0, batch)
    with steered(lm, [(s, -0.75)]):
        after = layer_inputs(lm, 0, batch)
        got = logits_of(lm, batch)
    torch.testing.assert_close(after - before, (c * rows[1]).expand_as(before), atol=1e-6, rtol=0)
    with added_by_hand(lm, {L: c * rows[i] for i, L in enumerate(layers)}):
        expected = logits_of(lm, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - logits_of(lm, batch)).abs().max() > 1e-2, "the steer should change the logits"


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_multi_layer_vector_changes_nothing(arch):
    lm = tiny_model(arch)
    batch = batch_of(lm)
    base = logits_of(lm, batch)
    with steered(lm, [(multi_steer(lm, torch.zeros(3, D), [0, 1, 2]), 9.0)]):
        assert torch.equal(logits_of(lm, batch), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_n_layers_adds_after_the_last_block_before_the_final_norm(arch):
    lm = tiny_model(arch)
    batch = batch_of(lm)
    norm = lm.model.get_submodule(FINAL_NORMS[arch])

    def norm_input():
        got = []
        h = norm.register_forward_pre_hook(lambda m, a, k: got.append((a[0] if a else k["hidden_states"]).clone()),
                                           with_kwargs=True)
        try:
            logits = logits_of(lm, batch)
        finally:
            h.remove()
        return got[0], logits

    v = torch.randn(D, generator=torch.Generator().manual_seed(8))
    before, _ = norm_input()
    with added_by_hand(lm, {2: 3.0 * v}):
        expected = logits_of(lm, batch)
    for s in (actadd_steer(lm, v, layer=2, positions="all"), multi_steer(lm, v[None], [2])):
        with steered(lm, [(s, 1.5)]):
            after, got = norm_input()
        torch.testing.assert_close(after - before, (3.0 * v).expand_as(before), atol=1e-5, rtol=0)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_multi_layer_steers_sum_per_layer_and_compose_with_lm_steer():
    lm = tiny_model("qwen2", n_layers=3)
    g = torch.Generator().manual_seed(9)
    multi = multi_steer(lm, torch.randn(2, D, generator=g), [1, 3], eps=2.0)
    single = actadd_steer(lm, torch.randn(D, generator=g), layer=3, positions="all", eps=0.5)
    front = actadd_steer(lm, torch.randn(2, D, generator=g), layer=1, eps=1.0)
    A, B = random_steer_factors()
    lms = Steer.lm_steer(A, B, epsilon=0.5, model={"spec": lm.spec, "fingerprint": lm.fingerprint})
    batch = batch_of(lm)
    rows = multi.tensors["vector"]
    summed = multi_steer(lm, torch.stack([3.0 * rows[0], 3.0 * rows[1] - 1.0 * single.tensors["vector"]]), [1, 3], eps=1.0)
    with steered(lm, [(multi, 1.5), (single, -2.0), (front, 1.0)]):
        alone = logits_of(lm, batch)
    with steered(lm, [(summed, 1.0), (front, 1.0)]):
        torch.testing.assert_close(logits_of(lm, batch), alone, atol=1e-5, rtol=1e-5)
    heads = []
    hook = lm.lm_head.register_forward_pre_hook(lambda m, a: heads.append(a[0].clone()))
    try:
        with steered(lm, [(multi, 1.5), (single, -2.0), (front, 1.0)]):
            logits_of(lm, batch)
    finally:
        hook.remove()
    h = heads[0]
    expected = (h + 2.0 * 0.5 * (h @ A) @ B.T) @ lm.output_embeddings.T
    with steered(lm, [(multi, 1.5), (lms, 2.0), (single, -2.0), (front, 1.0)]):
        torch.testing.assert_close(logits_of(lm, batch), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("meta,rows,match", [
    ({"layers": [1, 1]}, 2, r"'layers' repeats a layer: \[1, 1\]"),
    ({"layers": [0, 3]}, 2, "acts at layer 3, but this model has 2 decoder layers"),
    ({"layers": [-1, 1]}, 2, "acts at layer -1"),
    ({"layers": [0, 1, 2]}, 2, "lists 3 layers but its vector has 2 rows"),
    ({"layers": [0, 1], "positions": "front"}, 2, "acts on all positions"),
    ({"layers": "0,1"}, 2, "list of layer indices"),
    ({"layer": 3}, None, "acts at layer 3"),
    ({}, None, "no integer 'layer'"),
])
def test_bad_layer_metadata_is_a_one_line_error(meta, rows, match):
    lm = tiny_model("llama")
    s = Steer("actadd", {"vector": torch.ones(D) if rows is None else torch.ones(rows, D)}, meta={"positions": "all", **meta})
    with pytest.raises(SteerportError, match=match) as err:
        with steered(lm, [(s, 1.0)]):
            pass
    assert "\n" not in str(err.value)


def mixed_texts(n, seed=0):
    """n distinct word salads from the corpus vocabulary (distinct positions for fitting maps)."""
    import random

    words = " ".join(dict.fromkeys(CORPUS)).split()
    rng = random.Random(seed)
    return [" ".join(rng.sample(words, 12)) for _ in range(n)]


def test_multi_layer_map_transfer_to_a_shallower_model():
    src, tgt = tiny_model("llama", n_layers=4), tiny_model("gpt2")
    s = multi_steer(src, torch.randn(4, D, generator=torch.Generator().manual_seed(10)), [1, 2, 3, 4], eps=2.0)
    texts = mixed_texts(16)
    t = transfer_actadd(s, src, tgt, texts, method="map", calibrate=False)
    lin = t.meta["lineage"]
    assert lin["source_layers"] == [1, 2, 3, 4] and lin["target_layers"] == [0, 1, 1, 2]  # round(f·2), 4 -> after the last
    assert t.meta["layers"] == [0, 1, 2] and "layer" not in t.meta and t.meta["n_layers"] == 2
    assert t.tensors["vector"].shape == (3, D) and len(lin["map_heldout_r2"]) == 4
    # rows landing on the same target layer are summed; each is what a single-layer transfer carries

    def one(L):  # source row for layer L carried alone, as a single-layer steer
        single = Steer("actadd", {"vector": s.tensors["vector"][L - 1]}, epsilon=2.0,
                       meta={"layer": L, "n_layers": 4, "positions": "all"})
        return transfer_actadd(single, src, tgt, texts, method="map", calibrate=False).tensors["vector"]

    torch.testing.assert_close(t.tensors["vector"][1], one(2) + one(3), atol=1e-5, rtol=1e-5)
    assert t.epsilon == s.epsilon and mean_kl(tgt, texts, [(t, 1.0)], max_tokens=64) > 1e-4  # applies on the target
    with pytest.raises(SteerportError, match="no prompt pairs.*method='map'"):
        transfer_actadd(s, src, tgt, texts, method="recipe")
    s.meta["pairs"] = [[" love", " hate"]]
    with pytest.raises(SteerportError, match="acts on 4 layers, use method='map'"):
        transfer_actadd(s, src, tgt, texts, method="recipe")


def rebased_llama(lm, alpha, S):
    """A copy of a tiny llama whose residual stream is alpha · h · S at every layer (S a signed permutation),
    computing the same function: readers W ← W S, writers W ← alpha Sᵀ W, RMSNorm weights permuted."""
    import copy

    from steerport.models import LoadedModel

    model = copy.deepcopy(lm.model)
    perm = S.abs().argmax(0)  # S[perm[j], j] = ±1
    m = model.model
    with torch.no_grad():
        m.embed_tokens.weight.copy_(alpha * m.embed_tokens.weight @ S)
        norms = [m.norm] + [n for block in m.layers for n in (block.input_layernorm, block.post_attention_layernorm)]
        for norm in norms:
            norm.weight.copy_(norm.weight[perm])
        for block in m.layers:
            for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.mlp.gate_proj, block.mlp.up_proj):
                lin.weight.copy_(lin.weight @ S)
            for lin in (block.self_attn.o_proj, block.mlp.down_proj):
                lin.weight.copy_(alpha * S.T @ lin.weight)
        model.lm_head.weight.copy_(model.lm_head.weight @ S)
    return LoadedModel("tiny-llama-rebased", model, lm.tokenizer)


def test_multi_layer_map_transfer_through_a_change_of_basis_reproduces_the_effect():
    src = tiny_model("llama")
    for module in src.model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-12  # RMSNorm then ignores the scale alpha (to ~1e-8)
    g = torch.Generator().manual_seed(11)
    S = torch.eye(D)[torch.randperm(D, generator=g)] * torch.where(torch.rand(D, generator=g) < 0.5, -1.0, 1.0)
    tgt = rebased_llama(src, 3.0, S)
    batch = batch_of(src)
    torch.testing.assert_close(logits_of(tgt, batch), logits_of(src, batch), atol=1e-5, rtol=1e-5)
    rows = torch.randn(3, D, generator=g) * 0.05
    s = multi_steer(src, rows, [0, 1, 2], eps=1.0)
    # a negligible ridge, so the least-squares map is exactly K = alpha S (the default 1e-3 shrinks rare directions)
    t = transfer_actadd(s, src, tgt, mixed_texts(40), method="map", calibrate=False, ridge=1e-9)
    assert t.meta["layers"] == [0, 1, 2] and min(t.meta["lineage"]["map_heldout_r2"]) > 0.99999
    torch.testing.assert_close(t.tensors["vector"], 3.0 * rows @ S, atol=1e-4, rtol=0)
    with steered(src, [(s, 1.0)]):
        want = logits_of(src, batch)
    with steered(tgt, [(t, 1.0)]):
        got = logits_of(tgt, batch)
    assert (want - logits_of(src, batch)).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- per-row values


def per_row_steers(lm, kind, g):
    """Two actadd steers of one layout: front (P, d) at one layer, all-positions (d,), or multi-layer rows."""
    n = lm.n_layers
    if kind == "front":
        return [actadd_steer(lm, torch.randn(3, D, generator=g), layer=1, eps=2.0),
                actadd_steer(lm, torch.randn(5, D, generator=g), layer=1, eps=0.5)]
    if kind == "all":
        return [actadd_steer(lm, torch.randn(D, generator=g), layer=1, eps=2.0, positions="all"),
                actadd_steer(lm, torch.randn(D, generator=g), layer=0, eps=0.5, positions="all")]
    return [multi_steer(lm, torch.randn(3, D, generator=g), [n, 0, 1], eps=2.0),  # n: after the last block
            multi_steer(lm, torch.randn(2, D, generator=g), [1, n], eps=0.5)]


# GPT-2 does not derive position ids from the attention mask, so its rows are padded on the right
@pytest.mark.parametrize("arch,side", [("llama", "left"), ("gemma3_text", "left"), ("gpt2", "right")])
@pytest.mark.parametrize("kind", ["front", "all", "multi"])
def test_per_row_values_equal_each_row_run_alone(arch, side, kind):
    """Rows at different values in one batch: each row is bit for bit the batch run at that row's values,
    and matches the row run alone (a batch of one, no padding) to float precision."""
    lm = tiny_model(arch, n_layers=3)
    steers = per_row_steers(lm, kind, torch.Generator().manual_seed(12))
    texts = ["The movie was wonderful and the food is good.", "I hate it.", "What a waste of time"]
    batch = batch_of(lm, texts, side=side)  # left: rows start at different positions
    rows = torch.tensor([[1.5, -2.0], [-0.5, 0.0], [0.0, 3.0]])  # (b, k)
    with steered(lm, [(s, 0.0) for s in steers], rows=rows):
        mixed = logits_of(lm, batch)
    mask = batch["attention_mask"].bool()
    for i, text in enumerate(texts):
        with steered(lm, [(s, float(v)) for s, v in zip(steers, rows[i])]):
            same_batch = logits_of(lm, batch)
            alone = logits_of(lm, batch_of(lm, [text]))[0]
        assert torch.equal(mixed[i], same_batch[i])
        torch.testing.assert_close(mixed[i][mask[i]], alone, atol=1e-5, rtol=1e-5)
    base = logits_of(lm, batch)
    for i in range(3):
        assert (mixed[i] - base[i])[mask[i]].abs().max() > 1e-3, "every row carries a steer"
    with steered(lm, [(s, 0.0) for s in steers], rows=torch.zeros(3, 2)):
        assert torch.equal(logits_of(lm, batch), base)


def test_per_row_values_for_another_batch_size_are_a_clear_error():
    lm = tiny_model("llama")
    s = actadd_steer(lm, torch.ones(2, D))
    with pytest.raises(SteerportError, match="per-row actadd values for 3 rows, but this forward pass has 2"):
        with steered(lm, [(s, 1.0)], rows=torch.ones(3, 1)):
            logits_of(lm, batch_of(lm))


# ---------------------------------------------------------------- residual map, calibration, transfer entry


def test_residual_map_holds_out_a_random_split_not_the_tail():
    """Rows sorted so that the last 20 % come from another region of the space (a coordinate the head never
    uses). An exact linear relation must still be measured as exact: the held-out rows are a seeded random
    split, so the fit has seen that region (holding out the tail gave R² far below 1)."""
    from steerport.actadd import fit_residual_map

    g = torch.Generator().manual_seed(13)
    n, d = 500, 6
    Xs = torch.randn(n, d, generator=g)
    Xs[: int(0.8 * n), 0] = 0.0  # the head never moves along coordinate 0 ...
    Xs[int(0.8 * n) :, 0] = 5.0 + torch.randn(n - int(0.8 * n), generator=g)  # ... the tail does, strongly
    K = torch.randn(d, 4, generator=g)
    Xt = Xs @ K + 0.3
    K_fit, r2 = fit_residual_map(Xs, Xt, ridge=1e-9)
    assert r2 > 0.999
    torch.testing.assert_close(K_fit, K, atol=1e-3, rtol=1e-3)
    assert fit_residual_map(Xs, Xt, ridge=1e-9)[1] == r2  # seeded: the same split every time


def test_calibrate_value_finds_the_kl_budget_with_the_shared_scoring():
    lm = tiny_model("llama")
    steer = actadd_steer(lm, torch.randn(3, D, generator=torch.Generator().manual_seed(14)), eps=1.0)
    texts = list(dict.fromkeys(CORPUS))
    from steerport.actadd import calibrate_value

    s, k = calibrate_value(lm, steer, texts, 5e-4, start=1.0, max_tokens=32)
    assert k == pytest.approx(5e-4, rel=0.02)
    assert k == pytest.approx(mean_kl(lm, texts, [(steer, s)], max_tokens=32), rel=1e-6)  # κ(s) as scoring measures it
    with pytest.raises(SteerportError, match="positive"):
        calibrate_value(lm, steer, texts, 0.0)
    other = Steer("actadd", steer.tensors, 1.0, model={"spec": "elsewhere", "fingerprint": "0123456789abcdef"},
                  meta=steer.meta)
    with pytest.raises(SteerportError, match="fingerprint"):
        calibrate_value(lm, other, texts, 5e-4)
    s1, k1 = calibrate_value(lm, other, texts, 5e-4, force=True, max_evals=1, max_tokens=32)  # one evaluation, at start
    assert s1 == 1.0 and k1 == pytest.approx(mean_kl(lm, texts, [(steer, 1.0)], max_tokens=32), rel=1e-6)


def transfer_options(**kw):
    """steerport.transfer.TransferOptions, or a stand-in with the fields the actadd transfer reads while the
    transfer branch (which adds actadd_method, texts, max_tokens) is not merged."""
    from dataclasses import dataclass

    from steerport.transfer import TransferOptions

    try:
        return TransferOptions(**kw)
    except TypeError:
        @dataclass
        class StandIn:
            actadd_method: str = "recipe"
            texts: object = None
            max_tokens: int = 128
            calibrate: str = "auto"
            dtype: str = "float32"
            device: str = "cpu"

        return StandIn(**kw)


def test_transfer_with_options_loads_specs_and_follows_the_options(monkeypatch):
    import steerport.actadd as actadd
    from steerport.kinds import get_kind
    from steerport.transfer import TransferResult

    src, tgt = tiny_model("gpt2"), tiny_model("gemma3_text")
    loaded = []

    def fake_load(spec, *, dtype, device):
        loaded.append((spec, dtype, device))
        return {"src": src, "tgt": tgt}[spec]

    monkeypatch.setattr(actadd, "load_model", fake_load)
    s = make_actadd(src, [(" love", " hate")], layer=0.5, coeff=2.0)
    texts = list(dict.fromkeys(CORPUS))[:4]
    opt = transfer_options(actadd_method="recipe", texts=texts, max_tokens=32, dtype="bfloat16", device="cpu",
                           calibrate="none")  # recipe calibrates all the same
    res = get_kind("actadd").transfer_steer(s, "src", "tgt", opt, source_path="love.st")  # the kind's entry
    assert isinstance(res, TransferResult) and res.mapping is None and res.lineage is res.steer.meta["lineage"]
    assert loaded == [("src", "bfloat16", "cpu"), ("tgt", "bfloat16", "cpu")]
    want = transfer_actadd(s, src, tgt, texts, method="recipe", max_tokens=32)
    assert res.steer.epsilon == want.epsilon and torch.equal(res.steer.tensors["vector"], want.tensors["vector"])
    assert res.lineage["source_path"] == "love.st" and res.lineage["kappa_source"] == want.meta["lineage"]["kappa_source"]
    # map calibrates for calibrate auto / kl and keeps ε₀ for none
    kept = actadd.transfer_with_options(s, src, tgt, transfer_options(actadd_method="map", texts=texts, max_tokens=32,
                                                                      calibrate="none"))
    assert kept.steer.epsilon == s.epsilon and "calibration" not in kept.lineage and kept.lineage["pairs_fit"] > 0
    auto = actadd.transfer_with_options(s, src, tgt, transfer_options(actadd_method="map", texts=texts, max_tokens=32))
    assert auto.lineage["calibration"] == "matched mean KL on neutral text"
    assert mean_kl(tgt, texts, [(auto.steer, 1.0)], max_tokens=32) == pytest.approx(auto.lineage["kappa_source"], rel=0.03)
    # default neutral text: the first 64 paragraphs of the bundled fit split
    default = actadd.transfer_with_options(s, src, tgt, transfer_options(actadd_method="map", max_tokens=16,
                                                                         calibrate="none"))
    assert default.lineage["neutral_texts"] == 64
    with pytest.raises(SteerportError, match="embed calibration is for LM-Steer"):
        actadd.transfer_with_options(s, src, tgt, transfer_options(actadd_method="map", texts=texts, calibrate="embed"))
    with pytest.raises(SteerportError, match="without a vocabulary mapping"):
        actadd.transfer_with_options(s, src, tgt, opt, mapping_path="m.st")
    with pytest.raises(SteerportError, match="fingerprint"):  # the steer was made for src, not tgt
        actadd.transfer_with_options(s, tgt, src, opt)
    forced = actadd.transfer_with_options(s, tgt, src, transfer_options(actadd_method="map", texts=texts,
                                                                        max_tokens=32, calibrate="none"), force=True)
    assert forced.steer.model["fingerprint"] == src.fingerprint


def test_calibrating_a_steer_without_effect_is_a_clear_error():
    src, tgt = tiny_model("gpt2"), tiny_model("llama")
    zero = actadd_steer(src, torch.zeros(3, D))  # stores prompt pairs, but its vector does nothing
    with pytest.raises(SteerportError, match=r"does not change the source model's predictions.*κ = 0"):
        transfer_actadd(zero, src, tgt, ["The movie was wonderful."], method="recipe")

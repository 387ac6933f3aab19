"""Applying steers: exact identities on tiny random models of many architectures."""

import copy

import pytest
import torch

from steerport import Steer, SteerportError, generate, steered
from tests.tiny import ARCHS, D, random_steer_factors, tiny_model, tiny_tokenizer

TEXT = ["The movie was wonderful and the food is good.", "I hate it."]


def logits(lm, **steer_kw):
    batch = lm.tokenizer(TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        return lm.model(**batch).logits


def steer_for(lm, seed=1, r=3, eps=0.5):
    A, B = random_steer_factors(r=r, seed=seed)
    return Steer.lm_steer(A, B, epsilon=eps, model={"spec": lm.spec, "fingerprint": lm.fingerprint})


def rebuilt_logits(lm, W_total):
    """Logits of a copy whose LM head is rebuilt as E (I + W_total)ᵀ: the definition of a steer."""
    model = copy.deepcopy(lm.model)
    old = model.get_output_embeddings()
    head = torch.nn.Linear(D, old.out_features, bias=old.bias is not None)
    head.weight = torch.nn.Parameter(old.weight.detach() @ (torch.eye(D) + W_total).T)
    if old.bias is not None:
        head.bias = torch.nn.Parameter(old.bias.detach().clone())
    model.set_output_embeddings(head)  # unties a tied head: the input embeddings stay as they were
    batch = lm.tokenizer(TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_value_and_zero_factors_are_bit_identical(arch):
    lm = tiny_model(arch)
    base = logits(lm)
    s = steer_for(lm)
    with steered(lm, [(s, 0.0)]):
        assert torch.equal(logits(lm), base)
    zero = Steer.lm_steer(torch.zeros(D, 2), torch.zeros(D, 2), epsilon=1.0)
    with steered(lm, [(zero, 7.0)]):
        assert torch.equal(logits(lm), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_equals_rebuilt_embeddings(arch):
    lm = tiny_model(arch)
    s = steer_for(lm)
    value = 3.0
    with steered(lm, [(s, value)]):
        hooked = logits(lm)
    expected = rebuilt_logits(lm, value * s.epsilon * (s.A @ s.B.T))
    assert not torch.allclose(hooked, logits(lm), atol=1e-3), "the steer should change something"
    torch.testing.assert_close(hooked, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied,bias", [(True, False), (False, False), (False, True), (True, True)])
def test_hook_equals_rebuilt_for_tied_untied_and_biased_heads(tied, bias):
    lm = tiny_model("llama", tied=tied, head_bias=bias)
    assert (lm.lm_head_bias is not None) == bias
    s = steer_for(lm)
    with steered(lm, [(s, -2.0)]):
        hooked = logits(lm)
    torch.testing.assert_close(hooked, rebuilt_logits(lm, -2.0 * s.epsilon * (s.A @ s.B.T)), atol=1e-4, rtol=1e-4)


def test_composition_equals_one_summed_steer():
    lm = tiny_model("gpt2")
    a, b = steer_for(lm, seed=1, r=3, eps=0.5), steer_for(lm, seed=2, r=2, eps=0.2)
    sa, sb = 2.0, -3.0
    with steered(lm, [(a, sa), (b, sb)]):
        both = logits(lm)
    W = sa * a.epsilon * (a.A @ a.B.T) + sb * b.epsilon * (b.A @ b.B.T)
    torch.testing.assert_close(both, rebuilt_logits(lm, W), atol=1e-4, rtol=1e-4)
    # and equal to one steer whose factors are stacked
    merged = Steer.lm_steer(torch.cat([a.A * sa * a.epsilon, b.A * sb * b.epsilon], 1), torch.cat([a.B, b.B], 1), epsilon=1.0)
    with steered(lm, [(merged, 1.0)]):
        torch.testing.assert_close(logits(lm), both, atol=1e-5, rtol=1e-5)


def test_domain_component_only_when_asked():
    lm = tiny_model("llama")
    s = steer_for(lm)
    s.tensors["domain.A"], s.tensors["domain.B"] = random_steer_factors(r=1, seed=5)
    base = logits(lm)
    with steered(lm, [(s, 0.0)]):
        assert torch.equal(logits(lm), base)
    with steered(lm, [(s, 0.0)], include_domain=True):
        expected = rebuilt_logits(lm, s.epsilon * (s.tensors["domain.A"] @ s.tensors["domain.B"].T))
        torch.testing.assert_close(logits(lm), expected, atol=1e-4, rtol=1e-4)


def test_hooks_removed_on_exit_and_on_exception():
    lm = tiny_model("gpt2")
    base = logits(lm)
    s = steer_for(lm)
    with steered(lm, [(s, 4.0)]):
        pass
    assert torch.equal(logits(lm), base)
    assert not lm.lm_head._forward_pre_hooks
    with pytest.raises(RuntimeError), steered(lm, [(s, 4.0)]):
        raise RuntimeError("boom")
    assert not lm.lm_head._forward_pre_hooks
    assert torch.equal(logits(lm), base)


def test_mismatched_steer_refused():
    lm = tiny_model("gpt2")
    wrong_size = Steer.lm_steer(torch.ones(D + 1, 2), torch.ones(D + 1, 2), epsilon=1.0)
    with pytest.raises(SteerportError, match="hidden size"), steered(lm, [(wrong_size, 1.0)]):
        pass
    other = Steer.lm_steer(*random_steer_factors(), epsilon=1.0, model={"spec": "x", "fingerprint": "0123"})
    with pytest.raises(SteerportError, match="fingerprint"), steered(lm, [(other, 1.0)]):
        pass
    with steered(lm, [(other, 1.0)], force=True):
        pass
    assert not lm.lm_head._forward_pre_hooks


def test_generate_zero_steer_unchanged_and_steer_changes_output():
    lm = tiny_model("gpt2")
    s = steer_for(lm, eps=30.0)
    prompts = ["The movie was", "I love this"]
    base = generate(lm, prompts, max_new_tokens=8)
    assert generate(lm, prompts, [(s, 0.0)], max_new_tokens=8) == base
    assert generate(lm, prompts, [(s, 1.0)], max_new_tokens=8) != base
    # only the new text comes back: the prompt's ids followed by the continuation's are what the model generates
    tok = lm.tokenizer
    ids = lm.model.generate(**tok(prompts[:1], return_tensors="pt"), max_new_tokens=8, do_sample=False,
                            pad_token_id=tok.pad_token_id)
    n = len(tok(prompts[0])["input_ids"])
    assert base[0] == tok.decode(ids[0, n:], skip_special_tokens=True) and not base[0].startswith(prompts[0])
    # batching does not change greedy output
    assert generate(lm, prompts, max_new_tokens=8, batch_size=1) == base
    # sampling is reproducible with a seed
    a = generate(lm, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == generate(lm, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    assert tiny_tokenizer().padding_side == "right"


def test_scoring_identities():
    from steerport.scoring import mean_kl, mean_logprob, roc_auc, steer_scores

    lm = tiny_model("llama")
    s = steer_for(lm)
    texts = ["The movie was wonderful.", "I hate it.", "The weather today is mild."]
    assert mean_kl(lm, texts, [(s, 0.0)]) == 0.0
    assert mean_kl(lm, texts, [(s, 2.0)]) > 0
    torch.testing.assert_close(mean_logprob(lm, texts, [(s, 0.0)]), mean_logprob(lm, texts))
    assert torch.equal(steer_scores(lm, s, texts, 0.0), torch.zeros(3))
    assert roc_auc([0.1, 0.9, 0.8, 0.2], [0, 1, 1, 0]) == 1.0
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 1, 0]) == 0.5


# --------------------------------------------------------------------------- half precision (the GPU dtypes, run on the CPU)


def half_copy(lm, dtype):
    from steerport.models import LoadedModel

    return LoadedModel(spec=lm.spec, model=copy.deepcopy(lm.model).to(dtype), tokenizer=lm.tokenizer)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_steered_forward_in_half_precision_is_close_to_float32(arch, dtype):
    """bf16/fp16 models: the hooks run in the model's dtype (no float32 leaks into its stream) and the
    steered logits, and the steer's own shift of them, stay close to the float32 ones."""
    from steerport.actadd import make_actadd

    lm = tiny_model(arch)
    half = half_copy(lm, dtype)
    s3 = [steer_for(lm, seed=k, eps=2.0) for k in (1, 2, 3)]
    act = make_actadd(lm, [(" love", " hate")], layer=1, coeff=2.0, positions="all")
    cases = {"lm-steer x1": dict(steers=[(s3[0], 3.0)]), "lm-steer x3": dict(steers=[(s, 2.0) for s in s3]),
             "per-row": dict(steers=[(s3[0], 0.0)], rows=torch.tensor([[3.0], [-3.0]])),
             "actadd": dict(steers=[(act, 1.0)])}
    base32, base16 = logits(lm), logits(half)
    assert base16.dtype == dtype
    for name, kw in cases.items():
        with steered(lm, kw["steers"], rows=kw.get("rows"), force=True):
            got32 = logits(lm)
        with steered(half, kw["steers"], rows=kw.get("rows"), force=True):
            got16 = logits(half)
        assert got16.dtype == dtype, name
        scale = got32.abs().max().item()
        torch.testing.assert_close(got16.float(), got32, atol=0.02 * scale, rtol=0, msg=name)
        shift32, shift16 = (got32 - base32).flatten(), (got16.float() - base16.float()).flatten()
        assert shift32.abs().max() > 0.05 * scale, f"{name}: the steer should change something"
        cos = torch.nn.functional.cosine_similarity(shift16, shift32, dim=0)
        assert cos > 0.98, f"{name}: {dtype} shift has cosine {cos:.3f} to float32's"


def test_generate_in_bfloat16_matches_float32_greedy_tokens():
    """Greedy steered decoding in bf16 (with the KV cache, one token per step) runs and starts like float32."""
    lm = tiny_model("llama")
    half = half_copy(lm, torch.bfloat16)
    s = steer_for(lm, eps=2.0)
    out32 = generate(lm, ["The movie was"], [(s, 3.0)], max_new_tokens=6)
    out16 = generate(half, ["The movie was"], [(s, 3.0)], max_new_tokens=6, force=True)
    assert out16 and out16[0][:3] == out32[0][:3]

"""Evaluator metrics with known answers, the head-only scorer against full forward passes, and the CLI."""

import copy
import gc
import json
import math

import numpy as np
import pytest
import torch

from steerport import Steer, SteerportError
from steerport.capture import cache_hidden
from steerport.evaluate import (
    EvalSettings,
    conditional_perplexity,
    evaluate_steers,
    sample_continuations,
)
from steerport.metrics import (
    distinct_n,
    find_value_for_kl,
    kl_divergence,
    mean_distinct,
    retention,
    roc_auc,
    separation,
    spearman,
)
from steerport.scoring import (
    ForwardScorer,
    HeadScorer,
    capture_hidden,
    mean_kl,
    scorer_for,
    token_logprobs,
    value_for_kl,
)
from tests.tiny import ARCHS, CORPUS, D, random_steer_factors, tiny_model

TEXTS = CORPUS[:6]


def steer_for(lm, seed=1, eps=0.5):
    A, B = random_steer_factors(seed=seed)
    return Steer.lm_steer(A, B, epsilon=eps, model={"spec": lm.spec, "fingerprint": lm.fingerprint})


def test_kl_of_identical_distributions_is_zero():
    logp = torch.log_softmax(torch.randn(4, 7, 50), -1)
    assert torch.all(kl_divergence(logp, logp).abs() < 1e-6)
    other = torch.log_softmax(torch.randn(4, 7, 50), -1)
    assert torch.all(kl_divergence(logp, other) > 0)


def test_auc_of_perfect_and_reversed_scorer():
    labels = [1, 1, 0, 0, 1]
    assert roc_auc([0.9, 0.8, 0.1, 0.2, 0.7], labels) == 1.0
    assert roc_auc([0.1, 0.2, 0.9, 0.8, 0.3], labels) == 0.0
    assert roc_auc([0.5] * 5, labels) == 0.5


def test_auc_equals_scikit_learns_with_ties_and_refuses_nan():
    from sklearn.metrics import roc_auc_score

    g = np.random.default_rng(0)
    for n in (2, 7, 300):
        y = np.arange(n) % 2 == 0
        scores = g.integers(0, 5, n).astype(float)  # many ties
        assert roc_auc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
        scores = g.normal(size=n) + y
        assert roc_auc(scores, y.astype(float)) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    with pytest.raises(SteerportError, match="NaN"):
        roc_auc([0.1, float("nan")], [1, 0])
    with pytest.raises(SteerportError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])


def test_separation_known_answer_and_against_itself():
    pos0, neg0 = torch.tensor([-3.0, -4.0]), torch.tensor([-2.0, -5.0])
    # positives gain 0.5 on average, negatives lose 0.25: Sep = 0.5 - (-0.25) = 0.75
    assert separation(pos0 + torch.tensor([0.4, 0.6]), pos0, neg0 - 0.25, neg0) == pytest.approx(0.75)
    assert separation(pos0, pos0, neg0, neg0) == 0.0


def test_distinct_n_on_fixed_strings():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # "the cat" twice
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n([""], 2) == 0.0
    assert mean_distinct([["a b", "a b"], ["c d"]], 1) == pytest.approx((2 / 4 + 1) / 2)


def test_retention_and_spearman():
    assert retention(0.2, 0.5, 0.6) == pytest.approx(0.75)
    assert retention(0.2, 0.2, 0.6) == 0.0
    assert math.isnan(retention(0.2, 0.3, 0.2))
    x = torch.randn(100)
    assert spearman(x, x) == pytest.approx(1.0)
    assert spearman(x, -x ** 3) == pytest.approx(-1.0)


@pytest.mark.parametrize("target", [1e-4, 0.05, 3.0])
def test_bisection_hits_the_budget(target):
    calls = []

    def kl(s):  # monotone, not a power law: quadratic near 0, linear far out
        calls.append(s)
        return 0.01 * s * s / (1 + 0.1 * s)

    res = find_value_for_kl(kl, target, rel_tol=1e-3)
    assert abs(res.kl - target) <= 1e-3 * target
    assert kl(res.value) == pytest.approx(res.kl)
    assert res.evaluations == len(res.history) < 40


def test_bisection_refuses_a_steer_that_cannot_reach_the_budget():
    with pytest.raises(SteerportError, match="too weak"):
        find_value_for_kl(lambda s: 1e-3 * (1 - math.exp(-s)), 0.5)
    with pytest.raises(SteerportError, match="positive"):
        find_value_for_kl(lambda s: s, 0.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_scorer_equals_full_forward(arch):
    lm = tiny_model(arch, head_bias=arch == "opt")
    s = steer_for(lm)
    cache = capture_hidden(lm, TEXTS, batch_size=4)
    full_stats = ForwardScorer(lm, TEXTS, batch_size=4).stats([(s, 2.0)], shift=True)  # full forward passes
    assert full_stats.kl > 0
    for max_base in (0, 1 << 30):  # recomputed and cached base logits
        sc = HeadScorer(lm, cache, chunk=7, max_base_bytes=max_base)
        st = sc.stats([(s, 2.0)], shift=True)
        assert st.kl == pytest.approx(full_stats.kl, rel=1e-4)
        assert st.kl == pytest.approx(mean_kl(lm, TEXTS, [(s, 2.0)], batch_size=4), rel=1e-5)
        torch.testing.assert_close(st.logprob_shift, full_stats.logprob_shift, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(st.token_logprob, full_stats.token_logprob, atol=1e-4, rtol=1e-4, equal_nan=True)
        full = torch.cat(token_logprobs(lm, TEXTS, [(s, 2.0)], batch_size=4))
        mine = st.token_logprob[cache.targets >= 0]
        torch.testing.assert_close(mine, full, atol=1e-4, rtol=1e-4)
        base = torch.cat(token_logprobs(lm, TEXTS, batch_size=4))
        torch.testing.assert_close(sc.base_token_logprob[cache.targets >= 0], base, atol=1e-4, rtol=1e-4)
        assert st.logprob_shift.shape == (len(lm.tokenizer),)
        no_kl, again = sc.stats_many([[(s, 2.0)], [(s, -1.0)]], kl=False)
        assert math.isnan(no_kl.kl)
        torch.testing.assert_close(no_kl.token_logprob, st.token_logprob, equal_nan=True)
        assert again.kl != again.kl and not torch.equal(again.token_logprob[cache.targets >= 0], mine)
    zero = sc.stats([(s, 0.0)])
    assert abs(zero.kl) < 1e-6


def test_low_rank_path_equals_the_log_prob_loop():
    """LM-Steer settings skip the (n, V) log-prob arrays; κ, token log-probs and shifts stay those of the one loop,
    for composed steers, an empty setting and a head with a bias."""
    lm = tiny_model("opt", head_bias=True)
    s1, s2 = steer_for(lm, seed=1), steer_for(lm, seed=2)
    sc = HeadScorer(lm, capture_hidden(lm, TEXTS, batch_size=4), chunk=5)
    settings = [[(s1, 2.0)], [(s1, -1.5), (s2, 3.0)], []]
    fast = sc.stats_many(settings, shift=True)
    loop = sc._stats_from_chunks(sc._check(settings), shift=True, kl=True)
    for a, b in zip(fast, loop):
        assert a.kl == pytest.approx(b.kl, rel=1e-5, abs=1e-8)
        torch.testing.assert_close(a.token_logprob, b.token_logprob, atol=1e-5, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(a.logprob_shift, b.logprob_shift, atol=1e-5, rtol=1e-5)
    assert fast[1].kl > 0 and fast[2].kl == 0


def test_head_scorer_with_a_generic_head_steer_kind(monkeypatch):
    """A registered steer kind that hooks the LM head goes through its own hook."""
    import dataclasses

    from steerport import kinds
    from steerport.kinds import lm_steer

    lm = tiny_model("llama")
    s = steer_for(lm)
    cache = capture_hidden(lm, TEXTS, batch_size=4)
    # register a fake head-acting kind that behaves exactly like the lm-steer hook
    fake = Steer("token-prob", {"token_ids": torch.tensor([1, 2]), "delta": torch.zeros(2, D)}, model=s.model)
    fake_kind = dataclasses.replace(kinds.get_kind("token-prob"),
                                    apply=lambda lm_, steers, values, **kw: lm_steer.apply(lm_, [s] * len(steers), values))
    monkeypatch.setitem(kinds._discover(), "token-prob", fake_kind)
    a = HeadScorer(lm, cache).stats([(fake, 2.0)])
    b = HeadScorer(lm, cache).stats([(s, 2.0)])
    assert a.kl == pytest.approx(b.kl, rel=1e-4)


def test_evaluate_steer_against_itself_and_its_negative():
    lm = tiny_model("llama")
    s = steer_for(lm)
    louder = Steer.lm_steer(3 * s.A, s.B, epsilon=s.epsilon, model=s.model)  # the same steer, 3x as loud
    flipped = Steer.lm_steer(-s.A, s.B, epsilon=s.epsilon, model=s.model)
    texts = CORPUS[:6]
    labels = [1, 0, 1, 0, 0, 1]
    rep = evaluate_steers(lm, [("native", s), ("same", s), ("louder", louder), ("flipped", flipped)], heldout=(texts, labels),
                          neutral=CORPUS[6:12], settings=EvalSettings(kappa=0.01, rel_tol=1e-3, curve=(0.5, 1.0)))
    r = rep["steers"]
    assert r["same"]["retained_effect"] == pytest.approx(1.0)
    assert r["same"]["agreement"]["native"] == pytest.approx(1.0)
    # matched κ removes loudness: a 3x louder copy gets a third of the value and the same effect
    assert r["louder"]["value"] == pytest.approx(r["native"]["value"] / 3, rel=1e-3)
    assert r["louder"]["retained_effect"] == pytest.approx(1.0, rel=1e-3)
    assert r["louder"]["auc"] == pytest.approx(r["native"]["auc"])
    assert r["flipped"]["retained_effect"] < 0  # opposite direction
    assert r["flipped"]["agreement"]["native"] < 0
    for name in r:
        assert r[name]["kl"] == pytest.approx(0.01, rel=1e-3)
    assert r["native"]["curve"][1]["separation"] == pytest.approx(r["native"]["separation"])
    assert r["native"]["curve"][0]["kl"] < r["native"]["curve"][1]["kl"]
    json.dumps(rep)  # JSON-ready


def test_evaluate_generation_metrics():
    from steerport.judges import TfidfJudge

    lm = tiny_model("gpt2")
    ref = tiny_model("llama")
    s = steer_for(lm)
    judge = TfidfJudge.fit(["good great lovely", "love it", "bad awful", "hate it"] * 3, [1, 1, 0, 0] * 3, settings={"min_df": 1})
    settings = EvalSettings(kappa=0.01, n_prompts=2, samples_per_prompt=2, max_new_tokens=5)
    prompts = ["The movie", "I think"]
    rep = evaluate_steers(lm, [("a", s)], heldout=(TEXTS, [1, 0, 1, 0, 0, 1]), neutral=TEXTS, settings=settings,
                          prompts=prompts, judge=judge, reference=ref)
    g = rep["generation"]
    assert set(g["runs"]) == {"unsteered", "a"}
    # every number is the metric of the seeded samples, redrawn here with the same settings
    for name, steers in (("unsteered", []), ("a", [(s, rep["steers"]["a"]["value"])])):
        groups = sample_continuations(lm, prompts, steers, settings)
        flat = [c for grp in groups for c in grp]
        run = g["runs"][name]
        assert run["distinct_1"] == pytest.approx(mean_distinct(groups, 1))
        assert run["attribute_rate"] == pytest.approx(float((judge.score(flat) > 0.5).mean()))
        assert run["perplexity"] == pytest.approx(conditional_perplexity(ref, [p for p in prompts for _ in range(2)], flat))
        assert [x["continuation"] for x in run["samples"]] == [grp[0] for grp in groups]
        assert all(not c.startswith(p) for p, grp in zip(prompts, groups) for c in grp)  # continuations only
    base, nat = g["runs"]["unsteered"]["attribute_rate"], g["runs"]["a"]["attribute_rate"]
    if base == nat:
        assert math.isnan(g["runs"]["a"]["generation_retention"])
    else:  # the native steer retains all of its own effect
        assert g["runs"]["a"]["generation_retention"] == pytest.approx(1.0)


def test_evaluate_refuses_bad_input():
    lm = tiny_model("llama")
    s = steer_for(lm)
    with pytest.raises(SteerportError, match="unique"):
        evaluate_steers(lm, [("a", s), ("a", s)], heldout=(TEXTS, [1, 0] * 3), neutral=TEXTS)
    other = Steer.lm_steer(torch.zeros(16, 2), torch.zeros(16, 2), epsilon=1.0)
    with pytest.raises(SteerportError, match="hidden size"):
        evaluate_steers(lm, [("a", other)], heldout=(TEXTS, [1, 0] * 3), neutral=TEXTS)


def test_evaluate_refuses_a_steer_made_for_another_model_unless_forced():
    lm = tiny_model("gpt2")
    A, B = random_steer_factors(seed=1)
    foreign = Steer.lm_steer(A, B, epsilon=0.5, model={"spec": "elsewhere", "fingerprint": "0123456789abcdef"})
    kw = {"heldout": (TEXTS, [1, 0, 1, 0, 0, 1]), "neutral": TEXTS, "prompts": ["The movie"],
          "settings": EvalSettings(kappa=0.01, samples_per_prompt=1, max_new_tokens=3)}
    with pytest.raises(SteerportError, match="fingerprint"):
        evaluate_steers(lm, [("a", foreign)], **kw)
    rep = evaluate_steers(lm, [("a", foreign)], force=True, **kw)
    assert rep["steers"]["a"]["kl"] == pytest.approx(0.01, rel=0.03) and rep["generation"]["runs"]["a"]["samples"]
    # the scorers and the sampler check too: the caller's force is passed through, never assumed
    cache = cache_hidden(lm, TEXTS)
    with pytest.raises(SteerportError, match="fingerprint"):
        HeadScorer(lm, cache).stats([(foreign, 1.0)])
    assert HeadScorer(lm, cache, force=True).stats([(foreign, 1.0)]).kl > 0
    with pytest.raises(SteerportError, match="fingerprint"):
        sample_continuations(lm, ["The movie"], [(foreign, 1.0)], EvalSettings(samples_per_prompt=1, max_new_tokens=2))
    with pytest.raises(SteerportError, match="fingerprint"):
        mean_kl(lm, TEXTS, [(foreign, 1.0)])


def test_head_scorer_keys_steers_by_content_not_identity():
    """Steers created and freed in sequence (CPython reuses their ids) each get their own E·B."""
    lm = tiny_model("llama")
    cache = cache_hidden(lm, TEXTS)
    expected = [HeadScorer(lm, cache).stats([(steer_for(lm, seed=k), 2.0)]).kl for k in range(1, 5)]
    assert len(set(expected)) == 4
    shared = HeadScorer(lm, cache)
    got = []
    for k in range(1, 5):
        st = steer_for(lm, seed=k)
        got.append(shared.stats([(st, 2.0)]).kl)
        del st
        gc.collect()
    assert got == pytest.approx(expected, rel=1e-6)
    # the same object changed in place is a different steer
    st = steer_for(lm, seed=1)
    before = shared.stats([(st, 2.0)]).kl
    st.tensors["B"] = -2 * st.tensors["B"]
    assert shared.stats([(st, 2.0)]).kl == pytest.approx(HeadScorer(lm, cache).stats([(st, 2.0)]).kl, rel=1e-6)
    assert shared.stats([(st, 2.0)]).kl != pytest.approx(before, rel=1e-3)


def test_head_scorer_soft_caps_like_the_model_reads_the_text_config(monkeypatch):
    """A Gemma-style model whose cap sits in its text config (the top-level config lacks it)."""
    lm = tiny_model("gemma3_text")
    text_config = copy.deepcopy(lm.model.config)
    text_config.final_logit_softcapping = 0.5  # small: it bites on the tiny model's logits
    monkeypatch.setattr(lm.model.config, "final_logit_softcapping", None)
    monkeypatch.setattr(lm.model.config, "get_text_config", lambda *a, **k: text_config, raising=False)
    assert lm.softcap == 0.5
    cache = cache_hidden(lm, TEXTS)
    s = steer_for(lm)
    z = cache.h @ lm.output_embeddings.detach().float().T  # (N, V)
    for steers, shift in (([], 0.0), ([(s, 2.0)], 2.0 * s.epsilon)):
        zs = z + shift * (cache.h @ s.A) @ (lm.output_embeddings.detach().float() @ s.B).T
        capped = torch.log_softmax(0.5 * torch.tanh(zs / 0.5), -1)
        want = capped.gather(-1, cache.targets.clamp(min=0)[:, None])[:, 0]
        got = HeadScorer(lm, cache).stats(steers).token_logprob
        ok = cache.targets >= 0
        torch.testing.assert_close(got[ok], want[ok], atol=1e-5, rtol=1e-5)
        uncapped = torch.log_softmax(zs, -1).gather(-1, cache.targets.clamp(min=0)[:, None])[:, 0]
        assert (got[ok] - uncapped[ok]).abs().max() > 1e-2


def test_head_scorer_refuses_steers_inside_the_network_and_forward_scorer_measures_them():
    lm = tiny_model("gpt2")
    g = torch.Generator().manual_seed(0)
    act = Steer("actadd", {"vector": torch.randn(D, generator=g)}, epsilon=1.0,
                meta={"layer": 1, "positions": "all"}, model={"spec": lm.spec, "fingerprint": lm.fingerprint})
    with pytest.raises(SteerportError, match="inside the network"):
        HeadScorer(lm, cache_hidden(lm, TEXTS)).stats([(act, 1.0)])
    sc = scorer_for(lm, TEXTS, [act])
    assert isinstance(sc, ForwardScorer)
    assert sc.stats([(act, 0.0)]).kl == 0.0
    k1, k2 = (x.kl for x in sc.stats_many([[(act, 1.0)], [(act, 2.0)]]))
    assert 0 < k1 < k2
    assert mean_kl(lm, TEXTS, [(act, 2.0)]) == pytest.approx(k2, rel=1e-6)


def test_value_for_kl_reaches_the_budget_for_both_scorers():
    lm = tiny_model("gpt2")
    s = steer_for(lm)
    for scorer in (None, ForwardScorer(lm, TEXTS)):
        res = value_for_kl(lm, TEXTS, s, 0.02, rel_tol=1e-3, scorer=scorer)
        assert res.kl == pytest.approx(0.02, rel=1e-3)
        assert mean_kl(lm, TEXTS, [(s, res.value)]) == pytest.approx(0.02, rel=2e-3)


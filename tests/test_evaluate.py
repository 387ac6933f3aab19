"""Evaluator metrics with known answers, the head-only scorer against full forward passes, and the CLI."""

import json
import math

import pytest
import torch

from steerport import Steer, SteerportError
from steerport.evaluate import (
    EvalSettings, distinct_n, evaluate_steers, find_value_for_kl, mean_distinct, retention, separation, spearman,
)
from steerport.scoring import HeadScorer, capture_hidden, kl_divergence, mean_kl, roc_auc, token_logprobs
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
    for max_base in (0, 1 << 30):  # recomputed and cached base logits
        sc = HeadScorer(lm, cache, chunk=7, max_base_bytes=max_base)
        st = sc.stats([(s, 2.0)], shift=True)
        assert st.kl == pytest.approx(mean_kl(lm, TEXTS, [(s, 2.0)], batch_size=4), rel=1e-4)
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
    s = steer_for(lm)
    judge = TfidfJudge.fit(["good great lovely", "love it", "bad awful", "hate it"] * 3, [1, 1, 0, 0] * 3, settings={"min_df": 1})
    rep = evaluate_steers(lm, [("a", s)], heldout=(TEXTS, [1, 0, 1, 0, 0, 1]), neutral=TEXTS,
                          settings=EvalSettings(kappa=0.01, n_prompts=2, samples_per_prompt=2, max_new_tokens=5),
                          prompts=["The movie", "I think"], judge=judge, reference=tiny_model("llama"))
    g = rep["generation"]
    assert set(g["runs"]) == {"unsteered", "a"}
    for run in g["runs"].values():
        assert 0 <= run["attribute_rate"] <= 1 and run["perplexity"] > 1
        assert 0 < run["distinct_1"] <= 1
    assert g["runs"]["a"]["generation_retention"] == pytest.approx(1.0) or math.isnan(g["runs"]["a"]["generation_retention"])


def test_evaluate_refuses_bad_input():
    lm = tiny_model("llama")
    s = steer_for(lm)
    with pytest.raises(SteerportError, match="unique"):
        evaluate_steers(lm, [("a", s), ("a", s)], heldout=(TEXTS, [1, 0] * 3), neutral=TEXTS)
    other = Steer.lm_steer(torch.zeros(16, 2), torch.zeros(16, 2), epsilon=1.0)
    with pytest.raises(SteerportError, match="hidden size"):
        evaluate_steers(lm, [("a", other)], heldout=(TEXTS, [1, 0] * 3), neutral=TEXTS)

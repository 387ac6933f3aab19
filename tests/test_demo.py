"""The demo's pieces on tiny random models: value for a KL budget, strength ratio, judged generations, and
the whole run (results.json complete) with tiny models standing in for the catalog pair."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import steerport.demo as demo
from steerport.errors import SteerportError
from steerport.hooks import generate
from steerport.steer import Steer
from steerport.strength import curve_text
from steerport.train import TrainConfig
from tests.tiny import CORPUS, D, random_steer_factors, tiny_model

TEXTS = sorted(set(CORPUS)) * 3  # short enough for the tiny models' 128 positions
TEXT = curve_text(TEXTS)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERPORT_HOME", str(tmp_path / "home"))


def make_steer(lm, epsilon: float = 0.5, seed: int = 1) -> Steer:
    A, B = random_steer_factors(D, 3, seed=seed)
    return Steer.lm_steer(A, B, epsilon=epsilon, positive="positive", model={"spec": lm.spec, "fingerprint": lm.fingerprint})


class LengthJudge:
    """Calls a text positive when it is longer than 30 characters: a judge whose shares a test can predict."""

    positive = "long"

    def score(self, texts):
        return np.array([0.9 if len(t) > 30 else 0.1 for t in texts])

    def describe(self):
        return {"kind": "length"}


def test_value_for_a_kappa_reproduces_it():
    lm = tiny_model("llama")
    k = demo.KappaAt(lm, make_steer(lm), TEXT)
    s = k.value_for(0.05, start=2.0)
    assert s > 0 and abs(k(s) - 0.05) <= demo.RATIO_TOL * 0.05


def test_strength_ratio_of_a_steer_with_itself_is_one_and_follows_epsilon():
    lm = tiny_model("llama")
    steer = make_steer(lm, epsilon=0.5)
    ref = demo.KappaAt(lm, steer, TEXT)
    same = demo.strength_ratio(ref, demo.KappaAt(lm, steer, TEXT), 2.0)
    assert same["ratio_at_1"] == pytest.approx(1.0) and same["ratio_at_value"] == pytest.approx(1.0)
    # κ depends on value · ε₀ only: twice the ε₀ reaches the same strength at half the value
    double = demo.KappaAt(lm, Steer.lm_steer(steer.A, steer.B, epsilon=1.0, positive="positive", model=steer.model), TEXT)
    r = demo.strength_ratio(ref, double, 2.0)
    assert r["ratio_at_1"] == pytest.approx(0.5, rel=0.02) and r["ratio_at_value"] == pytest.approx(0.5, rel=0.02)
    assert r["kappa_src_at_1"] == pytest.approx(ref(1.0)) and r["kappa_tgt_at_value"] == pytest.approx(double(2.0))


def test_judged_share_and_its_wilson_interval():
    got = demo.judged(LengthJudge(), ["short", "a much longer continuation than thirty", "tiny", "x"])
    assert got["share"] == 0.25 and got["n"] == 4 and got["mean_prob"] == pytest.approx(0.3)
    assert got["positive"] == [0, 1, 0, 0] and got["prob"] == pytest.approx([0.1, 0.9, 0.1, 0.1])
    assert 0 < got["low"] < 0.25 < got["high"] < 1


def test_swing_intervals_resample_the_prompts_once_for_every_share():
    pos, neg = [1, 0, 1, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 1, 0, 0]
    same = demo.swing_intervals({"a": pos, "b": pos}, {"a": neg, "b": neg}, "a", "b")
    assert same["target_over_source"] == [1.0, 1.0]  # paired: the same prompts in every resample
    assert same["a"] == same["b"] and same["a"][0] < 3 / 8 < same["a"][1]
    assert 0 < same["ratio_undefined_share"] < 0.1  # a few resamples draw no prompt that swings up
    flat = demo.swing_intervals({"a": [1, 0, 1], "b": [1, 1, 1]}, {"a": [1, 0, 1], "b": [0, 0, 0]}, "a", "b")
    assert flat["a"] == [0.0, 0.0] and flat["b"] == [1.0, 1.0]
    assert all(math.isnan(x) for x in flat["target_over_source"]) and flat["ratio_undefined_share"] == 1.0


def test_swings_by_share_and_by_mean_probability():
    def judge(prob: list[float]) -> dict:
        return {"judge": demo.judged_from(np.array(prob))}

    gen = {"a": {"+2": judge([0.9, 0.8, 0.6, 0.4]), "-2": judge([0.2, 0.4, 0.3, 0.1])},
           "b": {"+2": judge([0.7, 0.6, 0.45, 0.55]), "-2": judge([0.3, 0.35, 0.5, 0.2])}}
    share = demo.swings(gen, 2.0, "a", "b", "share", "positive")
    prob = demo.swings(gen, 2.0, "a", "b", "mean_prob", "prob")
    assert share["a"] == pytest.approx(0.75) and share["b"] == pytest.approx(0.75) and share["target_over_source"] == 1.0
    assert prob["a"] == pytest.approx(0.425) and prob["b"] == pytest.approx(0.2375)
    assert prob["target_over_source"] == pytest.approx(0.2375 / 0.425) and prob["by"] == "mean_prob"
    lo, hi = prob["interval_95"]["target_over_source"]
    assert lo <= prob["target_over_source"] <= hi
    gen["a"]["+2"] = gen["a"]["-2"]  # the source does not move: no ratio
    assert demo.swings(gen, 2.0, "a", "b", "mean_prob", "prob")["target_over_source"] is None


def test_steer_in_action_is_seeded_and_zero_is_unsteered():
    lm = tiny_model("llama")
    steer = make_steer(lm)
    prompts = ["The movie was", "I love this", "The weather today"]
    a = demo.steer_in_action(lm, steer, [-2.0, 0.0, 2.0], prompts, LengthJudge(), examples=2, max_new_tokens=6)
    b = demo.steer_in_action(lm, steer, [-2.0, 0.0, 2.0], prompts, LengthJudge(), examples=2, max_new_tokens=6)
    assert list(a) == ["-2", "+0", "+2"] and a == b  # same seed, same texts
    assert a["+0"]["greedy"] == generate(lm, prompts[:2], [], max_new_tokens=6)
    assert a["+0"]["sampled"] == generate(lm, prompts, [], max_new_tokens=6, temperature=demo.TEMPERATURE,
                                          top_p=demo.TOP_P, seed=demo.SEED, batch_size=len(prompts))
    assert a["+2"]["judge"]["n"] == 3 and len(a["+2"]["greedy"]) == 2


def test_demo_prompts_are_shipped():
    prompts = demo.demo_prompts(32)
    assert len(prompts) == 32 and len(set(prompts)) == 32 and all(prompts)


def test_bad_values_are_one_line_errors(tmp_path):
    with pytest.raises(SteerportError, match="positive number"):
        demo.run_demo(tmp_path, value=-1.0)
    with pytest.raises(SteerportError, match="KL budget"):
        demo.run_demo(tmp_path, kappa=0.0)


def test_the_whole_demo_on_tiny_models(tmp_path, monkeypatch, capsys):
    import steerport.strength

    models = {"src": tiny_model("llama", seed=0), "tgt": tiny_model("qwen2", seed=3)}
    monkeypatch.setattr(demo, "load_model", lambda spec, **kw: models[spec])
    monkeypatch.setattr(steerport.strength, "neutral", lambda split, limit=None: TEXTS[:limit])  # fit in 128 positions
    monkeypatch.setattr(demo, "neutral", lambda split, limit=None: TEXTS[::-1][:limit])  # other text for the ratio
    # ε₀ large enough that the steer's κ at value 1 is measurable in fp32 on a tiny model (with the default 1e-3,
    # κ(1) ~ 1e-10 and reads as exactly 0 on some CPUs, and there is no strength to calibrate against)
    monkeypatch.setattr(demo, "TrainConfig", lambda **kw: TrainConfig(**kw, epsilon=0.1))
    r = demo.run_demo(tmp_path, source="src", target="tgt", limit_per_class=12, test_per_class=6, n_prompts=6,
                      log=lambda m: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["value"] == r["value"] > 0 and saved["strength"]["value_chosen_by"].startswith("source κ")
    assert abs(r["strength"]["kappa_src_at_value"] - demo.DEMO_KAPPA) <= 0.1 * demo.DEMO_KAPPA  # rounded value
    for key in ("ratio_at_1", "ratio_at_value"):
        assert math.isfinite(saved["strength"][key]) and saved["strength"][key] > 0
    assert saved["lineage"]["calibration"]["method"] == "kl"
    for spec in ("src", "tgt"):
        by_value = saved["generation"][spec]
        assert [v["value"] for v in by_value.values()] == [-r["value"], 0.0, r["value"]]
        for v in by_value.values():
            j = v["judge"]
            assert j["n"] == 6 and j["low"] <= j["share"] <= j["high"] and len(v["sampled"]) == 6 and len(v["greedy"]) == 3
        assert saved["swing"][spec] == pytest.approx(by_value[f"{r['value']:+g}"]["judge"]["share"]
                                                     - by_value[f"{-r['value']:+g}"]["judge"]["share"])
        lo, hi = saved["swing"]["interval_95"][spec]
        assert lo <= saved["swing"][spec] <= hi
        by_prob = saved["swing_mean_prob"]
        assert by_prob[spec] == pytest.approx(by_value[f"{r['value']:+g}"]["judge"]["mean_prob"]
                                              - by_value[f"{-r['value']:+g}"]["judge"]["mean_prob"])
    assert (tmp_path / "positive.src.st").is_file() and (tmp_path / "positive.tgt.st").is_file()
    assert set(saved["stage_seconds"]) >= {"train_and_score_source", "strength", "generate_transferred"}

    from steerport.cli.demo import print_results

    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: the tables' cells on one line each
    print_results(saved)
    out = capsys.readouterr().out
    assert f"strength ratio {saved['strength']['ratio_at_1']:.2f} at s = 1" in " ".join(out.split()) and "Wilson" in out
    share = saved["generation"]["tgt"][f"{r['value']:+g}"]["judge"]
    assert f"{share['share']:.2f} [{share['low']:.2f}, {share['high']:.2f}]" in out
    assert "by mean P(positive)" in out and f"{saved['swing_mean_prob']['tgt']:+.2f}" in out

"""The ladder benchmark's own mechanics: its κ solver, its data split and its interval arithmetic."""

import json
import math
from types import SimpleNamespace

import numpy as np

from benchmarks.transfer_ladder import (
    KAPPAS,
    SHORT,
    STEERED,
    generation_figures,
    judge_rate,
    matched_values,
    summary,
    toxicity,
    transfer_options,
)
from steerport.texts import neutral


class PowerScorer:
    """κ(v) = c·v^p with a kink, counting evaluations (a stand-in for HeadScorer.stats)."""

    def __init__(self, c: float, p: float):
        self.c, self.p, self.calls = c, p, 0

    def stats(self, steers):
        self.calls += 1
        v = steers[0][1]
        return SimpleNamespace(kl=self.c * v**self.p * (1.1 if v > 30 else 1.0))


def test_matched_values_gives_each_kappa_its_value_and_evaluations():
    sc = PowerScorer(1e-4, 2.0)
    out = matched_values(sc, None, KAPPAS, rel_tol=0.02)
    assert list(out) == [str(k) for k in KAPPAS]
    for k in KAPPAS:
        assert abs(out[str(k)]["kl"] - k) <= 0.02 * k
        assert math.isclose(sc.stats([(None, out[str(k)]["value"])]).kl, out[str(k)]["kl"])
    assert sum(v["evals"] for v in out.values()) == sc.calls - len(KAPPAS)


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_toxicity_split_keeps_pairs_whole_and_balances_classes(tmp_path):
    rows = []
    for pair in range(400):  # one toxic text and one or two paraphrases per pair
        rows.append({"text": f"toxic {pair}", "label": 1, "pair_id": pair})
        rows += [{"text": f"clean {pair} {j}", "label": 0, "pair_id": pair} for j in range(1 + pair % 2)]
    _write(tmp_path / "toxicity/paradetox/train.jsonl", rows)
    _write(tmp_path / "toxicity/paradetox/test.jsonl", rows[:60])
    _write(tmp_path / "prompts/rtp_nontoxic.jsonl", [{"prompt": {"text": f"p{i}"}} for i in range(5)])
    task = toxicity(tmp_path, heldout=10, n_prompts=3, quick=False, per_class=100, dev_per_class=30)
    pair_of = {r["text"]: r["pair_id"] for r in rows}
    train_pairs = {pair_of[e.text] for e in task.train}
    dev_pairs = {pair_of[e.text] for e in task.dev}
    assert not train_pairs & dev_pairs
    assert sum(e.label > 0 for e in task.train) == sum(e.label < 0 for e in task.train) == 100
    assert sum(e.label > 0 for e in task.dev) == sum(e.label < 0 for e in task.dev) == 30
    assert all((e.label > 0) == e.text.startswith("clean") for e in task.train)  # the steer's side: non-toxic
    assert task.test_labels.count(1) == task.test_labels.count(0) == 10 and len(task.prompts) == 3
    assert task.direction == -1  # generation steers toward toxic: the non-toxic side has no room to move


def test_generation_figures_pool_perplexity_and_bound_the_judge_rate():
    doc = {"kappa": 0.1, "kappa_reaches_0.2": True, "reference_model": "ref",
           "runs": {"unsteered": {"value": 0.0, "judge_prob": [0.9, 0.1, 0.7, 0.2], "nll_sum": [2.0, 4.0, 6.0, 0.0],
                                  "nll_count": [1, 2, 3, 0], "distinct": {"1": [1, 1, 0.5, 1], "2": [1] * 4, "3": [1] * 4},
                                  "samples": ["a", "b"]}}}
    r = generation_figures(doc, np.random.default_rng(0), 200)["runs"]["unsteered"]
    assert r["judge_rate"] == 0.5 and r["judge_rate_ci95"][0] < 0.5 < r["judge_rate_ci95"][1]
    assert math.isclose(r["perplexity"], math.exp(12 / 6))  # pooled over tokens, not averaged over texts
    assert r["perplexity_ci95"][0] <= r["perplexity"] <= r["perplexity_ci95"][1]
    assert math.isclose(r["distinct_1"], 0.875)
    doc["runs"]["unsteered"]["judge_prob"] = [0.9, 0.1, 0.3, 0.2]  # steered toward the other side: P ≤ 0.5 counts
    toward_other = generation_figures({**doc, "direction": -1}, np.random.default_rng(0), 10)
    assert toward_other["direction"] == -1 and toward_other["runs"]["unsteered"]["judge_rate"] == 0.75


def test_summary_reports_seed_spread_and_interval():
    s = summary([0.8, 0.9, 1.0], [0.85, 0.9, 0.95, float("nan")] * 50)
    assert math.isclose(s["mean"], 0.9) and math.isclose(s["seed_std"], 0.1)
    assert s["ci95"][0] >= 0.85 and s["ci95"][1] <= 0.95


def test_judge_rate_counts_the_side_steered_toward():
    run = {"judge_prob": [0.9, 0.6, 0.4, 0.5]}
    assert judge_rate(run, 1) == 0.5 and judge_rate(run, -1) == 0.5  # 0.5 itself is not above the threshold
    assert judge_rate({"judge_prob": [0.99, 0.98, 0.2]}, -1) == 1 / 3


def test_ladder_form_names_stand_for_transfer_options():
    plain = transfer_options("refined", keywords=4)
    assert plain.form == "refined" and plain.steered_texts == 0 and plain.hidden_texts is None and plain.refine.keywords == 4
    steered = transfer_options(STEERED, steered_texts=32)
    assert steered.form == "refined" and steered.steered_texts == 32 and steered.hidden_texts is None
    assert steered.steered_seed == 0 and transfer_options(f"{STEERED}-s2").steered_seed == 2000
    short = transfer_options(SHORT)  # the neutral texts the steered form keeps, alone
    assert short.steered_texts == 0 and list(short.hidden_texts or []) == neutral("fit")[:steered.steered_neutral]
    drawn = transfer_options(f"{SHORT}-r3").hidden_texts or []
    assert len(drawn) == len(set(drawn)) == steered.steered_neutral and set(drawn) <= set(neutral("fit"))
    assert drawn == transfer_options(f"{SHORT}-r3").hidden_texts != transfer_options(f"{SHORT}-r4").hidden_texts
    assert transfer_options("logit").form == "logit"

"""The transfer-quality benchmark end to end on tiny random models (``--quick``)."""

import json
import math

from benchmarks.transfer_quality import main


def test_quick_benchmark_runs_end_to_end(tmp_path):
    res = main(["--quick", "--task", "sentiment", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    data = json.loads((out / "transfer_quality_quick.json").read_text())
    md = (out / "transfer_quality_quick.md").read_text()
    assert "Retained effect" in md and "Ablations" in md and "Warm start" in md
    for png in data["plots"]:
        assert (out / png).stat().st_size > 1000
    names = [m.rsplit("/", 1)[-1] for m in res["models"]]
    mats = data["summary"]["sentiment"]["matrices"]
    # every ordered pair of the three models has a retained effect, an AUC and an agreement
    for key in ("retained_effect", "auc", "agreement"):
        assert {f"{s}->{t}" for s in names for t in names if s != t} == set(mats[key])
        assert all(math.isfinite(c["mean"]) for c in mats[key].values())
    # every steer was evaluated at the matched KL budget
    for rep in data["evaluations"].values():
        for r in rep["steers"].values():
            assert abs(r["kl"] - rep["kappa_target"]) <= 0.05 * rep["kappa_target"]
        assert rep["steers"]["native.s0"]["retained_effect"] == 1.0
    abl = data["summary"]["sentiment"]["ablations"]
    assert {"default", "form=paper", "form=hidden", "method=ridge", "method=procrustes", "calibration=none", "anchor"} <= set(abl)
    warm = data["warm"]["sentiment"]
    assert warm["curves"]["scratch"][0]["step"] == 0 and len(warm["curves"]["warm"]) >= 2
    # the warm-small run trains on fewer texts, so its body pass is its own and shorter in texts
    assert warm["runs"]["warm-small"]["texts"] < warm["runs"]["scratch"]["texts"]
    # step 0 of both warm runs is the transferred steer itself, on the same held-out texts
    assert warm["curves"]["warm"][0]["auc"] == warm["curves"]["warm-small"][0]["auc"]
    # a second run reuses every cached stage
    again = main(["--quick", "--task", "sentiment", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out2"),
                  "--stages", "train,transfer,evaluate,report", "--no-warm"])
    key = "sentiment/" + names[0]
    for name, r in res["evaluations"][key]["steers"].items():
        assert again["evaluations"][key]["steers"][name]["separation"] == r["separation"]

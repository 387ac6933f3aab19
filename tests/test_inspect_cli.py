"""The inspect / explain / score / sweep / merge / control-vector commands, end to end on a tiny model dir."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from steerport import Steer
from steerport.cli import app
from tests.tiny import D, random_steer_factors, tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    lm = tiny_model("gpt2")
    model_dir = root / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    from steerport.models import load_model

    fp = load_model(str(model_dir)).fingerprint
    A, B = random_steer_factors(seed=4)
    steer = Steer.lm_steer(A, B, epsilon=1.0, positive="nice", model={"spec": str(model_dir), "fingerprint": fp})
    steer.save(root / "s.st")
    data = root / "d.jsonl"
    rows = [{"text": t, "label": y} for t, y in [("The movie was wonderful.", 1), ("I love this place.", 1),
                                                  ("The film was terrible.", 0), ("What a waste of time.", 0)]]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, str(model_dir)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_inspect_keywords_json(setup):
    root, model = setup
    r = run("inspect", root / "s.st", "--model", model, "--keywords", "4", "--value", "2", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["directions"]) == 3 and len(doc["directions"][0]["positive"]) == 4
    assert len(doc["raised"]) == 4 and doc["value"] == 2.0 and doc["steer"]["positive"] == "nice"
    r = run("inspect", root / "s.st", "--model", model, "--keywords", "3")
    assert r.exit_code == 0 and "singular direction 1" in r.output and "raised most" in r.output


def test_explain_writes_html(setup):
    root, model = setup
    r = run("explain", model, "--steer", f"{root / 's.st'}:2", "--text", "I love this place.", "--html", root / "e.html")
    assert r.exit_code == 0, r.output
    page = (root / "e.html").read_text()
    div = page.split('<div class="text">')[1].split("</div>")[0]
    assert re.sub(r"<[^>]+>", "", div) == "I love this place."
    r = run("explain", model, "--steer", root / "s.st", "--text", "I love it.", "--json")
    doc = json.loads(r.stdout)
    assert "".join(t["surface"] for t in doc["tokens"]) == "I love it."


def test_score_reports_auc_and_writes_scores(setup):
    root, model = setup
    r = run("score", model, "--steer", f"{root / 's.st'}:3", "--data", root / "d.jsonl", "--out", root / "scores.jsonl")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    from steerport.metrics import roc_auc
    from steerport.models import load_model
    from steerport.scoring import steer_scores

    texts = ["The movie was wonderful.", "I love this place.", "The film was terrible.", "What a waste of time."]
    want = roc_auc(steer_scores(load_model(model), Steer.load(root / "s.st"), texts, 3.0), [1, 1, 0, 0])
    assert summary["n"] == 4 and summary["roc_auc"] == pytest.approx(want)
    lines = [json.loads(x) for x in (root / "scores.jsonl").read_text().splitlines()]
    assert [x["label"] for x in lines] == [1, 1, 0, 0]
    # flipping which label is positive mirrors the AUC
    r2 = run("score", model, "--steer", f"{root / 's.st'}:3", "--data", root / "d.jsonl", "--positive-label", "0")
    assert json.loads(r2.stdout)["roc_auc"] == pytest.approx(1 - summary["roc_auc"])


def test_sweep_writes_json_and_png(setup):
    root, model = setup
    r = run("sweep", model, "--steer", root / "s.st", "--values", "-2:2:3", "--data", root / "d.jsonl",
            "--out", root / "sw", "--samples", "0")
    assert r.exit_code == 0, r.output
    doc = json.loads((root / "sw" / "sweep.json").read_text())
    assert [row["value"] for row in doc["rows"]] == [-2.0, 0.0, 2.0]
    assert doc["rows"][1]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert (root / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_command(setup, tmp_path):
    root, model = setup
    r = run("merge", model, "--steer", f"{root / 's.st'}:2", "--out", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "config.json").exists() and "s.st" in (tmp_path / "m" / "README.md").read_text()


def test_control_vector_commands(setup, tmp_path):
    act = Steer("actadd", {"vector": torch.randn(D)}, epsilon=2.0, meta={"layer": 2, "positions": "all"})
    act.save(tmp_path / "a.st")
    r = run("export-cvec", f"{tmp_path / 'a.st'}:1.5", "--out", tmp_path / "a.gguf", "--model-hint", "gpt2")
    assert r.exit_code == 0, r.output
    r = run("import-cvec", tmp_path / "a.gguf", "--out", tmp_path / "b.st")
    assert r.exit_code == 0, r.output
    back = Steer.load(tmp_path / "b.st")
    torch.testing.assert_close(back.tensors["vector"], 3.0 * act.tensors["vector"])
    assert back.meta["layer"] == 2


def test_user_errors_are_one_line(setup, tmp_path):
    """Through main(): SteerportError -> one line on stderr, exit 1, no traceback."""
    import os
    import subprocess
    import sys

    root, model = setup
    act = Steer("actadd", {"vector": torch.ones(3, D)}, meta={"layer": 1, "positions": "front"})
    act.save(tmp_path / "front.st")
    cases = [
        ["merge", model, "--steer", f"{tmp_path / 'front.st'}:1", "--out", str(tmp_path / "x")],
        ["explain", model, "--steer", str(root / "s.st")],
        ["score", model, "--steer", str(root / "s.st"), "--data", str(tmp_path / "missing.jsonl")],
        ["sweep", model, "--steer", str(root / "s.st"), "--values", "1:2"],
        ["export-cvec", str(tmp_path / "front.st"), "--out", str(tmp_path / "f.gguf")],
        ["import-cvec", str(root / "s.st"), "--out", str(tmp_path / "y.st")],
    ]
    for args in cases:
        env = {**os.environ, "COLUMNS": "2000"}  # so rich does not wrap the line
        p = subprocess.run([sys.executable, "-m", "steerport.cli", *args], capture_output=True, text=True, env=env, check=False)
        assert p.returncode == 1, (args, p.stderr)
        assert p.stderr.startswith("error:") and "Traceback" not in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr

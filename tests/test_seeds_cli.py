"""The ActAdd / token-probability commands end to end on a tiny model saved as a local directory."""

import json

import pytest
from typer.testing import CliRunner

from steerport.cli import app, main
from steerport.steer import Steer
from tests.tiny import CORPUS, tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = []
    for arch in ("gpt2", "llama"):
        lm = tiny_model(arch)
        d = tmp_path_factory.mktemp(arch)
        lm.model.save_pretrained(d)
        lm.tokenizer.save_pretrained(d)
        dirs.append(str(d))
    text = tmp_path_factory.mktemp("text") / "neutral.txt"
    text.write_text("\n".join(dict.fromkeys(CORPUS)) + "\n")
    return dirs[0], dirs[1], str(text)


def ok(args):
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_actadd_generate_and_transfer(model_dirs, tmp_path):
    gpt2, llama, text = model_dirs
    st = tmp_path / "love.st"
    ok(["actadd", gpt2, "--plus", " love", "--minus", " hate", "--plus", " good", "--minus", " bad",
        "--layer", "0.5", "--coeff", "3", "--out", str(st)])
    s = Steer.load(st)
    assert s.kind == "actadd" and s.meta["layer"] == 1 and len(s.meta["pairs"]) == 2 and s.epsilon == 3
    res = ok(["generate", gpt2, "--steer", f"{st}:2", "--prompt", "The movie", "--max-new-tokens", "3", "--dtype", "float32"])
    assert "The movie" in res.output
    for method in ("recipe", "map"):
        dst = tmp_path / f"{method}.st"
        ok(["actadd-transfer", gpt2, llama, "--steer", str(st), "--method", method, "--neutral", text,
            "--lines", "6", "--out", str(dst)])
        t = Steer.load(dst)
        assert t.meta["lineage"]["method"] == method and t.model["spec"] == llama


def test_token_steer_analyze_transfer_and_mixed_generate(model_dirs, tmp_path):
    gpt2, llama, text = model_dirs
    st = tmp_path / "o.st"
    res = ok(["token-steer", gpt2, "--token", "o", "--scale", "5", "--token", "a", "--scale", "0.5",
              "--detect", text, "--dtype", "float32", "--out", str(st)])
    assert "adjusted R²" in res.output
    s = Steer.load(st)
    assert s.kind == "token-prob" and s.meta["tokens"] == ["o", "a"]
    js, png = tmp_path / "a.json", tmp_path / "pca.png"
    ok(["analyze", gpt2, "--text", text, "--png", str(png), "--prune-curve", "--json", str(js), "--dtype", "float32"])
    result = json.loads(js.read_text())
    assert len(result["slopes"]) == 32 and len(result["prune_curve"]) == 10
    assert png.stat().st_size > 1000 and (tmp_path / "pca_prune.png").stat().st_size > 1000
    act = tmp_path / "act.st"
    ok(["actadd", gpt2, "--plus", " love", "--minus", " hate", "--layer", "1", "--out", str(act)])
    ok(["generate", gpt2, "--steer", str(st), "--steer", f"{act}:2", "--prompt", "I", "--max-new-tokens", "3", "--dtype", "float32"])
    dst = tmp_path / "t.st"
    ok(["token-transfer", llama, "--steer", str(st), "--detect", text, "--dtype", "float32", "--out", str(dst)])
    assert Steer.load(dst).model["spec"] == llama


def test_actadd_coefficient_for_a_kl_budget(model_dirs, tmp_path):
    gpt2, _, _ = model_dirs
    st = tmp_path / "calm.st"
    ok(["actadd", gpt2, "--plus", " love", "--minus", " hate", "--layer", "1", "--positions", "all",
        "--kappa", "0.002", "--out", str(st)])
    s = Steer.load(st)
    rec = s.meta["coefficient_for_kappa"]
    assert rec["kappa"] == 0.002 and abs(rec["reached"] / 0.002 - 1) < 0.05 and s.epsilon != 5.0
    res = runner.invoke(app, ["actadd", gpt2, "--plus", "a", "--minus", "b", "--kappa", "-1", "--out", str(st)])
    assert res.exit_code != 0


def test_transfer_command_carries_every_kind(model_dirs, tmp_path):
    """`steerport transfer` dispatches on the steer's kind: ActAdd by recipe/map, token-prob by surface."""
    gpt2, llama, text = model_dirs
    act, tok = tmp_path / "act.st", tmp_path / "tok.st"
    ok(["actadd", gpt2, "--plus", " love", "--minus", " hate", "--layer", "1", "--out", str(act)])
    ok(["token-steer", gpt2, "--token", "o", "--scale", "5", "--detect", text, "--dtype", "float32", "--out", str(tok)])
    for method in ("recipe", "map"):
        dst = tmp_path / f"act.{method}.st"
        ok(["transfer", gpt2, llama, "--steer", str(act), "--actadd-method", method, "--calib-text", text, "--out", str(dst)])
        moved = Steer.load(dst)
        assert moved.kind == "actadd" and moved.meta["lineage"]["method"] == method and moved.model["spec"] == llama
    dst = tmp_path / "tok.llama.st"
    ok(["transfer", gpt2, llama, "--steer", str(tok), "--calib-text", text, "--out", str(dst)])
    moved = Steer.load(dst)
    assert moved.kind == "token-prob" and moved.meta["tokens"] == ["o"] and moved.model["spec"] == llama


def test_user_errors_are_one_line(model_dirs, tmp_path, capsys, monkeypatch):
    gpt2, _, _ = model_dirs
    for argv in (
        ["actadd", gpt2, "--plus", " a", "--plus", " c", "--minus", " b", "--out", str(tmp_path / "x.st")],
        ["actadd", gpt2, "--plus", " a", "--minus", " b", "--layer", "9", "--out", str(tmp_path / "x.st")],
        ["token-steer", gpt2, "--token", " wonderful movie", "--scale", "2", "--dtype", "float32", "--out", str(tmp_path / "y.st")],
    ):
        monkeypatch.setattr("sys.argv", ["steerport", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 1
        err = capsys.readouterr().err
        err = err[err.index("error:"):]  # after transformers' own loading bar
        assert "Traceback" not in err and err.count("error:") == 1

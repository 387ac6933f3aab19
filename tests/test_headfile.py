"""Output embeddings read by rows from the checkpoint, and the cached model identity."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import steerport.headfile as hf
from steerport.embeddings import load_embeddings
from steerport.errors import SteerportError
from steerport.headfile import cache_file, open_head, read_rows
from tests.tiny import tiny_model


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERPORT_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_read_rows_equals_the_whole_tensor_indexed(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(37, 5, generator=g).to(dtype)
    path = tmp_path / "w.safetensors"
    save_file({"other": torch.zeros(3), "w": W}, str(path))
    ids = torch.tensor([36, 0, 5, 5, 17])
    out = read_rows(path, "w", ids)
    assert out.dtype == torch.float32 and torch.equal(out, W.float()[ids])
    assert read_rows(path, "w", torch.tensor([], dtype=torch.long)).shape == (0, 5)
    with pytest.raises(SteerportError, match="out of range") as e:
        read_rows(path, "w", torch.tensor([37]))
    assert "\n" not in str(e.value)
    with pytest.raises(SteerportError, match="no 2-D float tensor 'other'"):
        read_rows(path, "other", ids)
    with pytest.raises(SteerportError, match="no 2-D float tensor 'missing'"):
        read_rows(path, "missing", ids)


def _save_dir(lm, path):
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def test_open_head_caches_the_identity_and_reads_the_same_rows(tmp_path, monkeypatch):
    d = _save_dir(tiny_model("qwen2", seed=2), tmp_path / "m")
    full = load_embeddings(d)
    first = open_head(d)
    assert first is not None and first.tokenizer is not None  # a miss loads the tokenizer (for the fingerprint)
    assert first.full().fingerprint == full.fingerprint and torch.equal(first.full().embeddings, full.embeddings)
    assert (first.fingerprint, first.vocab_size, first.hidden_size) == (full.fingerprint, *full.embeddings.shape)
    entry = cache_file(tmp_path / "m")
    assert json.loads(entry.read_text())["fingerprint"] == full.fingerprint

    def no_tokenizer(*a, **kw):
        raise AssertionError("tokenizer or tensor loaded on a cache hit")

    monkeypatch.setattr(hf, "locate_head", no_tokenizer)
    again = open_head(d)
    assert again is not None and again.tokenizer is None and again.fingerprint == full.fingerprint
    ids = torch.tensor([3, 1, 150, 0])
    assert torch.equal(again.rows(ids), full.embeddings[ids]) and torch.equal(first.rows(ids), full.embeddings[ids])
    # any file in the folder changes (here: its modification time): the entry is not trusted
    cfg = tmp_path / "m" / "tokenizer_config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(AssertionError, match="cache hit"):
        open_head(d)
    monkeypatch.undo()
    monkeypatch.setenv("STEERPORT_HOME", str(tmp_path / "home"))
    assert open_head(d).tokenizer is not None  # recomputed
    # a damaged entry is recomputed, never an error
    entry.write_text("{not json")
    assert open_head(d).fingerprint == full.fingerprint


def test_open_head_gives_none_for_a_hub_id():
    assert open_head("gpt2") is None  # an alias of a hub id: read the ordinary way

"""Atomic writes and the safetensors + JSON container: round trips, refusals, one-line errors."""

import json
import os

import pytest
import torch

from steerport.errors import SteerportError, one_line
from steerport.fileio import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    read_json_safetensors,
    require_fields,
    sha256_file,
    write_json_safetensors,
)


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # ordinary permissions, not mkstemp's


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_json(path, {"a": 1})

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_atomic_directory_appears_only_on_success(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("stop")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(dest) as tmp:
        (tmp / "x").write_text("whole")
    assert (dest / "x").read_text() == "whole"
    with pytest.raises(SteerportError, match="already exists"):
        with atomic_directory(dest):
            pass
    with atomic_directory(dest, replace=True) as tmp:
        (tmp / "y").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["y"]


def test_safetensors_json_round_trip_and_sha256(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"A": torch.arange(6.0).reshape(2, 3), "ids": torch.tensor([3, 1], dtype=torch.int64)}
    write_json_safetensors(path, tensors, "k", {"x": "é", "n": [1, 2]})
    doc, got = read_json_safetensors(path, "k", "a test file")
    assert doc == {"x": "é", "n": [1, 2]}
    assert torch.equal(got["A"], tensors["A"]) and torch.equal(got["ids"], tensors["ids"])
    import hashlib

    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("data, fragment", [
    (b"\x80\x04\x95rest-of-a-pickle", "never unpickles"),
    (b"PK\x03\x04zip", "never unpickles"),
    (b"abc", "truncated"),
    ((1000).to_bytes(8, "little") + b"{}", "truncated"),
    ((2).to_bytes(8, "little") + b"{x", "corrupted"),
])
def test_broken_files_give_one_line_errors(tmp_path, data, fragment):
    path = tmp_path / "bad.st"
    path.write_bytes(data)
    with pytest.raises(SteerportError, match=fragment) as e:
        read_json_safetensors(path, "k", "a test file")
    assert "\n" not in str(e.value)


def test_missing_key_and_missing_fields(tmp_path):
    path = tmp_path / "t.safetensors"
    write_json_safetensors(path, {"A": torch.zeros(1)}, "other", {})
    with pytest.raises(SteerportError, match="without k metadata"):
        read_json_safetensors(path, "k", "a test file")
    with pytest.raises(SteerportError, match="lacks the required field 'source'"):
        require_fields(path, {"format": 1}, ("format", "source"), "mapping")
    with pytest.raises(SteerportError, match="no such file"):
        read_json_safetensors(tmp_path / "missing", "k", "a test file")


def test_one_line():
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(KeyError()) == "KeyError"

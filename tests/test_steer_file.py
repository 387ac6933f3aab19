"""The .st file: round-trips and every kind of broken file."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from steerport import Steer, SteerportError
from steerport.steer import FORMAT, VERSION
from tests.tiny import random_steer_factors


def make_steer(**kw) -> Steer:
    A, B = random_steer_factors()
    meta = {"training": {"lr": 0.01, "steps": 3}, "lineage": None}
    return Steer.lm_steer(A, B, epsilon=1e-3, positive="positive sentiment",
                          model={"spec": "tiny", "fingerprint": "abc"}, meta=meta, **kw)


def test_round_trip_keeps_every_tensor_and_field(tmp_path):
    s = make_steer()
    s.tensors["domain.A"], s.tensors["domain.B"] = random_steer_factors(r=2, seed=7)
    path = s.save(tmp_path / "s.st")
    t = Steer.load(path)
    assert t.kind == s.kind and t.epsilon == s.epsilon and t.positive == s.positive
    assert t.model == s.model and t.meta == s.meta
    assert set(t.tensors) == set(s.tensors)
    for k in s.tensors:
        assert torch.equal(t.tensors[k], s.tensors[k])
    assert t.metadata() == s.metadata()
    assert t.fingerprint == s.fingerprint


def test_other_kinds_round_trip(tmp_path):
    tp = Steer("token-prob", {"token_ids": torch.tensor([3, 9]), "delta": torch.randn(2, 32)}, epsilon=1.0)
    aa = Steer("actadd", {"vector": torch.randn(32)}, epsilon=4.0, meta={"layer": 1})
    for s in (tp, aa):
        t = Steer.load(s.save(tmp_path / f"{s.kind}.st"))
        assert t.kind == s.kind and t.meta == s.meta
        assert all(torch.equal(t.tensors[k], s.tensors[k]) for k in s.tensors)


def test_file_is_plain_safetensors_with_documented_metadata(tmp_path):
    from safetensors import safe_open

    path = make_steer().save(tmp_path / "s.st")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["steerport"])
        assert set(f.keys()) == {"A", "B"}
    assert meta["format"] == FORMAT and meta["version"] == VERSION
    assert meta["kind"] == "lm-steer" and meta["rank"] == 3 and meta["hidden_size"] == 32


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "s.st"
    make_steer().save(path)
    make_steer().save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.st"]


def expect_error(path, *fragments):
    with pytest.raises(SteerportError) as e:
        Steer.load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for f in fragments:
        assert f in msg, msg


def test_truncated_file_rejected(tmp_path):
    path = make_steer().save(tmp_path / "s.st")
    data = path.read_bytes()
    (tmp_path / "t.st").write_bytes(data[: len(data) - 50])
    expect_error(tmp_path / "t.st", "damaged")
    (tmp_path / "h.st").write_bytes(data[:40])
    expect_error(tmp_path / "h.st", "truncated")
    (tmp_path / "e.st").write_bytes(b"")
    expect_error(tmp_path / "e.st", "truncated")


def test_corrupted_header_rejected(tmp_path):
    data = bytearray(make_steer().save(tmp_path / "s.st").read_bytes())
    data[10:20] = b"\xff" * 10
    (tmp_path / "c.st").write_bytes(bytes(data))
    expect_error(tmp_path / "c.st", "corrupted")


def test_wrong_version_and_format_rejected(tmp_path):
    s = make_steer()
    for key, value, fragment in [("version", VERSION + 1, "newer"), ("version", "one", "bad format version"),
                                 ("format", "other", "format")]:
        meta = s.metadata() | {key: value}
        path = tmp_path / f"{key}{value}.st"
        save_file(dict(s.tensors), str(path), metadata={"steerport": json.dumps(meta)})
        expect_error(path, fragment)


def test_nan_rejected(tmp_path):
    s = make_steer()
    bad = dict(s.tensors)
    bad["A"] = bad["A"].clone()
    bad["A"][0, 0] = float("nan")
    path = tmp_path / "nan.st"
    save_file(bad, str(path), metadata={"steerport": json.dumps(s.metadata())})
    expect_error(path, "NaN")


def test_pickle_rejected_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "evil.st"
    path.write_bytes(pickle.dumps(Boom()))
    expect_error(path, "pickle")
    torch.save({"A": torch.zeros(2)}, tmp_path / "zip.st")
    expect_error(tmp_path / "zip.st", "pickle")


def test_shape_and_metadata_mismatches_rejected(tmp_path):
    s = make_steer()
    cases = {
        "shape": ({"A": torch.zeros(32, 3), "B": torch.zeros(32, 2)}, s.metadata(), "d x r"),
        "rank": (dict(s.tensors), s.metadata() | {"rank": 5}, "rank"),
        "kind": (dict(s.tensors), s.metadata() | {"kind": "mystery"}, "unknown steer kind"),
        "missing": ({"A": s.A}, s.metadata(), "lacks tensor"),
        "eps": (dict(s.tensors), s.metadata() | {"epsilon": "big"}, "epsilon"),
        "no-meta": (dict(s.tensors), None, "without steerport metadata"),
    }
    for name, (tensors, meta, fragment) in cases.items():
        path = tmp_path / f"{name}.st"
        save_file(tensors, str(path), metadata=None if meta is None else {"steerport": json.dumps(meta)})
        expect_error(path, fragment)


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.st", "no such")

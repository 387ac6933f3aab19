"""The refinement's data cache: reused per model pair, recomputed when damaged or when the weights change."""

from __future__ import annotations

import torch

from tests.test_refine import _refined
from tests.test_transfer import source_steer
from tests.tiny import tiny_model


def test_refinement_data_is_cached_per_model_pair_and_gives_the_same_steer(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERPORT_HOME", str(tmp_path))
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    steer = source_steer(src)
    first = _refined(steer, src, tgt)
    (path,) = (tmp_path / "refine").glob("*.safetensors")
    again = _refined(steer, src, tgt)
    assert first.lineage["refine"]["data"] == "computed" and again.lineage["refine"]["data"] == "cache"
    for k in first.steer.tensors:
        assert torch.equal(first.steer.tensors[k], again.steer.tensors[k]), k
    other = _refined(source_steer(src, epsilon=0.2), src, tgt)  # another steer, same pair: same data
    assert other.lineage["refine"]["data"] == "cache"
    path.write_bytes(b"\x80\x04 not safetensors")  # a damaged cache is recomputed and rewritten
    redone = _refined(steer, src, tgt)
    assert redone.lineage["refine"]["data"] == "computed" and torch.equal(redone.steer.A, first.steer.A)
    tgt.model.model.norm.weight.data.mul_(1.5)  # other weights with the same output embeddings: not reused
    assert _refined(steer, src, tgt).lineage["refine"]["data"] == "computed"

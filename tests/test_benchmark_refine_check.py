"""The refinement variants of benchmarks/refine_check.py: their weights reduce to the library's at the ends."""

import torch

from benchmarks.refine_check import steered_problem
from benchmarks.transfer_ladder import kept
from steerport.refine import shift_problem
from tests.test_transfer import D, source_steer
from tests.tiny import tiny_model


def _problem(src, tgt, weight="both"):
    g = torch.Generator().manual_seed(3)
    ids = torch.arange(1, 60)
    return shift_problem(torch.randn(9, D, generator=g), torch.randn(9, D, generator=g), src, tgt, ids, ids,
                         top_k=5, weight=weight), ids


def _tokens(p):
    return p.pairs[p.ids]  # (N, K) rows of the aligned vocabulary


def test_steered_weights_without_the_steered_share_are_the_librarys():
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    base, ids = _problem(src, tgt)
    got = steered_problem(base, source_steer(src), src, tgt, ids, ids, sigma=3.0, mix=0.0)
    assert torch.equal(_tokens(got), _tokens(base)) and torch.allclose(got.w, base.w)
    assert torch.equal(got.X_s, src.output_embeddings.detach().float()[ids[got.pairs]])


def test_steered_weights_at_value_zero_are_the_sources_probabilities():
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    base, ids = _problem(src, tgt)
    source_only, _ = _problem(src, tgt, weight="source")
    got = steered_problem(base, source_steer(src), src, tgt, ids, ids, sigma=0.0, mix=1.0)
    assert torch.equal(_tokens(got), _tokens(source_only)) and torch.allclose(got.w, source_only.w, atol=1e-7)


def test_steered_weights_move_towards_the_tokens_the_steer_promotes():
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    base, ids = _problem(src, tgt)
    steer = source_steer(src, epsilon=5.0)
    got = steered_problem(base, steer, src, tgt, ids, ids, sigma=3.0, mix=1.0)
    assert not torch.equal(_tokens(got), _tokens(base))
    assert (got.w.sum(1) <= 1 + 1e-6).all() and (got.w >= 0).all()


def test_kept_is_read_from_the_cell_or_rebuilt_from_per_seed_figures():
    f = {"mean": 0.5, "seed_std": 0.1, "ci95": [0.4, 0.6], "per_seed": [0.5]}
    assert kept({"kept@0.05": f}, 0.05) == "0.50 [0.40, 0.60] ±0.10"
    cell = {"retained@0.05": {"per_seed": [0.5, 1.0]}, "sep_native@0.05": {"per_seed": [2.0, 1.0]},
            "sep_source@0.05": {"per_seed": [4.0, 2.0]}}
    assert kept(cell, 0.05) == "0.38"  # mean of 0.5·2/4 and 1·1/2

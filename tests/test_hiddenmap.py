"""The hidden-state map: an exact identity on one model, and its diagnostics."""

import torch

from steerport.hiddenmap import fit_hidden_map
from tests.tiny import CORPUS, D, tiny_model


def test_a_model_maps_onto_itself_by_the_identity():
    lm = tiny_model("llama", seed=0)
    hm = fit_hidden_map(lm, lm, sorted(set(CORPUS)), holdout=0.2)
    assert hm.K.shape == (D, D)
    assert torch.allclose(hm.K, torch.eye(D), atol=1e-3)
    assert hm.diagnostics["heldout"]["r2"] > 0.9999
    assert hm.diagnostics["n_positions"] > D and hm.diagnostics["n_texts"] == len(set(CORPUS))


def test_the_map_goes_from_target_width_to_source_width():
    small, wide = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    hm = fit_hidden_map(small, wide, sorted(set(CORPUS)))
    assert hm.K.shape == (small.hidden_size, wide.hidden_size)  # h_s ≈ K h_t

"""Integration checks on a real pretrained model from the offline catalog (pulled on first use)."""

import pytest
import torch

from steerport import Steer, generate, load_embeddings, load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", dtype="bfloat16")


def test_real_model_loads_with_consistent_fingerprint(smollm):
    assert smollm.hidden_size == 576 and smollm.output_embeddings.shape[0] == 49152
    assert load_embeddings("smollm2-135m").fingerprint == smollm.fingerprint


def test_real_model_steered_generation(smollm):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(576, 4, generator=g), torch.randn(576, 4, generator=g)
    steer = Steer.lm_steer(A, B, epsilon=1e-2, model={"spec": "smollm2-135m", "fingerprint": smollm.fingerprint})
    prompts = ["The movie was", "My neighbour said"]
    base = generate(smollm, prompts, max_new_tokens=12)
    assert all(len(t.strip()) > 0 for t in base)
    assert generate(smollm, prompts, [(steer, 0.0)], max_new_tokens=12) == base
    assert generate(smollm, prompts, [(steer, 1.0)], max_new_tokens=12) != base

"""The capture primitive and the cache of hidden states: equal to the model's own states, resumable."""

import pytest
import torch

from steerport.capture import cache_hidden, capture, input_of
from steerport.errors import SteerportError
from tests.tiny import ARCHS, tiny_model

TEXTS = ["The movie was wonderful.", "I hate it.", "The weather today is mild with a light breeze from the west."]


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_points_equal_hidden_states(arch):
    lm = tiny_model(arch)
    enc = lm.tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        out = lm.model(**enc, output_hidden_states=True)
    head, first, last = capture(lm, ["head", 0, lm.n_layers], **enc)
    torch.testing.assert_close(first, out.hidden_states[0])
    z = head @ lm.output_embeddings.T
    if lm.lm_head_bias is not None:
        z = z + lm.lm_head_bias
    torch.testing.assert_close(z, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head, input_of(lm.model, lm.lm_head, **enc))
    assert last.shape == head.shape
    with pytest.raises(SteerportError, match="capture point"):
        capture(lm, [lm.n_layers + 1], **enc)


def test_cache_is_flat_over_texts_with_next_token_targets():
    lm = tiny_model("llama")
    cache = cache_hidden(lm, TEXTS, tokens_per_batch=16)
    ids = [lm.tokenizer(t)["input_ids"] for t in TEXTS]
    assert cache.n_positions == sum(map(len, ids)) and cache.n_texts == 3
    start = 0
    for i, t in enumerate(ids):
        h = capture(lm, ["head"], input_ids=torch.tensor([t]))[0][0]
        torch.testing.assert_close(cache.h[start : start + len(t)], h, atol=1e-5, rtol=1e-5)
        assert cache.targets[start : start + len(t)].tolist() == t[1:] + [-1]
        assert set(cache.text_id[start : start + len(t)].tolist()) == {i}
        start += len(t)
    pred = cache_hidden(lm, TEXTS, predicted_only=True)
    assert pred.n_positions == cache.n_targets and (pred.targets >= 0).all()


def test_workdir_cache_resumes_after_an_interruption(tmp_path):
    lm = tiny_model("gpt2")
    texts = TEXTS * 4
    full = cache_hidden(lm, texts, tokens_per_batch=24)
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] >= 2

    with pytest.raises(KeyboardInterrupt):
        cache_hidden(lm, texts, tokens_per_batch=24, workdir=tmp_path, should_stop=stop_after_two)
    seen = []
    resumed = cache_hidden(lm, texts, tokens_per_batch=24, workdir=tmp_path, progress=lambda n, k: seen.append(n))
    assert seen[0] > 0  # started after the batches already done
    torch.testing.assert_close(resumed.h, full.h)

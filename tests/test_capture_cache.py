"""The capture primitive and the cache of hidden states: equal to the model's own states, resumable."""

import pytest
import torch

from steerport.capture import (
    batch_plan,
    cache_hidden,
    capture,
    input_of,
    pack_by_length,
    pack_rows,
    packs_texts,
    plan_key,
)
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


def test_pack_rows_lays_every_text_once_within_the_row_length():
    lengths = [5, 30, 7, 30, 2, 12, 40, 1, 9, 9]
    rows = pack_rows(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 32 or len(row) == 1 for row in rows)
    assert [6] in rows  # longer than a row: a row of its own
    assert len(rows) == 5  # best-fit decreasing reaches the bound: the 40 alone, then 105 tokens in ceil(105 / 32) rows
    assert pack_rows(lengths, 32) == rows  # deterministic
    plan = batch_plan([[0] * n for n in lengths], 64)  # rows of min(ROW_TOKENS, 64) = 64 tokens, one per batch
    assert all(len(b) == 1 and sum(lengths[i] for i in b[0]) <= 64 for b in plan)
    padded = batch_plan([[0] * n for n in lengths], 64, packed=False)
    assert padded == [[[i] for i in b] for b in pack_by_length(lengths, 64)]  # one text per row


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_give_the_states_of_each_text_alone(arch):
    """Texts laid end to end with restarting positions: the same states as each text alone (the
    model keeps each text's attention to itself); a model that ignores the restarts gets padding."""
    lm = tiny_model(arch)
    texts = TEXTS * 3
    packed = packs_texts(lm)
    assert packed == (arch != "opt")  # OPT derives its positions from the attention mask, so it reads a row as one text
    plan = batch_plan([lm.tokenizer(t)["input_ids"] for t in texts], 64, packed=packed)
    assert packed == any(len(row) > 1 for b in plan for row in b)
    cache = cache_hidden(lm, texts, tokens_per_batch=64)
    start = 0
    for t in texts:
        ids = lm.tokenizer(t)["input_ids"]
        alone = capture(lm, ["head"], input_ids=torch.tensor([ids]))[0][0]
        torch.testing.assert_close(cache.h[start : start + len(ids)], alone, atol=1e-5, rtol=1e-5)
        start += len(ids)


def test_a_work_folder_from_another_batch_plan_starts_over(tmp_path):
    """hidden.json records the plan's fingerprint: batches done under another plan are not reused."""
    lm = tiny_model("llama")
    texts = TEXTS * 4
    cache_hidden(lm, texts, tokens_per_batch=24, workdir=tmp_path)
    state = (tmp_path / "hidden.json").read_text()
    ids = [lm.tokenizer(t)["input_ids"] for t in texts]
    assert batch_plan(ids, 24) != batch_plan(ids, 400)
    assert plan_key(batch_plan(ids, 24)) in state and plan_key(batch_plan(ids, 400)) not in state
    seen = []
    cache_hidden(lm, texts, tokens_per_batch=400, workdir=tmp_path, progress=lambda n, k: seen.append(n))
    assert seen[0] == 0  # the other plan's progress is not taken for this one's
    torch.testing.assert_close(cache_hidden(lm, texts, tokens_per_batch=400, workdir=tmp_path).h, cache_hidden(lm, texts).h)


def test_a_model_that_takes_no_position_ids_gets_padded_batches():
    lm = tiny_model("llama")
    forward = lm.model.forward

    def no_positions(*args, **kwargs):
        if kwargs.get("position_ids") is not None:
            raise TypeError("forward() got an unexpected keyword argument 'position_ids'")
        return forward(*args, **kwargs)

    lm.model.forward = no_positions
    assert not packs_texts(lm)
    torch.testing.assert_close(cache_hidden(lm, TEXTS * 2, tokens_per_batch=64).h, cache_hidden(tiny_model("llama"), TEXTS * 2).h)

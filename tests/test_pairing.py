"""Position pairing of two tokenizations (steerport.pairing): pairs have read the same text, position 0
never pairs, and paired states are the captured states at the paired positions."""

import pytest
import torch

from steerport import SteerportError
from steerport.capture import capture
from steerport.pairing import pair_by_end_offset, paired_positions, paired_states, token_end_offsets
from tests.tiny import tiny_model, tiny_tokenizer


def test_end_offset_pairs_have_read_the_same_text():
    ta, tb = tiny_tokenizer(vocab_size=300), tiny_tokenizer(vocab_size=400)
    text = "The weather today is mild, and the food was wonderful."
    ia, ib = paired_positions(ta, tb, text)
    ids_a, ends_a = token_end_offsets(ta, text)
    ids_b, ends_b = token_end_offsets(tb, text)
    assert len(ia) == len(ib) >= 5 and len(ids_a) != len(ids_b)
    for i, j in zip(ia, ib):
        assert ends_a[i] == ends_b[j]
        assert ta.decode(ids_a[: i + 1]) == tb.decode(ids_b[: j + 1]) == text[: ends_a[i]]
    assert pair_by_end_offset([-1, 3, 5, 5, 9], [-1, 5, 9]) == ([3, 4], [1, 2])


def test_position_zero_never_pairs():
    # the same end offsets everywhere: every position pairs with itself, except position 0 of either side
    assert pair_by_end_offset([3, 5, 9], [3, 5, 9]) == ([1, 2], [1, 2])
    assert pair_by_end_offset([3, 5, 9], [1, 3, 5, 9]) == ([1, 2], [2, 3])  # b's 3 pairs, a's 3 is position 0
    tok = tiny_tokenizer()
    text = "The movie was wonderful."
    ia, ib = paired_positions(tok, tok, text)
    n = len(token_end_offsets(tok, text)[0])
    assert ia == ib == list(range(1, n))


def test_paired_states_are_the_captured_states_at_the_paired_positions():
    a, b = tiny_model("llama"), tiny_model("gpt2")
    texts = ["The movie was wonderful.", "   ", "I hate it."]
    (Xa0, Xb0), (Xa1, Xb1) = paired_states(a, b, texts, [0, "head"], [2, 1], max_tokens=64)
    want = {k: [] for k in range(4)}
    for text in ("The movie was wonderful.", "I hate it."):  # the blank text is skipped
        ids = torch.tensor([a.tokenizer(text)["input_ids"]])
        ia, ib = paired_positions(a.tokenizer, b.tokenizer, text)
        ha0, ha1 = capture(a, [0, "head"], input_ids=ids)
        (hb1,) = capture(b, [1], input_ids=ids)
        (hb2,) = capture(b, [2], input_ids=ids)
        want[0].append(ha0[0, ia])
        want[1].append(hb2[0, ib])
        want[2].append(ha1[0, ia])
        want[3].append(hb1[0, ib])
    for got, k in ((Xa0, 0), (Xb0, 1), (Xa1, 2), (Xb1, 3)):
        torch.testing.assert_close(got, torch.cat(want[k]), atol=1e-6, rtol=0)
    assert Xa0.shape[0] == sum(len(t) - 1 for t in a.tokenizer(["The movie was wonderful.", "I hate it."])["input_ids"])
    with pytest.raises(SteerportError, match="pair up"):
        paired_states(a, b, texts, [0], [0], min_pairs=10_000)
    with pytest.raises(SteerportError, match="one point of model b per point"):
        paired_states(a, b, texts, [0, 1], [0])

"""Keywords (SVD of W on the factors), logit shifts, evidence spans, value sweeps."""

import pytest
import torch

from steerport import Steer, SteerportError
from steerport.explain import (
    explain_text,
    mean_hidden,
    render_html,
    render_rich,
    steer_keywords,
    steer_svd,
    svd_keywords,
    top_spans,
)
from steerport.scoring import ForwardScorer, mean_logprob
from steerport.sweep import parse_values, plot_sweep, read_labeled, sweep
from steerport.texts import neutral
from tests.tiny import D, random_steer_factors, tiny_model

POS = ["x", "z"]  # planted tokens (the tiny tokenizer is character level)
NEG = ["q", "k"]


def test_svd_from_factors_is_exact():
    A, B = random_steer_factors(r=4, seed=3)
    U, S, V = steer_svd(A, B)
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, A @ B.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(U.T @ U, torch.eye(4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(V.T @ V, torch.eye(4), atol=1e-5, rtol=1e-5)
    assert torch.all(S[:-1] >= S[1:])


def planted(lm, scale=3.0):
    """Make rows of the tiny model's head point along b (POS) and -b (NEG); W = a bᵀ with a = h̄."""
    tok = lm.tokenizer
    g = torch.Generator().manual_seed(0)
    b = torch.randn(D, generator=g)
    b /= b.norm()
    E = lm.lm_head.weight
    with torch.no_grad():
        E.mul_(0.1)
        for s in POS:
            E[tok.convert_tokens_to_ids(s)] = scale * b + 0.05 * torch.randn(D, generator=g)
        for s in NEG:
            E[tok.convert_tokens_to_ids(s)] = -scale * b + 0.05 * torch.randn(D, generator=g)
    h = mean_hidden(lm, ["The weather today is mild.", "What a waste of time."])
    a = h / h.norm()
    return Steer.lm_steer(a[:, None], b[:, None], epsilon=1.0, positive="planted",
                          model={"spec": lm.spec, "fingerprint": lm.fingerprint}), a


def test_planted_rank1_keywords():
    lm = tiny_model("gpt2", tied=False)
    steer, a = planted(lm)
    E = lm.output_embeddings.detach()
    [d] = svd_keywords(steer, E, lm.tokenizer, k=2, h_mean=a)
    assert d.oriented and d.share == pytest.approx(1.0)
    assert sorted(k.surface for k in d.positive) == sorted(POS)
    assert sorted(k.surface for k in d.negative) == sorted(NEG)
    # orientation follows the mean hidden state: flip it and the ends swap
    [f] = svd_keywords(steer, E, lm.tokenizer, k=2, h_mean=-a)
    assert sorted(k.surface for k in f.positive) == sorted(NEG)
    # and the full report: the steer raises POS and lowers NEG on text at a positive value
    kw = steer_keywords(lm, steer, k=2, value=2.0, texts=["The weather today is mild.", "What a waste of time."])
    assert sorted(k.surface for k in kw.raised) == sorted(POS)
    assert sorted(k.surface for k in kw.lowered) == sorted(NEG)
    assert all(k.score > 0 for k in kw.raised) and all(k.score < 0 for k in kw.lowered)
    assert kw.to_json()["directions"][0]["positive"][0]["surface"] in POS


def test_keywords_default_to_the_calib_neutral_text_and_cover_actadd():
    lm = tiny_model("gpt2")
    steer = Steer.lm_steer(*random_steer_factors(seed=2), epsilon=1.0, model={"spec": lm.spec, "fingerprint": lm.fingerprint})
    kw = steer_keywords(lm, steer, k=3, value=2.0)
    given = steer_keywords(lm, steer, k=3, value=2.0, texts=neutral("calib", 16))
    assert kw.n_neutral_texts == 16 and kw.to_json() == given.to_json()
    # a steer that acts inside the network: no SVD directions, its shift measured by full forward passes
    g = torch.Generator().manual_seed(0)
    act = Steer("actadd", {"vector": 3 * torch.randn(D, generator=g)}, meta={"layer": 1, "positions": "all"})
    texts = ["The weather today is mild.", "What a waste of time."]
    akw = steer_keywords(lm, act, k=3, value=1.0, texts=texts)
    shift = ForwardScorer(lm, texts).stats([(act, 1.0)], shift=True).logprob_shift
    assert akw.directions == [] and akw.raised[0].score == pytest.approx(float(shift[akw.raised[0].token_id]))
    assert akw.raised[0].score > 0 > akw.lowered[0].score


def test_keywords_errors():
    lm = tiny_model("gpt2")
    act = Steer("actadd", {"vector": torch.ones(D)}, meta={"layer": 0, "positions": "all"})
    with pytest.raises(SteerportError, match="lm-steer"):
        svd_keywords(act, lm.output_embeddings, lm.tokenizer)
    small = Steer.lm_steer(torch.ones(D // 2, 1), torch.ones(D // 2, 1), epsilon=1.0)
    with pytest.raises(SteerportError, match="hidden size"):
        svd_keywords(small, lm.output_embeddings, lm.tokenizer)
    with pytest.raises(SteerportError, match="hidden size"):
        steer_keywords(lm, small)


def test_top_spans_constructed():
    deltas = [0.0, 0.1, 3.0, 2.5, 0.0, -0.1, 0.0, -4.0, -0.2, 0.05, 0.3, 0.0]
    assert top_spans(deltas, k=3) == [(2, 3, 5.5), (7, 7, -4.0)]  # the 0.3 bump carries < 10 %
    assert top_spans(deltas, k=1) == [(2, 3, 5.5)]
    assert top_spans(deltas, k=3, min_share=0.0)[:2] == [(2, 3, 5.5), (7, 7, -4.0)]
    assert top_spans([], k=3) == [] and top_spans([0.0, 0.0], k=3) == []


def test_explain_constructed_example():
    """gpt2 with ln_f = constant β, so every position has h = β; the steer moves only '!'."""
    lm = tiny_model("gpt2", tied=False)
    tok = lm.tokenizer
    g = torch.Generator().manual_seed(1)
    beta = torch.randn(D, generator=g)
    with torch.no_grad():
        lm.model.transformer.ln_f.weight.zero_()
        lm.model.transformer.ln_f.bias.copy_(beta)
    target = tok.convert_tokens_to_ids("!")
    with torch.no_grad():
        lm.lm_head.weight[target] *= 8  # well above the other rows' projections on it
    e = lm.lm_head.weight[target].detach().clone()
    A = (beta / beta.dot(beta) * 3.0 / e.norm())[:, None]  # so Δz('!') = ±3 at value ±1
    B = (e / e.norm())[:, None]
    steer = Steer.lm_steer(A, B, epsilon=1.0, positive="excited", model={"spec": lm.spec, "fingerprint": lm.fingerprint})
    text = "I love it!!! The food is good."
    ex = explain_text(lm, steer, text, 1.0, k=2)
    assert [t.surface for t in ex.tokens] == list(text)
    assert ex.tokens[0].delta == 0.0  # the first token is not predicted
    top = ex.spans[0]
    assert top.text == "!!!" and top.total > 0 and top.share > 0.5
    assert ex.tokens[text.index("!")].delta == pytest.approx(max(t.delta for t in ex.tokens))
    assert ex.score == pytest.approx(sum(t.delta for t in ex.tokens) / (len(text) - 1), rel=1e-5)
    assert render_rich(ex).plain == text
    page = render_html(ex, title="<t>")
    assert "&lt;t&gt;" in page and "!!!</span>" not in page and page.count('title="Δ =') == len(text)
    assert "excited" in page


def test_explain_errors():
    lm = tiny_model("gpt2")
    A, B = random_steer_factors()
    s = Steer.lm_steer(A, B, epsilon=1.0)
    with pytest.raises(SteerportError, match="empty"):
        explain_text(lm, s, "   ")
    with pytest.raises(SteerportError, match="non-zero"):
        explain_text(lm, s, "hello", 0.0)


# --------------------------------------------------------------------------- sweep


def test_parse_values():
    assert parse_values("-10:10:11") == [-10, -8, -6, -4, -2, 0, 2, 4, 6, 8, 10]
    assert parse_values("-5,0,2.5") == [-5, 0, 2.5]
    for bad in ("1:2", "a:b:3", "1:2:1", "", "x"):
        with pytest.raises(SteerportError, match="--values"):
            parse_values(bad)


def test_read_labeled(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n{"text": "c", "label": 2}\n')
    assert read_labeled(p) == (["a", "b", "c"], [1, 0, 0])
    assert read_labeled(p, positive_labels=["0", "2"]) == (["a", "b", "c"], [0, 1, 1])
    t = tmp_path / "t.txt"
    t.write_text("one\ntwo\n")
    assert read_labeled(t) == (["one", "two"], None)
    for content, match in [('{"text": "a", "label": 1}\n{"text": "b"}\n', "no 'label'"),
                           ('{"text": "a"}\n{"text": "b", "label": 1}\n', r"d.jsonl:2: has a 'label' field, but earlier rows do not"),
                           ('{"txt": "a"}\n', "no string field"), ("{oops\n", "not valid JSON"), ("\n", "no texts")]:
        p.write_text(content)
        with pytest.raises(SteerportError, match=match):
            read_labeled(p)
    with pytest.raises(SteerportError, match="no such"):
        read_labeled(tmp_path / "missing.jsonl")


def test_sweep_rows_and_plot(tmp_path):
    lm = tiny_model("llama")
    A, B = random_steer_factors(seed=2)
    steer = Steer.lm_steer(A, B, epsilon=1.0, model={"spec": lm.spec, "fingerprint": lm.fingerprint})
    texts = ["The movie was wonderful.", "I love this place.", "The film was terrible.", "What a waste of time."]
    rows = sweep(lm, steer, [-2.0, 0.0, 1.0, 2.0], neutral=["The weather today is mild."],
                 labeled=(texts, [1, 1, 0, 0]), prompts=["The movie"], max_new_tokens=3)
    zero = rows[1]
    assert zero.kl == pytest.approx(0.0, abs=1e-6) and zero.separation == pytest.approx(0.0, abs=1e-6)
    assert rows[3].kl > rows[2].kl > 0 and rows[0].kl > 0
    assert all(len(r.samples) == 1 for r in rows)
    assert all(r.separation is not None for r in rows)
    # each row is the definition, measured with full forward passes
    base = mean_logprob(lm, texts, [])
    y = torch.tensor([True, True, False, False])
    for r in rows:
        assert r.kl == pytest.approx(float(ForwardScorer(lm, ["The weather today is mild."]).stats([(steer, r.value)]).kl),
                                     rel=1e-4, abs=1e-7)
        shift = mean_logprob(lm, texts, [(steer, r.value)]) - base
        assert r.pos_shift == pytest.approx(float(shift[y].mean()), abs=1e-5)
        assert r.separation == pytest.approx(float(shift[y].mean() - shift[~y].mean()), abs=1e-5)
    assert rows[0].samples != rows[1].samples or rows[3].samples != rows[1].samples
    png = plot_sweep(rows, tmp_path / "s.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SteerportError, match="both classes"):
        sweep(lm, steer, [1.0], neutral=["x y"], labeled=(texts, [1, 1, 1, 1]))


def test_recorded_label_mapping():
    from steerport.sweep import recorded_positive_labels

    A, B = random_steer_factors()
    make = lambda meta: Steer.lm_steer(A, B, epsilon=1.0, meta=meta)
    assert recorded_positive_labels(make({"data": {"label_mapping": {"positive": [0], "negative": "all other labels"}}})) == ["0"]
    assert recorded_positive_labels(make({"data": {"label_mapping": "labels are +1/-1"}})) == ["1"]
    assert recorded_positive_labels(make({"data": {"label_mapping": "real-valued"}})) is None
    assert recorded_positive_labels(make({})) is None

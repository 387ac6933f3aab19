"""The refined transfer form: exact maps refine to the identical steer; the fit lowers a real loss;
the objective's math; bad input is a one-line error."""

from __future__ import annotations

import pytest
import torch

from steerport.errors import SteerportError
from steerport.refine import (
    RefineOptions,
    ShiftProblem,
    keyword_problem,
    refine_factors,
    refined_carry,
    shift_problem,
    token_shifts,
)
from steerport.transfer import TransferOptions, transfer_steer
from tests.test_transfer import TEXTS, D, logit_shift, random_basis, saved_pair_and_steer, source_steer, transformed_model
from tests.tiny import tiny_model


def _refined(steer, src, tgt, **kw):
    return transfer_steer(steer, src, tgt, TransferOptions(form="refined", calibrate="none", hidden_texts=TEXTS, **kw),
                          force=True)


def test_same_model_refines_to_the_identical_steer():
    src = tiny_model("llama", seed=0)
    steer = source_steer(src)
    res = _refined(steer, src, src)
    assert torch.equal(res.steer.A, steer.A) and torch.equal(res.steer.B, steer.B)
    rec = res.lineage["refine"]
    assert rec["loss"]["init"] == 0 and rec["rounds"] == 0 and "exact" in rec["kept"]
    assert res.lineage["form"] == "refined" and res.lineage["options"]["refine"]["top_k"] == 64


@pytest.mark.parametrize("orthogonal", [True, False])
def test_exact_linear_image_refines_to_the_closed_form_and_reproduces_the_shift(orthogonal):
    """Target = source in another basis and vocabulary order (h_t = P h_s, E_t = E_s P⁻¹): the
    closed form is exact, the refinement keeps it bit for bit, and the logit shifts match."""
    src = tiny_model("llama", seed=0)
    V = src.output_embeddings.shape[0]
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(7))
    tgt = transformed_model(src, random_basis(D, orthogonal), perm)
    steer = source_steer(src)
    hidden = transfer_steer(steer, src, tgt, TransferOptions(form="hidden", calibrate="none", hidden_texts=TEXTS,
                                                             hidden_holdout=0.0))
    res = _refined(steer, src, tgt)
    assert res.lineage["refine"]["rounds"] == 0
    # K is fitted on the refinement's fit texts only, so it equals the hidden form's K up to rounding
    assert torch.allclose(res.steer.A, hidden.steer.A, atol=1e-4) and torch.equal(res.steer.B, hidden.steer.B)
    ids = src.tokenizer(TEXTS[:3], return_tensors="pt", padding=True)["input_ids"]
    want = logit_shift(src, steer, ids)
    got = logit_shift(tgt, res.steer, perm[ids])[..., perm]
    assert torch.allclose(got, want, atol=2e-4 * want.abs().max())


def test_inexact_pair_lowers_the_heldout_loss_and_keeps_the_domain_part():
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    steer = source_steer(src)
    res = _refined(steer, src, tgt, refine=RefineOptions(rounds=5, keywords=8))
    rec = res.lineage["refine"]
    assert rec["rounds"] >= 1
    assert rec["heldout_loss"]["final"] < rec["heldout_loss"]["init"]
    assert rec["loss"]["final"] < rec["loss"]["init"]
    assert res.steer.A.shape == (D, steer.rank) and torch.isfinite(res.steer.A).all()
    assert res.lineage["calibration"]["method"] == "none"
    assert TransferOptions(form="refined").calibration_method() == "kl"
    terms = rec["heldout_terms"]  # likely tokens, keywords: the fit lowers the keywords' term
    assert terms["final"][1] < terms["init"][1]
    plain = _refined(steer, src, tgt, refine=RefineOptions(rounds=5)).lineage["refine"]  # keywords off: the default
    assert "heldout_terms" not in plain and plain["heldout_loss"]["init"] == pytest.approx(terms["init"][0], rel=1e-5)


def test_auto_form_is_refined_with_kl_calibration_and_logit_without():
    assert TransferOptions().carry_form() == "refined" and TransferOptions(calibrate="kl").carry_form() == "refined"
    assert TransferOptions(calibrate="embed").carry_form() == "logit"
    assert TransferOptions(calibrate="none").carry_form() == "logit"
    assert TransferOptions(form="hidden", calibrate="none").carry_form() == "hidden"
    assert TransferOptions().carry_form(embeddings_given=True) == "logit"  # a model given as embeddings only
    with pytest.raises(SteerportError, match="use auto or one of"):
        TransferOptions(form="best")


def _random_problem(n=40, m=30, K=5, d=6, seed=0) -> ShiftProblem:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return ShiftProblem(h_s=r(n, d), h_t=r(n, d), X_s=r(m, d), X_t=r(m, d),
                        ids=torch.randint(0, m, (n, K), generator=g), w=torch.rand(n, K, generator=g),
                        cen_s=r(n, d), cen_t=r(n, d), slope_s=torch.ones(n, K), slope_t=torch.ones(n, K),
                        pairs=torch.arange(m))


def test_token_shifts_are_the_centred_logit_shift():
    p = _random_problem()
    A, B = torch.randn(6, 2), torch.randn(6, 2)
    got = token_shifts(p.h_s, p.cen_s, p.slope_s, p.X_s, p.ids, A, B, 0.3)
    W = A @ B.T  # Δz_v = ε hᵀ W x_v, minus ε hᵀ W ē
    want = 0.3 * ((p.h_s @ W)[:, None, :] * p.X_s[p.ids]).sum(-1) - 0.3 * ((p.h_s @ W) * p.cen_s).sum(-1, keepdim=True)
    assert torch.allclose(got, want, atol=1e-5)


def test_refine_factors_fixed_point_and_fit():
    """The source itself as a start has zero loss and comes back unchanged; a perturbed start is improved."""
    p = _random_problem()
    p.h_t, p.X_t, p.cen_t = p.h_s, p.X_s, p.cen_s  # the same model on both sides
    A, B = torch.randn(6, 2), torch.randn(6, 2)
    fit, held = torch.arange(30), torch.arange(30, 40)
    A1, B1, rec = refine_factors(p, A, B, 0.1, A, B, fit, held)
    assert torch.equal(A1, A) and torch.equal(B1, B) and rec["rounds"] == 0
    A2, B2, rec = refine_factors(p, A, B, 0.1, A + 0.3 * torch.randn(6, 2), B, fit, held)
    assert rec["heldout_loss"]["final"] < 0.01 * rec["heldout_loss"]["init"]


def test_keywords_are_the_tokens_the_steer_shifts_most_and_an_exact_map_stays_exact():
    src = tiny_model("llama", seed=0)
    E = src.output_embeddings.float()
    ids = torch.arange(1, E.shape[0])  # an aligned vocabulary that leaves token 0 out
    h = torch.randn(20, D, generator=torch.Generator().manual_seed(3))
    p = shift_problem(h, h, src, src, ids, ids, top_k=4)
    A, B = torch.randn(D, 2), torch.randn(D, 2)
    kw = keyword_problem(p, A, B, src, src, ids, ids, 5, torch.arange(15))
    b = E[ids] @ B
    mean_square = ((h[:15] @ A) @ (b - b.mean(0)).T).pow(2).mean(0)  # centred logit shifts, per aligned token
    assert set(kw.pairs.tolist()) == set(mean_square.topk(5).indices.tolist())
    assert torch.equal(kw.X_s, E[ids[kw.pairs]]) and kw.ids.shape == (20, 5) and torch.equal(kw.w, torch.ones(20, 5))
    A1, B1, rec = refine_factors(p, A, B, 0.1, A, B, torch.arange(15), torch.arange(15, 20), RefineOptions(), kw)
    assert torch.equal(A1, A) and torch.equal(B1, B) and rec["rounds"] == 0  # the same model: zero loss, kept


def test_words_only_keywords_skip_tokens_without_a_letter():
    src = tiny_model("llama", seed=0)
    E, tok = src.output_embeddings.float(), src.tokenizer
    ids = torch.arange(E.shape[0])
    h = torch.randn(20, D, generator=torch.Generator().manual_seed(3))
    p = shift_problem(h, h, src, src, ids, ids, top_k=4)
    A, B = torch.randn(D, 2), torch.randn(D, 2)
    b = E @ B
    ranked = ((h[:15] @ A) @ (b - b.mean(0)).T).pow(2).mean(0).argsort(descending=True).tolist()
    words = [k for k in ranked if any(c.isalpha() for c in tok.decode([k]))]
    assert words[:5] != ranked[:5]  # this steer's largest shifts include tokens without a letter
    kw = keyword_problem(p, A, B, src, src, ids, ids, 5, torch.arange(15), words_only=True)
    assert kw.pairs.tolist() == words[:5]
    punctuation = torch.tensor([tok.convert_tokens_to_ids(t) for t in [",", ".", "!"]])
    with pytest.raises(SteerportError, match="no aligned token has a letter"):
        keyword_problem(p, A, B, src, src, punctuation, punctuation, 5, torch.arange(15), words_only=True)


def test_keyword_slopes_follow_a_logit_soft_cap(monkeypatch):
    lm = tiny_model("llama", seed=0)
    monkeypatch.setattr(type(lm), "softcap", property(lambda self: 0.5))
    E = lm.output_embeddings.float()
    ids = torch.arange(E.shape[0])
    h = torch.randn(6, D, generator=torch.Generator().manual_seed(4))
    p = shift_problem(h, h, lm, lm, ids, ids, top_k=3)
    kw = keyword_problem(p, torch.randn(D, 2), torch.randn(D, 2), lm, lm, ids, ids, 4, torch.arange(6))
    want = 1 - torch.tanh((h @ E[kw.pairs].T) / 0.5).pow(2)  # d(cap·tanh(z/cap))/dz at each keyword's logit
    assert torch.allclose(kw.slope_s, want, atol=1e-6) and torch.allclose(kw.slope_t, want, atol=1e-6)


def test_shift_problem_weights_are_probabilities_of_shared_tokens():
    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    h_s, h_t = torch.randn(7, D), torch.randn(7, D)
    ids = torch.arange(1, 50)
    p = shift_problem(h_s, h_t, src, tgt, ids, ids, top_k=4, weight="target")
    probs = torch.softmax(h_t @ tgt.output_embeddings.T.float(), 1)[:, ids]
    assert torch.allclose(p.w, probs.topk(4, dim=1).values, atol=1e-6)
    assert torch.allclose(p.cen_t, torch.softmax(h_t @ tgt.output_embeddings.T.float(), 1) @ tgt.output_embeddings.float(),
                          atol=1e-5)


def test_bad_input_is_a_one_line_error():
    src = tiny_model("llama", seed=0)
    steer = source_steer(src)
    with pytest.raises(SteerportError, match="must not be negative"):
        RefineOptions(keywords=-1)
    with pytest.raises(SteerportError, match="must not be negative"):
        RefineOptions(keyword_weight=float("nan"))
    with pytest.raises(SteerportError, match="needs both models"):
        refined_carry(steer, torch.eye(D), None, RefineOptions(keywords=4))  # type: ignore[arg-type]
    with pytest.raises(SteerportError, match="neutral text"):
        transfer_steer(steer, src, src, TransferOptions(form="refined", calibrate="none", hidden_texts=["Hi.", "Ok", "Yes."]))
    with pytest.raises(SteerportError, match="at least 2 neutral texts"):
        transfer_steer(steer, src, src, TransferOptions(form="refined", calibrate="none", hidden_texts=["One text."]))
    with pytest.raises(SteerportError, match="refine weight"):
        RefineOptions(weight="uniform")
    with pytest.raises(SteerportError, match="refine top_k"):
        RefineOptions(top_k=0)
    tgt = tiny_model("llama", seed=2)
    tgt.model.model.norm.weight.data[0] = float("nan")
    with pytest.raises(SteerportError, match="NaN"):
        _refined(steer, src, tgt)


def test_cli_transfer_records_the_keyword_options(tmp_path, monkeypatch, capsys):
    import sys

    from steerport.cli import main
    from steerport.steer import Steer

    dirs, steer_file = saved_pair_and_steer(tmp_path)
    (tmp_path / "neutral.txt").write_text("\n".join(TEXTS))
    out = tmp_path / "pos.b.st"
    monkeypatch.setattr(sys, "argv", ["steerport", "transfer", *dirs, "--steer", str(steer_file), "--form", "refined",
                                      "--calibrate", "none", "--hidden-text", str(tmp_path / "neutral.txt"), "--keywords", "4",
                                      "--keywords-words-only", "--out", str(out)])
    main()
    assert "keywords" in capsys.readouterr().err  # the report line gives the keyword term's held-out loss
    lineage = Steer.load(out).meta["lineage"]
    assert lineage["options"]["refine"]["keywords"] == 4 and lineage["options"]["refine"]["keyword_words_only"] is True
    assert len(lineage["refine"]["heldout_terms"]["final"]) == 2

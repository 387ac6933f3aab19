"""Token-probability steering (Cho et al.): regression, Algorithm 1 direction, logit-offset hook."""

import math

import pytest
import torch

from steerport import Steer, SteerportError, steered
from steerport.tokenprob import (
    Encoding,
    collect_head_stats,
    direction,
    fit_encoding,
    make_token_steer,
    omega,
    prune_curve,
    remaining_kl,
    scale_errors,
    steered_log_alpha,
    token_id,
    transfer_token_prob,
)
from tests.tiny import CORPUS, D, random_steer_factors, tiny_model

TEXTS = list(dict.fromkeys(CORPUS))


def planted_model(seed=0):
    """Tiny GPT-2 whose final hidden state is almost constant (h ≈ h̄), so -log α_w ≈ -h̄·e_w + c exactly."""
    lm = tiny_model("gpt2", seed=seed)
    ln = lm.model.transformer.ln_f
    g = torch.Generator().manual_seed(seed + 10)
    ln.weight.data.mul_(0.05)
    ln.bias.data.copy_(torch.randn(D, generator=g) * 0.6)
    return lm


def measured_log_alpha(lm, texts, steers=()):
    """log of the average next-token distribution from real forward passes (with the steers' hooks)."""
    batch = lm.tokenizer(texts, return_tensors="pt", padding=True)
    with steered(lm, list(steers)), torch.no_grad():
        logits = lm.model(**batch).logits.double()
    lp = torch.log_softmax(logits, -1)[batch["attention_mask"].bool()]  # (N, V)
    return torch.logsumexp(lp, 0) - math.log(lp.shape[0])


def test_regression_recovers_an_exact_linear_law():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(500, 8, generator=g)
    A = torch.randn(8, generator=g, dtype=torch.float64)
    y = E.double() @ A + 3.0
    enc = fit_encoding(E, -y)
    torch.testing.assert_close(enc.slopes, A, atol=1e-8, rtol=0)
    assert enc.intercept == pytest.approx(3.0, abs=1e-8) and enc.r2 == pytest.approx(1.0, abs=1e-10)
    noisy = fit_encoding(E, -(y + torch.randn(500, generator=g, dtype=torch.float64)))
    assert 0 < noisy.adj_r2 < noisy.r2 < 1
    assert (noisy.log_p <= 0).all() and noisy.log_p[noisy.t.abs().argmax()] == noisy.log_p.min()
    with pytest.raises(SteerportError):
        fit_encoding(E[:5], -y[:5])


def test_omega_sums_to_one_favours_significance_and_direction_hits_minus_one():
    enc = Encoding(slopes=torch.tensor([2.0, -0.5, 1e-4], dtype=torch.float64), intercept=0.0,
                   t=torch.tensor([30.0, -5.0, 0.01], dtype=torch.float64),
                   log_p=torch.tensor([-400.0, -14.0, -0.008], dtype=torch.float64), r2=0.9, adj_r2=0.9, n_tokens=100)
    for b in (0.0, 1.0, 2.0):
        w = omega(enc, b)
        assert float(w.sum()) == pytest.approx(1.0)
        assert float(enc.slopes.float() @ direction(enc, b)) == pytest.approx(-1.0, abs=1e-5)
    assert torch.allclose(omega(enc, 0.0), torch.full((3,), 1 / 3, dtype=torch.float64))
    w = omega(enc, 2.0)
    assert w[0] > w[1] > w[2]
    assert direction(enc, 2.0).abs()[2] < 1.0  # a near-zero slope gets almost no movement


def test_planted_log_linear_model_fits_and_hits_the_requested_scale():
    lm = planted_model()
    stats = collect_head_stats(lm, TEXTS)
    torch.testing.assert_close(stats.log_alpha, measured_log_alpha(lm, TEXTS), atol=1e-4, rtol=0)
    enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
    assert enc.adj_r2 > 0.99
    base = measured_log_alpha(lm, TEXTS)
    for surface, r in (("o", 5.0), ("a", 0.2), ("e", 1.5)):
        steer = make_token_steer(lm, enc, {surface: r}, stats=stats, step="paper", direction_rule="regression")
        tid = token_id(lm.tokenizer, surface)
        new = measured_log_alpha(lm, TEXTS, [(steer, 1.0)])
        r_hat = math.exp(float(new[tid] - base[tid]))
        assert abs(math.log(r_hat) - math.log(r)) < 0.1, (surface, r, r_hat)
        # the exact analytic evaluation agrees with the real hooked forward pass
        analytic, _ = steered_log_alpha(lm, stats, tid, steer.tensors["delta"][0])
        assert analytic == pytest.approx(float(new[tid]), abs=1e-4)


def test_untouched_tokens_logits_are_unchanged_and_edited_ones_move_by_s_delta_h():
    lm = tiny_model("llama", tied=False, head_bias=True)
    stats = collect_head_stats(lm, TEXTS)
    enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
    steer = make_token_steer(lm, enc, {"o": 4.0, "a": 0.5}, stats=stats, step="paper")
    ids = steer.tensors["token_ids"]
    batch = lm.tokenizer(TEXTS[:3], return_tensors="pt", padding=True)
    heads = []
    hook = lm.lm_head.register_forward_pre_hook(lambda m, a: heads.append(a[0].clone()))
    with torch.no_grad():
        base = lm.model(**batch).logits
    hook.remove()
    with steered(lm, [(steer, 2.5)]), torch.no_grad():
        new = lm.model(**batch).logits
    others = torch.ones(base.shape[-1], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(new[..., others], base[..., others])
    expected = base[..., ids] + 2.5 * heads[0] @ steer.tensors["delta"].T
    torch.testing.assert_close(new[..., ids], expected, atol=1e-5, rtol=1e-5)


def test_token_prob_round_trip_and_composition_with_other_kinds(tmp_path):
    lm = tiny_model("gpt2")
    stats = collect_head_stats(lm, TEXTS)
    enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
    tp = make_token_steer(lm, enc, {"o": 3.0}, stats=stats)
    back = Steer.load(tp.save(tmp_path / "movie.st"))
    assert back.kind == "token-prob" and back.tensors["token_ids"].dtype == torch.int64
    assert torch.equal(back.tensors["delta"], tp.tensors["delta"]) and back.meta["tokens"] == ["o"]
    assert back.meta["scales"] == [3.0] and back.meta["b"] == 2.0
    assert back.meta["step"] == "corrected" and back.meta["detect_r_hat"][0] == pytest.approx(3.0, rel=1e-6)
    assert back.meta["direction"] == "steady"  # the default
    A, B = random_steer_factors()
    lms = Steer.lm_steer(A, B, epsilon=0.5, model={"spec": lm.spec, "fingerprint": lm.fingerprint})
    act = Steer("actadd", {"vector": torch.randn(2, D)}, 1.0, model=dict(lms.model), meta={"layer": 1, "positions": "front"})
    batch = lm.tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    heads = []
    hook = lm.lm_head.register_forward_pre_hook(lambda m, a: heads.append(a[0].clone()))
    with steered(lm, [(act, 1.0), (lms, 2.0)]), torch.no_grad():
        two = lm.model(**batch).logits
    hook.remove()
    with steered(lm, [(act, 1.0), (lms, 2.0), (back, 1.0)]), torch.no_grad():
        three = lm.model(**batch).logits
    tid = int(tp.tensors["token_ids"][0])
    shift = two.clone()
    h = heads[0] + 2.0 * 0.5 * (heads[0] @ A) @ B.T  # head input after the LM-Steer term (captured before it)
    shift[..., tid] += h @ tp.tensors["delta"][0]  # the token offset uses the steered head input
    torch.testing.assert_close(three, shift, atol=1e-5, rtol=1e-5)


def test_errors_for_bad_tokens_and_scales():
    lm = tiny_model("gpt2")
    stats = collect_head_stats(lm, TEXTS)
    enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
    with pytest.raises(SteerportError, match="tokens"):
        make_token_steer(lm, enc, {" wonderful and the food": 2.0}, stats=stats)
    with pytest.raises(SteerportError, match="positive"):
        make_token_steer(lm, enc, {"o": -1.0}, stats=stats)
    with pytest.raises(SteerportError):
        make_token_steer(lm, enc, {}, stats=stats)
    with pytest.raises(SteerportError, match="detect-set statistics"):
        make_token_steer(lm, enc, {"o": 2.0})  # the corrected step needs the detect set
    with pytest.raises(SteerportError, match="step must be"):
        make_token_steer(lm, enc, {"o": 2.0}, stats=stats, step="newton")
    tid = token_id(lm.tokenizer, "o")
    unreachable = 2 / math.exp(float(stats.log_alpha[tid]))  # α'_w would exceed 1
    with pytest.raises(SteerportError, match="no step"):
        make_token_steer(lm, enc, {"o": unreachable}, stats=stats)


def test_scale_errors_kl_and_prune_curve_basics():
    lm = planted_model()
    stats = collect_head_stats(lm, TEXTS)
    enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
    u = direction(enc)
    res = scale_errors(lm, stats, u, {"o": token_id(lm.tokenizer, "o")}, [0.5, 1.0, 2.0])
    assert res[1].r_hat == pytest.approx(1.0) and all(r.error < 0.1 for r in res)
    tid = token_id(lm.tokenizer, "o")
    assert remaining_kl(lm, stats, tid, 0 * u) == pytest.approx(0.0, abs=1e-12)
    # against the real hooked forward pass: the other tokens' average distribution, renormalized
    base = measured_log_alpha(lm, TEXTS).exp()
    kls = []
    for r in (1.5, 5.0, 25.0):
        delta = math.log(r) * u
        steer = Steer("token-prob", {"token_ids": torch.tensor([tid]), "delta": delta[None]}, 1.0)
        new = measured_log_alpha(lm, TEXTS, [(steer, 1.0)]).exp()
        keep = torch.arange(len(base)) != tid
        p, q = new[keep] / new[keep].sum(), base[keep] / base[keep].sum()
        expected = float((p * (p / q).log()).sum())
        kls.append(remaining_kl(lm, stats, tid, delta))
        assert kls[-1] == pytest.approx(expected, rel=1e-3, abs=1e-9) and kls[-1] > 0
    assert kls[0] < kls[1] < kls[2]  # grows with |log r|
    rows = prune_curve(lm, enc, stats, ["The movie", "I love"], fractions=(0.0, 0.5, 1.0), max_new_tokens=4)
    assert rows[0]["kl_avg"] == pytest.approx(0.0, abs=1e-9) and rows[0]["gen_sim"] == 1.0
    assert rows[2]["dims_removed"] == D and rows[2]["kl_pos"] > rows[0]["kl_pos"]


def test_transfer_by_surface_recomputes_the_direction_on_the_target():
    src, tgt = tiny_model("gpt2"), tiny_model("qwen2")
    enc = fit_encoding(src.output_embeddings, collect_head_stats(src, TEXTS).log_alpha)
    steer = make_token_steer(src, enc, {"o": 3.0, "a": 0.5}, step="paper", direction_rule="regression")
    new, report = transfer_token_prob(steer, tgt, TEXTS, step="paper")
    assert new.model["fingerprint"] == tgt.fingerprint and report["kept"] == ["o", "a"]
    tgt_enc = fit_encoding(tgt.output_embeddings, collect_head_stats(tgt, TEXTS).log_alpha)
    torch.testing.assert_close(new.tensors["delta"][0], math.log(3.0) * direction(tgt_enc), atol=1e-5, rtol=1e-5)
    assert new.meta["lineage"]["source_steer"] == steer.fingerprint
    broken = Steer("token-prob", steer.tensors, 1.0)
    with pytest.raises(SteerportError, match="surfaces"):
        transfer_token_prob(broken, tgt, TEXTS)


def test_corrected_step_hits_the_requested_scale_on_the_detect_set_and_the_paper_step_does_not():
    cases = [(planted_model(), (0.05, 0.2, 0.5, 1 / 1.1, 1.1, 2.0, 5.0, 20.0)),  # h almost constant: both ways
             (tiny_model("qwen2"), (1.1, 2.0, 5.0, 20.0))]
    for lm, scales in cases:
        stats = collect_head_stats(lm, TEXTS)
        enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
        paper_errors = []
        for surface in ("o", "a", "e"):
            tid = token_id(lm.tokenizer, surface)
            base = float(stats.log_alpha[tid])
            for r in scales:
                fixed = make_token_steer(lm, enc, {surface: r}, stats=stats, direction_rule="regression")
                paper = make_token_steer(lm, enc, {surface: r}, stats=stats, step="paper", direction_rule="regression")
                got, _ = steered_log_alpha(lm, stats, tid, fixed.tensors["delta"][0])
                assert abs(got - base - math.log(r)) < 1e-3, (lm.spec, surface, r)
                assert fixed.meta["detect_r_hat"][0] == pytest.approx(r, rel=1e-3)
                # same direction, only the step length differs
                cos = torch.nn.functional.cosine_similarity(fixed.tensors["delta"][0], paper.tensors["delta"][0], dim=0)
                assert float(cos) == pytest.approx(1.0, abs=1e-5)
                paper_errors.append(abs(math.log(paper.meta["detect_r_hat"][0]) - math.log(r)))
                assert fixed.meta["step"] == "corrected" and paper.meta["step"] == "paper"
                assert paper.meta["steps"] == [pytest.approx(math.log(r))]
        assert max(paper_errors) > (0.05 if lm.spec == "tiny-gpt2" else 0.3), lm.spec  # Algorithm 1's step misses
    # and the real hooked forward pass agrees with the cached evaluation
    tid = token_id(lm.tokenizer, "o")
    steer = make_token_steer(lm, enc, {"o": 5.0}, stats=stats)
    new = measured_log_alpha(lm, TEXTS, [(steer, 1.0)])
    assert abs(float(new[tid] - measured_log_alpha(lm, TEXTS)[tid]) - math.log(5.0)) < 1e-3


def test_soft_capped_logits_are_measured_and_steered_exactly():
    lm = tiny_model("gemma3_text")
    lm.model.config.final_logit_softcapping = 2.0  # tiny logits: a small cap bends them hard
    assert lm.softcap == 2.0
    stats = collect_head_stats(lm, TEXTS)
    torch.testing.assert_close(stats.log_alpha, measured_log_alpha(lm, TEXTS), atol=1e-4, rtol=0)
    enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
    steer = make_token_steer(lm, enc, {"o": 3.0}, stats=stats)
    tid = int(steer.tensors["token_ids"][0])
    new = measured_log_alpha(lm, TEXTS, [(steer, 1.0)])
    analytic, _ = steered_log_alpha(lm, stats, tid, steer.tensors["delta"][0])
    assert analytic == pytest.approx(float(new[tid]), abs=1e-4)
    assert abs(float(new[tid] - stats.log_alpha[tid]) - math.log(3.0)) < 1e-3


def test_transfer_with_options_returns_a_transfer_result():
    from types import SimpleNamespace

    from steerport.kinds import get_kind
    from steerport.tokenprob import transfer_with_options
    from steerport.transfer import TransferResult

    src, tgt = tiny_model("gpt2"), tiny_model("qwen2")
    stats = collect_head_stats(src, TEXTS)
    steer = make_token_steer(src, fit_encoding(src.output_embeddings, stats.log_alpha), {"o": 3.0}, stats=stats)
    options = SimpleNamespace(texts=TEXTS, max_tokens=64, dtype="float32", device="cpu")
    assert get_kind("token-prob").transfer == "steerport.tokenprob:transfer_with_options"
    res = transfer_with_options(steer, src, tgt, options)
    assert isinstance(res, TransferResult) and res.mapping is None
    assert res.lineage["source_steer"] == steer.fingerprint and res.lineage["step"] == "corrected"
    assert res.steer.model["fingerprint"] == tgt.fingerprint and res.steer.meta["step"] == "corrected"
    tstats = collect_head_stats(tgt, TEXTS, max_tokens=64)
    got, _ = steered_log_alpha(tgt, tstats, int(res.steer.tensors["token_ids"][0]), res.steer.tensors["delta"][0])
    assert abs(got - float(tstats.log_alpha[res.steer.tensors["token_ids"][0]]) - math.log(3.0)) < 1e-3
    with pytest.raises(SteerportError, match="mapping"):
        transfer_with_options(steer, src, tgt, options, mapping_path="m.safetensors")


def test_plots_write_png_files(tmp_path):
    from steerport.plots import plot_pca, plot_prune

    lm = planted_model()
    stats = collect_head_stats(lm, TEXTS)
    plot_pca(lm.output_embeddings, stats.log_alpha, tmp_path / "a" / "pca.png", title="tiny")
    rows = [{"fraction": f, "kl_avg": 1e-3 + f, "kl_pos": 1e-3 + 2 * f, "gen_sim": 1 - f} for f in (0.0, 0.5)]
    plot_prune(rows, tmp_path / "prune.png", baseline=rows)
    for name in ("a/pca.png", "prune.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_steady_direction_gives_an_almost_constant_offset():
    from steerport.tokenprob import steady_direction

    lm = tiny_model("qwen2")
    stats = collect_head_stats(lm, TEXTS)
    enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
    v = steady_direction(stats.H)
    offsets = stats.H @ v  # (N,)
    assert float(offsets.mean()) == pytest.approx(1.0, abs=1e-4)
    assert float(offsets.std()) < 0.5 * float((stats.H @ direction(enc)).std() / (stats.H @ direction(enc)).mean().abs())
    for rule in ("regression", "steady"):
        steer = make_token_steer(lm, enc, {"o": 5.0}, stats=stats, direction_rule=rule)
        assert steer.meta["direction"] == rule and steer.meta["detect_r_hat"][0] == pytest.approx(5.0, rel=1e-3)
    torch.testing.assert_close(steer.tensors["delta"][0] / steer.meta["steps"][0], v)
    with pytest.raises(SteerportError, match="direction rule"):
        make_token_steer(lm, enc, {"o": 2.0}, stats=stats, direction_rule="random")


@pytest.mark.parametrize("n", [640, 896, 1152, 1408, 19280])
def test_a_safetensors_header_whose_length_starts_like_a_pickle_is_read(n):
    """Header lengths 0x280, 0x380, ... begin with the bytes of a pickle protocol marker (and 0x4B50 with 'PK')."""
    import json as _json
    from pathlib import Path

    from steerport.fileio import read_json_metadata

    doc = {"__metadata__": {"steerport": _json.dumps({"kind": "token-prob"})}}
    header = _json.dumps(doc).encode()
    header += b" " * (n - len(header))
    data = n.to_bytes(8, "little") + header
    assert data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK")
    assert read_json_metadata(Path("x.st"), data, "steerport", "a .st steer") == {"kind": "token-prob"}
    with pytest.raises(SteerportError, match="pickle"):
        read_json_metadata(Path("x.st"), b"\x80\x04" + b"\x00" * 30, "steerport", "a .st steer")


def test_sample_single_tokens_is_seeded_and_round_trips():
    from steerport.tokenprob import sample_single_tokens
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    word = "I"  # one token in the tiny tokenizer
    picked = sample_single_tokens(tok, len(tok), 12, named=(word, " not-one-token-at-all"), seed=3)
    assert len(picked) == 12 and list(picked)[0] == word
    assert " not-one-token-at-all" not in picked
    for surface, i in picked.items():
        assert tok(surface, add_special_tokens=False)["input_ids"] == [i] and i not in tok.all_special_ids
    assert sample_single_tokens(tok, len(tok), 12, named=(word,), seed=3) == picked
    assert sample_single_tokens(tok, len(tok), 12, named=(word,), seed=4) != picked

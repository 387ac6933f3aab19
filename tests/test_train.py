"""The LM-Steer trainer: exact math of the cached fit, resume, determinism, metadata, errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from steerport.capture import cache_hidden, tokenize
from steerport.data import Dataset, Example
from steerport.errors import SteerportError
from steerport.hooks import steered
from steerport.steer import Steer
from steerport.train import (
    Fitter,
    TrainConfig,
    head_token_loss,
    train,
)
from tests.tiny import CORPUS, tiny_model

EXTRA = [
    "A gentle story that made me smile all the way through.",
    "Dull, lifeless and badly written from start to end.",
    "An honest, warm and funny film with a great cast.",
    "The plot is a mess and the jokes fall flat.",
]


def make_data(n_rep: int = 3, heldout: int = 4) -> Dataset:
    texts = (CORPUS[:6] + EXTRA) * n_rep
    signs = ([1.0, -1.0, 1.0, -1.0, 0.5, -0.5] + [1.0, -1.0, 1.0, -1.0]) * n_rep  # real values too
    ex = [Example(t, s, f"mem:{i}") for i, (t, s) in enumerate(zip(texts, signs))]
    return Dataset(ex[heldout:], ex[:heldout], "positive", {"counts": {}})


# --------------------------------------------------------------------------- head loss


@pytest.mark.parametrize("cap", [None, 2.5])
def test_head_loss_equals_cross_entropy_and_its_gradient(cap):
    g = torch.Generator().manual_seed(0)
    N, d, V, R = 9, 6, 37, 4
    h, E, bias = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((N, d), (V, d), (V,)))
    u = torch.randn(N, R, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d, R, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    loss = head_token_loss(h, u, B, E, bias, y, softcap=cap, chunk=8)  # 5 vocabulary chunks
    z = (h + u @ B.T) @ E.T + bias
    if cap:
        z = cap * torch.tanh(z / cap)
    ref = F.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(N, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((loss * w).sum(), [u, B])
    want = torch.autograd.grad((ref * w).sum(), [u, B])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- vs the full model


def full_model_loss(lm, params, eps, token_lists, signs, domain=False):
    """Reference: run the whole model with the steer hooked on the LM head, mean CE over tokens."""
    T = max(len(t) for t in token_lists)
    ids = torch.zeros(len(token_lists), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(token_lists):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    s = torch.tensor(signs, dtype=torch.float32)

    def hook(module, args):
        h = args[0]
        shift = (s[:, None, None] * eps) * ((h @ params["A"]) @ params["B"].T)
        if domain:
            shift = shift + eps * ((h @ params["domain.A"]) @ params["domain.B"].T)
        return (h + shift,)

    handle = lm.lm_head.register_forward_pre_hook(hook)
    try:
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    keep = mask[:, 1:].bool()
    return F.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])


def setup_fit(lm, data, config):
    texts = [e.text for e in data.train]
    labels = torch.tensor([e.label for e in data.train])
    tl = tokenize(lm.tokenizer, texts, 64)
    cache = cache_hidden(lm, token_lists=tl, predicted_only=True, dtype=torch.float32, tokens_per_batch=40)
    return Fitter(lm, cache, labels, config), tl, labels


def text_positions(fitter, text_ids):
    return torch.nonzero(torch.isin(fitter.cache.text_id, torch.tensor(text_ids))).flatten()


@pytest.mark.parametrize("arch, bias, cap", [("llama", False, None), ("gpt2", False, None), ("gemma3_text", False, 3.0),
                                              ("opt", False, None), ("qwen2", True, None)])
def test_cached_gradient_equals_autograd_through_full_model(arch, bias, cap):
    lm = tiny_model(arch, head_bias=bias)
    if cap:
        lm.model.config.final_logit_softcapping = cap
    data = make_data(1, heldout=0)
    config = TrainConfig(rank=3, epsilon=0.5, init_scale=0.3, domain=True, dtype="float32")
    fitter, tl, labels = setup_fit(lm, data, config)
    batch = [0, 3, 4, 7]
    loss = fitter.token_loss(text_positions(fitter, batch)).mean()
    got = torch.autograd.grad(loss, list(fitter.params.values()))
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in fitter.params.items()}
    ref = full_model_loss(lm, ref_params, config.epsilon, [tl[i] for i in batch], labels[batch].tolist(), domain=True)
    want = torch.autograd.grad(ref, list(ref_params.values()))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        assert b.abs().max() > 1e-4  # the check is not vacuous
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cached_training_equals_full_model_training():
    lm = tiny_model("llama")
    data = make_data(1, heldout=0)
    config = TrainConfig(rank=2, epsilon=0.3, init_scale=0.2, lr=0.05, dtype="float32")
    fitter, tl, labels = setup_fit(lm, data, config)
    ref = {k: v.detach().clone().requires_grad_() for k, v in fitter.params.items()}
    opt = torch.optim.Adam(list(ref.values()), lr=config.lr)
    batches = [[0, 1, 2], [3, 4, 5], [1, 4], [0, 2, 3, 5]]
    for b in batches:
        fitter.step(text_positions(fitter, b))
        opt.zero_grad()
        full_model_loss(lm, ref, config.epsilon, [tl[i] for i in b], labels[b].tolist()).backward()
        opt.step()
    for k in ref:
        assert not torch.allclose(fitter.params[k].detach(), fitter.tensors()[k] * 0)
        torch.testing.assert_close(fitter.params[k].detach(), ref[k].detach(), rtol=1e-4, atol=1e-6)


def test_trained_steer_applied_by_hooks_gives_the_fitted_loss():
    """The saved steer, applied through steerport.hooks, reproduces the trainer's held-out numbers."""
    lm = tiny_model("gpt2")
    data = make_data(3)
    result = train(lm, data, TrainConfig(rank=2, epsilon=0.2, lr=0.05, steps=12, tokens_per_batch=64, cache_dtype="float32"))
    steer = result.steer
    texts = [e.text for e in data.heldout]
    signs = [e.label for e in data.heldout]
    tl = tokenize(lm.tokenizer, texts, 128)
    n_tok = sum(len(t) - 1 for t in tl)
    total = 0.0
    for t, s in zip(tl, signs):
        with steered(lm, [(steer, s)]):
            total += full_model_loss(lm, {"A": torch.zeros(32, 1), "B": torch.zeros(32, 1)}, 0.0, [t], [0.0]).item() * (len(t) - 1)
    assert abs(total / n_tok - result.results["heldout_loss_steered"]) < 1e-4
    # separation and AUC, recomputed from the full model: mean per-token log-likelihood of each text at s = 0, +1, -1
    none = {"A": torch.zeros(32, 1), "B": torch.zeros(32, 1)}

    def loglik(value):
        out = []
        for t in tl:
            if value:
                with steered(lm, [(steer, value)]):
                    out.append(-full_model_loss(lm, none, 0.0, [t], [0.0]).item())
            else:
                out.append(-full_model_loss(lm, none, 0.0, [t], [0.0]).item())
        return torch.tensor(out, dtype=torch.float64)

    lp0, lpp, lpn = loglik(0.0), loglik(1.0), loglik(-1.0)
    pos, neg = torch.tensor(signs) > 0, torch.tensor(signs) < 0
    sep = float((lpp[pos] - lp0[pos]).mean() - (lpp[neg] - lp0[neg]).mean())
    assert sep > 0 and abs(result.results["separation"] - sep) < 1e-4
    score = lpp - lpn  # the steer as a classifier; AUC = share of (positive, negative) pairs ranked right
    auc = float(sum((score[i] > score[j]) + 0.5 * (score[i] == score[j]) for i in torch.nonzero(pos) for j in torch.nonzero(neg)))
    assert result.results["heldout_auc"] == pytest.approx(auc / (int(pos.sum()) * int(neg.sum())))


# --------------------------------------------------------------------------- runs


def cfg(**kw):
    base = dict(rank=2, epsilon=0.2, lr=0.05, steps=10, tokens_per_batch=48, cache_dtype="float32", dtype="float32",
                eval_every=2, checkpoint_every=3, cache_tokens_per_batch=64)
    base.update(kw)
    return TrainConfig(**base)


def test_deterministic_with_a_seed():
    lm = tiny_model("llama")
    a = train(lm, make_data(), cfg()).steer
    b = train(lm, make_data(), cfg()).steer
    c = train(lm, make_data(), cfg(seed=1)).steer
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert not torch.equal(a.A, c.A)


def test_warm_start_begins_at_the_init_steer_and_checks_it():
    lm = tiny_model("llama")
    first = train(lm, make_data(), cfg(rank=3)).steer
    first.epsilon *= 4  # a transferred steer carries its own scale; the fit folds it into A
    # a learning rate too small to move anything: the result is the init steer at this run's ε₀
    again = train(lm, make_data(), cfg(rank=8, lr=1e-30, patience=100), init=first)
    assert again.steer.rank == 3 and again.steer.meta["training"]["init"]["steer"] == first.fingerprint
    assert torch.allclose(again.steer.A * again.steer.epsilon, first.A * first.epsilon)
    assert torch.equal(again.steer.B, first.B)
    other = tiny_model("gpt2")
    with pytest.raises(SteerportError, match="transfer it to this model first"):
        train(other, make_data(), cfg(), init=first)


def test_warm_start_never_returns_worse_than_its_init():
    """The init is evaluated at step 0 and kept as the best unless the fit beats it on the held-out loss."""
    lm = tiny_model("llama")
    good = train(lm, make_data(), cfg(rank=3, steps=40, head="exact")).steer
    # a learning rate that wrecks the factors on the first step: every later evaluation is worse than the start
    wrecked = train(lm, make_data(), cfg(lr=5.0, steps=6, eval_every=1, head="exact", patience=100), init=good)
    r = wrecked.results
    assert r["best_step"] == 0 and wrecked.history[0]["step"] == 0
    assert all(h["heldout_loss"] > r["init_heldout_loss"] for h in wrecked.history[1:])
    assert torch.allclose(wrecked.steer.A * wrecked.steer.epsilon, good.A * good.epsilon) and torch.equal(wrecked.steer.B, good.B)
    assert r["heldout_loss_steered"] == pytest.approx(good.meta["training"]["results"]["heldout_loss_steered"], abs=1e-6)
    # a sound fit from a weak start moves on, and what it returns is no worse than where it began
    weak = train(lm, make_data(), cfg(rank=3, steps=2, head="exact")).steer
    better = train(lm, make_data(), cfg(steps=30, eval_every=2, head="exact", patience=100), init=weak)
    assert better.results["best_step"] > 0
    assert better.results["heldout_loss_steered"] < weak.meta["training"]["results"]["heldout_loss_steered"]
    assert better.results["init_heldout_loss"] == better.history[0]["heldout_loss"]


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    lm = tiny_model("llama")
    whole = train(lm, make_data(), cfg(patience=100), workdir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(lm, make_data(), cfg(patience=100), workdir=tmp_path / "b", stop_after_step=4)
    assert (tmp_path / "b" / "checkpoint.safetensors").exists()
    resumed = train(lm, make_data(), cfg(patience=100), workdir=tmp_path / "b")
    assert resumed.results["resumed"] and not whole.results["resumed"]
    assert torch.equal(whole.steer.A, resumed.steer.A) and torch.equal(whole.steer.B, resumed.steer.B)
    strip = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]  # noqa: E731
    assert strip(whole.history) == strip(resumed.history)


def test_resume_during_the_body_pass(tmp_path):
    lm = tiny_model("llama")
    whole = train(lm, make_data(), cfg(), workdir=tmp_path / "a")
    seen = []

    def interrupt(phase, info):
        if phase == "cache":
            seen.append(info["texts"])
            if len(seen) == 3:  # after two batches were cached
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(lm, make_data(), cfg(), workdir=tmp_path / "b", progress=interrupt)
    state = json.loads((tmp_path / "b" / "hidden.json").read_text())
    assert 0 < state["batches_done"] < state["batches"]
    resumed = train(lm, make_data(), cfg(), workdir=tmp_path / "b")
    assert torch.equal(whole.steer.A, resumed.steer.A)


def test_changed_settings_restart_the_fit_but_keep_the_cache(tmp_path):
    lm = tiny_model("llama")
    with pytest.raises(KeyboardInterrupt):
        train(lm, make_data(), cfg(), workdir=tmp_path, stop_after_step=4)
    seen = []
    other = train(lm, make_data(), cfg(lr=0.01), workdir=tmp_path, progress=lambda phase, info: seen.append((phase, info)))
    n_texts = len(make_data().train) + len(make_data().heldout)
    cache_updates = [info["texts"] for phase, info in seen if phase == "cache"]
    assert cache_updates == [n_texts]  # the whole cache was already there: no batch ran again
    assert other.results["resumed"]
    fresh = train(lm, make_data(), cfg(lr=0.01))
    assert torch.equal(other.steer.A, fresh.steer.A)


def test_early_stopping_and_summary():
    lm = tiny_model("llama")
    r = train(lm, make_data(), cfg(steps=200, lr=0.3, patience=2, eval_every=1, head="exact"))
    assert r.results["stopped"].startswith("early stop") and r.results["steps"] < 200
    best = min(h["heldout_loss"] for h in r.history)  # exact head, every held-out position (fewer than eval_tokens)
    assert abs(r.results["heldout_loss_steered"] - best) < 1e-5  # the kept steer is the best one
    assert r.results["best_step"] == min(r.history, key=lambda h: h["heldout_loss"])["step"]
    assert r.results["heldout_loss_steered"] < r.results["heldout_loss_unsteered"]
    assert r.results["separation"] > 0 and r.results["heldout_auc"] == 1.0  # held-out texts also occur in training


def test_metadata_records_data_settings_timings(tmp_path):
    lm = tiny_model("llama")
    data = make_data()
    data.summary = {"sources": [{"file": "x.jsonl", "sha256": "0" * 64}], "counts": {"train": {"positive": 1}}}
    steer = train(lm, data, cfg(domain=True)).steer
    path = steer.save(tmp_path / "s.st")
    back = Steer.load(path)
    assert set(back.tensors) == {"A", "B", "domain.A", "domain.B"}
    t = back.meta["training"]
    assert t["settings"]["rank"] == 2 and t["settings"]["domain"] is True
    assert {"cache_s", "fit_s", "total_s"} <= set(t["timings"])
    assert "heldout_loss_steered_with_domain" in t["results"] and "include_domain=True" in t["domain"]
    assert back.meta["data"]["sources"][0]["sha256"] == "0" * 64
    assert back.epsilon == 0.2 and back.positive == "positive"
    assert back.model["fingerprint"] == lm.fingerprint


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw, expect", [
    ({"rank": 0}, "rank must be at least 1"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"epsilon": float("nan")}, "epsilon must be a positive number"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"epochs": 0.0, "steps": None}, "epochs must be positive"),
    ({"weight_decay": -1.0}, "weight decay"),
    ({"cache_dtype": "int8"}, "unknown dtype"),
])
def test_bad_settings(kw, expect):
    with pytest.raises(SteerportError, match=expect):
        train(tiny_model("llama"), make_data(), cfg(**kw))


@pytest.mark.parametrize("name", ["lr", "epsilon", "init_scale", "epochs", "weight_decay", "min_improvement"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_settings_are_refused(name, value):
    """Every float setting must be finite, even where the run would not read it (epochs beside steps)."""
    config = cfg(**{name: value})
    with pytest.raises(SteerportError) as e:
        config.check()
    msg = str(e.value)
    assert "\n" not in msg and name.replace("_", " ") in msg.replace("_", " ")
    assert ("finite" in msg or "positive" in msg) and str(value) in msg
    cfg().check()  # the finite defaults pass


def test_single_token_texts_and_foreign_heads_are_refused():
    lm = tiny_model("llama")
    one = Dataset([Example("a", 1.0, ""), Example("b", -1.0, "")], [], "p")
    with pytest.raises(SteerportError, match="no tokens to predict"):
        train(lm, one, cfg())
    lm.model.config.final_logit_softcapping = None
    orig = lm.model.forward

    def scaled(*a, **k):  # a model that post-processes its logits (e.g. a logit scale)
        out = orig(*a, **k)
        out.logits = out.logits * 2
        return out

    lm.model.forward = scaled
    with pytest.raises(SteerportError, match="logits are not E·h"):
        train(lm, make_data(), cfg())


# --------------------------------------------------------------------------- CLI


def test_cli_trains_from_text_files_and_reports_errors(tmp_path, capsys):
    from steerport.cli import main

    lm = tiny_model("llama")
    model_dir = tmp_path / "tiny"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(CORPUS[0::2]))
    neg.write_text("\n".join(CORPUS[1::2]))
    out = tmp_path / "s.st"
    argv = ["train", str(model_dir), "--positive", str(pos), "--negative", str(neg), "--out", str(out),
            "--steps", "4", "--rank", "2", "--tokens-per-batch", "32", "--positive-name", "even", "--dtype", "float32"]
    import sys

    old = sys.argv
    try:
        sys.argv = ["steerport", *argv]
        main()
        steer = Steer.load(out)
        assert steer.positive == "even" and steer.rank == 2
        assert not (tmp_path / "s.st.work").exists()  # work folder removed after success
        sys.argv = ["steerport", "train", str(model_dir), "--data", str(pos), "--out", str(tmp_path / "t.st")]
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert "unknown data format '.txt'" in err and "Traceback" not in err
        assert not (tmp_path / "t.st").exists()
    finally:
        sys.argv = old


# --------------------------------------------------------------------------- opt-in top-k head


def test_topk_approximation_is_exact_without_a_tail_and_at_zero_steer():
    from steerport.train import topk_stats, topk_token_loss

    lm = tiny_model("llama", head_bias=True)
    data = make_data(1, heldout=0)
    fitter, _, _ = setup_fit(lm, data, TrainConfig(rank=3, epsilon=0.5, init_scale=0.3, dtype="float32"))
    idx = torch.arange(fitter.cache.n_positions)
    V = fitter.E.shape[0]
    u = torch.randn(len(idx), 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    B = fitter.params["B"].detach().clone().requires_grad_()
    exact = head_token_loss(fitter.cache.h[idx], u, B, fitter.E, fitter.bias, fitter.cache.targets[idx])
    full = topk_stats(fitter.cache, fitter.E, fitter.bias, V)  # every token a candidate: no tail
    approx = topk_token_loss(full, idx, u, B, fitter.E)
    torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(approx.sum(), [u, B])
    ge = torch.autograd.grad(exact.sum(), [u, B])
    for a, b in zip(ga, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    small = topk_stats(fitter.cache, fitter.E, fitter.bias, 8)
    zero = torch.zeros_like(u)
    torch.testing.assert_close(topk_token_loss(small, idx, zero, B, fitter.E),
                               head_token_loss(fitter.cache.h[idx], zero, B, fitter.E, fitter.bias, fitter.cache.targets[idx]),
                               rtol=1e-5, atol=1e-5)
    first = dataclasses.replace(small, tail_cov=None)

    def mean_error(stats, a):  # signed: approximate minus exact loss, mean over positions
        return (topk_token_loss(stats, idx, u * a, B, fitter.E)
                - head_token_loss(fitter.cache.h[idx], u * a, B, fitter.E, fitter.bias, fitter.cache.targets[idx])).mean().item()

    # the first-order tail is a lower bound (Jensen) whose error shrinks quadratically with the steer's size ...
    err = [mean_error(first, a) for a in (0.1, 0.01)]
    assert err[0] < 0 and abs(err[1]) < abs(err[0]) / 30
    # ... and the variance term takes most of that bias away
    for a in (1.0, 0.3):
        assert abs(mean_error(small, a)) < 0.2 * abs(mean_error(first, a))


def test_topk_statistics_swept_in_chunks_equal_the_full_logits():
    from steerport.train.topk import rows_stats

    g = torch.Generator().manual_seed(3)
    V, d, M, k = 1100, 16, 40, 10
    E, bias = torch.randn(V, d, generator=g), torch.randn(V, generator=g)
    h, y = torch.randn(M, d, generator=g) * 0.3, torch.randint(0, V, (M,), generator=g)  # spread: every tail counts
    z = (h.double() @ E.double().T) + bias.double()  # (M, V): the reference, all logits at once
    others = z.clone()
    others[torch.arange(M), y] = -math.inf
    top_v, top_i = others.topk(k - 1, dim=1)
    tail = torch.ones(M, V, dtype=torch.bool)
    tail[torch.arange(M)[:, None], torch.cat([y[:, None], top_i], 1)] = False
    p_tail = torch.where(tail, z, -math.inf).softmax(1)  # (M, V), the tail's own distribution
    for chunk in (7, 32, 256, 2048):  # many chunks (the merge across chunks), by column groups (256 | chunk), and one
        ids, z0, log_tail, e_tail = rows_stats(h, y, E, bias, k, chunk=chunk)
        assert torch.equal(ids[:, 0].long(), y) and torch.equal(ids[:, 1:].long(), top_i)
        torch.testing.assert_close(z0.double(), torch.cat([z[torch.arange(M), y][:, None], top_v], 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(log_tail.double(), torch.where(tail, z, -math.inf).logsumexp(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e_tail.double(), p_tail @ E.double(), rtol=1e-4, atol=1e-4)


def test_block_topk_equals_topk():
    from steerport.train.topk import block_topk

    g = torch.Generator().manual_seed(5)
    for n, c, k in ((7, 4096, 63), (5, 4099, 63), (3, 1000, 63), (4, 300, 9)):  # blocks, a remainder, too few blocks
        z = torch.randn(n, c, generator=g)
        z[0, :50] = -math.inf  # rows with -inf entries (the trainer masks each row's target)
        v, i = block_topk(z, k)
        ref_v, _ = z.topk(k, dim=1)
        assert torch.equal(v, ref_v) and torch.equal(z.gather(1, i), v)


def test_tail_covariance_equals_the_tails_covariance_from_full_logits():
    from steerport.train.topk import TopKStats, rows_stats, tail_covariance

    g = torch.Generator().manual_seed(8)
    V, d, M, k = 300, 12, 30, 8
    E, bias = torch.randn(V, d, generator=g), torch.randn(V, generator=g)
    h, y = torch.randn(M, d, generator=g) * 0.3, torch.randint(0, V, (M,), generator=g)
    ids, z0, log_tail, e_tail = rows_stats(h, y, E, bias, k, chunk=64)
    stats = TopKStats(ids, z0, log_tail, e_tail)
    pos = torch.arange(0, M, 2)
    cov = tail_covariance(h[pos], stats, pos, E, bias, mass=1.0, max_tokens=V)
    z = h[pos].double() @ E.double().T + bias.double()
    z[torch.arange(len(pos))[:, None], ids[pos].long()] = -math.inf
    q = z.softmax(1)  # (n, V): each tail's own distribution
    Ed = E.double()
    want = torch.stack([(Ed.T * qp) @ Ed - torch.outer(qp @ Ed, qp @ Ed) for qp in q]).mean(0)
    w, vecs = torch.linalg.eigh(want)
    want = (vecs * w.clamp_min(0)) @ vecs.T
    torch.testing.assert_close(cov.double(), want, rtol=1e-4, atol=1e-5)


def test_entries_above_a_threshold_equal_a_plain_comparison():
    from steerport.train.topk import entries_above

    g = torch.Generator().manual_seed(7)
    for c in (256, 100):  # whole column groups, and a width that is not
        z = torch.randn(9, c, generator=g)
        z[2, :40] = -math.inf
        t = torch.randn(9, generator=g) + 1.5
        t[4] = -math.inf  # a row with no candidates yet: every finite entry
        want = torch.nonzero(z > t[:, None], as_tuple=True)
        groups = z.view(9, -1, 64).amax(2) if c % 64 == 0 else None
        got = entries_above(z, t, groups)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_rows_weighted_sum_sums_embedding_rows_per_output_row():
    from steerport.train.topk import rows_weighted_sum

    g = torch.Generator().manual_seed(6)
    E = torch.randn(50, 8, generator=g).bfloat16()
    rows, ids, w = torch.tensor([2, 0, 2, 2]), torch.tensor([7, 7, 3, 49]), torch.tensor([0.5, 2.0, 1.0, -1.0])
    out = rows_weighted_sum(rows, ids, w, E, 4)
    Ef = E.float()
    want = torch.stack([2.0 * Ef[7], torch.zeros(8), 0.5 * Ef[7] + Ef[3] - Ef[49], torch.zeros(8)])
    torch.testing.assert_close(out, want)


def test_topk_statistics_in_bf16_keep_the_tail_precise():
    """With bf16 products, a tail that is a small share of the mass still comes out to ~1e-3
    (the candidates never enter the low-precision sums, so nothing cancels)."""
    from steerport.train.topk import rows_stats

    g = torch.Generator().manual_seed(4)
    V, d, M, k = 2048, 32, 64, 16
    E = torch.randn(V, d, generator=g).bfloat16()
    h = torch.randn(M, d, generator=g) * 1.5  # peaked: the tail holds a few % of the mass on most rows
    y = torch.randint(0, V, (M,), generator=g)
    ids, z0, log_tail, e_tail = rows_stats(h, y, E, None, k, chunk=256)
    z = (h.bfloat16() @ E.T).double()  # the same bf16 logits, then everything in fp64
    tail = torch.ones(M, V, dtype=torch.bool)
    tail[torch.arange(M)[:, None], ids.long()] = False
    zt = torch.where(tail, z, -math.inf)
    share = (zt.logsumexp(1) - z.logsumexp(1)).exp()
    assert share.median() < 0.05  # the hard case for precision
    ref = zt.softmax(1) @ E.double()
    err = (e_tail.double() - ref).norm(dim=1) / ref.norm(dim=1)
    kept = share > 1e-5  # smaller tails are dropped on purpose (log_tail −inf, e_tail 0)
    assert kept.float().mean() > 0.5 and torch.all(log_tail[~kept] == -math.inf)
    assert err[kept].max() < 3e-3, err[kept].max()
    torch.testing.assert_close(log_tail.double()[kept], zt.logsumexp(1)[kept], rtol=1e-5, atol=1e-5)


def test_topk_training_runs_and_resumes(tmp_path):
    lm = tiny_model("llama")
    whole = train(lm, make_data(), cfg(head="topk", topk=16, patience=100), workdir=tmp_path / "a")
    assert "topk_stats_s" in whole.steer.meta["training"]["timings"]
    with pytest.raises(KeyboardInterrupt):
        train(lm, make_data(), cfg(head="topk", topk=16, patience=100), workdir=tmp_path / "b", stop_after_step=5)
    assert (tmp_path / "b" / "topk16.json").exists() and (tmp_path / "b" / "topk16.e_tail.npy").exists()
    resumed = train(lm, make_data(), cfg(head="topk", topk=16, patience=100), workdir=tmp_path / "b")
    assert torch.equal(whole.steer.A, resumed.steer.A)
    with pytest.raises(SteerportError, match="head must be"):
        train(lm, make_data(), cfg(head="fast"))


def test_a_damaged_work_folder_manifest_is_a_one_line_error(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(SteerportError, match="run.json: unreadable work-folder manifest .*delete the work folder"):
        train(tiny_model("llama"), make_data(), cfg(steps=1), workdir=tmp_path)


def test_work_folder_cleanup_only_touches_our_files(tmp_path):
    from steerport.train import remove_workdir

    lm = tiny_model("llama")
    (tmp_path / "mine.txt").write_text("keep me")
    train(lm, make_data(), cfg(steps=2), workdir=tmp_path)
    assert (tmp_path / "hidden.bin").exists()
    remove_workdir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


@pytest.mark.integration
def test_real_model_trains_from_the_vendored_slice(tmp_path, catalog_model):
    """smollm2-135m on 40 vendored SST-2 sentences: runs end to end, steer applies through hooks."""
    from steerport.data import DataOptions, load_data

    lm = catalog_model("smollm2-135m")
    data = load_data(DataOptions(files=["sst2"], limit_per_class=20, heldout_fraction=0.2))
    result = train(lm, data, TrainConfig(steps=4, tokens_per_batch=256, eval_every=2), workdir=tmp_path / "w")
    r = result.results
    assert r["steps"] == 4 and r["heldout_texts"] == 8
    assert r["heldout_loss_unsteered"] > 1.0 and r["heldout_loss_steered"] != r["heldout_loss_unsteered"]
    assert {"separation", "heldout_auc"} <= set(r)
    steer = result.steer
    assert steer.hidden_size == 576 and steer.model["fingerprint"] == lm.fingerprint
    assert steer.meta["data"]["sources"][0]["file"].endswith("sst2_train.jsonl")
    ids = lm.tokenizer(["The movie was"], return_tensors="pt")
    base = lm.model(**ids).logits
    with steered(lm, [(steer, 100.0)]):  # compatible with the model it was trained on, and it moves the logits
        moved = lm.model(**ids).logits
    assert not torch.allclose(base, moved)


# --------------------------------------------------------------------------- one pass: statistics, cadence, stopping


def test_topk_statistics_come_out_of_the_body_pass():
    """The default head's statistics are filled batch by batch during the body pass and equal a separate pass."""
    from steerport.train import TopKWriter, topk_stats

    lm = tiny_model("llama", head_bias=True)
    tl = tokenize(lm.tokenizer, [e.text for e in make_data().train], 64)
    E = lm.output_embeddings.detach()
    n = sum(len(t) - 1 for t in tl)
    writer = TopKWriter(n, lm.hidden_size, 8, E, lm.lm_head_bias.detach(), torch.float32)
    cache = cache_hidden(lm, token_lists=tl, predicted_only=True, dtype=torch.float32, tokens_per_batch=40, observe=writer)
    assert int(writer.done.sum()) == n and writer.fill_missing(cache) == 0  # nothing left for a second pass
    after = topk_stats(cache, E, lm.lm_head_bias.detach(), 8)
    assert torch.equal(writer.stats.ids, after.ids)
    for f in ("z0", "log_tail", "e_tail"):
        torch.testing.assert_close(getattr(writer.stats, f), getattr(after, f), rtol=1e-5, atol=1e-6)
    # the unsteered loss comes free: it is the exact head's loss at zero shift
    idx = torch.arange(n)
    zero = torch.zeros(n, 1)
    exact = head_token_loss(cache.h, zero, torch.zeros(lm.hidden_size, 1), E, lm.lm_head_bias.detach(), cache.targets)
    torch.testing.assert_close(writer.stats.base_loss(idx), exact, rtol=1e-5, atol=1e-5)
    seen = []
    train(lm, make_data(), cfg(), progress=lambda phase, info: seen.append(phase))
    assert "cache" in seen and "stats-start" not in seen  # no separate statistics pass in a default run


def test_statistics_are_computed_for_a_cache_made_without_them(tmp_path):
    lm = tiny_model("llama")
    exact = train(lm, make_data(), cfg(head="exact"), workdir=tmp_path)
    seen = []
    later = train(lm, make_data(), cfg(head="topk", topk=16), workdir=tmp_path, progress=lambda p, i: seen.append(p))
    fresh = train(lm, make_data(), cfg(head="topk", topk=16))
    assert "stats-start" in seen and later.results["head"] == "topk" and exact.results["head"] == "exact"
    torch.testing.assert_close(later.steer.A, fresh.steer.A, rtol=1e-5, atol=1e-7)


def test_exact_and_topk_heads_agree_on_held_out_loss():
    """The approximate head trains a steer whose exact held-out loss is within 0.5 % of the exact head's."""
    lm = tiny_model("llama")
    data = make_data(4)
    kw = dict(steps=40, lr=0.05, patience=100, eval_every=5, tokens_per_batch=64)
    exact = train(lm, data, cfg(head="exact", **kw)).results
    approx = train(lm, data, cfg(head="topk", topk=16, **kw)).results
    assert exact["heldout_loss_steered"] < exact["heldout_loss_unsteered"] - 0.01  # the steer learned something
    assert abs(approx["heldout_loss_steered"] - exact["heldout_loss_steered"]) <= 0.005 * exact["heldout_loss_steered"]
    assert approx["heldout_loss_unsteered"] == pytest.approx(exact["heldout_loss_unsteered"], rel=1e-5)


@pytest.mark.parametrize("cap", [None, 2.5])
def test_fused_exact_losses_equal_one_version_at_a_time(cap):
    from steerport.train.headloss import head_token_losses, mirrored

    g = torch.Generator().manual_seed(1)
    N, d, V = 7, 5, 300
    h, E, bias = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((N, d), (V, d), (V,)))
    y = torch.randint(0, V, (N,), generator=g)
    shifts = [(torch.randn(N, r, generator=g, dtype=torch.float64), torch.randn(d, r, generator=g, dtype=torch.float64))
              for r in (2, 3, 2)]
    (u0, B0), (u1, B1) = shifts[0], shifts[1]
    shifts += [(-u0, B0), (u0, B0), (-u0, B0), (-u1, B1.clone()), (2 * u1, B1)]  # signs of one steer, and look-alikes
    assert mirrored(shifts) == {3: 0, 5: 0}  # the first unmirrored match, and only with the same B object
    got = head_token_losses(h, shifts, E, bias, y, softcap=cap)
    for j, (u, B) in enumerate(shifts):
        torch.testing.assert_close(got[j], head_token_loss(h, u, B, E, bias, y, softcap=cap, chunk=64), rtol=1e-12, atol=1e-12)


def test_early_stopping_needs_a_real_share_of_the_gain():
    from steerport.train.run import _early_stopping

    state = {"step": 0, "best_loss": None, "best_step": 0, "bad_evals": 0, "ref_loss": None, "stopped": None}
    config = TrainConfig(patience=2, min_improvement=0.1)
    # unsteered 5.0; the steer gains 0.5, then creeps on by 1e-3 per evaluation
    for step, held in enumerate([4.8, 4.5, 4.499, 4.498], start=1):
        state["step"] = step
        _early_stopping(state, held, 5.0, config)
    assert state["stopped"] and state["best_step"] == 4 and state["best_loss"] == 4.498  # the lowest is still kept
    state.update(stopped=None, bad_evals=0)
    state["step"] = 5
    _early_stopping(state, 4.40, 5.0, config)  # 0.098 below the reference 4.5 > 0.1 x gain 0.6: counts
    assert state["bad_evals"] == 0 and state["ref_loss"] == 4.40


def test_eval_cadence_and_subset_follow_the_cost_rule():
    lm = tiny_model("llama")
    r = train(lm, make_data(6), cfg(steps=30, eval_every=None, eval_tokens=40, tokens_per_batch=48)).results
    assert r["eval_tokens"] == 40 and r["eval_every"] == math.ceil(4 * 40 / 48)
    assert r["heldout_tokens"] > 40  # the summary still reads every held-out position


def test_work_folder_cache_stays_memory_mapped(tmp_path):
    """With a work folder the cache is read from disk, not copied: memory does not grow with the data."""
    import numpy as np

    lm = tiny_model("llama")
    tl = tokenize(lm.tokenizer, [e.text for e in make_data().train], 64)
    cache = cache_hidden(lm, token_lists=tl, predicted_only=True, dtype=torch.float32, workdir=tmp_path, in_memory_bytes=0)
    disk = np.memmap(tmp_path / "hidden.bin", dtype=np.float32, mode="r+", shape=tuple(cache.h.shape))
    disk[0, 0] = 1234.5
    disk.flush()
    assert cache.h[0, 0].item() == 1234.5  # the tensor is the file


@pytest.mark.parametrize("labels", [[1.0, -1.0], [0.5, -2.0]])
def test_summary_loss_at_the_labels_equals_the_exact_head_at_each_text_value(labels):
    """With ±1 values the summary reads the +1 / −1 versions instead of a third head pass; any other
    values keep the per-text version. Both equal the exact head at each text's own value."""
    from steerport.train import summarize

    lm = tiny_model("llama")
    data = make_data(1, heldout=0)
    data = Dataset([dataclasses.replace(e, label=labels[i % 2]) for i, e in enumerate(data.train)], [], "positive", {})
    fitter, _, _ = setup_fit(lm, data, TrainConfig(rank=3, epsilon=0.5, init_scale=0.3, dtype="float32"))
    idx = torch.arange(fitter.cache.n_positions)
    got = summarize(fitter, idx, 0)
    want = head_token_loss(fitter.cache.h[idx], *fitter.shift(idx), fitter.E, fitter.bias, fitter.cache.targets[idx]).double().mean()
    assert got["heldout_loss_steered"] == pytest.approx(float(want), rel=1e-6)
    assert got["heldout_loss_steered"] != pytest.approx(got["heldout_loss_unsteered"], rel=1e-6)

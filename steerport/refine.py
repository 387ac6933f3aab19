"""Refine a carried LM-Steer steer so its effect on next-token log-probabilities matches the source's.

The closed-form carries of :mod:`steerport.transfer` map the factors once. This module then
fits the target factors directly on what a user feels: the change of next-token log-probabilities,
measured on unlabeled neutral text, on tokens the two vocabularies share, at positions where both
tokenizations end at the same character (:func:`steerport.pairing.paired_states`).

**Objective.** At a paired position i the two models' LM-head inputs are h_s,i (d_s) and h_t,i
(d_t); the aligned vocabulary gives output-embedding rows x_s,k (d_s) and x_t,k (d_t) of the same
surface string k. A steer (A, B: d x r, scale ε) shifts logits by Δz_k = ε (hᵀA)(Bᵀx_k); to first
order the log-probability of token k moves by::

    δ_ik = ε (h_iᵀA) · (Bᵀ(c_ik x_k − ē_i))        ē_i = Σ_v p_iv c_iv e_v  (full vocabulary, d)

(c = the soft-cap slope, 1 for models without a final logit soft-cap), i.e. the logit shift minus
its probability-weighted mean. The refinement minimises, over A_t and B_t (d_t x r, ε_t = ε_s)::

    L = Σ_i Σ_k w_ik (δ^t_ik − δ^s_ik)²  /  Σ_i Σ_k w_ik (δ^s_ik)²                       (relative)

with w_ik = ½(p_s(k | i) + p_t(k | i)) (``weight="both"``; or one model's probability), kept on
the ``top_k`` shared tokens of largest weight at each position (precomputed once, so a step costs
O(N·K·r + m·d·r), never V·d). With weights p and δ centred under p, Σ_k p_k (δ^t − δ^s)² is twice
the second-order KL between the two steered next-token distributions: the shifts of likely tokens,
which KL and generation feel, count; the shifts of the long tail do not.

**Keywords** (opt-in). Likely tokens leave out what a steer is about: a detox steer's swear words
are improbable on neutral text, so their shifts never enter L, and a carried steer kept their order
but not their size. With ``keywords`` = M > 0 a second term L_kw of the same form matches the M aligned
tokens the source steer shifts most (:func:`keyword_problem`) at every position, each with weight 1;
the fit minimises L + λ L_kw (λ = ``keyword_weight``, 1). On the model ladder (``benchmarks/results/
transfer_ladder_keywords_*.md``, M = 64) this made toxicity steers carried between Gemma-3 and Qwen2.5
write toxic text as their sources do, and raised their separation per unit of KL, but lowered the
held-out AUC on four of twelve cells, most where a steer's largest shifts are a dataset's artifacts
(an SST-2 steer's keywords are mostly punctuation). So it is off by default; look at a steer's
keywords (``steerport inspect --keywords``) before turning it on.

Without weights (w ≡ 1 on every shared token, no centring) the objective has a closed form, and it
is exactly the ``hidden`` form: A_t = Kᵀ A_s (h_s ≈ K h_t fitted on the same positions), B_t = Hᵀ B_s
(the vocabulary map). The refinement starts there and runs L-BFGS (float64) on the weighted
objective. Positions are split by text into fit and held-out parts; the iterate with the lowest
held-out loss is returned — the closed form itself when nothing beats it, so an exact map
(already at zero loss) comes back unchanged.

Example::

    res = transfer_steer(steer, "smollm2-135m", "gemma3-270m", TransferOptions(form="refined"))
    print(res.lineage["refine"]["heldout_loss"])          # {"init": 0.41, "final": 0.18}
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerport.calibration import require_finite
from steerport.errors import SteerportError
from steerport.linmap import fit_map
from steerport.models import LoadedModel
from steerport.pairing import paired_states
from steerport.steer import Steer
from steerport.train.headloss import apply_softcap

WEIGHTS = ("both", "target", "source")
ROW_ELEMENTS = 1 << 25  # logits held at once while precomputing: rows x V <= 32M floats


@dataclass
class RefineOptions:
    """How the refinement fits (recorded in the lineage)."""

    top_k: int = 64  # shared tokens kept per position, by weight
    weight: str = "both"  # whose next-token probabilities weight the tokens: both (mean), target, source
    holdout: float = 0.2  # share of the neutral texts held out to choose the iterate
    max_positions: int = 4000  # paired positions used (a seeded sample when there are more)
    rounds: int = 30  # L-BFGS rounds of ``iters_per_round`` iterations; held-out loss checked after each
    iters_per_round: int = 10
    patience: int = 3  # stop after this many rounds without a held-out improvement
    exact_tol: float = 1e-6  # a closed form with relative loss below this is already exact: kept as is
    seed: int = 0
    keywords: int = 0  # the source steer's keywords (shared tokens it shifts most) matched at every position too
    keyword_weight: float = 1.0  # the keyword term's weight beside the likely tokens' term (both relative)
    keyword_words_only: bool = False  # keywords only among tokens with a letter (no punctuation, no whitespace)

    def __post_init__(self):
        if self.weight not in WEIGHTS:
            raise SteerportError(f"unknown refine weight {self.weight!r}; use one of {', '.join(WEIGHTS)}")
        if not 0 < self.holdout < 1:
            raise SteerportError(f"refine holdout must be in (0, 1), got {self.holdout}")
        for name in ("top_k", "max_positions", "rounds", "iters_per_round", "patience"):
            if getattr(self, name) < 1:
                raise SteerportError(f"refine {name} must be positive, got {getattr(self, name)}")
        if self.keywords < 0 or not self.keyword_weight >= 0:
            raise SteerportError(f"refine keywords and keyword_weight must not be negative, got {self.keywords} "
                                 f"and {self.keyword_weight}")


@dataclass
class ShiftProblem:
    """Everything the objective needs, precomputed once from paired states (N positions, K tokens).

    ``X_s`` (m, d_s), ``X_t`` (m, d_t): output-embedding rows of the m shared tokens that appear in
    some position's top K (``pairs`` (m,): their rows in the aligned vocabulary); ``ids`` (N, K) index
    them. ``cen_s`` (N, d_s), ``cen_t`` (N, d_t): ē of each position; ``slope_s``, ``slope_t`` (N, K):
    soft-cap slopes c_ik; ``w`` (N, K): weights.
    """

    h_s: torch.Tensor
    h_t: torch.Tensor
    X_s: torch.Tensor
    X_t: torch.Tensor
    ids: torch.Tensor
    w: torch.Tensor
    cen_s: torch.Tensor
    cen_t: torch.Tensor
    slope_s: torch.Tensor
    slope_t: torch.Tensor
    pairs: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.h_s.shape[0])


@torch.no_grad()
def shared_token_stats(h: torch.Tensor, E: torch.Tensor, bias: torch.Tensor | None, cap: float | None,
                       shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows h (M, d): probabilities of the shared tokens (M, n), their soft-cap slopes (M, n)
    and ē = Σ_v p_v c_v e_v over the full vocabulary (M, d)."""
    z = h @ E.T  # (M, V)
    if bias is not None:
        z = z + bias.float()
    z, slope = apply_softcap(z, cap)
    p = torch.softmax(z, 1)
    pc = p if slope is None else p * slope
    cen = pc @ E  # (M, d)
    sl = torch.ones(len(h), len(shared)) if slope is None else slope[:, shared]
    return p[:, shared], sl, cen


@torch.no_grad()
def shift_problem(h_s: torch.Tensor, h_t: torch.Tensor, src_lm: LoadedModel, tgt_lm: LoadedModel,
                  src_ids: torch.Tensor, tgt_ids: torch.Tensor, *, top_k: int = 64, weight: str = "both",
                  progress: Callable[[int], None] | None = None) -> ShiftProblem:
    """Precompute the weighted objective's data from paired states h_s (N, d_s), h_t (N, d_t) and
    the aligned vocabulary (``src_ids[k]``, ``tgt_ids[k]``: the same surface string)."""
    E_s, E_t = src_lm.output_embeddings.detach().float(), tgt_lm.output_embeddings.detach().float()
    N = len(h_s)
    K = min(top_k, len(src_ids))
    rows = max(8, ROW_ELEMENTS // max(E_s.shape[0], E_t.shape[0]))
    ids = torch.empty(N, K, dtype=torch.long)
    w = torch.empty(N, K)
    sl_s, sl_t = torch.empty(N, K), torch.empty(N, K)
    cen_s, cen_t = torch.empty(N, E_s.shape[1]), torch.empty(N, E_t.shape[1])
    for i in range(0, N, rows):
        ps, ss, cen_s[i : i + rows] = shared_token_stats(h_s[i : i + rows].float(), E_s, src_lm.lm_head_bias,
                                                         src_lm.softcap, src_ids)
        pt, st, cen_t[i : i + rows] = shared_token_stats(h_t[i : i + rows].float(), E_t, tgt_lm.lm_head_bias,
                                                         tgt_lm.softcap, tgt_ids)
        score = {"both": 0.5 * (ps + pt), "source": ps, "target": pt}[weight]
        top = score.topk(K, dim=1)
        ids[i : i + rows], w[i : i + rows] = top.indices, top.values
        sl_s[i : i + rows], sl_t[i : i + rows] = ss.gather(1, top.indices), st.gather(1, top.indices)
        if progress:
            progress(min(rows, N - i))
    used, local = torch.unique(ids, return_inverse=True)  # the m shared tokens any position keeps
    return ShiftProblem(h_s=h_s.float(), h_t=h_t.float(), X_s=E_s[src_ids[used]], X_t=E_t[tgt_ids[used]],
                        ids=local, w=w, cen_s=cen_s, cen_t=cen_t, slope_s=sl_s, slope_t=sl_t, pairs=used)


@torch.no_grad()
def keyword_problem(prob: ShiftProblem, A_s: torch.Tensor, B_s: torch.Tensor, src_lm: LoadedModel,
                    tgt_lm: LoadedModel, src_ids: torch.Tensor, tgt_ids: torch.Tensor, m: int,
                    rows: torch.Tensor, words_only: bool = False) -> ShiftProblem:
    """The source steer's ``m`` keywords as a second problem on the same positions, each with weight 1.

    Likely tokens leave out what a steer is about: a detox steer's swear words are improbable on
    neutral text, so the weighted objective never sees them, and a carried steer kept their order
    but a third of their shift (Gemma-3 → Qwen2.5: " fuck" +2.2 against the source's +8.0, while it
    raised "," twice as much as the source). The keywords are the aligned tokens k whose centred
    logit shift ε (h_iᵀA)(b_k − b̄), b_k = Bᵀx_k (r), is largest in mean square over positions
    ``rows``: (b_k − b̄)ᵀ M (b_k − b̄) with M = Uᵀ U / n, U = h A (n, r). With ``words_only``, the
    largest among tokens whose text has a letter (an SST-2 steer's largest are " ." and " ,").
    """
    b = src_lm.output_embeddings.detach()[src_ids].float() @ B_s.float()  # (n_aligned, r)
    b = b - b.mean(0)
    U = prob.h_s[rows] @ A_s.float()  # (n, r)
    score = ((b @ (U.T @ U / max(len(U), 1))) * b).sum(1)
    order: Iterable[int] = score.argsort(descending=True).tolist()  # indices into the aligned vocabulary, most shifted first
    if words_only:  # tokens with a letter: punctuation and whitespace are a corpus's style, not its content
        order = (k for k in order if any(c.isalpha() for c in src_lm.tokenizer.decode([int(src_ids[k])])))
    kw = torch.tensor(list(itertools.islice(order, m)), dtype=torch.long)
    if not len(kw):
        raise SteerportError("no aligned token has a letter: refine keywords need words")

    def side(lm: LoadedModel, ids: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        X = lm.output_embeddings.detach()[ids[kw]].float()  # (m, d)
        if not lm.softcap:
            return X, torch.ones(len(h), len(kw))
        z = h @ X.T + (lm.lm_head_bias[ids[kw]].float() if lm.lm_head_bias is not None else 0.0)
        _, slope = apply_softcap(z, lm.softcap)
        assert slope is not None  # a soft-cap gives slopes
        return X, slope

    (X_s, sl_s), (X_t, sl_t) = side(src_lm, src_ids, prob.h_s), side(tgt_lm, tgt_ids, prob.h_t)
    N = prob.n
    return ShiftProblem(h_s=prob.h_s, h_t=prob.h_t, X_s=X_s, X_t=X_t, ids=torch.arange(len(kw)).expand(N, -1),
                        w=torch.ones(N, len(kw)), cen_s=prob.cen_s, cen_t=prob.cen_t, slope_s=sl_s, slope_t=sl_t,
                        pairs=kw)


def token_shifts(h: torch.Tensor, cen: torch.Tensor, slope: torch.Tensor, X: torch.Tensor, ids: torch.Tensor,
                 A: torch.Tensor, B: torch.Tensor, eps: float) -> torch.Tensor:
    """δ (N, K) = ε (hᵀA)·(Bᵀ(c x_ids − ē)): first-order log-prob shifts; h (N, d), A, B (d, r)."""
    dt = A.dtype
    u = h.to(dt) @ A  # (N, r)
    XB = X.to(dt) @ B  # (m, r)
    cB = cen.to(dt) @ B  # (N, r)
    return eps * ((u[:, None, :] * XB[ids]).sum(-1) * slope.to(dt) - (u * cB).sum(-1, keepdim=True))


class _Term:
    """One relative weighted loss on a subset of positions, target factors as the variables."""

    def __init__(self, prob: ShiftProblem, idx: torch.Tensor, A_s: torch.Tensor, B_s: torch.Tensor, eps: float):
        d = torch.float64
        self.h_t, self.cen_t = prob.h_t[idx].to(d), prob.cen_t[idx].to(d)
        self.slope_t, self.ids, self.X_t = prob.slope_t[idx].to(d), prob.ids[idx], prob.X_t.to(d)
        self.w = prob.w[idx].to(d)
        self.eps = eps
        with torch.no_grad():
            self.want = token_shifts(prob.h_s[idx].to(d), prob.cen_s[idx].to(d), prob.slope_s[idx].to(d),
                                     prob.X_s.to(d), prob.ids[idx], A_s.to(d), B_s.to(d), eps)  # (n, K)
        self.norm = float((self.w * self.want.pow(2)).sum().clamp_min(1e-300))

    def __call__(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        got = token_shifts(self.h_t, self.cen_t, self.slope_t, self.X_t, self.ids, A, B, self.eps)
        return (self.w * (got - self.want).pow(2)).sum() / self.norm


class _Objective:
    """Σ_j λ_j L_j: the terms of several problems (the likely tokens, the keywords) on the same positions."""

    def __init__(self, problems: list[tuple[ShiftProblem, float]], idx: torch.Tensor, A_s: torch.Tensor,
                 B_s: torch.Tensor, eps: float):
        self.terms = [(lam, _Term(p, idx, A_s, B_s, eps)) for p, lam in problems]

    def __call__(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return sum((lam * term(A, B) for lam, term in self.terms), torch.zeros((), dtype=A.dtype))

    def parts(self, A: torch.Tensor, B: torch.Tensor) -> list[float]:
        with torch.no_grad():
            return [round(float(term(A.double(), B.double())), 6) for _, term in self.terms]


def refine_factors(prob: ShiftProblem, A_s: torch.Tensor, B_s: torch.Tensor, eps: float, A0: torch.Tensor,
                   B0: torch.Tensor, fit_idx: torch.Tensor, held_idx: torch.Tensor,
                   opts: RefineOptions = RefineOptions(),
                   keywords: ShiftProblem | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Fit A_t, B_t (d_t x r) from A0, B0 on positions ``fit_idx``; return the iterate with the lowest
    loss on ``held_idx`` (A0, B0 themselves when nothing beats them) and a JSON-able record.
    ``keywords`` (:func:`keyword_problem`) adds its term, weighted ``opts.keyword_weight``."""
    t0 = time.perf_counter()
    problems = [(prob, 1.0)] + ([(keywords, opts.keyword_weight)] if keywords is not None else [])
    fit, held = _Objective(problems, fit_idx, A_s, B_s, eps), _Objective(problems, held_idx, A_s, B_s, eps)
    d = torch.float64
    # optimise scaled copies (a = A/α, b = B/β, both of RMS 1) so L-BFGS sees a balanced problem
    alpha = float(A0.double().pow(2).mean().sqrt().clamp_min(1e-30))
    beta = float(B0.double().pow(2).mean().sqrt().clamp_min(1e-30))
    a = (A0.to(d) / alpha).requires_grad_()
    b = (B0.to(d) / beta).requires_grad_()
    with torch.no_grad():
        init_fit, init_held = float(fit(A0.to(d), B0.to(d))), float(held(A0.to(d), B0.to(d)))
    rec: dict[str, Any] = {"fit_positions": len(fit_idx), "heldout_positions": len(held_idx),
                           "loss": {"init": round(init_fit, 6)}, "heldout_loss": {"init": round(init_held, 6)},
                           "rounds": 0}
    best = (init_held, A0.clone(), B0.clone())
    if not math.isfinite(init_fit) or not math.isfinite(init_held):
        raise SteerportError("the refinement's loss is not a finite number; the models' hidden states or the "
                             "carried steer hold NaN or infinite entries (try --dtype float32)")
    if max(init_fit, init_held) <= opts.exact_tol:
        rec.update(kept="closed form already exact", seconds=round(time.perf_counter() - t0, 2))
        rec["loss"]["final"], rec["heldout_loss"]["final"] = rec["loss"]["init"], rec["heldout_loss"]["init"]
        return A0.clone(), B0.clone(), rec
    opt = torch.optim.LBFGS([a, b], lr=1, max_iter=opts.iters_per_round, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = fit(a * alpha, b * beta)
        loss.backward()
        return loss

    stale = 0
    fit_loss = init_fit
    for r in range(opts.rounds):
        opt.step(closure)
        with torch.no_grad():
            fit_loss = float(fit(a * alpha, b * beta))
            h = float(held(a * alpha, b * beta))
        rec["rounds"] = r + 1
        if not math.isfinite(fit_loss) or not math.isfinite(h):
            raise SteerportError("the refinement diverged (its loss became NaN or infinite); use --form hidden")
        if h < best[0] * (1 - 1e-4):
            best, stale = (h, (a * alpha).detach().float(), (b * beta).detach().float()), 0
        else:
            stale += 1
            if stale >= opts.patience:
                break
    A, B = best[1], best[2]
    require_finite("the refined steer", A, B)
    with torch.no_grad():
        rec["loss"]["final"] = round(float(fit(A.to(d), B.to(d))), 6)
    rec["loss"]["last_iterate"] = round(fit_loss, 6)
    rec["heldout_loss"]["final"] = round(best[0], 6)
    if keywords is not None:  # each term on the held-out positions: likely tokens, keywords
        rec["heldout_terms"] = {"init": held.parts(A0, B0), "final": held.parts(A, B)}
    if best[0] >= init_held:
        rec["kept"] = "closed form (no iterate beat it on held-out positions)"
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return A, B, rec


@dataclass
class RefineData:
    """What the refinement needs that does not depend on the steer: K (d_s x d_t, h_s ≈ K h_t, fitted
    on the fit texts' paired positions), its record, and the objective's data (:class:`ShiftProblem`)
    on a sample of fit and held-out positions (``fit_idx``, ``held_idx`` index its rows).
    Reusable for every steer carried between the same two models."""

    K: torch.Tensor
    hidden_map: dict[str, Any]
    problem: ShiftProblem
    fit_idx: torch.Tensor
    held_idx: torch.Tensor
    seconds: float
    cached: bool = False  # read from the cache (cached_prepare_refine) rather than computed now


def prepare_refine(src_lm: LoadedModel, tgt_lm: LoadedModel, src_ids: torch.Tensor, tgt_ids: torch.Tensor,
                   texts: Sequence[str], *, max_tokens: int = 128, ridge: float = 0.0,
                   opts: RefineOptions = RefineOptions(), log: Callable[[str], None] = lambda m: None,
                   progress: Callable[[int], None] | None = None) -> RefineData:
    """One pass of both models over neutral ``texts`` (split by text into fit and held-out parts),
    the hidden-state map K on the fit part, and the objective's data. Too few texts or paired
    positions, or non-finite states: a one-line error."""
    t0 = time.perf_counter()
    texts = [t for t in texts if t.strip()]
    n_held = max(1, int(round(opts.holdout * len(texts))))
    if len(texts) - n_held < 1:
        raise SteerportError(f"the refinement needs at least 2 neutral texts (got {len(texts)})")
    g = torch.Generator().manual_seed(opts.seed)
    order = torch.randperm(len(texts), generator=g).tolist()
    fit_texts = [texts[i] for i in sorted(order[n_held:])]
    held_texts = [texts[i] for i in sorted(order[:n_held])]
    d_t = tgt_lm.hidden_size
    ((Ys, Xt),) = paired_states(src_lm, tgt_lm, fit_texts, ["head"], ["head"], max_tokens=max_tokens, min_pairs=d_t + 1,
                                  progress=progress)  # (n, d_s), (n, d_t)
    ((Ys_h, Xt_h),) = paired_states(src_lm, tgt_lm, held_texts, ["head"], ["head"], max_tokens=max_tokens, progress=progress)
    require_finite("a hidden state of the source or target", Ys, Xt, Ys_h, Xt_h)
    # K is fitted on the fit texts' rows and measured on the held-out texts' rows
    fm = fit_map(torch.cat([Xt, Xt_h]), torch.cat([Ys, Ys_h]), method="ridge" if ridge > 0 else "lstsq", ridge=ridge,
                 train_rows=torch.arange(len(Xt)), held_rows=torch.arange(len(Xt_h)) + len(Xt))
    require_finite("the hidden-state map", fm.M)
    hidden = {"n_positions": len(Ys), "n_heldout_positions": len(Ys_h), "n_texts": len(fit_texts),
              "n_heldout_texts": len(held_texts), "max_tokens": max_tokens, "ridge": ridge, "train": fm.train,
              "heldout": fm.heldout}
    # positions for the objective: a seeded sample of each part, in proportion
    n_fit = min(len(Ys), max(1, int(round(opts.max_positions * (1 - opts.holdout)))))
    n_hold = min(len(Ys_h), max(1, opts.max_positions - n_fit))
    pick_f = torch.randperm(len(Ys), generator=g)[:n_fit].sort().values
    pick_h = torch.randperm(len(Ys_h), generator=g)[:n_hold].sort().values
    log(f"refinement data: {n_fit} + {n_hold} held-out paired positions, top {opts.top_k} shared tokens each")
    prob = shift_problem(torch.cat([Ys[pick_f], Ys_h[pick_h]]), torch.cat([Xt[pick_f], Xt_h[pick_h]]), src_lm, tgt_lm,
                         src_ids, tgt_ids, top_k=opts.top_k, weight=opts.weight)
    return RefineData(K=fm.M.T.contiguous(), hidden_map=hidden, problem=prob, fit_idx=torch.arange(n_fit),
                      held_idx=torch.arange(n_fit, n_fit + n_hold), seconds=round(time.perf_counter() - t0, 2))


@dataclass
class RefinedCarry:
    """The refined target factors ({"A", "B"} and the closed-form domain part, if any), the closed
    form it started from (the ``hidden`` form with this K) and the record for the lineage."""

    factors: dict[str, torch.Tensor]
    closed_form: dict[str, torch.Tensor]
    K: torch.Tensor
    hidden_map: dict[str, Any]
    refine: dict[str, Any]


def refined_carry(steer: Steer, H: torch.Tensor, data: RefineData, opts: RefineOptions = RefineOptions(),
                  heads: tuple[LoadedModel, LoadedModel, torch.Tensor, torch.Tensor] | None = None) -> RefinedCarry:
    """The ``refined`` form: the hidden-state closed form A_t = Kᵀ A_s, B_t = Hᵀ B_s (H, d_s x d_t: the
    vocabulary map e_s ≈ H e_t), then the weighted fit of :func:`refine_factors`; the held-out
    positions choose the iterate. ``heads`` (source model, target model, aligned source and target
    ids) are needed for ``opts.keywords`` (:func:`keyword_problem`)."""
    with_keywords = bool(opts.keywords and opts.keyword_weight > 0)
    if with_keywords and heads is None:
        raise SteerportError("refining with keywords needs both models and the aligned vocabulary")
    K = data.K
    closed = {"A": K.T @ steer.A, "B": H.T @ steer.B}  # (d_t, r) each
    if "domain.A" in steer.tensors:  # the always-on domain part keeps the closed form
        closed["domain.A"] = K.T @ steer.tensors["domain.A"]
        closed["domain.B"] = H.T @ steer.tensors["domain.B"]
    require_finite("the carried steer", *closed.values())
    keywords = None
    if with_keywords:
        assert heads is not None
        keywords = keyword_problem(data.problem, steer.A, steer.B, *heads, opts.keywords, data.fit_idx,
                                   words_only=opts.keyword_words_only)
    A, B, rec = refine_factors(data.problem, steer.A, steer.B, steer.epsilon, closed["A"], closed["B"], data.fit_idx,
                               data.held_idx, opts, keywords)
    rec.update(tokens_used=int(data.problem.X_s.shape[0]), weight_mass=round(float(data.problem.w.sum(1).mean()), 4),
               prepare_seconds=data.seconds, data="cache" if data.cached else "computed")
    return RefinedCarry(factors={**closed, "A": A, "B": B}, closed_form=closed, K=K, hidden_map=data.hidden_map,
                        refine=rec)

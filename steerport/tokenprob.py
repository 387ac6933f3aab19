"""Token-probability steering through the output embedding (Cho et al., "Understanding Token
Probability Encoding in Output Embeddings", COLING 2025, arXiv 2406.01468).

Pieces, one module each (all names are importable from here):

* :mod:`steerport.tokenstats` — the average distribution α over a detect set from cached LM-head
  inputs (:func:`collect_head_stats`) and the exact effect of a row change on it
  (:func:`steered_log_alpha`, :func:`scale_errors`, :func:`remaining_kl`);
* :mod:`steerport.tokenencoding` — the regression -log α ≈ A·e + B (:func:`fit_encoding`), Ω and
  the direction u = -Ω ⊙ A⁻¹ (:func:`direction`);
* :mod:`steerport.tokenprune` — dimension removal (:func:`prune_curve`);
* :mod:`steerport.plots` — pictures (:func:`plot_pca`, :func:`plot_prune`);
* here — the steer itself (:func:`make_token_steer`) and carrying it to another model.

**The step.** Algorithm 1 moves e_w by log(r)·u, which changes the *regression's prediction* of
-log α_w by exactly -log r. The model's actual α_w responds with its own gain: d log α_w / dt at
t = 0 is the p-weighted mean of (1 - p_t,w)·(h_t · u) over the positions, which is not 1, and the
response is not linear in t. So the achieved factor r̂ misses r by an amount that grows with
|log r| (the paper reports e ≈ 0.15–0.20). Since r̂(t) follows exactly from the cached head
inputs, the default step (``step="corrected"``) solves log r̂(t·u) = log r on the detect set for
the scalar t (bracketing, then Brent's method: a few dozen O(N) evaluations);
``step="paper"`` keeps Algorithm 1's t = log r. The steer's metadata records which.

**The direction.** Measured on held-out and out-of-domain text (``benchmarks/SEEDS.md``), most
of the remaining error comes from h_t · u varying from position to position: the p-weighted mean
of the offset differs between texts. The default direction (``direction_rule="steady"``) is the
row change whose offset h·u is as constant as possible over the detect positions at mean 1,
u = Σ⁻¹μ / (μᵀΣ⁻¹μ) (:func:`steady_direction`); then log r shifts token w's logit by about log r
at every position of any text. ``direction_rule="regression"`` keeps the paper's u = -Ω ⊙ A⁻¹;
``direction_rule="regression", step="paper"`` is Algorithm 1 exactly.

A ``token-prob`` steer stores delta_w = e_w' - e_w at value 1 and adds s · (delta_w · h) to token
w's logit only (a hook on the LM head's output); the V x d matrix is never copied, the input
embeddings are untouched. At value s the step is s·t (the factor is r̂(s·t), about r^s).

Example::

    stats = collect_head_stats(lm, texts.neutral("fit", 100))
    enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
    steer = make_token_steer(lm, enc, {" great": 5.0}, stats=stats)     # α_great × 5 on the detect set
    with steered(lm, [(steer, 1.0)]): ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerport.errors import SteerportError
from steerport.models import LoadedModel
from steerport.steer import Steer
from steerport.tokenencoding import (  # noqa: F401  (re-exported)
    DEFAULT_B,
    OMEGA_RULE,
    Encoding,
    direction,
    fit_encoding,
    omega,
    random_direction,
    shuffled_direction,
    steady_direction,
)
from steerport.tokenprune import importance, prune_curve, removed_dims  # noqa: F401  (re-exported)
from steerport.tokenstats import (  # noqa: F401  (re-exported)
    HeadStats,
    ScaleResult,
    TokenStats,
    collect_head_stats,
    remaining_kl,
    remaining_kls,
    scale_errors,
    steered_log_alpha,
    steered_log_alpha_from,
    token_logits,
)

STEPS = ("corrected", "paper")
DEFAULT_STEP = "corrected"
DIRECTIONS = ("regression", "steady")
DEFAULT_DIRECTION = "steady"
PAPER_METHOD = "Cho et al. Algorithm 1: e_w' = e_w - log(r) Ω ⊙ A⁻¹, applied as a logit offset"
CORRECTED_METHOD = ("Cho et al. Algorithm 1 direction u = -Ω ⊙ A⁻¹; step t solved so that log r̂(t·u) = log r "
                    "on the detect set (Brent's method), applied as a logit offset")


def __getattr__(name: str) -> Any:
    """The pictures, imported on first use (matplotlib is slow to import)."""
    if name in ("plot_pca", "plot_prune"):
        from steerport import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def token_id(tokenizer, surface: str, spec: str = "model") -> int:
    """The single token whose text is ``surface`` (e.g. " great"); an error if it is not one token."""
    ids = tokenizer(surface, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise SteerportError(f"{surface!r} is {len(ids)} tokens in {spec}, not one; pick a single token")
    return int(ids[0])


# --------------------------------------------------------------------------- the step along u


@dataclass
class Step:
    """The scalar step t along u for one token, and log r̂ it reaches on the detect set."""

    t: float
    log_r_hat: float
    evaluations: int


def solve_step(lm: LoadedModel, stats: TokenStats, tid: int, u: torch.Tensor, r: float, *,
               xtol: float = 1e-12, max_doublings: int = 60, surface: str = "") -> Step:
    """t with log r̂(t·u) = log r on ``stats`` (exact, from the cached head inputs); see :func:`solve_step_from`."""
    z = token_logits(lm, stats, tid)  # (N,)
    s = (stats.H @ u.float().cpu()).double()  # (N,): logit offset per unit step
    return solve_step_from(z, s, stats.lse, float(stats.log_alpha[tid]), r, lm.softcap, xtol=xtol,
                           max_doublings=max_doublings, name=surface or str(tid))


def solve_step_from(z: torch.Tensor, s: torch.Tensor, lse: torch.Tensor, base: float, r: float, cap: float | None, *,
                    xtol: float = 1e-12, max_doublings: int = 60, name: str = "token") -> Step:
    """The step for pre-cap logits z (N,), offsets per unit step s = H·u (N,), normalizers lse (N,)
    and the unsteered log α_w ``base``.

    f(t) = log α'_w(t·u) − log α_w − log r has f(0) = −log r. Starting at the paper's step
    t₀ = log r, the step is doubled until f changes sign, then Brent's method (scipy ``brentq``)
    finds the root in the bracket; if u moves this token's α the wrong way on this text, the
    same search runs from −t₀. A factor the line cannot reach on this text (α'_w saturates) is
    a one-line error.
    """
    from scipy.optimize import brentq

    log_r = math.log(r)
    if log_r == 0.0:
        return Step(0.0, 0.0, 0)
    calls = [0]

    def f(t: float) -> float:
        calls[0] += 1
        return steered_log_alpha_from(z, lse, t * s, cap)[0] - base - log_r

    def bracket(start: float) -> tuple[float, float, float] | None:
        """(lo, hi, f(hi)) with f(lo), f(hi) of opposite signs (or f(hi) = 0), doubling from ``start``."""
        lo, hi = 0.0, start
        f_hi = f(hi)
        for _ in range(max_doublings):
            if (f_hi > 0) == (log_r > 0) or f_hi == 0:
                return lo, hi, f_hi
            lo, hi = hi, 2 * hi
            f_hi = f(hi)
        return None

    # the paper's side first; on the other side when u moves this token's α the wrong way
    found = bracket(log_r) or bracket(-log_r)
    if found is None:
        raise SteerportError(f"{name!r}: no step along the direction scales its average probability by "
                             f"{r:g} on the detect set; ask for less")
    lo, hi, f_hi = found
    t = hi if f_hi == 0 else brentq(f, min(lo, hi), max(lo, hi), xtol=xtol, rtol=4 * torch.finfo(torch.float64).eps)
    return Step(float(t), f(t) + log_r, calls[0])


# --------------------------------------------------------------------------- the steer


def sample_single_tokens(tokenizer: Any, vocab_size: int, n: int, *, named: Sequence[str] = (),
                         seed: int = 0) -> dict[str, int]:
    """``n`` token surfaces -> ids: the ``named`` words that are one token, then random ids below
    ``vocab_size`` (the output-embedding rows) that round-trip as one token (not special, not blank),
    drawn with ``random.Random(seed)``.

    Example::

        sample_single_tokens(lm.tokenizer, lm.output_embeddings.shape[0], 30, named=(" great", " war"))
    """
    import random

    rng = random.Random(seed)
    V = vocab_size
    special = set(tokenizer.all_special_ids)
    picked: dict[str, int] = {}
    for w in named:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            picked[w] = ids[0]
    while len(picked) < n:
        i = rng.randrange(V)
        surface = tokenizer.decode([i])
        if i in special or not surface.strip() or surface in picked:
            continue
        if tokenizer(surface, add_special_tokens=False)["input_ids"] == [i]:
            picked[surface] = i
    return picked


def make_token_steer(
    lm: LoadedModel,
    enc: Encoding,
    scales: dict[str, float],
    *,
    b: float = DEFAULT_B,
    detect: dict | None = None,
    stats: TokenStats | None = None,
    step: str = DEFAULT_STEP,
    direction_rule: str = DEFAULT_DIRECTION,
) -> Steer:
    """A ``token-prob`` steer scaling each token's average probability by its factor r (ε₀ = 1).

    delta_w = t_w · u. ``direction_rule="steady"`` (default): u = :func:`steady_direction` of the
    detect set's head inputs (a logit offset as constant as possible over positions, so the
    factor depends little on the text); ``"regression"`` (the paper's): u = -Ω ⊙ A⁻¹.
    ``step="corrected"`` (default) solves t_w so that r̂ = r exactly on the detect set ``stats``
    (which it then needs), ``step="paper"`` uses t_w = log r.
    """
    if step not in STEPS:
        raise SteerportError(f"step must be one of {', '.join(STEPS)}, got {step!r}")
    if direction_rule not in DIRECTIONS:
        raise SteerportError(f"direction rule must be one of {', '.join(DIRECTIONS)}, got {direction_rule!r}")
    if stats is None and (step == "corrected" or direction_rule == "steady"):
        raise SteerportError("the corrected step and the steady direction need the detect-set statistics: pass "
                             "stats=collect_head_stats(...) (or step='paper', direction_rule='regression' for the "
                             "paper's Algorithm 1)")
    if not scales:
        raise SteerportError("give at least one token and scale")
    if direction_rule == "regression":
        u = direction(enc, b)  # (d,)
    else:
        assert stats is not None  # checked above: the steady direction needs the detect statistics
        u = steady_direction(stats.H)  # (d,)
    ids: list[int] = []
    rows: list[torch.Tensor] = []
    steps: list[float] = []
    reached: list[float | None] = []
    for surface, r in scales.items():
        if not (r > 0 and math.isfinite(r)):
            raise SteerportError(f"scale for {surface!r} must be a positive number, got {r}")
        tid = token_id(lm.tokenizer, surface, lm.spec)
        if tid in ids:
            raise SteerportError(f"{surface!r} is the same token as an earlier one")
        reached_r: float | None
        if step == "corrected":
            assert stats is not None  # checked above: the corrected step needs the detect statistics
            found = solve_step(lm, stats, tid, u, r, surface=surface)
            t, reached_r = found.t, math.exp(found.log_r_hat)
        else:
            t = math.log(r)
            reached_r = None if stats is None else math.exp(steered_log_alpha(lm, stats, tid, t * u)[0] - float(stats.log_alpha[tid]))
        ids.append(tid)
        rows.append(t * u)
        steps.append(t)
        reached.append(reached_r)
    meta = {
        "tokens": list(scales),
        "scales": [float(r) for r in scales.values()],
        "b": b,
        "omega": OMEGA_RULE,
        "step": step,
        "steps": steps,
        "direction": direction_rule,
        "regression": {"adj_r2": enc.adj_r2, "r2": enc.r2, "n_tokens": enc.n_tokens},
        "detect": detect or {},
        "method": (CORRECTED_METHOD if step == "corrected" else PAPER_METHOD)
        + ("" if direction_rule == "regression" else "; direction: steady (Σ⁻¹μ of the detect head inputs)"),
    }
    if stats is not None:
        meta["detect_r_hat"] = reached
    return Steer(
        "token-prob",
        {"token_ids": torch.tensor(ids, dtype=torch.int64), "delta": torch.stack(rows)},
        epsilon=1.0,
        positive=", ".join(f"{s!r} x{r:g}" for s, r in scales.items()),
        model={"spec": lm.spec, "fingerprint": lm.fingerprint},
        meta=meta,
    )


def token_steer(
    lm: LoadedModel,
    detect_texts: Sequence[str],
    scales: dict[str, float],
    *,
    b: float = DEFAULT_B,
    step: str = DEFAULT_STEP,
    direction_rule: str = DEFAULT_DIRECTION,
    max_tokens: int = 128,
    detect: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Steer, TokenStats, Encoding]:
    """Detect statistics, regression and steer in one call: (steer, stats, encoding)."""
    stats = collect_head_stats(lm, detect_texts, max_tokens=max_tokens, progress=progress)
    enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
    info = {"texts": len(detect_texts), "positions": stats.positions, "max_tokens": max_tokens, **(detect or {})}
    steer = make_token_steer(lm, enc, scales, b=b, detect=info, stats=stats, step=step, direction_rule=direction_rule)
    return steer, stats, enc


# --------------------------------------------------------------------------- transfer


def transfer_token_prob(
    steer: Steer,
    target: LoadedModel,
    detect_texts: Sequence[str],
    *,
    b: float | None = None,
    step: str | None = None,
    max_tokens: int = 128,
    progress: Callable[[int], None] | None = None,
) -> tuple[Steer, dict]:
    """Rebuild a ``token-prob`` steer on ``target``: same token surfaces and scales, direction
    (and step) recomputed from the target's own detect statistics.

    Tokens are matched by surface string (the text the user gave, e.g. " great"), which must be a
    single token on the target too; tokens that are not are dropped and reported. ``b`` and
    ``step`` default to the source steer's (``step``: the corrected step for steers that do not
    record one; the direction rule is the source's, else the default). Returns the new steer and
    a report (regression fit on the target, dropped tokens).
    """
    if steer.kind != "token-prob":
        raise SteerportError(f"transfer_token_prob needs a token-prob steer, got {steer.kind!r}")
    tokens, scales = steer.meta.get("tokens"), steer.meta.get("scales")
    if not tokens or not scales or len(tokens) != len(scales):
        raise SteerportError("this token-prob steer does not store its token surfaces and scales; cannot transfer it")
    kept, dropped = {}, []
    for surface, r in zip(tokens, scales):
        try:
            token_id(target.tokenizer, surface, target.spec)
            kept[surface] = r
        except SteerportError as e:  # not one token on the target: reported, not fatal
            dropped.append(str(e))
    if not kept:
        raise SteerportError(f"none of the steer's tokens is a single token on {target.spec}: {'; '.join(dropped)}")
    b = steer.meta.get("b", DEFAULT_B) if b is None else b
    step = steer.meta.get("step", DEFAULT_STEP) if step is None else step
    rule = steer.meta.get("direction", DEFAULT_DIRECTION)
    new, _, enc = token_steer(target, detect_texts, kept, b=b, step=step, direction_rule=rule, max_tokens=max_tokens,
                              progress=progress)
    new.meta["lineage"] = {
        "source_steer": steer.fingerprint,
        "source_model": dict(steer.model),
        "method": "token surface match, direction recomputed on the target",
        "step": step,
        "dropped": dropped,
    }
    return new, {"adj_r2": enc.adj_r2, "dropped": dropped, "kept": list(kept)}


def transfer_with_options(
    steer: Steer,
    source: str | LoadedModel,
    target: str | LoadedModel,
    options: Any,
    *,
    mapping_path: Any = None,
    source_path: Any = None,
    force: bool = False,
    log: Callable[[str], None] = lambda m: None,
    progress: Callable[[int], None] | None = None,
):
    """The ``token-prob`` kind's transfer entry: :func:`transfer_token_prob` driven by
    :class:`steerport.transfer.TransferOptions` (``texts``: detect texts, default the neutral
    ``fit`` split; ``max_tokens``; ``dtype``/``device`` for a target given as a spec).

    The source model is not needed (the token surfaces are in the steer) and no vocabulary
    mapping is used, so giving ``mapping_path`` is an error; ``force`` waives nothing here.
    Returns ``TransferResult(steer, None, lineage)``.
    """
    from steerport.models import load_model
    from steerport.texts import neutral
    from steerport.transfer import TransferResult

    if mapping_path is not None:
        raise SteerportError("token-prob steers are carried by token surface; they use no vocabulary mapping")
    lm = target if isinstance(target, LoadedModel) else load_model(target, dtype=options.dtype, device=options.device)
    detect = list(options.texts) if options.texts is not None else neutral("fit", 100)
    log(f"token-prob transfer to {lm.spec}: detect statistics on {len(detect)} texts")
    new, report = transfer_token_prob(steer, lm, detect, max_tokens=options.max_tokens, progress=progress)
    for line in report["dropped"]:
        log(f"dropped {line}")
    lineage = dict(new.meta["lineage"])
    if source_path is not None:
        lineage["source_path"] = str(source_path)
    lineage["source_spec"] = source if isinstance(source, str) else source.spec
    lineage["target_adj_r2"] = report["adj_r2"]
    new.meta["lineage"] = lineage
    return TransferResult(new, None, lineage)

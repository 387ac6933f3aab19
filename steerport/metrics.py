"""The numbers steerport reports, as pure functions of tensors and scores.

* :func:`roc_auc` — the steer as a classifier (equal to scikit-learn's ``roc_auc_score``).
* :func:`separation` — Sep = [ℓ_s(D+) − ℓ_0(D+)] − [ℓ_s(D−) − ℓ_0(D−)].
* :func:`kl_divergence` — KL(p ‖ q) per position from log-probabilities; the KL budget κ is its mean.
* :func:`wilson_interval` — a share's 95 % interval (judge rates).
* :func:`spearman`, :func:`retention`, :func:`distinct_n`, :func:`mean_distinct`.
* :func:`find_value_for_kl` — the value-for-κ solver: bracket the root, then
  ``scipy.optimize.brentq`` on log s; :func:`find_values_for_kl` — several κ at once, by log-log
  secant steps that share every evaluation, handing a stubborn target to the former.

Example::

    auc = roc_auc(scores, labels)                       # labels > 0 are the positive class
    res = find_value_for_kl(lambda s: 0.01 * s * s, 0.04)
    res.value                                           # ≈ 2.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from steerport.errors import SteerportError

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """ROC AUC of ``scores`` for labels > 0 against labels <= 0 (ties count half).

    The Mann–Whitney form: AUC = (Σ ranks of the positives − n₊(n₊+1)/2) / (n₊ n₋), with tied
    scores sharing their average rank (equal to scikit-learn's ``roc_auc_score``, without its
    second-long import on every ``steerport train``).
    """
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float64).flatten())
    y = np.asarray(torch.as_tensor(labels, dtype=torch.float64).flatten()) > 0
    if y.all() or not y.any():
        raise SteerportError("ROC AUC needs texts of both classes")
    if np.isnan(s).any():
        raise SteerportError("ROC AUC of scores that are not numbers (NaN)")
    _, where, counts = np.unique(s, return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts - 1) / 2)[where]  # 1-based, ties at their average rank
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((rank[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial share ``successes / n`` (95 % for z = 1.96); (nan, nan) when n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def separation(lp_pos_s: torch.Tensor, lp_pos_0: torch.Tensor, lp_neg_s: torch.Tensor, lp_neg_0: torch.Tensor) -> float:
    """Sep = [ℓ_s(D+) − ℓ_0(D+)] − [ℓ_s(D−) − ℓ_0(D−)], ℓ = mean over texts of per-token log-likelihood.

    Positive means the steer favours the positive class. Inputs: per-text mean log-likelihoods.
    """
    return float((lp_pos_s - lp_pos_0).double().mean() - (lp_neg_s - lp_neg_0).double().mean())


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis from log-probabilities: (..., V) -> (...)."""
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation of two vectors."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)).statistic)


def retention(base: float, transferred: float, native: float) -> float:
    """(base − transferred) / (base − native): share of the native steer's change the transferred one makes."""
    gap = base - native
    return float((base - transferred) / gap) if gap != 0 else math.nan


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over whitespace tokens of ``texts`` (0 when none)."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_distinct(groups: Sequence[Sequence[str]], n: int) -> float:
    """Distinct-n within each group (the samples of one prompt), averaged over groups (DExperts protocol)."""
    vals = [distinct_n(g, n) for g in groups if any(t.split() for t in g)]
    return float(np.mean(vals)) if vals else 0.0


# --------------------------------------------------------------------------- value for a KL budget


@dataclass
class BisectResult:
    """The value found, its κ, and every (value, κ) evaluated on the way."""

    value: float
    kl: float
    evaluations: int
    history: list[tuple[float, float]] = field(default_factory=list)


def find_value_for_kl(
    kl_at: Callable[[float], float],
    target: float,
    *,
    start: float = 1.0,
    rel_tol: float = 0.02,
    max_evals: int = 40,
    max_value: float = 1e6,
) -> BisectResult:
    """The steer value s > 0 with κ(s) = target, for κ increasing in s with κ(0) = 0.

    Brackets the root in log s (growing by the local power law κ ≈ c s², at most ×16 a step,
    or shrinking by ×1/4 when ``start`` already overshoots), then solves log κ(s) = log target
    with ``scipy.optimize.brentq`` on log s. Stops when |κ − target| ≤ rel_tol · target.
    A steer whose κ never reaches the budget below ``max_value`` is a one-line error.
    """
    from scipy.optimize import brentq

    if not (target > 0 and math.isfinite(target)):
        raise SteerportError(f"the KL budget must be a positive number, got {target}")
    if not (start > 0 and math.isfinite(start)):
        raise SteerportError(f"the start value must be a positive number, got {start}")
    history: list[tuple[float, float]] = []

    def ev(s: float) -> float:
        if len(history) >= max_evals:
            raise _OutOfEvaluations
        k = float(kl_at(s))
        if not math.isfinite(k):
            raise SteerportError(f"κ({s:g}) is not a finite number ({k}); cannot solve for the KL budget")
        history.append((s, k))
        return k

    def done(s: float, k: float) -> BisectResult | None:
        return BisectResult(s, k, len(history), history) if abs(k - target) <= rel_tol * target else None

    try:
        hi, khi = start, ev(start)
        lo, klo = hi, khi
        if (hit := done(hi, khi)) is not None:
            return hit
        while khi < target:  # grow until the budget is passed
            lo, klo = hi, khi
            guess = hi * math.sqrt(target / khi) * 1.5 if khi > 0 else hi * 4
            hi = min(max(guess, hi * 1.5), hi * 16)
            if hi > max_value:
                raise SteerportError(f"no steer value up to {max_value:g} reaches KL {target:g} (reached {khi:g}); "
                                     "the steer is too weak")
            khi = ev(hi)
            if (hit := done(hi, khi)) is not None:
                return hit
        while klo >= target:  # start overshot: shrink until below the budget
            hi, khi = lo, klo
            lo = lo / 4
            klo = ev(lo)
            if (hit := done(lo, klo)) is not None:
                return hit
        if klo <= 0:  # κ(lo) = 0 exactly (no effect at all): the log is undefined, bisect once in s
            lo = hi / 2
            klo = ev(lo)
        best: list[tuple[float, float]] = []

        def f(log_s: float) -> float:
            s = math.exp(log_s)
            k = ev(s)
            best.append((s, k))
            if abs(k - target) <= rel_tol * target:
                raise _Converged
            return math.log(max(k, 1e-300)) - math.log(target)

        try:
            brentq(f, math.log(lo), math.log(hi), xtol=rel_tol / 8, maxiter=max_evals)
        except _Converged:
            pass
    except _OutOfEvaluations:
        pass
    if not history:
        raise SteerportError("no evaluation of the KL budget was possible")
    s, k = min(history, key=lambda sk: abs(sk[1] - target))
    return BisectResult(s, k, len(history), history)


def find_values_for_kl(
    kl_at: Callable[[float], float],
    targets: Sequence[float],
    *,
    start: float = 1.0,
    rel_tol: float = 0.02,
    max_secant: int = 8,
) -> dict[float, BisectResult]:
    """Per target κ, the value s > 0 with κ(s) = target (to ``rel_tol``), sharing every evaluation.

    κ grows about as a power of s, so each step is a secant on log κ against log s through the two
    measured points nearest the target (slope 2 to start; a slope outside (0.5, 4) is replaced by 2),
    and every measurement serves every later target. A target the secant does not reach within
    ``max_secant`` evaluations is handed to :func:`find_value_for_kl`. Each result's ``evaluations``
    counts the evaluations spent on that target (0 when an earlier one already hit it).

    Example::

        found = find_values_for_kl(lambda s: 0.01 * s**2, [0.05, 0.1])
        found[0.1].value  # about 3.16
    """
    points: list[tuple[float, float]] = []

    def ev(s: float) -> float:
        k = float(kl_at(s))
        if not math.isfinite(k):
            raise SteerportError(f"κ({s:g}) is not a finite number ({k}); cannot solve for the KL budget")
        points.append((s, k))
        return k

    def gap(p: tuple[float, float], target: float) -> float:
        return abs(math.log(p[1] / target)) if p[1] > 0 else math.inf

    ev(start)
    out: dict[float, BisectResult] = {}
    for target in targets:
        if not (target > 0 and math.isfinite(target)):
            raise SteerportError(f"the KL budget must be a positive number, got {target}")
        n0 = len(points) if out else 0  # the first target owns the start evaluation
        while True:
            near = sorted(points, key=lambda p: gap(p, target))
            s, k = near[0]
            if abs(k - target) <= rel_tol * target:
                break
            if len(points) - n0 > max_secant:
                found = find_value_for_kl(ev, target, start=s, rel_tol=rel_tol)
                s, k = found.value, found.kl
                break
            slope = 2.0
            if len(near) > 1 and near[1][1] > 0 and k > 0 and near[1][0] != s:
                p = math.log(near[1][1] / k) / math.log(near[1][0] / s)
                slope = p if 0.5 < p < 4 else 2.0
            ev(s * (target / k) ** (1 / slope) if k > 0 else s * 4)
        out[target] = BisectResult(s, k, len(points) - n0, points[n0:])
    return out


class _Converged(Exception):
    """Ends brentq early once κ is within the relative tolerance."""


class _OutOfEvaluations(Exception):
    """Ends the search when the evaluation budget is spent (the best point is returned)."""

"""Metrics: exact values on fixed inputs, and the value-for-κ solver."""

import math

import pytest
import torch

from steerport.errors import SteerportError
from steerport.metrics import (
    find_value_for_kl,
    find_values_for_kl,
    kl_divergence,
    mean_distinct,
    retention,
    roc_auc,
    separation,
    spearman,
    wilson_interval,
)


def test_roc_auc_matches_the_mann_whitney_count():
    scores = [0.9, 0.4, 0.4, 0.1, 0.8]
    labels = [1, 1, 0, 0, 0]
    # pairs (pos, neg): (0.9 > all 3) = 3, (0.4 vs 0.4 tie) = 0.5, (0.4 > 0.1) = 1  -> 4.5 / 6
    assert roc_auc(scores, labels) == pytest.approx(4.5 / 6)
    with pytest.raises(SteerportError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])


def test_wilson_interval_on_known_values():
    lo, hi = wilson_interval(5, 10)  # the textbook 95 % interval of 5/10
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))  # never below 0 nor a zero width
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_separation_and_kl_on_known_values():
    assert separation(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -3.0]),
                      torch.tensor([-3.0]), torch.tensor([-2.5])) == pytest.approx(1.0 - (-0.5))
    p = torch.log(torch.tensor([0.5, 0.5]))
    q = torch.log(torch.tensor([0.25, 0.75]))
    assert float(kl_divergence(p, q)) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert float(kl_divergence(p, p)) == 0.0


def test_retention_spearman_distinct():
    assert retention(1.0, 0.5, 0.0) == pytest.approx(0.5)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert mean_distinct([["a a", "a b"]], 1) == pytest.approx(2 / 4)


@pytest.mark.parametrize("start", [1e-3, 1.0, 50.0])
def test_value_for_kl_from_below_and_above(start):
    res = find_value_for_kl(lambda s: 0.01 * s * s, 0.04, start=start, rel_tol=1e-4)
    assert res.value == pytest.approx(2.0, rel=1e-4)
    assert res.evaluations == len(res.history) < 40


def test_value_for_kl_refusals():
    with pytest.raises(SteerportError, match="not a finite"):
        find_value_for_kl(lambda s: float("nan"), 0.1)
    with pytest.raises(SteerportError, match="positive number"):
        find_value_for_kl(lambda s: s, float("nan"))


KAPPAS = (0.02, 0.05, 0.1, 0.2)


@pytest.mark.parametrize("c,p", [(3e-6, 2.2), (0.01, 1.7), (1e-4, 2.0), (0.5, 0.3)])
def test_values_for_kl_reach_every_target_sharing_evaluations(c, p):
    calls: list[float] = []

    def kl(v: float) -> float:  # κ = c·v^p with a kink the secant must cross
        calls.append(v)
        return c * v**p * (1.1 if v > 30 else 1.0)

    found = find_values_for_kl(kl, KAPPAS, rel_tol=0.02)
    assert list(found) == list(KAPPAS)
    for k, f in found.items():
        assert abs(f.kl - k) <= 0.02 * k and f.kl == kl(f.value)
    assert sum(f.evaluations for f in found.values()) == len(calls) - len(KAPPAS)  # every evaluation owned once
    if 0.5 < p < 4:  # the secant needs a few evaluations per κ, not a bisection's
        assert len(calls) - len(KAPPAS) <= 4 * len(KAPPAS) + 1


def test_values_for_kl_refusals():
    with pytest.raises(SteerportError, match="not a finite"):
        find_values_for_kl(lambda s: float("inf"), [0.1])
    with pytest.raises(SteerportError, match="positive number"):
        find_values_for_kl(lambda s: s, [0.1, -1.0])

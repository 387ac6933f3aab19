"""The least-squares map: exact recovery, centring, held-out split, ridge and Procrustes."""

import pytest
import torch

from steerport.linmap import fit_linear, fit_map, map_quality, split_pairs


def data(n=400, p=6, q=4, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g)
    M = torch.randn(p, q, generator=g)
    return X, M, X @ M + noise * torch.randn(n, q, generator=g)


def test_exact_recovery_and_quality():
    X, M, Y = data()
    fit = fit_map(X, Y, holdout=0.25, seed=3)
    torch.testing.assert_close(fit.M, M, atol=1e-4, rtol=1e-4)
    assert fit.heldout["r2"] == pytest.approx(1.0, abs=1e-6) and fit.heldout["n"] == 100
    assert fit.heldout["nn_acc"] == 1.0


def test_centring_recovers_an_affine_map():
    X, M, Y = data()
    Y = Y + torch.tensor([3.0, -1.0, 0.5, 2.0])
    X = X + 5.0
    plain, centred = fit_map(X, Y, holdout=0.2), fit_map(X, Y, center=True, holdout=0.2)
    assert centred.heldout["r2"] == pytest.approx(1.0, abs=1e-6)
    assert plain.heldout["r2"] < 0.999
    torch.testing.assert_close(centred.predict(X[:5]), Y[:5], atol=1e-4, rtol=1e-4)


def test_holdout_is_a_seeded_random_split_not_the_tail():
    train, held = split_pairs(100, 0.2, seed=0)
    assert len(held) == 20 and set(train.tolist()) | set(held.tolist()) == set(range(100))
    assert held.tolist() != list(range(80, 100))
    assert torch.equal(split_pairs(100, 0.2, seed=0)[1], held)
    assert not torch.equal(split_pairs(100, 0.2, seed=1)[1], held)


def test_refit_on_all_uses_every_row():
    X, _, Y = data(noise=0.5)
    fit = fit_map(X, Y, holdout=0.3, refit_on_all=True)
    full, _ = fit_linear(X, Y)
    torch.testing.assert_close(fit.M, full)


def test_ridge_shrinks_and_procrustes_is_orthogonal_times_scale():
    X, _, Y = data(p=4, q=4)
    ridge, _ = fit_linear(X, Y, "ridge", ridge=10.0)
    plain, _ = fit_linear(X, Y)
    assert ridge.norm() < plain.norm()
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(5)))
    P, info = fit_linear(X, 2.0 * X @ Q, "procrustes")
    torch.testing.assert_close(P, 2.0 * Q, atol=1e-4, rtol=1e-4)
    assert info["scale"] == pytest.approx(2.0, rel=1e-4)
    assert map_quality(X @ P, 2.0 * X @ Q)["r2"] == pytest.approx(1.0, abs=1e-6)

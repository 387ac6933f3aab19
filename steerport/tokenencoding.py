"""The log-linear encoding of average token probability in the output embeddings (Cho et al.,
"Understanding Token Probability Encoding in Output Embeddings", COLING 2025, arXiv 2406.01468).

The average next-token distribution α (V,) over a detect text set is log-linearly encoded in
the output embeddings E (V, d)::

    -log α_w ≈ A · e_w + B                                     A: (d,), B: scalar

fitted by multiple linear regression over all V tokens (adjusted R², per-dimension slopes,
t statistics and p-values). Algorithm 1 scales token w's average probability by r by moving
only its output-embedding row along ``u = -Ω ⊙ A⁻¹`` (element-wise; Σ Ω = 1, so A · u = -1)::

    e_w' = e_w + log(r) · u

**Ω (our choice).** The paper's line multiplies by the p-value, which would put the most weight
on the *least* significant dimensions — the opposite of what its text says it intends (favour
dimensions with stronger correlation, with a softness b). We use the negative log p-value (the
evidence against "no correlation") raised to b and normalized:

    Ω_i = (-log p_i)^b / Σ_j (-log p_j)^b                      b = 0: uniform; larger b: sharper

Near t = 0, -log p_i ∝ |t_i| ∝ |A_i|, so the step Ω_i / A_i stays bounded for b ≥ 1 and the
weakly-correlated dimensions (tiny |A_i|, huge 1/A_i) get almost no movement. p-values come
from the t distribution in log space (``scipy.stats.t.logsf``), so they never underflow to 0.

Example::

    enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
    enc.adj_r2, enc.summary(5)["top_dims"]
    u = direction(enc, b=2.0)                                   # (d,), A · u = -1
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from steerport.errors import SteerportError
from steerport.linmap import gram

DEFAULT_B = 2.0
OMEGA_RULE = "(-log p)^b normalized"


@dataclass
class Encoding:
    """-log α ≈ slopes · e + intercept over the vocabulary, with per-dimension significance."""

    slopes: torch.Tensor  # (d,) float64, A
    intercept: float  # B
    t: torch.Tensor  # (d,) t statistics
    log_p: torch.Tensor  # (d,) natural log of two-sided p-values
    r2: float
    adj_r2: float
    n_tokens: int

    @property
    def hidden_size(self) -> int:
        return self.slopes.shape[0]

    def summary(self, top: int = 10) -> dict:
        """Fit quality, counts of significant dims and the ``top`` dims by |t|."""
        order = torch.argsort(self.t.abs(), descending=True)[:top]
        log10_p = self.log_p / math.log(10)
        return {
            "n_tokens": self.n_tokens,
            "hidden_size": self.hidden_size,
            "r2": self.r2,
            "adj_r2": self.adj_r2,
            "significant_dims_p<0.05": int((self.log_p < math.log(0.05)).sum()),
            "significant_dims_bonferroni": int((self.log_p < math.log(0.05 / self.hidden_size)).sum()),
            "top_dims": [
                {"dim": int(i), "slope": float(self.slopes[i]), "t": float(self.t[i]), "log10_p": float(log10_p[i])}
                for i in order
            ],
        }


def fit_encoding(E: torch.Tensor, log_alpha: torch.Tensor) -> Encoding:
    """Multiple linear regression of y = -log α (V,) on the rows of E (V, d) plus an intercept.

    Normal equations in float64 from :func:`steerport.linmap.gram` (row blocks; V may be 262k),
    augmented by the intercept column; standard errors σ² (XᵀX)⁻¹, t = β / se, two-sided p from
    the t distribution with V - d - 1 degrees of freedom.
    """
    from scipy.stats import t as t_dist

    V, d = E.shape
    if log_alpha.shape != (V,):
        raise SteerportError(f"log_alpha has shape {tuple(log_alpha.shape)}, expected ({V},)")
    if V <= d + 2:
        raise SteerportError(f"regression needs more tokens ({V}) than dimensions + 2 ({d + 2})")
    X = E.detach().cpu()
    y = -log_alpha.double().cpu()  # (V,)
    EtE, Ety = gram(X, y[:, None])  # (d, d), (d, 1)
    col_sum = X.double().sum(0)  # (d,) = Eᵀ 1
    G = torch.zeros(d + 1, d + 1, dtype=torch.float64)  # X1ᵀ X1 with X1 = [E, 1]
    G[:d, :d], G[:d, d], G[d, :d], G[d, d] = EtE, col_sum, col_sum, V
    c = torch.cat([Ety[:, 0], y.sum()[None]])  # X1ᵀ y, (d+1,)
    Ginv = torch.linalg.inv(G)
    beta = Ginv @ c  # (d+1,)
    rss = 0.0
    for i in range(0, V, 65536):
        rss += float(((y[i : i + 65536] - X[i : i + 65536].double() @ beta[:d] - beta[d]) ** 2).sum())
    tss = float(((y - y.mean()) ** 2).sum())
    dof = V - d - 1
    se = torch.sqrt(rss / dof * Ginv.diagonal()[:d])
    t = beta[:d] / se
    log_p = torch.from_numpy(math.log(2) + t_dist.logsf(t.abs().numpy(), dof))
    # far tails underflow even in log space: use the normal tail log(2φ(t)/|t|) there
    tail = math.log(2) - t**2 / 2 - torch.log(t.abs() * math.sqrt(2 * math.pi))
    log_p = torch.where(torch.isfinite(log_p), log_p, tail)
    r2 = 1 - rss / tss
    return Encoding(
        slopes=beta[:d], intercept=float(beta[d]), t=t, log_p=log_p,
        r2=r2, adj_r2=1 - (1 - r2) * (V - 1) / dof, n_tokens=V,
    )


def omega(enc: Encoding, b: float = DEFAULT_B) -> torch.Tensor:
    """Ω_i ∝ (-log p_i)^b (d,), normalized to sum 1 (see the module docstring for why not p_i)."""
    evidence = (-enc.log_p).clamp_min(0.0)  # (d,) ≥ 0
    w = evidence.pow(b) if b != 0 else torch.ones_like(evidence)
    return w / w.sum()


def direction(enc: Encoding, b: float = DEFAULT_B) -> torch.Tensor:
    """u = -Ω ⊙ A⁻¹ (d,): e_w + log(r)·u scales α_w by about r, since A·u = -1."""
    return (-omega(enc, b) / enc.slopes).float()


def shuffled_direction(u: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Baseline: the entries of direction ``u`` (d,) permuted at random (same norm, same values)."""
    return u[torch.randperm(u.shape[0], generator=torch.Generator().manual_seed(seed))]


def random_direction(u: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Baseline: a Gaussian random direction (d,) with the norm of ``u``, signed so that it
    points the way of ``u`` (positive dot product)."""
    v = torch.randn(u.shape[0], generator=torch.Generator().manual_seed(seed)).to(u.dtype)
    v = v * (u.norm() / v.norm())
    return v if float(v @ u) >= 0 else -v


def steady_direction(H: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """The row change (d,) whose logit offset h·δ is as constant as possible over the positions
    of H (N, d) at mean 1: δ = Σ⁻¹μ / (μᵀΣ⁻¹μ), Σ the covariance of h plus ``ridge`` · mean
    variance, μ the mean. A constant offset log r scales p_t,w by about r at every position of
    any text (where p_t,w ≪ 1), so the achieved factor depends little on the text.
    """
    X = H.double()
    mu = X.mean(0)  # (d,)
    C = torch.cov(X.T)  # (d, d)
    C = C + ridge * float(C.diagonal().mean()) * torch.eye(C.shape[0], dtype=C.dtype)
    w = torch.linalg.solve(C, mu)  # Σ⁻¹μ
    return (w / float(mu @ w)).float()

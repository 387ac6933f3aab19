"""Token-probability steering through the output embedding (Cho et al., "Understanding Token
Probability Encoding in Output Embeddings", COLING 2025, arXiv 2406.01468).

The average next-token distribution over a detect text set D,

    α_w = mean_t p(w | x_<t)                                   α: (V,)

is log-linearly encoded in the output embeddings E (V, d)::

    -log α_w ≈ A · e_w + B                                     A: (d,), B: scalar

fitted by multiple linear regression over all V tokens (adjusted R², per-dimension slopes,
t statistics and p-values). Algorithm 1 scales token w's average probability by r by moving
only its output-embedding row::

    e_w' = e_w - log(r) · Ω ⊙ A⁻¹                              (element-wise; Σ Ω = 1)

so that A · (e_w' - e_w) = -log r, i.e. α_w' ≈ r · α_w. As a steer (kind ``token-prob``) we store
delta_w = e_w' - e_w at value 1 and add s · (delta_w · h) to token w's logit only (a hook on the
LM head's output); the V x d matrix is never copied, the input embeddings are untouched.

**Ω (our choice).** The paper's line multiplies by the p-value, which would put the most weight
on the *least* significant dimensions — the opposite of what its text says it intends (favour
dimensions with stronger correlation, with a softness b). We use the negative log p-value (the
evidence against "no correlation") raised to b and normalized:

    Ω_i = (-log p_i)^b / Σ_j (-log p_j)^b                      b = 0: uniform; larger b: sharper

Near t = 0, -log p_i ∝ |t_i| ∝ |A_i|, so the step Ω_i / A_i stays bounded for b ≥ 1 and the
weakly-correlated dimensions (tiny |A_i|, huge 1/A_i) get almost no movement. p-values come
from the t distribution in log space (``scipy.stats.t.logsf``), so they never underflow to 0.

Example::

    stats = collect_head_stats(lm, read_texts(limit=100))
    enc = fit_encoding(lm.output_embeddings, stats.log_alpha)
    steer = make_token_steer(lm, enc, {" great": 5.0})          # α_great × 5
    with steered(lm, [(steer, 1.0)]): ...
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from steerport.errors import SteerportError
from steerport.capture import edit_input, input_of
from steerport.models import LoadedModel
from steerport.steer import Steer

DEFAULT_B = 2.0
OMEGA_RULE = "(-log p)^b normalized"


# --------------------------------------------------------------------------- the average distribution


@dataclass
class HeadStats:
    """What the LM head saw on a text set: final hidden states and per-position normalizers.

    H: (N, d) hidden states at the LM head input (float32, real tokens only);
    lse: (N,) log Σ_v exp z_v per position; log_alpha: (V,) float64 log of the average distribution.
    """

    H: torch.Tensor
    lse: torch.Tensor
    log_alpha: torch.Tensor

    @property
    def positions(self) -> int:
        return self.H.shape[0]


def _head_bias(lm: LoadedModel) -> torch.Tensor | None:
    b = lm.lm_head_bias
    return None if b is None else b.detach().float()


def _check_plain_head(lm: LoadedModel) -> None:
    cap = getattr(lm.model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        raise SteerportError(f"{lm.spec}: final logit soft-capping is not supported by token-probability analysis")


@torch.no_grad()
def collect_head_stats(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> HeadStats:
    """One pass over ``texts``: LM-head inputs, log-normalizers and log α (log-mean-exp over positions)."""
    from steerport.scoring import batches

    _check_plain_head(lm)
    Hs, lses = [], []
    log_sum = None  # (V,) float64: log Σ_t p_t
    E = lm.output_embeddings.detach().float().cpu()  # (V, d)
    bias = _head_bias(lm)
    for batch in batches(lm, texts, batch_size, max_tokens):
        mask = batch["attention_mask"].bool().cpu()
        H = input_of(lm.model, lm.lm_head, **batch).float().cpu()[mask]  # (n, d); the head is recomputed in float32
        z = H @ E.T if bias is None else H @ E.T + bias  # (n, V): float32 logits, as the evaluation uses
        lse = torch.logsumexp(z, -1)  # (n,)
        part = torch.logsumexp((z - lse[:, None]).double(), 0)  # (V,)
        log_sum = part if log_sum is None else torch.logaddexp(log_sum, part)
        Hs.append(H)
        lses.append(lse)
        if progress:
            progress(len(batch["input_ids"]))
    if log_sum is None:
        raise SteerportError("no text to measure the average distribution on")
    H, lse = torch.cat(Hs), torch.cat(lses)
    return HeadStats(H=H, lse=lse, log_alpha=(log_sum - math.log(H.shape[0])).cpu())


# --------------------------------------------------------------------------- the regression


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


def fit_encoding(E: torch.Tensor, log_alpha: torch.Tensor, *, chunk: int = 65536) -> Encoding:
    """Multiple linear regression of y = -log α (V,) on the rows of E (V, d) plus an intercept.

    Normal equations in float64 accumulated over row chunks (V may be 262k); standard errors
    σ² (XᵀX)⁻¹, t = β / se, two-sided p from the t distribution with V - d - 1 degrees of freedom.
    """
    from scipy.stats import t as t_dist

    V, d = E.shape
    if log_alpha.shape != (V,):
        raise SteerportError(f"log_alpha has shape {tuple(log_alpha.shape)}, expected ({V},)")
    if V <= d + 2:
        raise SteerportError(f"regression needs more tokens ({V}) than dimensions + 2 ({d + 2})")
    y = -log_alpha.double()
    G = torch.zeros(d + 1, d + 1, dtype=torch.float64)  # X1ᵀ X1, X1 = [E, 1]
    c = torch.zeros(d + 1, dtype=torch.float64)  # X1ᵀ y
    for i in range(0, V, chunk):
        X = torch.cat([E[i : i + chunk].detach().double().cpu(), torch.ones(min(chunk, V - i), 1, dtype=torch.float64)], 1)
        G += X.T @ X
        c += X.T @ y[i : i + chunk]
    Ginv = torch.linalg.inv(G)
    beta = Ginv @ c  # (d+1,)
    rss = 0.0
    for i in range(0, V, chunk):
        X = E[i : i + chunk].detach().double().cpu()
        rss += float(((y[i : i + chunk] - X @ beta[:d] - beta[d]) ** 2).sum())
    tss = float(((y - y.mean()) ** 2).sum())
    dof = V - d - 1
    sigma2 = rss / dof
    se = torch.sqrt(sigma2 * Ginv.diagonal()[:d])
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
    """Ω_i ∝ (-log p_i)^b, normalized to sum 1 (see the module docstring for why not p_i)."""
    evidence = (-enc.log_p).clamp_min(0.0)  # (d,) ≥ 0
    w = evidence.pow(b) if b != 0 else torch.ones_like(evidence)
    return w / w.sum()


def direction(enc: Encoding, b: float = DEFAULT_B) -> torch.Tensor:
    """u = -Ω ⊙ A⁻¹ (d,): e_w + log(r)·u scales α_w by about r, since A·u = -1."""
    return (-omega(enc, b) / enc.slopes).float()


# --------------------------------------------------------------------------- the steer


def token_id(tokenizer, surface: str, spec: str = "model") -> int:
    """The single token whose text is ``surface`` (e.g. " great"); an error if it is not one token."""
    ids = tokenizer(surface, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise SteerportError(f"{surface!r} is {len(ids)} tokens in {spec}, not one; pick a single token")
    return int(ids[0])


def make_token_steer(
    lm: LoadedModel,
    enc: Encoding,
    scales: dict[str, float],
    *,
    b: float = DEFAULT_B,
    detect: dict | None = None,
) -> Steer:
    """A ``token-prob`` steer scaling each token's average probability by its factor r (ε₀ = 1).

    delta_w = log(r_w) · u with u = -Ω ⊙ A⁻¹; at value s the factor becomes r^s.
    """
    if not scales:
        raise SteerportError("give at least one token and scale")
    u = direction(enc, b)  # (d,)
    ids, rows = [], []
    for surface, r in scales.items():
        if not (r > 0 and math.isfinite(r)):
            raise SteerportError(f"scale for {surface!r} must be a positive number, got {r}")
        tid = token_id(lm.tokenizer, surface, lm.spec)
        if tid in ids:
            raise SteerportError(f"{surface!r} is the same token as an earlier one")
        ids.append(tid)
        rows.append(math.log(r) * u)
    return Steer(
        "token-prob",
        {"token_ids": torch.tensor(ids, dtype=torch.int64), "delta": torch.stack(rows)},
        epsilon=1.0,
        positive=", ".join(f"{s!r} x{r:g}" for s, r in scales.items()),
        model={"spec": lm.spec, "fingerprint": lm.fingerprint},
        meta={
            "tokens": list(scales),
            "scales": [float(r) for r in scales.values()],
            "b": b,
            "omega": OMEGA_RULE,
            "regression": {"adj_r2": enc.adj_r2, "r2": enc.r2, "n_tokens": enc.n_tokens},
            "detect": detect or {},
            "method": "Cho et al. Algorithm 1: e_w' = e_w - log(r) Ω ⊙ A⁻¹, applied as a logit offset",
        },
    )




# --------------------------------------------------------------------------- evaluation


def _token_logits(lm: LoadedModel, stats: HeadStats, tid: int) -> torch.Tensor:
    """z_w at every cached position, (N,) float64."""
    e = lm.output_embeddings[tid].detach().float().cpu()
    z = stats.H @ e
    bias = _head_bias(lm)
    if bias is not None:
        z = z + bias[tid].cpu()
    return z.double()


def steered_log_alpha(lm: LoadedModel, stats: HeadStats, tid: int, delta: torch.Tensor, value: float = 1.0) -> tuple[float, torch.Tensor]:
    """log α'_w of token w after z_w += value · (delta · h), exactly, from cached head inputs.

    Returns (log α'_w, ρ) with ρ_t = Z_t / Z'_t (N,): how much every other token's probability
    at position t is scaled.
    """
    z = _token_logits(lm, stats, tid)  # (N,)
    shift = value * (stats.H @ delta.float().cpu()).double()  # (N,)
    lse = stats.lse.double()
    log_p = z - lse  # log p_t,w
    # log Z' - log Z = log(1 + p (e^shift - 1))
    dlse = torch.log1p(torch.exp(log_p) * torch.expm1(shift))
    new_log_p = log_p + shift - dlse
    return float(torch.logsumexp(new_log_p, 0) - math.log(len(z))), torch.exp(-dlse)


@dataclass
class ScaleResult:
    token: str
    token_id: int
    r: float
    r_hat: float

    @property
    def error(self) -> float:
        return abs(math.log(self.r) - math.log(self.r_hat))


def scale_errors(lm: LoadedModel, stats: HeadStats, u: torch.Tensor, tokens: dict[str, int], scales: Sequence[float]) -> list[ScaleResult]:
    """r̂ = α'_w / α_w for each token and requested r, with delta = log(r) · u."""
    out = []
    for surface, tid in tokens.items():
        base = float(stats.log_alpha[tid])
        for r in scales:
            new, _ = steered_log_alpha(lm, stats, tid, math.log(r) * u)
            out.append(ScaleResult(surface, tid, r, math.exp(new - base)))
    return out


@torch.no_grad()
def remaining_kl(lm: LoadedModel, stats: HeadStats, tid: int, delta: torch.Tensor, *, max_positions: int = 2048, chunk: int = 256) -> float:
    """KL(ᾱ' ‖ ᾱ) of the average distribution over all tokens but w, each renormalized.

    Only z_w changes, so p'_t,v = p_t,v · ρ_t for v ≠ w; computed on the first ``max_positions`` positions.
    """
    n = min(max_positions, stats.positions)
    _, rho = steered_log_alpha(lm, HeadStats(stats.H[:n], stats.lse[:n], stats.log_alpha), tid, delta)
    E = lm.output_embeddings.detach().float().cpu()
    bias = _head_bias(lm)
    old = torch.zeros(E.shape[0], dtype=torch.float64)
    new = torch.zeros(E.shape[0], dtype=torch.float64)
    for i in range(0, n, chunk):
        z = stats.H[i : i + chunk] @ E.T  # (c, V)
        if bias is not None:
            z = z + bias
        p = torch.exp(z - stats.lse[i : i + chunk, None]).double()  # (c, V)
        old += p.sum(0)
        new += (rho[i : i + chunk, None] * p).sum(0)
    old[tid] = 0.0
    new[tid] = 0.0
    old, new = old / old.sum(), new / new.sum()
    keep = new > 0
    return float((new[keep] * (new[keep].log() - old[keep].log())).sum())


# --------------------------------------------------------------------------- dimension removal


def importance(enc: Encoding, E: torch.Tensor, rank_by: str = "slope") -> torch.Tensor:
    """Per-dimension importance (d,): |A_i| · std(E[:, i]) (standardized slope), |t_i|, or random."""
    if rank_by == "slope":
        return enc.slopes.abs().float() * E.detach().float().std(0).cpu()
    if rank_by == "t":
        return enc.t.abs().float()
    if rank_by == "random":
        return torch.rand(enc.hidden_size, generator=torch.Generator().manual_seed(0))
    raise SteerportError(f"rank_by must be slope, t or random, got {rank_by!r}")


@contextmanager
def removed_dims(lm: LoadedModel, dims: torch.Tensor):
    """Zero output-embedding columns ``dims`` for the block: done as h[..., dims] = 0 at the LM head input."""
    keep = torch.ones(lm.hidden_size, device=lm.device, dtype=lm.dtype)
    keep[dims.to(lm.device)] = 0

    remove = edit_input(lm.lm_head, lambda h: h * keep)
    try:
        yield lm
    finally:
        remove()


@torch.no_grad()
def prune_curve(
    lm: LoadedModel,
    enc: Encoding,
    stats: HeadStats,
    prompts: Sequence[str],
    fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    *,
    rank_by: str = "slope",
    max_new_tokens: int = 24,
    max_positions: int = 2048,
    chunk: int = 256,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Zero the least important fraction of output-embedding dims; measure the damage.

    Per fraction: ``kl_avg`` = KL(ᾱ ‖ ᾱ_pruned) of the average distribution, ``kl_pos`` = mean
    per-position KL(p ‖ p_pruned) (both on cached head inputs), ``gen_sim`` = mean difflib ratio
    between greedy continuations (token ids) of ``prompts`` with and without the removal.
    """
    from steerport.hooks import generate

    E = lm.output_embeddings.detach().float().cpu()
    bias = _head_bias(lm)
    order = torch.argsort(importance(enc, E, rank_by))  # least important first
    n = min(max_positions, stats.positions)
    H = stats.H[:n]
    base_gen = generate(lm, prompts, max_new_tokens=max_new_tokens) if prompts else []
    tok = lm.tokenizer
    rows = []
    for f in fractions:
        k = round(f * lm.hidden_size)
        dims = order[:k]
        Hm = H.clone()
        Hm[:, dims] = 0
        log_avg0 = torch.full((E.shape[0],), -math.inf, dtype=torch.float64)
        log_avg1 = log_avg0.clone()
        kl_pos = 0.0
        for i in range(0, n, chunk):
            z0 = H[i : i + chunk] @ E.T
            z1 = Hm[i : i + chunk] @ E.T
            if bias is not None:
                z0, z1 = z0 + bias, z1 + bias
            lp0, lp1 = torch.log_softmax(z0, -1), torch.log_softmax(z1, -1)  # (c, V)
            kl_pos += float((lp0.exp() * (lp0 - lp1)).sum())
            log_avg0 = torch.logaddexp(log_avg0, torch.logsumexp(lp0.double(), 0))
            log_avg1 = torch.logaddexp(log_avg1, torch.logsumexp(lp1.double(), 0))
        a0, a1 = log_avg0 - math.log(n), log_avg1 - math.log(n)
        kl_avg = float((a0.exp() * (a0 - a1)).sum())
        sim = float("nan")
        if prompts:
            with removed_dims(lm, dims):
                gen = generate(lm, prompts, max_new_tokens=max_new_tokens)
            sims = [
                difflib.SequenceMatcher(a=tok(x, add_special_tokens=False)["input_ids"],
                                        b=tok(y, add_special_tokens=False)["input_ids"], autojunk=False).ratio()
                for x, y in zip(base_gen, gen)
            ]
            sim = sum(sims) / len(sims)
        rows.append({"fraction": f, "dims_removed": k, "kl_avg": kl_avg, "kl_pos": kl_pos / n, "gen_sim": sim})
        if progress:
            progress(1)
    return rows


# --------------------------------------------------------------------------- transfer


def transfer_token_prob(
    steer: Steer,
    target: LoadedModel,
    detect_texts: Sequence[str],
    *,
    b: float | None = None,
    max_tokens: int = 128,
    progress: Callable[[int], None] | None = None,
) -> tuple[Steer, dict]:
    """Rebuild a ``token-prob`` steer on ``target``: same token surfaces and scales, direction recomputed.

    Tokens are matched by surface string (the text the user gave, e.g. " great"), which must be a
    single token on the target too; tokens that are not are dropped and reported. Returns the new
    steer and a report (regression fit on the target, dropped tokens).
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
        except SteerportError as e:
            dropped.append(str(e))
    if not kept:
        raise SteerportError(f"none of the steer's tokens is a single token on {target.spec}: {'; '.join(dropped)}")
    stats = collect_head_stats(target, detect_texts, max_tokens=max_tokens, progress=progress)
    enc = fit_encoding(target.output_embeddings, stats.log_alpha)
    b = steer.meta.get("b", DEFAULT_B) if b is None else b
    new = make_token_steer(target, enc, kept, b=b, detect={"texts": len(detect_texts), "positions": stats.positions})
    new.meta["lineage"] = {
        "source_steer": steer.fingerprint,
        "source_model": dict(steer.model),
        "method": "token surface match, direction recomputed on the target",
        "dropped": dropped,
    }
    return new, {"adj_r2": enc.adj_r2, "dropped": dropped, "kept": list(kept)}


# --------------------------------------------------------------------------- pictures


def plot_pca(E: torch.Tensor, log_alpha: torch.Tensor, path, *, title: str = "", max_points: int = 30000) -> None:
    """PCA (2 components) of the output embeddings, coloured by the rank percentile of α (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X = E.detach().float().cpu()
    X = X - X.mean(0)
    _, _, Vt = torch.linalg.svd(X[torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:20000]], full_matrices=False)
    P = X @ Vt[:2].T  # (V, 2)
    rank = torch.argsort(torch.argsort(log_alpha)).float() / (len(log_alpha) - 1) * 100  # percentile, 100 = most probable
    idx = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(1))[:max_points]
    idx = idx[torch.argsort(rank[idx])]  # draw frequent tokens on top
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(P[idx, 0], P[idx, 1], c=rank[idx], s=2, cmap="viridis")
    fig.colorbar(sc, label="rank percentile of average probability")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "output embeddings")
    _save_fig(fig, path)


def plot_prune(rows: Sequence[dict], path, *, title: str = "") -> None:
    """KL of the average distribution and generation similarity against the fraction of dims removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = [r["fraction"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(f, [r["kl_avg"] for r in rows], "o-", label="KL of average distribution")
    ax.plot(f, [r["kl_pos"] for r in rows], "s-", label="mean per-position KL")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of output-embedding dims removed (least important first)")
    ax.set_ylabel("KL (nats)")
    ax2 = ax.twinx()
    ax2.plot(f, [r["gen_sim"] for r in rows], "^-", color="tab:red", label="generation similarity")
    ax2.set_ylabel("generation similarity")
    ax2.set_ylim(0, 1.05)
    fig.legend(loc="lower left", fontsize=8)
    ax.set_title(title or "dimension removal")
    _save_fig(fig, path)


def _save_fig(fig, path) -> None:
    import io
    from pathlib import Path

    import matplotlib.pyplot as plt

    from steerport.steer import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())

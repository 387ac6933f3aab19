"""LM-Steer training at close to the cost of one forward pass.

The model body is frozen, so its output does not change while the steer learns. We run it
**once** over the training (and held-out) tokens and cache the final hidden states ``h``
(the LM head's input) with their next-token ids; the fit then touches only the LM head::

    u   = s · ε₀ · (Aᵀ h)                    h: (N, d) cached   A, B: (d, r)   s: (N,) text label
    z   = E h + (E B) u (+ bias)             E: (V, d)          z: (N, V) in vocabulary chunks
    L   = mean_n [ logsumexp(z_n) − z_n[y_n] ]

which is exactly the model's loss with the hook ``h ← h + s·ε₀·B(Aᵀh)`` (steerport.hooks).
The softmax is computed chunk by chunk over the vocabulary with a running max, sum and
gradient accumulator (one pass, memory O(N · chunk)), so a 262k vocabulary is fine.

``head="topk"`` (opt-in) replaces the full softmax of each step by the base model's top
candidates plus a first-order tail term computed once after the body pass (:class:`TopKStats`):
steps then cost O(N·K·r) instead of O(N·V·d). Held-out evaluations (early stopping) and the
final summary always use the exact head.

The optional always-on *domain* component (the anchor code's ``dummy_steer``) adds
``ε₀·B_d(A_dᵀh)`` to every text whatever its label; it absorbs what positive and negative
texts share (their domain), is stored as ``domain.A``/``domain.B`` and is applied by
``steerport.hooks.steered`` only with ``include_domain=True``.

Example::

    lm = load_model("smollm2-135m")
    data = load_data(DataOptions(files=["sst2"]))
    result = train(lm, data, TrainConfig(rank=8), workdir="pos.st.work")
    result.steer.save("pos.st")
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from steerport.data import Dataset, pack_by_length, tokenize
from steerport.errors import SteerportError
from steerport.hooks import input_of
from steerport.models import LoadedModel, parse_dtype
from steerport.steer import Steer, atomic_write_bytes

IN_MEMORY_BYTES = 1 << 30  # caches up to 1 GiB are read into memory after the pass
CHUNK_ELEMENTS = 1 << 23  # logits held at once: N x chunk <= 8M floats (32 MB)


@dataclass
class TrainConfig:
    """Settings of one training run (all recorded in the steer's metadata)."""

    rank: int = 8
    epsilon: float = 1e-3  # base scale ε₀ stored in the file
    init_scale: float = 1e-2  # std of the random initial A, B (anchor: init_var)
    lr: float = 1e-2
    epochs: float = 8.0  # upper bound; early stopping usually ends sooner
    steps: int | None = None  # if given, overrides epochs
    tokens_per_batch: int = 512
    weight_decay: float = 0.0  # L2 on A, B (Adam's coupled weight decay, as the anchor's regularization)
    seed: int = 0
    domain: bool = False  # learn the always-on domain component too
    max_tokens: int = 128  # per text
    eval_every: int | None = None  # steps between held-out evaluations; None: twice per epoch
    patience: int = 3  # evaluations without improvement before stopping
    min_improvement: float = 1e-4  # relative held-out loss improvement that counts
    dtype: str = "auto"  # compute dtype of the body pass and the fit
    cache_dtype: str = "bfloat16"  # storage dtype of the cached hidden states
    cache_tokens_per_batch: int = 4096  # padded tokens per forward batch while caching
    checkpoint_every: int = 25  # steps between checkpoints (when a workdir is given)
    head: str = "exact"  # "exact": full softmax every step; "topk": opt-in approximation (see TopKStats)
    topk: int = 64  # candidates per token kept by head="topk" (the target is always one of them)

    def check(self) -> None:
        for name in ("rank", "tokens_per_batch", "max_tokens", "patience", "cache_tokens_per_batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise SteerportError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        for name in ("epsilon", "lr", "init_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise SteerportError(f"{name} must be a positive number, got {v}")
        if self.steps is None and not (self.epochs > 0):
            raise SteerportError(f"epochs must be positive, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise SteerportError(f"steps must be at least 1, got {self.steps}")
        if self.weight_decay < 0:
            raise SteerportError(f"weight decay must be >= 0, got {self.weight_decay}")
        parse_dtype(self.cache_dtype)
        if self.head not in ("exact", "topk"):
            raise SteerportError(f"head must be 'exact' or 'topk', got {self.head!r}")
        if self.topk < 2:
            raise SteerportError(f"topk must be at least 2, got {self.topk}")


# --------------------------------------------------------------------------- the head loss


def _softcap(z: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gemma-2 style ``cap · tanh(z / cap)`` and its derivative (None when no cap)."""
    if not cap:
        return z, None
    t = torch.tanh(z / cap)
    return cap * t, 1 - t * t


class _HeadCE(torch.autograd.Function):
    """Per-token cross-entropy of z = E h + (E B) u + bias, chunked over the vocabulary.

    One pass keeps a running max m, sum S and, when gradients are needed, Q = Σ_v w_v e_v
    (weights exp(z_v − m) times the softcap slope), so dL/dh' = Q/S − slope_y e_y comes out
    of the same pass; gradients go to u (N, R) and B (d, R) only.
    """

    @staticmethod
    def forward(ctx, h, u, B, E, bias, targets, cap, chunk):
        N, d = h.shape
        cdt = E.dtype
        acc = torch.promote_types(cdt, torch.float32)  # accumulate in fp32 (fp64 for fp64 inputs)
        hc = h.to(cdt)
        want_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        m = torch.full((N,), -math.inf, dtype=acc, device=h.device)
        S = torch.zeros(N, dtype=acc, device=h.device)
        Q = torch.zeros(N, d, dtype=acc, device=h.device) if want_grad else None
        uf, Bf = u.to(acc), B.to(acc)
        for v0 in range(0, E.shape[0], chunk):
            Ec = E[v0 : v0 + chunk]  # (c, d)
            z = (hc @ Ec.T).to(acc) + uf @ (Ec.to(acc) @ Bf).T  # (N, c)
            if bias is not None:
                z = z + bias[v0 : v0 + chunk].to(acc)
            z, slope = _softcap(z, cap)
            m_new = torch.maximum(m, z.max(1).values)
            scale = torch.exp(m - m_new)  # (N,)
            w = torch.exp(z - m_new[:, None])  # (N, c)
            S = S * scale + w.sum(1)
            if want_grad:
                if slope is not None:
                    w = w * slope
                Q = Q * scale[:, None] + (w.to(cdt) @ Ec).to(acc)
            m = m_new
        Ey = E[targets]  # (N, d)
        zy = (hc * Ey).sum(1).to(acc) + (uf * (Ey.to(acc) @ Bf)).sum(1)
        if bias is not None:
            zy = zy + bias[targets].to(acc)
        zy, slope_y = _softcap(zy, cap)
        loss = m + torch.log(S) - zy  # (N,)
        if want_grad:
            g = Q / S[:, None] - (Ey.to(acc) if slope_y is None else slope_y[:, None] * Ey.to(acc))  # dL/dh' (N, d)
            ctx.save_for_backward(g, u, B)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        g, u, B = ctx.saved_tensors
        g = g * grad_loss[:, None].to(g.dtype)
        gu = (g @ B.to(g.dtype)).to(u.dtype)  # dL/du = Bᵀ g      (N, R)
        gB = (g.T @ u.to(g.dtype)).to(B.dtype)  # dL/dB = Σ g uᵀ    (d, R)
        return None, gu, gB, None, None, None, None, None


def head_token_loss(
    h: torch.Tensor,
    u: torch.Tensor,
    B: torch.Tensor,
    E: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    softcap: float | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Per-token −log p(y | h + B u) under the LM head E (V, d); h (N, d), u (N, R), B (d, R).

    Equals ``cross_entropy((h + u @ B.T) @ E.T + bias, targets, reduction="none")`` (with the
    softcap when given) without ever holding the (N, V) logits.
    """
    N = max(h.shape[0], 1)
    chunk = chunk or max(256, min(E.shape[0], CHUNK_ELEMENTS // N))
    return _HeadCE.apply(h, u, B, E, bias, targets, softcap, chunk)


# --------------------------------------------------------------------------- caching


@dataclass
class HiddenCache:
    """Final hidden states of every predicted position, flat over texts.

    ``h`` (N, d) in the cache dtype (maybe memory-mapped), ``targets`` (N,) next-token ids,
    ``text`` (N,) index of the text each position belongs to.
    """

    h: torch.Tensor
    targets: torch.Tensor
    text: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return self.targets.shape[0]


@torch.no_grad()
def body_hidden(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states (b, T, d) from one forward pass that skips the LM head."""
    return input_of(lm.model, lm.lm_head, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def _head_softcap(lm: LoadedModel) -> float | None:
    config = lm.model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None and hasattr(config, "get_text_config"):
        cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    return float(cap) if cap else None


@torch.no_grad()
def check_head_matches(lm: LoadedModel, ids: list[int]) -> None:
    """Refuse models whose logits are not ``E h + bias`` (with softcap): the fit would be wrong."""
    x = torch.tensor([ids], device=lm.device)
    mask = torch.ones_like(x)
    full = lm.model(input_ids=x, attention_mask=mask, use_cache=False).logits.float()[0]
    h = body_hidden(lm, x, mask)[0].float()
    z = h @ lm.output_embeddings.float().T
    if lm.lm_head_bias is not None:
        z = z + lm.lm_head_bias.float()
    z, _ = _softcap(z, _head_softcap(lm))
    err = (z - full).abs().max().item() / max(full.abs().max().item(), 1e-6)
    if err > 2e-2:
        raise SteerportError(
            f"{lm.spec}: its logits are not E·h + bias of the LM head's input (relative difference "
            f"{err:.3g}); the trainer cannot fit steers for this architecture"
        )


def _token_ranges(token_lists: Sequence[Sequence[int]]) -> np.ndarray:
    """Start offset of each text's predicted positions in the flat cache (len+1 entries)."""
    return np.concatenate([[0], np.cumsum([max(len(t) - 1, 0) for t in token_lists])]).astype(np.int64)


def build_cache(
    lm: LoadedModel,
    token_lists: Sequence[Sequence[int]],
    *,
    cache_dtype: torch.dtype = torch.bfloat16,
    tokens_per_batch: int = 4096,
    workdir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> HiddenCache:
    """Run the model body once over all texts and keep h at every predicted position.

    With a ``workdir`` the cache is a memory-mapped file there, written batch by batch with
    its progress recorded, so an interrupted pass resumes at the next batch.
    ``progress(texts_done, tokens_done)`` is called after each batch.
    """
    starts = _token_ranges(token_lists)
    N, d = int(starts[-1]), lm.hidden_size
    lengths = [len(t) for t in token_lists]
    batches = pack_by_length(lengths, tokens_per_batch)
    targets = np.concatenate([np.asarray(t[1:], dtype=np.int64) for t in token_lists]) if N else np.zeros(0, np.int64)
    text_of = np.repeat(np.arange(len(token_lists), dtype=np.int32), np.diff(starts))
    item = torch.tensor([], dtype=cache_dtype).element_size()
    np_dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32}[item]  # raw bits; viewed as cache_dtype
    done = 0
    if workdir is not None:
        path, state_path = workdir / "hidden.bin", workdir / "hidden.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else None
        if state and state.get("shape") == [N, d] and path.exists():
            done = int(state["batches_done"])
            raw = np.memmap(path, dtype=np_dtype, mode="r+", shape=(N, d))
        else:
            raw = np.memmap(path, dtype=np_dtype, mode="w+", shape=(max(N, 1), d))[:N]
    else:
        raw = np.zeros((N, d), dtype=np_dtype)
    h_all = torch.from_numpy(raw).view(cache_dtype) if N else torch.zeros(0, d, dtype=cache_dtype)
    pad = lm.tokenizer.pad_token_id or 0
    texts_done = sum(len(b) for b in batches[:done])
    tokens_done = int(sum(starts[i + 1] - starts[i] for b in batches[:done] for i in b))
    if progress:
        progress(texts_done, tokens_done)
    for bi in range(done, len(batches)):
        batch = batches[bi]
        T = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(token_lists[i])
            mask[row, : lengths[i]] = 1
        hb = body_hidden(lm, ids.to(lm.device), mask.to(lm.device)).to("cpu", cache_dtype)
        for row, i in enumerate(batch):
            h_all[starts[i] : starts[i + 1]] = hb[row, : lengths[i] - 1]
        texts_done += len(batch)
        tokens_done += int(sum(starts[i + 1] - starts[i] for i in batch))
        if workdir is not None:
            if isinstance(raw, np.memmap):
                raw.flush()
            _write_json(workdir / "hidden.json", {"shape": [N, d], "batches_done": bi + 1, "batches": len(batches)})
        if progress:
            progress(texts_done, tokens_done)
        if should_stop() and bi + 1 < len(batches):
            raise KeyboardInterrupt
    if isinstance(raw, np.memmap) and N * d * item <= IN_MEMORY_BYTES:
        h_all = h_all.clone()  # small: read it into memory; large: stay memory-mapped
    return HiddenCache(h_all, torch.from_numpy(targets), torch.from_numpy(text_of))


# --------------------------------------------------------------------------- opt-in head approximation


@dataclass
class TopKStats:
    """Per-token statistics of the *unsteered* head for ``head="topk"`` (computed once).

    For each cached position: ``ids`` (N, K) = the target followed by the K−1 highest other
    logits, ``z0`` (N, K) their base logits, ``log_tail`` (N,) = log Σ_{v ∉ ids} exp(z0_v) and
    ``e_tail`` (N, d) = Σ_{v ∉ ids} q_v e_v, the tail's probability-weighted mean embedding.
    The steered normaliser is then approximated as::

        logsumexp_v z_v ≈ logsumexp( z0_ids + (E B)_ids u ,  log_tail + u·(Bᵀ e_tail) )

    exact on the K candidates and first-order (Jensen) on the tail, whose logits shift by
    δ_v = u·(Bᵀ e_v): a step costs O(N·K·r + V·d·r) instead of O(N·V·d).
    """

    ids: torch.Tensor
    z0: torch.Tensor
    log_tail: torch.Tensor
    e_tail: torch.Tensor


@torch.no_grad()
def topk_stats(cache: HiddenCache, E: torch.Tensor, bias: torch.Tensor | None, k: int,
               progress: Callable[[int], None] | None = None) -> TopKStats:
    """One pass of the unsteered head over the cache, keeping :class:`TopKStats`."""
    N, d = cache.h.shape
    V = E.shape[0]
    k = min(k, V)
    ids = torch.empty(N, k, dtype=torch.int32)
    z0 = torch.empty(N, k, dtype=torch.float32)
    log_tail = torch.empty(N, dtype=torch.float32)
    e_tail = torch.empty(N, d, dtype=cache.h.dtype)
    rows = max(16, CHUNK_ELEMENTS // V)
    Ef = E.float()
    for i in range(0, N, rows):
        h = cache.h[i : i + rows].float()
        y = cache.targets[i : i + rows].long()
        z = h @ Ef.T  # (M, V)
        if bias is not None:
            z += bias.float()
        others = z.scatter(1, y[:, None], -math.inf)
        top = torch.cat([y[:, None], others.topk(k - 1, dim=1).indices], 1)  # (M, k), target first
        lse = torch.logsumexp(z, 1)
        p_tail = torch.exp(z - lse[:, None]).scatter_(1, top, 0.0)  # (M, V) tail probabilities
        mass = p_tail.sum(1).clamp_min(1e-30)
        ids[i : i + rows] = top.int()
        z0[i : i + rows] = z.gather(1, top)
        log_tail[i : i + rows] = lse + torch.log(mass)
        e_tail[i : i + rows] = ((p_tail @ Ef) / mass[:, None]).to(e_tail.dtype)
        if progress:
            progress(min(i + rows, N))
    return TopKStats(ids, z0, log_tail, e_tail)


def topk_token_loss(stats: TopKStats, idx: torch.Tensor, u: torch.Tensor, B: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """Per-token loss under the :class:`TopKStats` approximation; u (n, R), B (d, R)."""
    EB = E.float() @ B.float()  # (V, R)
    ids = stats.ids[idx].long()  # (n, K)
    z = stats.z0[idx] + (EB[ids] * u[:, None, :]).sum(-1)  # (n, K)
    tail = stats.log_tail[idx] + (u * (stats.e_tail[idx].float() @ B.float())).sum(-1)  # (n,)
    return torch.logsumexp(torch.cat([z, tail[:, None]], 1), 1) - z[:, 0]


# --------------------------------------------------------------------------- the fit


@dataclass
class StepStats:
    step: int
    loss: float
    tokens: int


class Fitter:
    """Adam on A, B (and the domain factors) over a :class:`HiddenCache`; the head is frozen.

    ``labels`` (n_texts,) gives each text's steer value s. The per-step math::

        u = [s · ε₀ · h A,  ε₀ · h A_d]        (N, R)
        B_all = [B, B_d]                       (d, R)
        loss = mean head_token_loss(h, u, B_all, E, bias, y)
    """

    def __init__(self, lm: LoadedModel, cache: HiddenCache, labels: torch.Tensor, config: TrainConfig):
        self.config = config
        self.cache = cache
        self.compute_dtype = parse_dtype(config.dtype, str(lm.device))
        self.E = lm.output_embeddings.detach().to(dtype=self.compute_dtype)
        bias = lm.lm_head_bias
        self.bias = None if bias is None else bias.detach().float()
        self.softcap = _head_softcap(lm)
        self.device = lm.device
        self.labels = labels.to(torch.float32)
        d, r = lm.hidden_size, config.rank
        g = torch.Generator().manual_seed(config.seed)
        names = ["A", "B"] + (["domain.A", "domain.B"] if config.domain else [])
        self.params = {n: (torch.randn(d, r, generator=g) * config.init_scale).to(self.device).requires_grad_() for n in names}
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.lr, weight_decay=config.weight_decay)
        self.stats: TopKStats | None = None  # set for head="topk"; steps then use the approximation

    # ---------------------------------------------------------------- math

    def token_loss(self, idx: torch.Tensor, sign: float | None = None, domain: bool = True, exact: bool = False) -> torch.Tensor:
        """Per-token loss of cache positions ``idx``; ``sign`` overrides the texts' labels (0 = unsteered).

        Uses the top-k approximation when :attr:`stats` is set, unless ``exact``.
        """
        c, eps = self.config, self.config.epsilon
        h = self.cache.h[idx].to(self.device)
        y = self.cache.targets[idx].to(self.device)
        s = self.labels[self.cache.text[idx].long()].to(self.device) if sign is None else torch.full((len(idx),), float(sign), device=self.device)
        hf = h.to(self.compute_dtype)
        P = self.params
        us, Bs = [(s * eps)[:, None] * (hf.float() @ P["A"])], [P["B"]]
        if c.domain and domain:
            us.append(eps * (hf.float() @ P["domain.A"]))
            Bs.append(P["domain.B"])
        u, B = torch.cat(us, 1), torch.cat(Bs, 1)
        if self.stats is not None and not exact:
            return topk_token_loss(self.stats, idx, u, B, self.E)
        return head_token_loss(h, u, B, self.E, self.bias, y, softcap=self.softcap)  # exact

    def step(self, idx: torch.Tensor) -> float:
        """One Adam step on the positions ``idx``; returns the batch's mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.token_loss(idx).mean()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def mean_loss(self, idx: torch.Tensor, sign: float | None = None, domain: bool = True, exact: bool = False) -> float:
        """Token-weighted mean loss over ``idx`` (in batches)."""
        total, T = 0.0, max(self.config.tokens_per_batch * 2, 2048)
        for i in range(0, len(idx), T):
            total += float(self.token_loss(idx[i : i + T], sign, domain, exact).double().sum())
        return total / max(len(idx), 1)

    @torch.no_grad()
    def text_logprob(self, idx: torch.Tensor, sign: float | None, domain: bool = False) -> torch.Tensor:
        """Mean per-token log-likelihood of each text touched by ``idx`` (indexed by text id)."""
        n_texts = len(self.labels)
        tot = torch.zeros(n_texts, dtype=torch.float64)
        cnt = torch.zeros(n_texts, dtype=torch.float64)
        T = max(self.config.tokens_per_batch * 2, 2048)
        for i in range(0, len(idx), T):
            part = idx[i : i + T]
            lp = -self.token_loss(part, sign, domain, exact=True).double().cpu()
            t = self.cache.text[part].long()
            tot.index_add_(0, t, lp)
            cnt.index_add_(0, t, torch.ones_like(lp))
        return tot / cnt.clamp_min(1)

    # ---------------------------------------------------------------- state

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[n])

    def optimizer_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        sd = self.optimizer.state_dict()
        tensors = {f"opt.{i}.{k}": v.detach().cpu().clone() if torch.is_tensor(v) else torch.tensor(v)
                   for i, st in sd["state"].items() for k, v in st.items()}
        return tensors, {"param_groups": sd["param_groups"]}

    def load_optimizer(self, tensors: dict[str, torch.Tensor], groups: dict[str, Any]) -> None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                state.setdefault(int(i), {})[k] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``n`` training positions in ``epoch`` (depends only on seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    return torch.randperm(n, generator=g)


def batch_for_step(train_idx: torch.Tensor, step: int, tokens_per_batch: int, seed: int) -> torch.Tensor:
    """The cache positions of optimizer step ``step``: token-packed batches over shuffled epochs."""
    n = len(train_idx)
    per_epoch = math.ceil(n / tokens_per_batch)
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch)
    return train_idx[order[k * tokens_per_batch : (k + 1) * tokens_per_batch]]


# --------------------------------------------------------------------------- checkpoints


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def _save_checkpoint(path: Path, fitter: Fitter, best: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    opt_t, groups = fitter.optimizer_tensors()
    tensors = {**{f"param.{k}": v for k, v in fitter.tensors().items()},
               **{f"best.{k}": v.contiguous() for k, v in best.items()}, **opt_t}
    data = save(tensors, metadata={"state": json.dumps(state), "optimizer": json.dumps(groups)})
    atomic_write_bytes(path, data)


def _load_checkpoint(path: Path, fitter: Fitter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    fitter.load_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("param.")})
    fitter.load_optimizer(tensors, json.loads(meta["optimizer"]))
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    return best, json.loads(meta["state"])


# --------------------------------------------------------------------------- the whole run


@dataclass
class TrainResult:
    """The trained steer and what the run measured."""

    steer: Steer
    results: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loops finish their current step, checkpoint and stop."""

    def __init__(self):
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


ProgressFn = Callable[[str, dict[str, Any]], None]


def train(
    lm: LoadedModel,
    data: Dataset,
    config: TrainConfig | None = None,
    *,
    workdir: str | Path | None = None,
    progress: ProgressFn | None = None,
    stop_after_step: int | None = None,
    init: Steer | None = None,
) -> TrainResult:
    """Train an LM-Steer steer on ``data``: cache the body's output once, fit A, B on the head.

    With a ``workdir``, the cache and checkpoints live there and an interrupted run
    (Ctrl-C, SIGTERM, kill) resumes where it stopped; identical data and settings give the
    identical steer either way. ``progress(phase, info)`` receives updates ("cache", "fit",
    "eval"). ``stop_after_step`` simulates an interruption after that step (tests).
    ``init`` starts the fit from an existing steer of this model (a warm start, e.g. from a
    transferred steer) instead of random factors; its rank replaces ``config.rank``.
    """
    config = config or TrainConfig()
    if init is not None:
        _check_init(lm, init)
        config = replace(config, rank=init.rank)
    config.check()
    t_start = time.perf_counter()
    texts = [e.text for e in data.train] + [e.text for e in data.heldout]
    labels = torch.tensor([e.label for e in data.train] + [e.label for e in data.heldout])
    n_train_texts = len(data.train)
    token_lists = tokenize(lm.tokenizer, texts, config.max_tokens)
    if sum(len(t) - 1 for t in token_lists[:n_train_texts] if len(t) > 1) == 0:
        raise SteerportError("the training texts have no tokens to predict (each is a single token)")
    model_dtype = lm.dtype  # the body runs as loaded; config.dtype sets the fit's compute dtype
    cache_key = _key({"model": lm.fingerprint, "spec": lm.spec, "tokens": _key(token_lists), "dtype": str(model_dtype),
                      "cache_dtype": config.cache_dtype})
    fit_key = _key({"cache": cache_key, "labels": labels.tolist(), "n_train": n_train_texts,
                    "init": init.fingerprint if init is not None else None,
                    **{k: v for k, v in asdict(config).items() if k not in ("cache_tokens_per_batch", "checkpoint_every")}})
    wd = Path(workdir) if workdir is not None else None
    resumed = _prepare_workdir(wd, cache_key, fit_key)
    notify = progress or (lambda phase, info: None)
    timings: dict[str, float] = {}

    with _StopFlag() as flag:
        # ---- phase 1: the body, once
        t0 = time.perf_counter()
        shortest = min((t for t in token_lists if len(t) > 1), key=len)
        check_head_matches(lm, shortest)
        n_tokens_total = int(sum(max(len(t) - 1, 0) for t in token_lists))
        notify("cache-start", {"texts": len(texts), "tokens": n_tokens_total})
        cache = build_cache(
            lm, token_lists, cache_dtype=parse_dtype(config.cache_dtype), tokens_per_batch=config.cache_tokens_per_batch,
            workdir=wd, progress=lambda n, k: notify("cache", {"texts": n, "tokens": k}),
            should_stop=lambda: flag.stop,
        )
        timings["cache_s"] = time.perf_counter() - t0
        if wd is not None:
            _write_json(wd / "cache.done", {"key": cache_key, "seconds": timings["cache_s"]})

        # ---- phase 2: the fit on the cache
        fitter = Fitter(lm, cache, labels, config)
        if init is not None:  # the init steer's scale folded into A, at this run's base scale ε₀
            fitter.load_tensors({**fitter.tensors(), "A": init.A * (init.epsilon / config.epsilon), "B": init.B})
        if config.head == "topk":
            if fitter.softcap:
                raise SteerportError(f"{lm.spec}: head='topk' does not support logit softcapping; use head='exact'")
            t_stats = time.perf_counter()
            fitter.stats = _cached_topk_stats(fitter, wd, cache_key, config.topk, notify)
            timings["topk_stats_s"] = time.perf_counter() - t_stats
        is_train = cache.text < n_train_texts
        train_idx = torch.nonzero(is_train).flatten()
        held_idx = torch.nonzero(~is_train).flatten()
        per_epoch = math.ceil(len(train_idx) / config.tokens_per_batch)
        total_steps = config.steps or max(1, math.ceil(config.epochs * per_epoch))
        eval_every = config.eval_every or max(1, per_epoch // 2)
        state: dict[str, Any] = {"step": 0, "best_loss": None, "best_step": 0, "bad_evals": 0,
                                 "history": [], "stopped": None, "fit_seconds": 0.0, "fit_key": fit_key}
        best = fitter.tensors()
        ckpt = wd / "checkpoint.safetensors" if wd is not None else None
        if ckpt is not None and ckpt.exists():
            best, state = _load_checkpoint(ckpt, fitter)
        notify("fit-start", {"steps": total_steps, "start": state["step"], "tokens_per_step": config.tokens_per_batch,
                             "per_epoch": per_epoch})
        fit_clock = time.perf_counter() - state["fit_seconds"]
        last_loss = float("nan")
        while state["step"] < total_steps and state["stopped"] is None:
            step = state["step"]
            idx = batch_for_step(train_idx, step, config.tokens_per_batch, config.seed)
            last_loss = fitter.step(idx)
            state["step"] = step + 1
            notify("fit", {"step": step + 1, "loss": last_loss, "tokens": len(idx)})
            if len(held_idx) and (state["step"] % eval_every == 0 or state["step"] == total_steps):
                held = fitter.mean_loss(held_idx, exact=True)  # early stopping never trusts the approximation
                state["history"].append({"step": state["step"], "train_loss": last_loss, "heldout_loss": held,
                                         "seconds": round(time.perf_counter() - t_start, 3)})
                notify("eval", {"step": state["step"], "heldout_loss": held})
                if state["best_loss"] is None or held < state["best_loss"] * (1 - config.min_improvement):
                    state.update(best_loss=held, best_step=state["step"], bad_evals=0)
                    best = fitter.tensors()
                else:
                    state["bad_evals"] += 1
                    if state["bad_evals"] >= config.patience:
                        state["stopped"] = "early stop: held-out loss stopped improving"
            elif not len(held_idx):
                best = fitter.tensors()
            state["fit_seconds"] = time.perf_counter() - fit_clock
            interrupted = flag.stop or (stop_after_step is not None and state["step"] >= stop_after_step)
            if ckpt is not None and (interrupted or state["step"] % config.checkpoint_every == 0):
                _save_checkpoint(ckpt, fitter, best, state)
            if interrupted and state["step"] < total_steps and state["stopped"] is None:
                raise KeyboardInterrupt
        state["stopped"] = state["stopped"] or "step limit reached"
        timings["fit_s"] = state["fit_seconds"]

    # ---- summary on the held-out texts
    fitter.load_tensors(best)
    t2 = time.perf_counter()
    results = summarize(fitter, held_idx, n_train_texts, data)
    timings["summary_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t_start
    results.update(steps=state["step"], best_step=state["best_step"], stopped=state["stopped"],
                   epochs=round(state["step"] / per_epoch, 3), resumed=resumed,
                   train_tokens=len(train_idx), heldout_tokens=len(held_idx))
    training = {
        "method": "lm-steer (cached final hidden states, head-only fit)",
        "settings": asdict(config),
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "results": results,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "history": state["history"],
        "init": {"steer": init.fingerprint, "model": dict(init.model), "epsilon": init.epsilon} if init is not None else None,
        "domain": ("always-on domain component domain.A/domain.B at base scale; applied by "
                   "steerport.hooks.steered only with include_domain=True") if config.domain else None,
    }
    from steerport import __version__

    steer = Steer(
        "lm-steer", {k: v.float() for k, v in best.items()}, config.epsilon, positive=data.positive_name,
        model={"spec": lm.spec, "fingerprint": lm.fingerprint},
        meta={"training": training, "data": data.summary, "steerport_version": __version__},
    )
    return TrainResult(steer, results, state["history"])


def _check_init(lm: LoadedModel, init: Steer) -> None:
    if init.kind != "lm-steer":
        raise SteerportError(f"a warm start needs an lm-steer steer, this one is {init.kind!r}")
    if init.hidden_size != lm.hidden_size:
        raise SteerportError(f"the init steer has hidden size {init.hidden_size} but {lm.spec!r} has {lm.hidden_size}; "
                             "transfer it to this model first (steerport transfer)")
    want = init.model.get("fingerprint")
    if want and want != lm.fingerprint:
        raise SteerportError(f"the init steer was made for {init.model.get('spec')!r} (fingerprint {want}), not for "
                             f"{lm.spec!r} ({lm.fingerprint}); transfer it to this model first")


def _cached_topk_stats(fitter: Fitter, wd: Path | None, cache_key: str, k: int, notify: ProgressFn) -> TopKStats:
    """:func:`topk_stats`, kept in the work folder so a resumed run does not recompute it."""
    path = wd / f"topk{k}.safetensors" if wd is not None else None
    if path is not None and path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if f.metadata().get("key") == cache_key:
                return TopKStats(**load_file(str(path)))
    N = fitter.cache.n_tokens
    notify("stats-start", {"tokens": N})
    stats = topk_stats(fitter.cache, fitter.E, fitter.bias, k, progress=lambda n: notify("stats", {"tokens": n}))
    if path is not None:
        atomic_write_bytes(path, save({f: getattr(stats, f).contiguous() for f in ("ids", "z0", "log_tail", "e_tail")},
                                      metadata={"key": cache_key}))
    return stats


def _prepare_workdir(wd: Path | None, cache_key: str, fit_key: str) -> bool:
    """Make the work folder; keep a matching cache/checkpoint, drop stale ones. True if resuming."""
    if wd is None:
        return False
    wd.mkdir(parents=True, exist_ok=True)
    manifest = wd / "run.json"
    old = json.loads(manifest.read_text()) if manifest.exists() else {}
    resumed = False
    if old.get("cache_key") != cache_key:
        for name in ("hidden.bin", "hidden.json", "cache.done", "checkpoint.safetensors"):
            (wd / name).unlink(missing_ok=True)
        for stale in wd.glob("topk*.safetensors"):
            stale.unlink()
    else:
        resumed = (wd / "hidden.json").exists()
        if old.get("fit_key") != fit_key:
            (wd / "checkpoint.safetensors").unlink(missing_ok=True)
        else:
            resumed = resumed or (wd / "checkpoint.safetensors").exists()
    _write_json(manifest, {"cache_key": cache_key, "fit_key": fit_key, "written_by": "steerport train"})
    return resumed


WORK_FILES = ("run.json", "hidden.bin", "hidden.json", "cache.done", "checkpoint.safetensors")


def remove_workdir(wd: str | Path) -> None:
    """Delete a run's work files (only ours), and the folder itself if that leaves it empty."""
    wd = Path(wd)
    if not (wd / "run.json").exists():
        return
    for name in WORK_FILES:
        (wd / name).unlink(missing_ok=True)
    for stale in wd.glob("topk*.safetensors"):
        stale.unlink()
    try:
        wd.rmdir()
    except OSError:
        pass  # the user keeps other files there


@torch.no_grad()
def summarize(fitter: Fitter, held_idx: torch.Tensor, n_train_texts: int, data: Dataset) -> dict[str, Any]:
    """Held-out loss without/with the steer, separation and steer-as-classifier AUC (value 1)."""
    from steerport.scoring import roc_auc

    if not len(held_idx):
        return {"note": "no held-out texts (held-out fraction 0): nothing measured"}
    out: dict[str, Any] = {
        "heldout_loss_unsteered": fitter.mean_loss(held_idx, sign=0.0, domain=False, exact=True),
        "heldout_loss_steered": fitter.mean_loss(held_idx, domain=False, exact=True),
    }
    if fitter.config.domain:
        out["heldout_loss_steered_with_domain"] = fitter.mean_loss(held_idx, exact=True)
    held_texts = torch.arange(n_train_texts, len(fitter.labels))
    lp0 = fitter.text_logprob(held_idx, 0.0)[held_texts]
    lpp = fitter.text_logprob(held_idx, 1.0)[held_texts]
    lpn = fitter.text_logprob(held_idx, -1.0)[held_texts]
    y = fitter.labels[held_texts]
    pos, neg = y > 0, y < 0
    if pos.any() and neg.any():
        # Sep(1) = [ℓ_+1(D+) − ℓ_0(D+)] − [ℓ_+1(D−) − ℓ_0(D−)]  (DESIGN.md §5)
        out["separation"] = float((lpp[pos] - lp0[pos]).mean() - (lpp[neg] - lp0[neg]).mean())
        out["heldout_auc"] = roc_auc(lpp - lpn, y)
    out["heldout_texts"] = len(held_texts)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}

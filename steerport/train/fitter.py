"""Adam on the steer's factors over a cache of final hidden states; the LM head stays frozen.

Example::

    cache = cache_hidden(lm, texts, predicted_only=True)
    fitter = Fitter(lm, cache, labels, TrainConfig(rank=4))
    for step in range(100):
        fitter.step(batch_for_step(torch.arange(cache.n_positions), step, 512, seed=0))
    steer_tensors = fitter.tensors()          # {"A": (d, r), "B": (d, r)}
"""

from __future__ import annotations

import math
from typing import Any

import torch

from steerport.capture import HiddenCache
from steerport.models import LoadedModel, parse_dtype
from steerport.train.config import TrainConfig
from steerport.train.headloss import head_token_loss, head_token_losses
from steerport.train.topk import TopKStats, topk_token_loss


class Fitter:
    """Adam on A, B (and the domain factors) over a :class:`~steerport.capture.HiddenCache`.

    The cache holds predicted positions only (``predicted_only=True``); ``labels`` (n_texts,)
    gives each text's steer value s. The per-step math::

        u = [s · ε₀ · h A,  ε₀ · h A_d]        (N, R)
        B_all = [B, B_d]                       (d, R)
        loss = mean head_token_loss(h, u, B_all, E, bias, y)
    """

    def __init__(self, lm: LoadedModel, cache: HiddenCache, labels: torch.Tensor, config: TrainConfig):
        self.config = config
        self.cache = cache
        self.compute_dtype = parse_dtype(config.dtype, str(lm.device))
        self.E = lm.output_embeddings.detach().to(dtype=self.compute_dtype)  # (V, d)
        bias = lm.lm_head_bias
        self.bias = None if bias is None else bias.detach().float()
        self.softcap = lm.softcap
        self.device = lm.device
        self.labels = labels.to(torch.float32)
        d, r = lm.hidden_size, config.rank
        g = torch.Generator().manual_seed(config.seed)
        names = ["A", "B"] + (["domain.A", "domain.B"] if config.domain else [])
        self.params = {n: (torch.randn(d, r, generator=g) * config.init_scale).to(self.device).requires_grad_() for n in names}
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.lr, weight_decay=config.weight_decay)
        self.stats: TopKStats | None = None  # set for head="topk"; steps then use the approximation

    # ---------------------------------------------------------------- math

    def shift(self, idx: torch.Tensor, sign: float | None = None, domain: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The steer's shift B u of cache positions ``idx`` as (u (n, R), B (d, R)); ``sign``
        overrides the texts' labels (0 = unsteered)."""
        c, eps = self.config, self.config.epsilon
        h = self.cache.h.index_select(0, idx).to(self.device)  # (n, d)
        if sign is None:
            s = self.labels[self.cache.text_id[idx].long()].to(self.device)
        else:
            s = torch.full((len(idx),), float(sign), device=self.device)
        hf = h.to(self.compute_dtype).float()
        P = self.params
        us, Bs = [(s * eps)[:, None] * (hf @ P["A"])], [P["B"]]
        if c.domain and domain:
            us.append(eps * (hf @ P["domain.A"]))
            Bs.append(P["domain.B"])
        return torch.cat(us, 1), (Bs[0] if len(Bs) == 1 else torch.cat(Bs, 1))  # the same B object for every sign

    def token_loss(self, idx: torch.Tensor, sign: float | None = None, domain: bool = True, exact: bool = False) -> torch.Tensor:
        """Per-token loss of cache positions ``idx``; ``sign`` overrides the texts' labels (0 = unsteered).

        Uses the top-k approximation when :attr:`stats` is set, unless ``exact``.
        """
        u, B = self.shift(idx, sign, domain)
        if self.stats is not None and not exact:
            return topk_token_loss(self.stats, idx, u, B, self.E)
        h = self.cache.h[idx].to(self.device)
        y = self.cache.targets[idx].to(self.device)
        return head_token_loss(h, u, B, self.E, self.bias, y, softcap=self.softcap)  # exact

    @torch.no_grad()
    def exact_losses(self, idx: torch.Tensor, versions: list[tuple[float | None, bool]]) -> torch.Tensor:
        """Exact per-token losses (len(versions), n) of positions ``idx`` for several (sign, domain)
        versions of the steer, sharing one head pass per batch (:func:`head_token_losses`)."""
        out = []
        T = max(self.config.tokens_per_batch * 2, 2048)
        for i in range(0, len(idx), T):
            part = idx[i : i + T]
            h = self.cache.h[part].to(self.device)
            y = self.cache.targets[part].to(self.device)
            out.append(head_token_losses(h, [self.shift(part, s, dom) for s, dom in versions], self.E, self.bias, y,
                                         softcap=self.softcap).cpu())
        return torch.cat(out, 1) if out else torch.zeros(len(versions), 0)

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
        return self.text_means(idx, -self.exact_losses(idx, [(sign, domain)])[0])

    def text_means(self, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Per-text mean of per-position ``values`` (n,) at positions ``idx`` (indexed by text id)."""
        n_texts = len(self.labels)
        t = self.cache.text_id[idx].long()
        tot = torch.zeros(n_texts, dtype=torch.float64).index_add_(0, t, values.double())
        cnt = torch.zeros(n_texts, dtype=torch.float64).index_add_(0, t, torch.ones(len(idx), dtype=torch.float64))
        return tot / cnt.clamp_min(1)

    # ---------------------------------------------------------------- state

    def tensors(self) -> dict[str, torch.Tensor]:
        """A copy of the factors on the CPU ({"A", "B"} and maybe {"domain.A", "domain.B"})."""
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[n])

    def optimizer_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Adam's state as flat tensors ``opt.{param}.{key}`` plus its JSON-able param groups."""
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

"""The one measurement of a steer setting against the unsteered model on the same tokens.

For each setting (a list of (steer, value) pairs): κ, the mean KL(p_steered ‖ p_0) over token
positions; the log-prob of each next token; optionally the mean log-prob shift of every vocabulary
entry (:class:`SteerStats`). :class:`Scorer` computes them by one loop over chunks of
(unsteered log-probs, targets, steered log-probs per setting) that a subclass yields; the scorers
themselves (over cached head inputs, or full forward passes) live in :mod:`steerport.scoring`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from steerport.capture import HiddenCache
from steerport.hooks import SteerValue, as_items, check_compatible
from steerport.metrics import kl_divergence
from steerport.models import LoadedModel
from steerport.steer import Steer

Chunk = tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]  # lp0 (n, V), targets (n,), lps per setting (n, V)


@dataclass
class SteerStats:
    """What one (steers, values) setting does on a text set, against the unsteered model."""

    kl: float  # κ: mean over positions of KL(p_steered ‖ p_0), nats
    token_logprob: torch.Tensor  # (N,) log p_steered(next token); NaN where there is none
    logprob_shift: torch.Tensor | None = None  # (V,) mean over positions of log p_s(v) - log p_0(v)


HeadStats = SteerStats  # the older name (tokenprob has a different HeadStats)


class Scorer:
    """The one loop: κ, next-token log-probs and log-prob shifts of several settings, from
    chunks of (unsteered log-probs, targets, steered log-probs per setting) that a subclass yields."""

    lm: LoadedModel
    force: bool
    V: int
    targets: torch.Tensor  # (N,) next token id at each position, -1 at a text's last
    text_id: torch.Tensor  # (N,) which text each position belongs to
    n_texts: int
    base_token_logprob: torch.Tensor  # (N,) log p_0(next token), NaN where there is none
    _checked: set[tuple[str, str | None]]  # (steer fingerprint, made-for fingerprint) already checked

    def _chunks(self, settings: list[list[SteerValue]]) -> Iterator[Chunk]:
        raise NotImplementedError

    def _allowed(self, steer: Steer) -> None:
        """Raise if this scorer cannot measure ``steer``."""

    def _check(self, settings: Sequence[Sequence[SteerValue]]) -> list[list[SteerValue]]:
        out = [as_items(list(s)) for s in settings]
        for setting in out:
            for steer, _ in setting:
                key = (steer.fingerprint, steer.model.get("fingerprint"))
                if key not in self._checked:
                    self._allowed(steer)
                    check_compatible(self.lm, steer, force=self.force)
                    self._checked.add(key)
        return out

    def stats(self, steers: Sequence[SteerValue], *, shift: bool = False) -> SteerStats:
        """κ, next-token log-probs and (``shift=True``) the mean log-prob shift per vocabulary entry."""
        return self.stats_many([steers], shift=shift)[0]

    @torch.no_grad()
    def stats_many(self, settings: Sequence[Sequence[SteerValue]], *, shift: bool = False, kl: bool = True) -> list[SteerStats]:
        """:meth:`stats` for several settings in one pass: the unsteered log-probs are computed once per chunk.

        ``kl=False`` skips the KL (reported as NaN) when only the log-probs are needed.
        """
        return self._stats_from_chunks(self._check(settings), shift=shift, kl=kl)

    def _stats_from_chunks(self, checked: list[list[SteerValue]], *, shift: bool, kl: bool) -> list[SteerStats]:
        k = len(checked)
        total_kl, n = [0.0] * k, 0
        tgt: list[list[torch.Tensor]] = [[] for _ in range(k)]
        shift_sum = [torch.zeros(self.V) for _ in range(k)] if shift else None
        for lp0, targets, per_setting in self._chunks(checked):
            for j, lps in enumerate(per_setting):
                if kl:
                    total_kl[j] += kl_divergence(lps, lp0).sum().item()
                tgt[j].append(gather_targets(lps, targets))
                if shift_sum is not None:
                    shift_sum[j] += (lps - lp0).sum(0).cpu()
            n += lp0.shape[0]
        return [
            SteerStats(
                kl=total_kl[j] / max(n, 1) if kl else float("nan"),
                token_logprob=torch.cat(tgt[j]) if tgt[j] else torch.zeros(0),
                logprob_shift=None if shift_sum is None else shift_sum[j] / max(n, 1),
            )
            for j in range(k)
        ]

    def text_means(self, token_logprob: torch.Tensor) -> torch.Tensor:
        """Mean per-token log-likelihood of each text, shape (n_texts,); 0 for texts of one token."""
        return per_text_mean(token_logprob, self)


def gather_targets(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logp[i, targets[i]], NaN where targets[i] < 0: (n, V), (n,) -> (n,) on the CPU."""
    t = targets.to(logp.device)
    out = logp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1).cpu()
    return torch.where(targets.cpu() >= 0, out, torch.full_like(out, float("nan")))


def per_text_mean(token_logprob: torch.Tensor, cache: HiddenCache | Scorer) -> torch.Tensor:
    """Average the per-position values of each text over its positions that have a next token
    (``targets``, ``text_id``, ``n_texts`` of a cache or a scorer), shape (n_texts,)."""
    ok = cache.targets >= 0
    sums = torch.zeros(cache.n_texts, dtype=torch.float64).index_add_(0, cache.text_id[ok], token_logprob[ok].double())
    ones = torch.ones(int(ok.sum()), dtype=torch.float64)
    counts = torch.zeros(cache.n_texts, dtype=torch.float64).index_add_(0, cache.text_id[ok], ones)
    return (sums / counts.clamp(min=1)).float()

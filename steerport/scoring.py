"""Log-likelihoods and divergences of a (steered) model on text: the shared measuring tools.

Everything here compares a model with steers applied against the same model without,
on the same tokens. Used by the trainer's summary, transfer calibration, the evaluator,
``score`` and ``explain``.

Example::

    lp = mean_logprob(lm, ["What a lovely day."], [(steer, 3.0)])   # (1,)
    auc = roc_auc(steer_scores(lm, steer, texts, 3.0), labels)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from steerport.hooks import SteerValue, input_of, steered
from steerport.models import LoadedModel


def batches(lm: LoadedModel, texts: Sequence[str], batch_size: int, max_tokens: int) -> Iterator[dict]:
    """Right-padded token batches of at most ``max_tokens`` tokens per text."""
    tok = lm.tokenizer
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i : i + batch_size]), return_tensors="pt", padding=True,
                  truncation=True, max_length=max_tokens)
        yield {k: v.to(lm.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def token_logprobs(
    lm: LoadedModel,
    texts: Sequence[str],
    steers: Sequence[SteerValue] = (),
    *,
    batch_size: int = 8,
    max_tokens: int = 256,
    force: bool = False,
) -> list[torch.Tensor]:
    """For each text, log p(x_t | x_<t) of each of its tokens after the first: a float32 vector."""
    out: list[torch.Tensor] = []
    with steered(lm, list(steers), force=force):
        for batch in batches(lm, texts, batch_size, max_tokens):
            logits = lm.model(**batch).logits[:, :-1].float()  # (b, T-1, V)
            target = batch["input_ids"][:, 1:]
            lp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (b, T-1)
            mask = batch["attention_mask"][:, 1:].bool()
            out.extend(row[m].cpu() for row, m in zip(lp, mask))
    return out


def mean_logprob(lm: LoadedModel, texts: Sequence[str], steers: Sequence[SteerValue] = (), **kw) -> torch.Tensor:
    """Mean per-token log-likelihood of each text, shape (n,). Texts of one token score 0."""
    return torch.stack([lp.mean() if lp.numel() else lp.new_zeros(()) for lp in token_logprobs(lm, texts, steers, **kw)])


def steer_scores(lm: LoadedModel, steer, texts: Sequence[str], value: float = 1.0, **kw) -> torch.Tensor:
    """The steer as a classifier: mean log-likelihood under +value minus under -value, shape (n,)."""
    return mean_logprob(lm, texts, [(steer, value)], **kw) - mean_logprob(lm, texts, [(steer, -value)], **kw)


@torch.no_grad()
def mean_kl(
    lm: LoadedModel,
    texts: Sequence[str],
    steers: Sequence[SteerValue],
    *,
    batch_size: int = 8,
    max_tokens: int = 128,
    force: bool = False,
) -> float:
    """κ: mean over token positions of KL(p_steered ‖ p_unsteered), in nats."""
    total, count = 0.0, 0
    for batch in batches(lm, texts, batch_size, max_tokens):
        base = torch.log_softmax(lm.model(**batch).logits.float(), -1)  # (b, T, V)
        with steered(lm, list(steers), force=force):
            new = torch.log_softmax(lm.model(**batch).logits.float(), -1)
        kl = kl_divergence(new, base)  # (b, T)
        mask = batch["attention_mask"].bool()
        total += kl[mask].sum().item()
        count += int(mask.sum())
    return total / max(count, 1)


def roc_auc(scores: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[float]) -> float:
    """ROC AUC of ``scores`` for labels > 0 against labels <= 0 (ties count half)."""
    from scipy.stats import rankdata

    s = torch.as_tensor(scores, dtype=torch.float64).flatten().numpy()
    y = torch.as_tensor(labels, dtype=torch.float64).flatten().numpy() > 0
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both classes")
    ranks = rankdata(s)  # average ranks: ties count half (Mann-Whitney U)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis from log-probabilities."""
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


# --------------------------------------------------------------------------- body once, head many times
#
# LM-Steer (and any steer that acts only at the LM head) leaves the model body untouched, so the
# final hidden states of a text set are the same for every steer and every value. Run the body
# once (``capture_hidden``), then score any number of (steer, value) settings by recomputing only
# the head (``HeadScorer``): a KL bisection or a value sweep costs a few head passes, not a few
# full forward passes. For LM-Steer the logit shift is low rank and computed as such:
#
#     Δz = Σ_i s_i ε_i (h A_i)(E B_i)ᵀ        h: (n, d), A_i, B_i: (d, r_i), E: (V, d), Δz: (n, V)


@dataclass
class HiddenCache:
    """Final hidden states (LM-head inputs) of every real token position of a text set.

    ``targets[i]`` is the next token id at position i, or -1 at a text's last position;
    ``text_id[i]`` says which text position i belongs to.
    """

    hidden: torch.Tensor  # (N, d) float32
    targets: torch.Tensor  # (N,) int64
    text_id: torch.Tensor  # (N,) int64
    n_texts: int

    @property
    def n_positions(self) -> int:
        return self.hidden.shape[0]

    @property
    def n_targets(self) -> int:
        return int((self.targets >= 0).sum())


@torch.no_grad()
def capture_hidden(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_tokens: int = 128,
    progress: Callable[[int], None] | None = None,
) -> HiddenCache:
    """Run the model body once over ``texts`` and keep the LM head's inputs (no head compute).

    Example::

        cache = capture_hidden(lm, ["A neutral sentence."])
        cache.hidden.shape        # (n_tokens, d)
    """
    hiddens, targets, text_ids = [], [], []
    for start, batch in zip(range(0, len(texts), batch_size), batches(lm, texts, batch_size, max_tokens)):
        h = input_of(lm.model, lm.lm_head, **batch, use_cache=False).float().cpu()  # (b, T, d)
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        nxt = torch.full_like(ids, -1)
        nxt[:, :-1] = torch.where(mask[:, 1:], ids[:, 1:], -1)
        row = torch.arange(start, start + ids.shape[0]).unsqueeze(1).expand_as(ids)
        hiddens.append(h[mask])
        targets.append(nxt[mask])
        text_ids.append(row[mask])
        if progress:
            progress(ids.shape[0])
    d = lm.hidden_size
    return HiddenCache(
        hidden=torch.cat(hiddens) if hiddens else torch.zeros(0, d),
        targets=torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long),
        text_id=torch.cat(text_ids) if text_ids else torch.zeros(0, dtype=torch.long),
        n_texts=len(texts),
    )


@dataclass
class HeadStats:
    """What one (steers, values) setting does on a cached text set, against the unsteered model."""

    kl: float  # κ: mean over positions of KL(p_steered ‖ p_0), nats
    token_logprob: torch.Tensor  # (N,) log p_steered(next token); NaN where there is none
    logprob_shift: torch.Tensor | None = None  # (V,) mean over positions of log p_s(v) - log p_0(v)


class HeadScorer:
    """Score steer settings on a :class:`HiddenCache` by recomputing only the LM head.

    LM-Steer steers use the low-rank shift above; other kinds are applied through their hook on
    the head (``steerport.hooks.steered``) — correct for any steer that acts at the head input.
    The unsteered logits are kept in memory when they fit in ``max_base_bytes``.

    Example::

        scorer = HeadScorer(lm, capture_hidden(lm, neutral_texts))
        kappa = scorer.stats([(steer, 2.0)]).kl
    """

    def __init__(self, lm: LoadedModel, cache: HiddenCache, *, chunk: int = 256, max_base_bytes: int = 1 << 30):
        self.lm, self.cache, self.chunk = lm, cache, chunk
        self.E = lm.output_embeddings.detach().float()  # (V, d)
        bias = lm.lm_head_bias
        self.bias = None if bias is None else bias.detach().float()
        self.softcap = getattr(lm.model.config, "final_logit_softcapping", None)
        self.V = self.E.shape[0]
        self._eb: dict[int, torch.Tensor] = {}  # id(steer) -> E B (V, r)
        self._base: list[torch.Tensor] | None = None
        if cache.n_positions * self.V * 4 <= max_base_bytes:
            self._base = [self._raw_base(i) for i in range(0, cache.n_positions, chunk)]
        lse0, tgt0 = [], []
        for i, raw in self._chunks():
            logp = torch.log_softmax(self._cap(raw), -1)
            lse0.append(torch.logsumexp(self._cap(raw), -1))
            tgt0.append(_gather_targets(logp, self.cache.targets[i : i + chunk]))
        self.lse0 = torch.cat(lse0) if lse0 else torch.zeros(0)
        self.base_token_logprob = torch.cat(tgt0) if tgt0 else torch.zeros(0)

    # ------------------------------------------------------------ pieces

    def _raw_base(self, i: int) -> torch.Tensor:
        h = self.cache.hidden[i : i + self.chunk].to(self.E.device)
        z = h @ self.E.T  # (n, V)
        return z + self.bias if self.bias is not None else z

    def _chunks(self):
        for k, i in enumerate(range(0, self.cache.n_positions, self.chunk)):
            yield i, (self._base[k] if self._base is not None else self._raw_base(i))

    def _cap(self, z: torch.Tensor) -> torch.Tensor:
        return z if not self.softcap else torch.tanh(z / self.softcap) * self.softcap

    def _eb_of(self, steer) -> torch.Tensor:
        if id(steer) not in self._eb:
            self._eb[id(steer)] = self.E @ steer.B.float().to(self.E.device)  # (V, r)
        return self._eb[id(steer)]

    def _steered_raw(self, i: int, raw: torch.Tensor, steers: Sequence[SteerValue]) -> torch.Tensor:
        h = self.cache.hidden[i : i + raw.shape[0]].to(self.E.device)
        z = raw.clone()
        others = []
        for steer, value in steers:
            if steer.kind == "lm-steer":
                coef = (h @ steer.A.float().to(h.device)) * (float(value) * steer.epsilon)  # (n, r)
                z += coef @ self._eb_of(steer).T  # (n, V)
            else:
                others.append((steer, value))
        if others:  # generic path: the steer's own hook on the head, minus the unsteered head
            head = self.lm.lm_head
            with steered(self.lm, others, force=True):
                zs = head(h.to(self.lm.dtype)).float()
            z += zs - head(h.to(self.lm.dtype)).float()
        return z

    # ------------------------------------------------------------ the measurement

    def stats(self, steers: Sequence[SteerValue], *, shift: bool = False) -> HeadStats:
        """κ, next-token log-probs and (``shift=True``) the mean log-prob shift per vocabulary entry."""
        return self.stats_many([steers], shift=shift)[0]

    @torch.no_grad()
    def stats_many(self, settings: Sequence[Sequence[SteerValue]], *, shift: bool = False, kl: bool = True) -> list[HeadStats]:
        """:meth:`stats` for several settings in one pass: the unsteered logits are computed once per chunk.

        ``kl=False`` skips the KL (reported as NaN) when only the log-probs are needed.
        """
        k = len(settings)
        total_kl, n = [0.0] * k, 0
        tgt: list[list[torch.Tensor]] = [[] for _ in range(k)]
        shift_sum = [torch.zeros(self.V) for _ in range(k)] if shift else None
        for i, raw in self._chunks():
            lp0 = torch.log_softmax(self._cap(raw), -1)
            targets = self.cache.targets[i : i + raw.shape[0]]
            for j, steers in enumerate(settings):
                lps = torch.log_softmax(self._cap(self._steered_raw(i, raw, steers)), -1)  # (n, V)
                if kl:
                    total_kl[j] += kl_divergence(lps, lp0).sum().item()
                tgt[j].append(_gather_targets(lps, targets))
                if shift_sum is not None:
                    shift_sum[j] += (lps - lp0).sum(0).cpu()
            n += raw.shape[0]
        return [
            HeadStats(
                kl=total_kl[j] / max(n, 1) if kl else float("nan"),
                token_logprob=torch.cat(tgt[j]) if tgt[j] else torch.zeros(0),
                logprob_shift=None if shift_sum is None else shift_sum[j] / max(n, 1),
            )
            for j in range(k)
        ]

    def text_means(self, token_logprob: torch.Tensor) -> torch.Tensor:
        """Mean per-token log-likelihood of each text, shape (n_texts,); 0 for texts of one token."""
        return per_text_mean(token_logprob, self.cache)


def _gather_targets(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logp[i, targets[i]], NaN where targets[i] < 0."""
    t = targets.to(logp.device)
    out = logp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1).cpu()
    return torch.where(targets >= 0, out, torch.full_like(out, float("nan")))


def per_text_mean(token_logprob: torch.Tensor, cache: HiddenCache) -> torch.Tensor:
    """Average the finite per-position values of each text (the cache's text_id), shape (n_texts,)."""
    ok = cache.targets >= 0
    sums = torch.zeros(cache.n_texts, dtype=torch.float64).index_add_(0, cache.text_id[ok], token_logprob[ok].double())
    counts = torch.zeros(cache.n_texts, dtype=torch.float64).index_add_(0, cache.text_id[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
    return (sums / counts.clamp(min=1)).float()

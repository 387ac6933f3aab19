"""Log-likelihoods and divergences of a (steered) model on text: the shared measuring tools.

Everything here compares a model with steers applied against the same model without,
on the same tokens. Used by the trainer's summary, transfer calibration, the evaluator,
``score`` and ``explain``.

Example::

    lp = mean_logprob(lm, ["What a lovely day."], [(steer, 3.0)])   # (1,)
    auc = roc_auc(steer_scores(lm, steer, texts, 3.0), labels)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from steerport.hooks import SteerValue, steered
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

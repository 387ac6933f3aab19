"""Log-likelihoods and divergences of a (steered) model on text: the shared measuring tools.

Everything here compares a model with steers applied against the same model without, on the
same tokens. There is one measurement — for each setting (a list of (steer, value) pairs) the
mean KL(p_steered ‖ p_0) over token positions (κ, the KL budget), the log-prob of each next
token, and optionally the mean log-prob shift of every vocabulary entry — computed by one loop
(:meth:`steerport.measurement.Scorer.stats_many`) over one of two sources of log-probabilities:

* :class:`HeadScorer` — for steers that act at the LM head input (``lm-steer``, ``token-prob``):
  the model body runs once (:func:`steerport.capture.cache_hidden`) and only the head is
  recomputed per setting, so a value bisection costs a few head passes;
* :class:`ForwardScorer` — for steers that act inside the network (``actadd``): a full forward
  pass per setting.

:func:`scorer_for` picks the right one, :func:`mean_kl` and :func:`value_for_kl` are the
one-line uses (trainer summary, transfer calibration, ActAdd calibration, evaluate, sweep,
explain all go through them).

Example::

    lp = mean_logprob(lm, ["What a lovely day."], [(steer, 3.0)])   # (1,)
    kappa = mean_kl(lm, neutral("calib"), [(steer, 3.0)])
    res = value_for_kl(lm, neutral("calib"), steer, 0.05)           # res.value, res.kl
    auc = roc_auc(steer_scores(lm, steer, texts, 3.0), labels)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from steerport.capture import HiddenCache, cache_hidden, text_batches
from steerport.errors import SteerportError
from steerport.hooks import SteerValue, as_items, steered
from steerport.kinds import get_kind, kind_names
from steerport.measurement import Chunk, HeadStats, Scorer, SteerStats, gather_targets, per_text_mean
from steerport.metrics import BisectResult, find_value_for_kl, kl_divergence, roc_auc
from steerport.models import LoadedModel
from steerport.steer import Steer

__all__ = ["HEAD_KINDS", "ForwardScorer", "HeadScorer", "HeadStats", "HiddenCache", "SteerStats", "batches",
           "capture_hidden", "kl_divergence", "mean_kl", "mean_logprob", "per_text_mean", "roc_auc", "scorer_for",
           "steer_scores", "token_logprobs", "value_for_kl"]

batches = text_batches  # the older name of the token batcher, kept importable

# Kinds whose hook acts on the LM head (its input or its output) and nowhere else, so the
# body's hidden states are the same with and without them.
HEAD_KINDS = frozenset(name for name in kind_names() if get_kind(name).acts_at_head)


# --------------------------------------------------------------------------- full forward passes


def _forward_positions(lm: LoadedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (n, V) at every real position of a batch (flat, row by row) and the next
    token id at each (n,), -1 at a text's last position."""
    logits = lm.model(**batch).logits.float()  # (b, T, V)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = torch.where(mask[:, 1:], ids[:, 1:], -1)
    return torch.log_softmax(logits[mask], -1), nxt[mask].cpu()


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
        for batch in text_batches(lm, texts, batch_size, max_tokens):
            lp, targets = _forward_positions(lm, batch)
            got = gather_targets(lp, targets)  # (n,), NaN at each text's last position
            lengths = batch["attention_mask"].sum(1).tolist()
            for row in torch.split(got, lengths):
                out.append(row[:-1])
    return out


def mean_logprob(lm: LoadedModel, texts: Sequence[str], steers: Sequence[SteerValue] = (), **kw) -> torch.Tensor:
    """Mean per-token log-likelihood of each text, shape (n,). Texts of one token score 0."""
    return torch.stack([lp.mean() if lp.numel() else lp.new_zeros(()) for lp in token_logprobs(lm, texts, steers, **kw)])


def steer_scores(lm: LoadedModel, steer: Steer, texts: Sequence[str], value: float = 1.0, **kw) -> torch.Tensor:
    """The steer as a classifier: mean log-likelihood under +value minus under -value, shape (n,)."""
    return mean_logprob(lm, texts, [(steer, value)], **kw) - mean_logprob(lm, texts, [(steer, -value)], **kw)


def capture_hidden(lm: LoadedModel, texts: Sequence[str], *, batch_size: int = 8, max_tokens: int = 128,
                   progress: Callable[[int], None] | None = None) -> HiddenCache:
    """The LM head's inputs at every token position of ``texts``: :func:`steerport.capture.cache_hidden`
    under its older name and signature (``progress(n)`` gets the number of texts just done).

    Example::

        cache = capture_hidden(lm, ["A neutral sentence."])
        cache.h.shape        # (n_tokens, d)
    """
    seen = [0]

    def step(texts_done: int, positions_done: int) -> None:
        if progress and texts_done > seen[0]:
            progress(texts_done - seen[0])
        seen[0] = texts_done

    return cache_hidden(lm, texts, max_tokens=max_tokens, tokens_per_batch=batch_size * max_tokens, progress=step)


# The body once, the head many times. LM-Steer (and any steer that acts only at the LM head)
# leaves the model body untouched, so the final hidden states of a text set are the same for every
# steer and value. For LM-Steer the logit shift is low rank and computed as such:
#
#     Δz = Σ_i s_i ε_i (h A_i)(E B_i)ᵀ        h: (n, d), A_i, B_i: (d, r_i), E: (V, d), Δz: (n, V)


# Unsteered logits are kept in memory up to this size: the bundled neutral text on a 262k-token
# vocabulary (Gemma-3) needs 1.45 GB, and recomputing it on each calibration step costs ~40 %.
BASE_CACHE_BYTES = 2 << 30


class HeadScorer(Scorer):
    """Score steer settings on a :class:`~steerport.capture.HiddenCache` of LM-head inputs by
    recomputing only the LM head.

    LM-Steer steers use the low-rank shift above; other head kinds go through their own hook on
    the head (``steerport.hooks.steered``). Soft-capped heads (Gemma 2/3) are capped as the model
    does (:func:`steerport.models.logit_softcap`). The unsteered logits are kept in memory when
    they fit in ``max_base_bytes``. Steers made for another model are refused unless ``force``.

    Example::

        scorer = HeadScorer(lm, cache_hidden(lm, neutral_texts))
        kappa = scorer.stats([(steer, 2.0)]).kl
    """

    def __init__(self, lm: LoadedModel, cache: HiddenCache, *, chunk: int = 256,
                 max_base_bytes: int = BASE_CACHE_BYTES, force: bool = False):
        self.lm, self.cache, self.chunk, self.force, self._checked = lm, cache, chunk, force, set()
        self.targets, self.text_id, self.n_texts = cache.targets, cache.text_id, cache.n_texts
        self.E = lm.output_embeddings.detach().float()  # (V, d)
        bias = lm.lm_head_bias
        self.bias = None if bias is None else bias.detach().float()
        self.softcap = lm.softcap
        self.V = self.E.shape[0]
        self._eb: dict[str, torch.Tensor] = {}  # steer fingerprint -> E B (V, r)
        self._base: list[torch.Tensor] | None = None
        if cache.n_positions * self.V * 4 <= max_base_bytes:
            self._base = [self._base_logits(i) for i in range(0, cache.n_positions, chunk)]
        tgt0, rounding = [], []
        for i, z0 in self._base_chunks():
            tgt0.append(gather_targets(torch.log_softmax(self._cap(z0), -1), self.cache.targets[i : i + z0.shape[0]]))
            if not self.softcap:  # log p₀ sums to 1 up to rounding; the low-rank path measures from that sum
                rounding.append(_log_mass(z0.clone())[0].cpu())
        self.base_token_logprob = torch.cat(tgt0) if tgt0 else torch.zeros(0)  # (N,)
        self._base_log_mass = torch.cat(rounding) if rounding else torch.zeros(0)  # (N,) log Σ p₀, ≈ 0

    def _allowed(self, steer: Steer) -> None:
        if steer.kind not in HEAD_KINDS:
            raise SteerportError(f"a {steer.kind!r} steer acts inside the network, not at the LM head; "
                                 "measure it with ForwardScorer (scorer_for picks it)")

    def _hidden(self, i: int, n: int) -> torch.Tensor:
        return self.cache.h[i : i + n].to(self.E.device, torch.float32)  # (n, d)

    def _base_logits(self, i: int) -> torch.Tensor:
        """The unsteered logits (n, V) of the chunk at position i: normalised to log-probabilities on a
        plain head (a softmax does not see the shift, and the low-rank path needs them so), raw on a
        soft-capped one (the cap needs them raw)."""
        z = self._hidden(i, self.chunk) @ self.E.T  # (n, V)
        if self.bias is not None:
            z = z + self.bias
        return z if self.softcap else torch.log_softmax(z, -1)

    def _base_chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for k, i in enumerate(range(0, self.cache.n_positions, self.chunk)):
            yield i, (self._base[k] if self._base is not None else self._base_logits(i))

    def _cap(self, z: torch.Tensor) -> torch.Tensor:
        return z if not self.softcap else torch.tanh(z / self.softcap) * self.softcap

    def _eb_of(self, steer: Steer) -> torch.Tensor:
        key = steer.fingerprint  # not id(steer): ids are reused once a steer is freed
        if key not in self._eb:
            self._eb[key] = self.E @ steer.B.float().to(self.E.device)  # (V, r)
        return self._eb[key]

    def _steered_raw(self, h: torch.Tensor, raw: torch.Tensor, low_rank: list[tuple[torch.Tensor, torch.Tensor]],
                     others: list[SteerValue]) -> torch.Tensor:
        """Steered raw logits (n, V): ``low_rank`` holds (s ε A (d, r), E B (V, r)) per LM-Steer steer."""
        z = raw.clone()
        for A, EB in low_rank:
            z += (h @ A) @ EB.T  # (n, r) @ (r, V)
        if others:  # another head kind: its own hook on the head, minus the unsteered head
            head, x = self.lm.lm_head, h.to(self.lm.device, self.lm.dtype)
            with steered(self.lm, others, force=self.force):
                zs = head(x).float()
            z += (zs - head(x).float()).to(z.device)
        return z

    @torch.no_grad()
    def stats_many(self, settings: Sequence[Sequence[SteerValue]], *, shift: bool = False, kl: bool = True) -> list[SteerStats]:
        """:meth:`Scorer.stats_many`; LM-Steer steers on a head without soft-capping take the low-rank
        path (:meth:`_low_rank_stats`), which never forms a (n, V) array of log-probabilities."""
        checked = self._check(settings)
        if self.softcap or any(steer.kind != "lm-steer" for setting in checked for steer, _ in setting):
            return self._stats_from_chunks(checked, shift=shift, kl=kl)
        return self._low_rank_stats(checked, shift=shift, kl=kl)

    def _low_rank_stats(self, checked: list[list[SteerValue]], *, shift: bool, kl: bool) -> list[SteerStats]:
        """The same figures for LM-Steer settings, from the low-rank shift Δz = U (E B)ᵀ, U = h·sεA (n, R).

        With z = z₀ + Δz and normalisers ℓ₀, ℓ (logsumexp of z₀, z), log p − log p₀ = Δz − (ℓ − ℓ₀), so

            KL(p ‖ p₀) = Σ_v p_v Δz_v − (ℓ − ℓ₀) = rowsum(U ∘ (p E B)) − (ℓ − ℓ₀)

        and the mean shift of every entry is (Σ_n U_n)(E B)ᵀ / N − mean(ℓ − ℓ₀): per setting and chunk,
        one (n, V) add of the shift, one exponential and sum (p unnormalised, and ℓ from its mass), and for κ one
        (n, V)·(V, R) product. The base chunks hold log p₀, so ℓ − ℓ₀ comes out directly (no difference of two
        large normalisers), less log Σ p₀ (rounding, ~1e-7), so a zero shift gives κ = 0 exactly.
        """
        factors = []  # per setting: (sεA (d, R), E B (V, R)) of its steers side by side, or None when it has none
        for steers in checked:
            As = [steer.A.float().to(self.E.device) * (value * steer.epsilon) for steer, value in steers]
            factors.append((torch.cat(As, 1), torch.cat([self._eb_of(steer) for steer, _ in steers], 1)) if As else None)
        k = len(checked)
        total_kl, n_pos = [0.0] * k, 0
        tgt: list[list[torch.Tensor]] = [[] for _ in range(k)]
        u_sum = [torch.zeros(f[0].shape[1] if f is not None else 0) for f in factors]  # Σ_n U_n (R,)
        dlse_sum = [0.0] * k  # Σ_n (ℓ − ℓ₀)
        for i, lp0 in self._base_chunks():  # log p₀ (n, V): no soft cap on this path
            n = lp0.shape[0]
            h, targets, base_mass = self._hidden(i, n), self.targets[i : i + n], self._base_log_mass[i : i + n].to(lp0.device)
            has = targets >= 0
            rows, cols = torch.nonzero(has).flatten(), targets[has].to(lp0.device)
            for j, f in enumerate(factors):
                if f is None:  # no steer: the unsteered model
                    tgt[j].append(self.base_token_logprob[i : i + n])
                    continue
                A, EB = f
                U = h @ A  # (n, R)
                z = torch.addmm(lp0, U, EB.T)  # (n, V): log p₀ + Δz, the steered logits shifted by −ℓ₀
                z_target = z[rows, cols]
                log_mass, w, mass = _log_mass(z)  # ℓ − ℓ₀ (n,); p unnormalised (n, V), in z's memory; its mass (n,)
                lp = torch.full((n,), float("nan"))
                lp[has.cpu()] = (z_target - log_mass[rows]).cpu()
                tgt[j].append(lp)
                dlse = log_mass - base_mass  # exactly 0 for a zero shift
                if kl:  # a KL is ≥ 0: what falls below is rounding
                    total_kl[j] += float(((U * (w @ EB)).sum(1) / mass - dlse).clamp_min(0).double().sum())
                if shift:
                    u_sum[j] = u_sum[j] + U.sum(0).cpu()
                    dlse_sum[j] += float(dlse.double().sum())
            n_pos += n
        out = []
        for j, f in enumerate(factors):
            mean_shift = None
            if shift:
                mean_shift = torch.zeros(self.V) if f is None else (
                    (f[1] @ u_sum[j].to(f[1].device)).cpu() - dlse_sum[j]) / max(n_pos, 1)
            out.append(SteerStats(kl=total_kl[j] / max(n_pos, 1) if kl else float("nan"),
                                  token_logprob=torch.cat(tgt[j]) if tgt[j] else torch.zeros(0), logprob_shift=mean_shift))
        return out

    def _chunks(self, settings: list[list[SteerValue]]) -> Iterator[Chunk]:
        prepared = []  # per setting: the LM-Steer factors ready for the low-rank shift, and the other steers
        for steers in settings:
            low_rank = [(steer.A.float().to(self.E.device) * (value * steer.epsilon), self._eb_of(steer))
                        for steer, value in steers if steer.kind == "lm-steer"]
            prepared.append((low_rank, [(st, v) for st, v in steers if st.kind != "lm-steer"]))
        for i, raw in self._base_chunks():
            h = self._hidden(i, raw.shape[0])
            lp0 = torch.log_softmax(self._cap(raw), -1) if self.softcap else raw
            yield lp0, self.cache.targets[i : i + raw.shape[0]], [
                torch.log_softmax(self._cap(self._steered_raw(h, raw, low_rank, others)), -1) for low_rank, others in prepared]


class ForwardScorer(Scorer):
    """Score steer settings on ``texts`` by full forward passes: for steers that act inside the
    network (ActAdd), where the body's states change with the steer. Any kind works.

    The unsteered log-probs are kept when they fit in ``max_base_bytes``. ``token_logprob`` is
    flat over the texts' positions in text order, NaN at each text's last position (as a cache's).

    Example::

        scorer = ForwardScorer(lm, neutral_texts, max_tokens=64)
        kappa = scorer.stats([(actadd_steer, 4.0)]).kl
    """

    def __init__(self, lm: LoadedModel, texts: Sequence[str], *, batch_size: int = 8, max_tokens: int = 128,
                 max_base_bytes: int = BASE_CACHE_BYTES, force: bool = False):
        self.lm, self.force, self._checked = lm, force, set()
        self.batches = list(text_batches(lm, texts, batch_size, max_tokens))
        self.V, self.n_texts = lm.output_embeddings.shape[0], len(texts)
        lengths = torch.cat([b["attention_mask"].sum(1).cpu() for b in self.batches]) if self.batches else torch.zeros(0)
        self.text_id = torch.repeat_interleave(torch.arange(len(texts)), lengths.long())  # (N,)
        keep = self.text_id.numel() * self.V * 4 <= max_base_bytes
        self._base: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if keep else None
        targets, base_tgt = [], []
        with torch.no_grad():
            for b in self.batches:
                lp0, tgt = _forward_positions(lm, b)
                targets.append(tgt)
                base_tgt.append(gather_targets(lp0, tgt))
                if self._base is not None:
                    self._base.append((lp0, tgt))
        self.targets = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
        self.base_token_logprob = torch.cat(base_tgt) if base_tgt else torch.zeros(0)

    def _chunks(self, settings: list[list[SteerValue]]) -> Iterator[Chunk]:
        for k, batch in enumerate(self.batches):
            lp0, targets = self._base[k] if self._base is not None else _forward_positions(self.lm, batch)
            per_setting = []
            for steers in settings:
                with steered(self.lm, steers, force=self.force):
                    per_setting.append(_forward_positions(self.lm, batch)[0])
            yield lp0, targets, per_setting


def scorer_for(lm: LoadedModel, texts: Sequence[str], steers: Sequence[Steer], *, batch_size: int = 8,
               max_tokens: int = 128, chunk: int = 256, force: bool = False) -> HeadScorer | ForwardScorer:
    """A :class:`HeadScorer` on ``texts`` when every steer acts at the LM head, else a :class:`ForwardScorer`."""
    if all(s.kind in HEAD_KINDS for s in steers):
        return HeadScorer(lm, capture_hidden(lm, texts, batch_size=batch_size, max_tokens=max_tokens), chunk=chunk,
                          force=force)
    return ForwardScorer(lm, texts, batch_size=batch_size, max_tokens=max_tokens, force=force)


def mean_kl(
    lm: LoadedModel,
    texts: Sequence[str],
    steers: Sequence[SteerValue],
    *,
    batch_size: int = 8,
    max_tokens: int = 128,
    force: bool = False,
) -> float:
    """κ: mean over token positions of KL(p_steered ‖ p_unsteered) on ``texts``, in nats."""
    items = as_items(list(steers))
    return scorer_for(lm, texts, [s for s, _ in items], batch_size=batch_size, max_tokens=max_tokens,
                      force=force).stats(items).kl


def value_for_kl(
    lm: LoadedModel,
    texts: Sequence[str],
    steer: Steer,
    target: float,
    *,
    start: float = 1.0,
    rel_tol: float = 0.02,
    max_tokens: int = 128,
    batch_size: int = 8,
    force: bool = False,
    scorer: HeadScorer | ForwardScorer | None = None,
) -> BisectResult:
    """The steer value s > 0 whose κ on ``texts`` is ``target`` (:func:`steerport.metrics.find_value_for_kl`).

    Example::

        res = value_for_kl(lm, neutral("calib"), steer, 0.05)     # res.value, res.kl, res.history
    """
    sc = scorer or scorer_for(lm, texts, [steer], batch_size=batch_size, max_tokens=max_tokens, force=force)
    return find_value_for_kl(lambda v: sc.stats([(steer, v)]).kl, target, start=start, rel_tol=rel_tol)


def _log_mass(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log Σ_v exp(z_v) per row (n,), computed in place: also returns z's memory overwritten with
    exp(z − max) (n, V) and that array's row sums (n,)."""
    top = z.amax(1)
    w = z.sub_(top[:, None]).exp_()
    mass = w.sum(1)
    return top + mass.log(), w, mass

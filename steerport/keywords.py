"""Keywords of a steer: the tokens at both ends of its singular directions, and the tokens it
raises and lowers most on neutral text.

The paper's reading of a steer. With W = A Bᵀ = U S Vᵀ, the logit shift of token v is
Δz_v = ε hᵀ W e_v = ε Σ_i σ_i (hᵀu_i)(v_iᵀ e_v): the right singular directions v_i meet the
output embeddings. For the leading v_i we list the tokens whose embeddings project most
positively and most negatively on it. The SVD never forms d x d::

    A = Qa Ra, B = Qb Rb  (QR, d x r and r x r)    W = Qa (Ra Rbᵀ) Qbᵀ
    Ra Rbᵀ = Uc S Vcᵀ     (r x r SVD)              U = Qa Uc, V = Qb Vc   (d x r)

A singular pair's sign is arbitrary; we orient each pair so that the mean final hidden state
h̄ of neutral text has hᵀu_i > 0, so the "+" end lists tokens that direction *raises* at
positive values. Any kind of steer also gets the measured mean log-prob shift of every token
on neutral text (:func:`logit_shift`).

Example::

    dirs = svd_keywords(steer, lm.output_embeddings, lm.tokenizer, k=10, h_mean=mean_hidden(lm, texts))
    kw = steer_keywords(lm, steer, k=10, value=2.0)      # kw.raised, kw.lowered, kw.directions
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from steerport.capture import cache_hidden
from steerport.errors import SteerportError
from steerport.hooks import check_compatible
from steerport.models import LoadedModel
from steerport.scoring import HeadScorer, scorer_for
from steerport.steer import Steer
from steerport.texts import neutral


def default_neutral(n: int = 16) -> list[str]:
    """Neutral text when the user gives none: the first ``n`` paragraphs of the bundled ``calib`` split."""
    return neutral("calib", n)


# --------------------------------------------------------------------------- SVD keywords


def steer_svd(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of W = A Bᵀ from its factors: returns U (d, r), S (r,), V (d, r) with W = U diag(S) Vᵀ."""
    A, B = A.double(), B.double()  # (d, r)
    Qa, Ra = torch.linalg.qr(A)  # (d, r), (r, r)
    Qb, Rb = torch.linalg.qr(B)
    Uc, S, Vch = torch.linalg.svd(Ra @ Rb.T)  # core (r, r)
    return (Qa @ Uc).float(), S.float(), (Qb @ Vch.T).float()


@dataclass
class Keyword:
    token_id: int
    surface: str  # decoded text of the token (leading space kept)
    score: float


@dataclass
class Direction:
    """One singular direction of W and the tokens at both ends of it."""

    index: int
    singular_value: float
    share: float  # σ_i² / Σσ²
    positive: list[Keyword]
    negative: list[Keyword]
    oriented: bool  # True when the sign was fixed by the mean hidden state


def token_surfaces(tokenizer) -> list[str]:
    """Decoded surface of every token id (byte-level Ġ / SentencePiece ▁ resolved by the tokenizer)."""
    n = len(tokenizer)
    return [tokenizer.decode([i]) for i in range(n)]


def _keep_mask(tokenizer, surfaces: list[str], V: int) -> torch.Tensor:
    """Tokens worth listing: not special, decodes to visible text, no broken UTF-8 piece."""
    keep = torch.ones(V, dtype=torch.bool)
    for i in getattr(tokenizer, "all_special_ids", []):
        if i < V:
            keep[i] = False
    for i, s in enumerate(surfaces[:V]):
        visible = any(ch.isprintable() and not ch.isspace() for ch in s)
        if not visible or "\ufffd" in s or (s.startswith("<") and s.endswith(">") and len(s) > 2):
            keep[i] = False
    keep[len(surfaces):] = False  # padding rows of the embedding matrix beyond the tokenizer
    return keep


def _top(scores: torch.Tensor, keep: torch.Tensor, surfaces: list[str], k: int, largest: bool) -> list[Keyword]:
    """The k best kept tokens, one per stripped surface."""
    masked = scores.masked_fill(~keep, float("-inf") if largest else float("inf"))
    order = torch.argsort(masked, descending=largest)
    out: list[Keyword] = []
    seen: set[str] = set()
    for i in order.tolist():
        if not keep[i]:
            break
        key = surfaces[i].strip()
        if key in seen:
            continue
        seen.add(key)
        out.append(Keyword(i, surfaces[i], float(scores[i])))
        if len(out) == k:
            break
    return out


def svd_keywords(
    steer: Steer,
    E: torch.Tensor,
    tokenizer,
    *,
    k: int = 20,
    n_directions: int = 3,
    h_mean: torch.Tensor | None = None,
    surfaces: list[str] | None = None,
) -> list[Direction]:
    """For the leading right singular directions of W, the tokens projecting most +/- on them.

    E: output embeddings (V, d). ``h_mean`` (d): mean final hidden state used to orient signs.
    """
    if steer.kind != "lm-steer":
        raise SteerportError(f"keywords by SVD need an lm-steer steer; this one is {steer.kind!r}")
    if E.shape[1] != steer.hidden_size:
        raise SteerportError(f"steer has hidden size {steer.hidden_size} but the embeddings have {E.shape[1]}")
    U, S, V = steer_svd(steer.A, steer.B)
    E = E.detach().float().cpu()
    surfaces = surfaces if surfaces is not None else token_surfaces(tokenizer)
    keep = _keep_mask(tokenizer, surfaces, E.shape[0])
    total = float((S**2).sum()) or 1.0
    dirs = []
    for i in range(min(n_directions, S.shape[0])):
        u, v = U[:, i], V[:, i]
        if h_mean is not None and float(h_mean.float().cpu() @ u) != 0.0:
            sign = 1.0 if float(h_mean.float().cpu() @ u) > 0 else -1.0
            oriented = True
        else:  # deterministic fallback: largest entry of v positive
            sign = 1.0 if float(v[v.abs().argmax()]) > 0 else -1.0
            oriented = False
        proj = E @ (sign * v)  # (V,)
        dirs.append(
            Direction(
                index=i,
                singular_value=float(S[i]),
                share=float(S[i] ** 2) / total,
                positive=_top(proj, keep, surfaces, k, largest=True),
                negative=_top(proj, keep, surfaces, k, largest=False),
                oriented=oriented,
            )
        )
    return dirs


def mean_hidden(lm: LoadedModel, texts: Sequence[str], *, batch_size: int = 8, max_tokens: int = 128) -> torch.Tensor:
    """Mean final hidden state h̄ (d,) at the LM-head input over the tokens of ``texts``."""
    cache = cache_hidden(lm, texts, max_tokens=max_tokens, tokens_per_batch=batch_size * max_tokens)
    if cache.n_positions == 0:
        raise SteerportError("no tokens in the neutral text")
    return cache.h.float().mean(0)


def logit_shift(
    lm: LoadedModel,
    steer: Steer,
    texts: Sequence[str],
    value: float,
    *,
    batch_size: int = 8,
    max_tokens: int = 128,
    force: bool = False,
) -> torch.Tensor:
    """Mean over the tokens of ``texts`` of log p_s(v) − log p_0(v), for every token v: (V,).

    Measured by :func:`steerport.scoring.scorer_for` (the head alone for steers that act there).
    """
    scorer = scorer_for(lm, texts, [steer], batch_size=batch_size, max_tokens=max_tokens, force=force)
    shift = scorer.stats([(steer, value)], shift=True).logprob_shift
    assert shift is not None  # asked for with shift=True
    return shift


@dataclass
class Keywords:
    """Everything ``steerport inspect --keywords`` shows."""

    directions: list[Direction]
    value: float
    raised: list[Keyword]
    lowered: list[Keyword]
    n_neutral_texts: int

    def to_json(self) -> dict:
        return asdict(self)


def steer_keywords(
    lm: LoadedModel,
    steer: Steer,
    *,
    k: int = 20,
    n_directions: int = 3,
    value: float = 1.0,
    texts: Sequence[str] | None = None,
    force: bool = False,
) -> Keywords:
    """SVD keywords (LM-Steer only) and the tokens the steer raises/lowers most on neutral text."""
    check_compatible(lm, steer, force=force)
    texts = list(texts) if texts else default_neutral()
    surfaces = token_surfaces(lm.tokenizer)
    E = lm.output_embeddings.detach().float().cpu()
    keep = _keep_mask(lm.tokenizer, surfaces, E.shape[0])
    scorer = scorer_for(lm, texts, [steer], force=force)  # one body pass serves h̄ and the shift
    directions = []
    if isinstance(scorer, HeadScorer) and steer.kind == "lm-steer":
        directions = svd_keywords(steer, E, lm.tokenizer, k=k, n_directions=n_directions,
                                  h_mean=scorer.cache.h.float().mean(0), surfaces=surfaces)
    shift = scorer.stats([(steer, value)], shift=True).logprob_shift
    assert shift is not None  # asked for with shift=True
    return Keywords(
        directions=directions,
        value=value,
        raised=_top(shift, keep, surfaces, k, largest=True),
        lowered=_top(shift, keep, surfaces, k, largest=False),
        n_neutral_texts=len(texts),
    )

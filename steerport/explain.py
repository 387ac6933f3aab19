"""Looking inside a steer: keywords of its singular directions, tokens it pushes, evidence spans.

Keywords (the paper's reading of a steer). With W = A Bᵀ = U S Vᵀ, the logit shift of
token v is Δz_v = ε hᵀ W e_v = ε Σ_i σ_i (hᵀu_i)(v_iᵀ e_v): the right singular directions
v_i meet the output embeddings. For the leading v_i we list the tokens whose embeddings
project most positively and most negatively on it. The SVD never forms d x d::

    A = Qa Ra, B = Qb Rb  (QR, d x r and r x r)    W = Qa (Ra Rbᵀ) Qbᵀ
    Ra Rbᵀ = Uc S Vcᵀ     (r x r SVD)              U = Qa Uc, V = Qb Vc   (d x r)

A singular pair's sign is arbitrary; we orient each pair so that the mean final hidden state
h̄ of neutral text has hᵀu_i > 0, so the "+" end lists tokens that direction *raises* at
positive values.

Evidence: for one text, the per-token log-likelihood difference
Δ_t = log p_{+s}(x_t | x_<t) − log p_{−s}(x_t | x_<t); the steer-as-classifier score is its
mean. :func:`top_spans` finds the few contiguous spans that carry most of it.

Example::

    dirs = svd_keywords(steer, lm.output_embeddings, lm.tokenizer, k=10, h_mean=mean_hidden(lm, texts))
    ex = explain_text(lm, steer, "What a wonderful, kind film.", value=5.0)
    print(ex.spans[0].text, ex.spans[0].share)
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from steerport.errors import SteerportError
from steerport.hooks import check_compatible, input_of, steered
from steerport.models import LoadedModel
from steerport.scoring import batches, token_logprobs
from steerport.steer import Steer

# A few neutral, encyclopedic sentences (written for steerport): the fallback neutral text when
# the bundled paragraphs (steerport/data/neutral_text.txt) are not there.
NEUTRAL = [
    "The river flows north through the valley before it reaches the sea.",
    "The committee met on Tuesday to discuss the annual budget.",
    "The station was built in 1902 and rebuilt after the war.",
    "Most of the population lives in the two largest cities.",
    "The album was recorded in London over a period of three months.",
    "The species is found in forests at altitudes up to 2,000 metres.",
    "He was born in a small town and studied law at the university.",
    "The bridge carries four lanes of traffic and a railway line.",
    "The game is played on a board with sixty-four squares.",
    "The report lists the number of schools in each district.",
    "The building has three floors and a library on the ground floor.",
    "The company moved its offices to the city centre in 1995.",
]


def default_neutral(n: int = 16) -> list[str]:
    """Neutral text when the user gives none: the bundled WikiText-2 calibration paragraphs."""
    try:
        from steerport.transfer import neutral_texts

        return neutral_texts("calib")[:n] or NEUTRAL
    except (ImportError, OSError):
        return NEUTRAL


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


@torch.no_grad()
def mean_hidden(lm: LoadedModel, texts: Sequence[str], *, batch_size: int = 8, max_tokens: int = 128) -> torch.Tensor:
    """Mean final hidden state h̄ (d,) at the LM-head input over the tokens of ``texts``."""
    total, count = None, 0
    for batch in batches(lm, texts, batch_size, max_tokens):
        h = input_of(lm.model, lm.lm_head, **batch).float()  # (b, T, d)
        mask = batch["attention_mask"].bool()
        s = h[mask].sum(0)
        total = s if total is None else total + s
        count += int(mask.sum())
    if total is None or count == 0:
        raise SteerportError("no tokens in the neutral text")
    return (total / count).cpu()


@torch.no_grad()
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
    """Mean over the tokens of ``texts`` of log p_s(v) − log p_0(v), for every token v: (V,)."""
    total, count = None, 0
    for batch in batches(lm, texts, batch_size, max_tokens):
        base = torch.log_softmax(lm.model(**batch).logits.float(), -1)  # (b, T, V)
        with steered(lm, [(steer, value)], force=force):
            new = torch.log_softmax(lm.model(**batch).logits.float(), -1)
        mask = batch["attention_mask"].bool()
        s = (new - base)[mask].sum(0)  # (V,)
        total = s if total is None else total + s
        count += int(mask.sum())
    if total is None or count == 0:
        raise SteerportError("no tokens in the neutral text")
    return (total / count).cpu()


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
    directions = []
    if steer.kind == "lm-steer":
        directions = svd_keywords(steer, E, lm.tokenizer, k=k, n_directions=n_directions,
                                  h_mean=mean_hidden(lm, texts), surfaces=surfaces)
    shift = logit_shift(lm, steer, texts, value, force=force)
    return Keywords(
        directions=directions,
        value=value,
        raised=_top(shift, keep, surfaces, k, largest=True),
        lowered=_top(shift, keep, surfaces, k, largest=False),
        n_neutral_texts=len(texts),
    )


# --------------------------------------------------------------------------- evidence spans


@dataclass
class TokenEvidence:
    surface: str
    start: int  # character offsets into the text
    end: int
    delta: float  # log p_{+s} − log p_{−s} of this token (0 for the first token: not predicted)


@dataclass
class Span:
    first: int  # token index, inclusive
    last: int  # token index, inclusive
    start: int  # character offsets
    end: int
    text: str
    total: float  # Σ Δ over the span
    share: float  # |total| / Σ over the text of the |Δ| pointing the same way


@dataclass
class Explanation:
    text: str
    value: float
    positive: str
    score: float  # mean Δ over predicted tokens: the steer-as-classifier score
    tokens: list[TokenEvidence]
    spans: list[Span] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _best_segment(x: list[float], blocked: list[bool]) -> tuple[int, int, float] | None:
    """Kadane: the contiguous run of unblocked positions with the largest positive sum."""
    best, cur, start = None, 0.0, 0
    for i, xi in enumerate(x):
        if blocked[i]:
            cur, start = 0.0, i + 1
            continue
        if cur <= 0:
            cur, start = xi, i
        else:
            cur += xi
        if cur > 0 and (best is None or cur > best[2]):
            best = (start, i, cur)
    return best


def top_spans(deltas: Sequence[float], k: int = 3, *, min_share: float = 0.1, tightness: float = 0.25) -> list[tuple[int, int, float]]:
    """The ≤ k non-overlapping contiguous spans carrying most of the evidence, both directions.

    Each step takes the best remaining segment (largest Σ of d·Δ_t − λ, d = ±1, λ =
    ``tightness`` · mean |Δ| so spans do not swallow near-zero neighbours); a span is kept only
    if it carries at least ``min_share`` of the mass in its direction. Returns
    (first, last, Σ Δ) with inclusive token indices, strongest first.
    """
    x = [float(d) for d in deltas]
    n = len(x)
    if n == 0:
        return []
    lam = tightness * sum(abs(v) for v in x) / n
    mass = {1: sum(v for v in x if v > 0), -1: -sum(v for v in x if v < 0)}
    blocked = [False] * n
    spans: list[tuple[int, int, float]] = []
    while len(spans) < k:
        best = None
        for sign in (1, -1):
            if mass[sign] <= 0:
                continue
            seg = _best_segment([sign * v - lam for v in x], blocked)
            if seg is None:
                continue
            i, j, _ = seg
            total = sum(x[i : j + 1])
            if sign * total < min_share * mass[sign]:
                continue
            if best is None or abs(total) > abs(best[2]):
                best = (i, j, total)
        if best is None:
            break
        spans.append(best)
        for t in range(best[0], best[1] + 1):
            blocked[t] = True
    return sorted(spans, key=lambda s: -abs(s[2]))


def token_offsets(tokenizer, text: str, max_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (as the scorer tokenizes it) and each token's character span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, truncation=True, max_length=max_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # slow tokenizers have no offsets: cut the text where the decoded prefixes end
    ids = list(tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"])
    offsets, prev = [], 0
    for i in range(1, len(ids) + 1):
        end = min(len(tokenizer.decode(ids[:i], skip_special_tokens=True)), len(text))
        offsets.append((prev, end))
        prev = end
    return ids, offsets


def explain_text(
    lm: LoadedModel,
    steer: Steer,
    text: str,
    value: float = 1.0,
    *,
    k: int = 3,
    max_tokens: int = 1024,
    force: bool = False,
) -> Explanation:
    """Per-token evidence Δ_t = log p_{+s}(x_t) − log p_{−s}(x_t) and the spans that carry it."""
    if not text.strip():
        raise SteerportError("nothing to explain: the text is empty")
    if value == 0:
        raise SteerportError("value must be non-zero: evidence compares +value against -value")
    ids, offsets = token_offsets(lm.tokenizer, text, max_tokens)
    plus = token_logprobs(lm, [text], [(steer, value)], max_tokens=max_tokens, force=force)[0]
    minus = token_logprobs(lm, [text], [(steer, -value)], max_tokens=max_tokens, force=force)[0]
    delta = [0.0] + (plus - minus).tolist()  # the first token is not predicted
    if len(delta) != len(ids):
        raise SteerportError(f"tokenization mismatch: {len(ids)} tokens but {len(delta)} scores")
    tokens = []
    for (a, b), d, i in zip(offsets, delta, ids):
        surface = text[a:b] if b > a else lm.tokenizer.decode([i])
        tokens.append(TokenEvidence(surface, a, b, d))
    spans = []
    for first, last, total in top_spans(delta[1:], k):
        first, last = first + 1, last + 1
        same = sum(d for d in delta if d * total > 0)
        a, b = tokens[first].start, tokens[last].end
        spans.append(Span(first, last, a, b, text[a:b], total, abs(total) / abs(same) if same else 0.0))
    score = float((plus - minus).mean()) if plus.numel() else 0.0
    return Explanation(text, value, steer.positive, score, tokens, spans)


# --------------------------------------------------------------------------- rendering


def _scale(tokens: list[TokenEvidence]) -> float:
    return max((abs(t.delta) for t in tokens), default=0.0) or 1.0


def render_rich(ex: Explanation):
    """A rich Text: green background where a token supports +, red where it supports −; spans underlined."""
    from rich.text import Text

    top = _scale(ex.tokens)
    in_span = set()
    for sp in ex.spans:
        in_span.update(range(sp.first, sp.last + 1))
    out = Text()
    cursor = 0
    for i, t in enumerate(ex.tokens):
        if t.start > cursor:
            out.append(ex.text[cursor : t.start])
        a = min(abs(t.delta) / top, 1.0)
        level = int(40 + 160 * a)
        colour = f"rgb(0,{level},0)" if t.delta > 0 else f"rgb({level},0,0)"
        style = f"on {colour}" if a > 0.05 else ""
        if i in in_span:
            style += " underline bold"
        out.append(ex.text[t.start : t.end] if t.end > t.start else "", style=style.strip() or None)
        cursor = max(cursor, t.end)
    out.append(ex.text[cursor:])
    return out


def render_html(ex: Explanation, title: str = "steerport explain") -> str:
    """A self-contained HTML page: tokens shaded by evidence (hover for Δ), the spans listed."""
    top = _scale(ex.tokens)
    in_span = set()
    for sp in ex.spans:
        in_span.update(range(sp.first, sp.last + 1))
    parts = []
    cursor = 0
    for i, t in enumerate(ex.tokens):
        if t.start > cursor:
            parts.append(html.escape(ex.text[cursor : t.start]))
        a = min(abs(t.delta) / top, 1.0)
        rgb = "40,160,60" if t.delta > 0 else "210,50,50"
        border = "border-bottom:2px solid #222;" if i in in_span else ""
        parts.append(
            f'<span style="background:rgba({rgb},{a:.2f});{border}" title="Δ = {t.delta:+.3f}">'
            f"{html.escape(ex.text[t.start:t.end])}</span>"
        )
        cursor = max(cursor, t.end)
    parts.append(html.escape(ex.text[cursor:]))
    rows = "".join(
        f"<tr><td>{html.escape(sp.text)}</td><td>{sp.total:+.3f}</td><td>{sp.share:.0%}</td></tr>" for sp in ex.spans
    )
    positive = html.escape(ex.positive or "+")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto;line-height:1.9}}
.text{{font-size:1.2em;padding:1em;border:1px solid #ccc}} td,th{{padding:.2em .8em;text-align:left}}</style></head>
<body><h2>{html.escape(title)}</h2>
<p>Per-token evidence Δ = log p(+{ex.value:g}) − log p(−{ex.value:g}): <span style="background:rgba(40,160,60,.6)">green</span>
supports <b>{positive}</b>, <span style="background:rgba(210,50,50,.6)">red</span> the opposite; underlined: the spans below.
Score (mean Δ) = {ex.score:+.4f}.</p>
<div class="text">{''.join(parts)}</div>
<h3>Spans</h3><table><tr><th>span</th><th>Σ Δ</th><th>share</th></tr>{rows}</table>
</body></html>
"""

"""Evidence for a steer in one text: per-token log-likelihood differences, the spans that
carry them, and their rendering (terminal and HTML).

For one text, Δ_t = log p_{+s}(x_t | x_<t) − log p_{−s}(x_t | x_<t); the steer-as-classifier
score is its mean. :func:`top_spans` finds the few contiguous spans that carry most of it.
Keywords of a steer (SVD directions, logit shifts) are in :mod:`steerport.keywords`,
re-exported here.

Example::

    ex = explain_text(lm, steer, "What a wonderful, kind film.", value=5.0)
    print(ex.spans[0].text, ex.spans[0].share)
    page = render_html(ex)
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

from steerport.errors import SteerportError
from steerport.keywords import (  # noqa: F401  (re-exported: they used to live here)
    Direction,
    Keyword,
    Keywords,
    default_neutral,
    logit_shift,
    mean_hidden,
    steer_keywords,
    steer_svd,
    svd_keywords,
    token_surfaces,
)
from steerport.models import LoadedModel
from steerport.scoring import token_logprobs
from steerport.steer import Steer

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
        surface = text[a:b] if b > a else cast(str, lm.tokenizer.decode([i]))  # one id list decodes to one str
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
    in_span: set[int] = set()
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
    in_span: set[int] = set()
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

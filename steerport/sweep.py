"""Value sweeps: how strong is a steer at each value s, and what does it cost?

For each value s on a grid:

- κ(s): mean KL(p_s ‖ p_0) over the tokens of neutral text (the KL budget);
- Sep(s) = [ℓ_s(D+) − ℓ_0(D+)] − [ℓ_s(D−) − ℓ_0(D−)] on labeled texts, when given
  (ℓ = mean per-token log-likelihood; positive means the steer favours its positive class);
- a few greedy continuations of prompts, when given, to read.

Written as JSON and plotted (matplotlib's Figure API) to PNG: the picture for choosing a value.
Also here: :func:`read_labeled`, the labeled-text reader ``score`` and ``sweep`` use (labels optional).

Example::

    rows = sweep(lm, steer, parse_values("-10:10:11"), neutral=texts, labeled=(docs, labels))
    plot_sweep(rows, "sweep.png", title="positive.st on smollm2-135m")
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steerport.errors import SteerportError
from steerport.fileio import atomic_write_bytes
from steerport.hooks import generate
from steerport.models import LoadedModel
from steerport.scoring import scorer_for
from steerport.steer import Steer
from steerport.texts import read_texts_and_labels

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def parse_values(spec: str) -> list[float]:
    """``"-10:10:11"`` -> 11 evenly spaced values from -10 to 10; ``"-5,0,5"`` -> a list."""
    try:
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) != 3:
                raise ValueError
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
            if n < 2:
                raise SteerportError(f"--values {spec!r}: need at least 2 points")
            return [round(v, 10) for v in torch.linspace(lo, hi, n, dtype=torch.float64).tolist()]
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise SteerportError(f"--values {spec!r}: use START:STOP:COUNT (e.g. -10:10:11) or a comma list (e.g. -5,0,5)") from None
    if not values:
        raise SteerportError(f"--values {spec!r}: no values")
    return values


def read_labeled(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    positive_labels: Sequence[str] | None = None,
) -> tuple[list[str], list[int] | None]:
    """Texts and (if present) 0/1 labels: :func:`steerport.texts.read_texts_and_labels` with
    labels optional (a .txt file, one text a line, has none). ``positive_labels``: the label
    values (compared as strings) that mean the steer's positive class; default ``["1"]``."""
    return read_texts_and_labels(path, text_field=text_field, label_field=label_field,
                                 positive_labels=tuple(positive_labels or ("1",)), require_labels=False)


def recorded_positive_labels(steer: Steer) -> list[str] | None:
    """The label values the trainer mapped to +1, as recorded in the steer (meta.data.label_mapping)."""
    mapping = (steer.meta.get("data") or {}).get("label_mapping") if isinstance(steer.meta.get("data"), dict) else None
    if isinstance(mapping, dict) and isinstance(mapping.get("positive"), list) and mapping["positive"]:
        return [str(v) for v in mapping["positive"]]
    if mapping == "labels are +1/-1":
        return ["1"]
    return None


@dataclass
class SweepRow:
    value: float
    kl: float  # κ(s), nats per token
    separation: float | None = None  # Sep(s), nats per token
    pos_shift: float | None = None  # ℓ_s(D+) − ℓ_0(D+)
    neg_shift: float | None = None  # ℓ_s(D−) − ℓ_0(D−)
    attribute_rate: float | None = None  # from a judge, when one is given
    samples: list[str] | None = None


def sweep(
    lm: LoadedModel,
    steer: Steer,
    values: Sequence[float],
    *,
    neutral: Sequence[str],
    labeled: tuple[Sequence[str], Sequence[int]] | None = None,
    prompts: Sequence[str] = (),
    max_new_tokens: int = 30,
    judge: Callable[[list[str]], float] | None = None,
    force: bool = False,
    max_tokens: int = 128,
    progress: Callable[[float], None] | None = None,
) -> list[SweepRow]:
    """κ, separation and (optionally) generations + judge attribute rate at every value.

    The model body runs once on the neutral and once on the labeled texts; each value then costs
    a pass of the LM head (:class:`steerport.scoring.HeadScorer`; a full pass for ActAdd steers).
    """
    kl_scorer = scorer_for(lm, neutral, [steer], max_tokens=max_tokens, force=force)
    if labeled is not None:
        texts, labels = list(labeled[0]), list(labeled[1])
        if not any(labels) or all(labels):
            raise SteerportError("separation needs texts of both classes in --data")
        y = torch.tensor(labels, dtype=torch.bool)
        lab_scorer = scorer_for(lm, texts, [steer], max_tokens=max_tokens, force=force)
        base = lab_scorer.text_means(lab_scorer.base_token_logprob)  # (n,)
    rows = []
    for s in values:
        row = SweepRow(value=float(s), kl=kl_scorer.stats([(steer, s)]).kl)
        if labeled is not None:
            (got,) = lab_scorer.stats_many([[(steer, s)]], kl=False)
            shift = lab_scorer.text_means(got.token_logprob) - base
            row.pos_shift, row.neg_shift = float(shift[y].mean()), float(shift[~y].mean())
            row.separation = row.pos_shift - row.neg_shift
        if prompts:
            outs = generate(lm, list(prompts), [(steer, s)], max_new_tokens=max_new_tokens, force=force)
            row.samples = outs
            if judge is not None:
                row.attribute_rate = float(judge(outs))
        rows.append(row)
        if progress:
            progress(s)
    return rows


def sweep_json(rows: list[SweepRow], meta: dict) -> dict:
    return {**meta, "rows": [asdict(r) for r in rows]}


def plot_sweep(rows: list[SweepRow], path: str | Path, *, title: str = "") -> Path:
    """Effect (attribute rate or separation) and κ against the value, on two y axes; PNG."""
    from matplotlib.figure import Figure

    xs = [r.value for r in rows]
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
    effect_axis: Axes | None = ax
    handles = []
    if any(r.attribute_rate is not None for r in rows):
        # matplotlib draws None as a gap, but its stubs do not admit None in the y values
        handles += ax.plot(xs, [r.attribute_rate for r in rows], "o-", color="tab:green",  # type: ignore[arg-type]
                           label="attribute rate (judge)")
        ax.set_ylabel("attribute rate")
    elif any(r.separation is not None for r in rows):
        handles += ax.plot(xs, [r.separation for r in rows], "o-", color="tab:green",  # type: ignore[arg-type]  # None: a gap
                           label="separation Sep(s)")
        ax.axhline(0, color="#999", lw=0.8)
        ax.set_ylabel("separation (nats/token)")
    else:
        effect_axis = None
    kl_axis = ax.twinx() if effect_axis is not None else ax
    handles += kl_axis.plot(xs, [r.kl for r in rows], "s--", color="tab:purple", label="κ = mean KL(p_s‖p_0)")
    kl_axis.set_ylabel("κ (nats/token)")
    ax.set_xlabel("steer value s")
    ax.axvline(0, color="#bbb", lw=0.8)
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())

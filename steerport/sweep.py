"""Value sweeps: how strong is a steer at each value s, and what does it cost?

For each value s on a grid:

- κ(s): mean KL(p_s ‖ p_0) over the tokens of neutral text (the KL budget, DESIGN.md §5);
- Sep(s) = [ℓ_s(D+) − ℓ_0(D+)] − [ℓ_s(D−) − ℓ_0(D−)] on labeled texts, when given
  (ℓ = mean per-token log-likelihood; positive means the steer favours its positive class);
- a few greedy continuations of prompts, when given, to read.

Written as JSON and plotted (matplotlib, Agg) to PNG: the picture for choosing a value.
Also here: :func:`read_labeled`, the small labeled-text reader ``score`` and ``sweep`` use.

Example::

    rows = sweep(lm, steer, parse_values("-10:10:11"), neutral=texts, labeled=(docs, labels))
    plot_sweep(rows, "sweep.png", title="positive.st on smollm2-135m")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from steerport.errors import SteerportError
from steerport.hooks import generate
from steerport.models import LoadedModel
from steerport.scoring import mean_kl, mean_logprob
from steerport.steer import Steer


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
    """Texts and (if present) 0/1 labels from a .jsonl file (or a .txt file, one text a line).

    ``positive_labels``: the label values (compared as strings) that mean the steer's
    positive class; default ``["1"]``. Labels must be present on all rows or on none.
    """
    path = Path(path)
    if not path.is_file():
        raise SteerportError(f"{path}: no such data file")
    pos = {str(p) for p in (positive_labels or ["1"])}
    texts: list[str] = []
    labels: list[int] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            texts.append(line)
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise SteerportError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise SteerportError(f"{path}:{n}: no string field {text_field!r}")
        texts.append(row[text_field])
        if label_field in row:
            value = row[label_field]
            labels.append(1 if str(value) in pos else 0)
        elif labels:
            raise SteerportError(f"{path}:{n}: no {label_field!r} field, but earlier rows have one")
    if not texts:
        raise SteerportError(f"{path}: no texts")
    if labels and len(labels) != len(texts):
        raise SteerportError(f"{path}: {len(texts) - len(labels)} row(s) lack the {label_field!r} field")
    return texts, (labels or None)


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
    """κ, separation and (optionally) generations + judge attribute rate at every value."""
    if labeled is not None:
        texts, labels = list(labeled[0]), list(labeled[1])
        if not any(labels) or all(labels):
            raise SteerportError("separation needs texts of both classes in --data")
        y = torch.tensor(labels, dtype=torch.bool)
        base = mean_logprob(lm, texts, [], max_tokens=max_tokens)  # (n,)
    rows = []
    for s in values:
        row = SweepRow(value=float(s), kl=mean_kl(lm, neutral, [(steer, s)], force=force, max_tokens=max_tokens))
        if labeled is not None:
            shift = mean_logprob(lm, texts, [(steer, s)], force=force, max_tokens=max_tokens) - base
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.value for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    effect_axis = ax
    handles = []
    if any(r.attribute_rate is not None for r in rows):
        handles += ax.plot(xs, [r.attribute_rate for r in rows], "o-", color="tab:green", label="attribute rate (judge)")
        ax.set_ylabel("attribute rate")
    elif any(r.separation is not None for r in rows):
        handles += ax.plot(xs, [r.separation for r in rows], "o-", color="tab:green", label="separation Sep(s)")
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path

"""Labeled text for training steers: reading, label mapping, limits and held-out splits.

Sources:

* a JSONL or CSV/TSV file with a text field and a label field (``read_labeled``). Labels map to
  the steer value s each text is trained under: ``positive_labels`` -> +1, ``negative_labels``
  (or every other value when none are given) -> -1; ``real=True`` uses numeric labels as they
  are (e.g. SST-5's ``lmsteer_label`` = label/2 - 1 in [-1, 1]; zero-valued rows are dropped);
  labels that are already exactly +1/-1 need no mapping.
* two plain-text files, one text per line (``read_text_pair``).
* a built-in name (``sst2``, ``paradetox``): the small slices shipped in ``steerport/data``.

Every problem is a one-line :class:`SteerportError` naming the file and line.

Example::

    data = load_data(DataOptions(files=["train.jsonl"], positive_labels=("0",), positive_name="non-toxic"))
    print(data.summary["counts"])     # {'train': {'positive': .., 'negative': ..}, 'heldout': {...}}
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerport.capture import pack_by_length, tokenize
from steerport.errors import SteerportError
from steerport.fileio import sha256_file
from steerport.texts import bundled, read_file_text, read_rows

__all__ = ["BUILTINS", "Builtin", "DataOptions", "Dataset", "Example", "class_counts", "load_data",
           "pack_by_length", "read_labeled", "read_text_pair", "split", "tokenize"]  # the last ones from steerport.capture


@dataclass(frozen=True)
class Builtin:
    """A vendored data slice with its label mapping."""

    path: Path
    positive_labels: tuple[str, ...]
    positive_name: str
    test_path: Path


BUILTINS: dict[str, Builtin] = {
    "sst2": Builtin(bundled("sst2-train"), ("1",), "positive sentiment", bundled("sst2-test")),
    "paradetox": Builtin(bundled("paradetox-train"), ("0",), "non-toxic", bundled("paradetox-test")),
}


@dataclass(frozen=True)
class Example:
    """One labeled text; ``label`` is the steer value it trains under (+1, -1, or real)."""

    text: str
    label: float
    where: str  # "file:line"


@dataclass
class DataOptions:
    """How to read and split the training data (see :func:`load_data`)."""

    files: Sequence[str | Path] = ()
    text_field: str = "text"
    label_field: str = "label"
    positive_labels: Sequence[str] = ()
    negative_labels: Sequence[str] = ()
    real: bool = False
    positive_file: str | Path | None = None
    negative_file: str | Path | None = None
    positive_name: str = ""
    limit_per_class: int | None = None
    heldout_fraction: float = 0.1
    seed: int = 0


@dataclass
class Dataset:
    """Training and held-out examples plus a JSON-able summary for the steer's metadata."""

    train: list[Example]
    heldout: list[Example]
    positive_name: str
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def _label_key(value: Any) -> str:
    """Labels compare as strings: 1, 1.0 and "1" are the same label; true/false for booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_labeled(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    positive_labels: Sequence[str] = (),
    negative_labels: Sequence[str] = (),
    real: bool = False,
) -> tuple[list[Example], dict[str, int]]:
    """Read a JSONL/CSV file into examples; returns (examples, {"skipped": n, "neutral": n}).

    Mapping: ``real`` uses the numeric label as s (zero rows dropped as "neutral");
    otherwise ``positive_labels`` -> +1 and ``negative_labels`` -> -1, every other label is
    negative when no negative labels are given and skipped when they are; with neither,
    labels must already be +1/-1.
    """
    path = Path(path)
    rows = read_rows(path, "data file")
    pos = {_label_key(v) for v in positive_labels}
    neg = {_label_key(v) for v in negative_labels}
    if pos & neg:
        raise SteerportError(f"label(s) {', '.join(sorted(pos & neg))} are given as both positive and negative")
    if real and (pos or neg):
        raise SteerportError("use either real-valued labels or --positive-label/--negative-label, not both")
    examples: list[Example] = []
    counts = {"skipped": 0, "neutral": 0}
    seen: Counter[str] = Counter()
    for n, row in rows:
        where = f"{path}:{n}"
        if text_field not in row:
            raise SteerportError(f"{where}: no {text_field!r} field (fields: {', '.join(map(str, row)) or 'none'})")
        if label_field not in row:
            raise SteerportError(f"{where}: no {label_field!r} field (fields: {', '.join(map(str, row)) or 'none'})")
        t, raw = row[text_field], row[label_field]
        if not isinstance(t, str):
            raise SteerportError(f"{where}: field {text_field!r} is {type(t).__name__}, not text")
        if not t.strip():
            raise SteerportError(f"{where}: empty text")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise SteerportError(f"{where}: empty label")
        key = _label_key(raw)
        seen[key] += 1
        if real:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise SteerportError(f"{where}: label {raw!r} is not a number (real-valued labels)") from None
            if not math.isfinite(value):
                raise SteerportError(f"{where}: label {raw!r} is not finite")
            if value == 0:
                counts["neutral"] += 1
                continue
        elif pos or neg:
            if key in pos:
                value = 1.0
            elif key in neg or not neg:
                value = -1.0
            else:
                counts["skipped"] += 1
                continue
        else:
            if key not in ("1", "-1"):
                raise SteerportError(
                    f"{where}: label {raw!r} is not +1/-1; say which labels are positive with "
                    "--positive-label VALUE (e.g. --positive-label 0 when 0 means non-toxic), "
                    "or use --real-labels for numeric labels such as SST-5's lmsteer_label"
                )
            value = float(key)
        examples.append(Example(t, value, where))
    if not examples:
        what = f"{len(seen)} label value(s) seen: {', '.join(sorted(seen))}" if seen else "no rows"
        raise SteerportError(f"{path}: no usable examples ({what})")
    if pos and not any(k in pos for k in seen):
        raise SteerportError(f"{path}: no row has a positive label {sorted(pos)}; labels seen: {', '.join(sorted(seen))}")
    return examples, counts


def read_text_pair(positive: str | Path, negative: str | Path) -> list[Example]:
    """Examples from two plain-text files, one text per non-empty line: +1 and -1."""
    out: list[Example] = []
    for path, value in ((Path(positive), 1.0), (Path(negative), -1.0)):
        before = len(out)
        for n, line in enumerate(read_file_text(path, "data file").splitlines(), 1):
            if line.strip():
                out.append(Example(line.strip(), value, f"{path}:{n}"))
        if len(out) == before:
            raise SteerportError(f"{path}: no texts (the file is empty)")
    return out


# --------------------------------------------------------------------------- splitting


def split(
    examples: Sequence[Example],
    *,
    limit_per_class: int | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """Shuffle (seeded), keep at most ``limit_per_class`` per sign, hold out a stratified fraction.

    Returns (train, heldout); both keep the shuffled order.
    """
    if not 0 <= heldout_fraction < 1:
        raise SteerportError(f"held-out fraction must be in [0, 1), got {heldout_fraction}")
    if limit_per_class is not None and limit_per_class < 1:
        raise SteerportError(f"limit per class must be at least 1, got {limit_per_class}")
    rng = random.Random(seed)
    train: list[Example] = []
    heldout: list[Example] = []
    for sign in (1, -1):
        group = [e for e in examples if (e.label > 0) == (sign > 0)]
        if not group:
            name = "positive" if sign > 0 else "negative"
            labels = sorted({e.label for e in examples})
            raise SteerportError(
                f"the data has no {name} examples (one class only; labels after mapping: {labels}); "
                "a steer needs both classes"
            )
        rng.shuffle(group)
        if limit_per_class is not None:
            group = group[:limit_per_class]
        n_held = round(len(group) * heldout_fraction)
        if heldout_fraction > 0 and len(group) >= 2:
            n_held = max(1, n_held)
        n_held = min(n_held, len(group) - 1)
        heldout += group[:n_held]
        train += group[n_held:]
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def class_counts(examples: Sequence[Example]) -> dict[str, int]:
    return {"positive": sum(e.label > 0 for e in examples), "negative": sum(e.label < 0 for e in examples)}


def load_data(opts: DataOptions) -> Dataset:
    """Read every source in ``opts``, map labels, limit, split; with a summary for metadata."""
    files = [str(f) for f in opts.files]
    pos_labels, name = tuple(opts.positive_labels), opts.positive_name
    resolved: list[Path] = []
    for f in files:
        if f in BUILTINS and not Path(f).exists():
            b = BUILTINS[f]
            resolved.append(b.path)
            if not pos_labels and not opts.negative_labels and not opts.real:
                pos_labels = b.positive_labels
            name = name or b.positive_name
        else:
            resolved.append(Path(f))
    pair = (opts.positive_file, opts.negative_file)
    if (pair[0] is None) != (pair[1] is None):
        raise SteerportError("plain-text data needs both --positive and --negative files")
    if not resolved and pair[0] is None:
        raise SteerportError("no training data: give --data FILE (or a built-in name: "
                             f"{', '.join(BUILTINS)}) or --positive FILE --negative FILE")
    examples: list[Example] = []
    sources: list[dict[str, Any]] = []
    counts = {"skipped": 0, "neutral": 0}
    for path in resolved:
        ex, c = read_labeled(path, text_field=opts.text_field, label_field=opts.label_field,
                             positive_labels=pos_labels, negative_labels=opts.negative_labels, real=opts.real)
        examples += ex
        counts = {k: counts[k] + c[k] for k in counts}
        sources.append({"file": str(path), "sha256": sha256_file(path), "examples": len(ex), **class_counts(ex)})
    if opts.positive_file is not None and opts.negative_file is not None:
        ex = read_text_pair(opts.positive_file, opts.negative_file)
        examples += ex
        for path, sign in ((Path(opts.positive_file), 1), (Path(opts.negative_file), -1)):
            sources.append({"file": str(path), "sha256": sha256_file(path),
                            "examples": sum((e.label > 0) == (sign > 0) for e in ex), "class": "positive" if sign > 0 else "negative"})
    train, heldout = split(examples, limit_per_class=opts.limit_per_class,
                           heldout_fraction=opts.heldout_fraction, seed=opts.seed)
    if not name:
        name = f"label {'/'.join(pos_labels)}" if pos_labels else "positive class"
    summary = {
        "sources": sources,
        "text_field": opts.text_field if resolved else None,
        "label_field": opts.label_field if resolved else None,
        "label_mapping": ("real-valued" if opts.real else
                          {"positive": list(pos_labels), "negative": list(opts.negative_labels) or "all other labels"}
                          if pos_labels or opts.negative_labels else "labels are +1/-1"),
        "skipped_rows": counts["skipped"],
        "neutral_rows_dropped": counts["neutral"],
        "limit_per_class": opts.limit_per_class,
        "heldout_fraction": opts.heldout_fraction,
        "seed": opts.seed,
        "counts": {"train": class_counts(train), "heldout": class_counts(heldout)},
    }
    return Dataset(train, heldout, name, summary)

"""Reading texts: plain texts, labeled rows, and the texts bundled with steerport.

Every reader here turns a problem into a one-line :class:`SteerportError` naming the file and
line (missing file, bytes that are not UTF-8, bad JSON, a missing field).

Bundled texts (``steerport/data``, sources and licenses in ``data/SOURCE.md``), by name:

==================  =========================================================================
``neutral``         360 neutral encyclopedic paragraphs (WikiText-2 test, detokenized); split
                    deterministically by line: ``fit`` = lines 1-300 (hidden-state maps, detect
                    sets, position pairing), ``calib`` = lines 301-360 (KL budgets, value
                    calibration, strength curves, keyword logit shifts)
``sst2-train``      SST-2 train sentences, 500 per class (``label`` 1 = positive)
``sst2-test``       SST-2 test sentences, 200 per class (held out)
``paradetox-train`` ParaDetox toxic sentences (``label`` 1) and non-toxic rewrites (0), 500 pairs
``paradetox-test``  200 held-out pairs
``prompts-sentiment`` 50 neutral sentiment-control prompts (``prompt.text``)
``prompts-rtp``     50 RealToxicityPrompts prompts with toxicity < 0.5
==================  =========================================================================

Example::

    calib = neutral("calib")                          # 60 paragraphs
    texts = read_texts("heldout.jsonl", limit=200)    # field "text" (or prompt / prompt.text)
    texts, labels = read_texts_and_labels(bundled("sst2-test"))
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from steerport.errors import SteerportError

DATA_DIR = Path(__file__).resolve().parent / "data"

BUNDLED: dict[str, Path] = {
    "neutral": DATA_DIR / "text" / "neutral_360.txt",
    "sst2-train": DATA_DIR / "sentiment" / "sst2_train.jsonl",
    "sst2-test": DATA_DIR / "sentiment" / "sst2_test.jsonl",
    "paradetox-train": DATA_DIR / "toxicity" / "paradetox_train.jsonl",
    "paradetox-test": DATA_DIR / "toxicity" / "paradetox_test.jsonl",
    "prompts-sentiment": DATA_DIR / "prompts" / "sentiment_neutral_50.jsonl",
    "prompts-rtp": DATA_DIR / "prompts" / "rtp_nontoxic_50.jsonl",
}
NEUTRAL_SPLITS = {"fit": slice(0, 300), "calib": slice(300, 360), "all": slice(0, None)}


def bundled(name: str) -> Path:
    """The path of a bundled text file by its name (see the module docstring)."""
    if name not in BUNDLED:
        raise SteerportError(f"unknown bundled text {name!r}; known: {', '.join(BUNDLED)}")
    return BUNDLED[name]


def neutral(split: str = "fit", limit: int | None = None) -> list[str]:
    """The bundled neutral paragraphs of one split (``fit``, ``calib`` or ``all``)."""
    if split not in NEUTRAL_SPLITS:
        raise SteerportError(f"unknown neutral split {split!r}; use one of {', '.join(NEUTRAL_SPLITS)}")
    lines = [ln.strip() for ln in read_file_text(BUNDLED["neutral"]).splitlines() if ln.strip()]
    return lines[NEUTRAL_SPLITS[split]][:limit]


def read_file_text(path: str | Path, what: str = "text file") -> str:
    """A file's text as UTF-8 (a BOM is dropped); missing, unreadable or undecodable -> one line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SteerportError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise SteerportError(f"{path}: is a folder, not a {what}") from None
    except OSError as e:
        raise SteerportError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SteerportError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x})") from None


def read_rows(path: str | Path, what: str = "data file") -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a .jsonl/.ndjson/.json-lines or .csv/.tsv file; rows are dicts."""
    path = Path(path)
    text = read_file_text(path, what)
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix in (".jsonl", ".ndjson", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise SteerportError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(row, dict):
                raise SteerportError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            try:  # JSON can escape a lone surrogate (\ud800) that is not text and no tokenizer accepts
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise SteerportError(f"{path}:{n}: not valid Unicode (an unpaired surrogate escape)") from None
            rows.append((n, row))
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            for row in reader:
                rows.append((reader.line_num, dict(row)))
        except csv.Error as e:
            raise SteerportError(f"{path}:{reader.line_num}: unreadable CSV row ({e})") from None
    else:
        raise SteerportError(f"{path}: unknown data format {suffix or '(no suffix)'!r}; use .jsonl or .csv/.tsv")
    return rows


def _row_text(row: dict[str, Any], field: str) -> Any:
    """``row[field]``; for the default field also ``prompt`` or ``prompt.text`` (prompt files)."""
    value = row.get(field)
    if value is None and field == "text":
        value = row.get("prompt")
    if isinstance(value, dict):
        value = value.get("text")
    return value


def read_texts(path: str | Path | None = None, *, limit: int | None = None, skip: int = 0, min_chars: int = 40,
               field: str = "text") -> list[str]:
    """Texts of at least ``min_chars`` characters from a .txt/.raw file (one per line; WikiText
    headings ``= x =`` dropped) or a .jsonl file (``field``, else ``prompt`` / ``prompt.text``).

    ``path`` None means the bundled neutral ``fit`` split. ``skip`` and ``limit`` select a
    window of the kept texts (e.g. a detect set and a held-out set from one file).
    """
    if path is None:
        texts = [t for t in neutral("fit") if len(t) >= min_chars]
        where: str | Path = "bundled neutral text"
    else:
        where = path = Path(path)
        texts = []
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for n, row in read_rows(path, "text file"):
                t = _row_text(row, field)
                if not isinstance(t, str):
                    raise SteerportError(f"{path}:{n}: no string field {field!r}"
                                         + (" (nor prompt / prompt.text)" if field == "text" else ""))
                if len(t.strip()) >= min_chars:
                    texts.append(t.strip())
        else:
            for line in read_file_text(path).splitlines():
                line = line.strip()
                if line.startswith("= ") and line.endswith(" ="):
                    continue
                if line and len(line) >= min_chars:
                    texts.append(line)
    texts = texts[skip:]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise SteerportError(f"{where}: no texts of at least {min_chars} characters (after skipping {skip})")
    return texts


def read_texts_and_labels(path: str | Path, *, text_field: str = "text", label_field: str = "label",
                          positive_labels: tuple[str, ...] | list[str] = ("1",), rows: slice | None = None,
                          require_labels: bool = True) -> tuple[list[str], list[int] | None]:
    """Texts and 1/0 labels (1 where the label, as a string, is one of ``positive_labels``).

    JSONL/CSV rows; a .txt file gives one text per line and no labels. Labels must be on all
    rows or on none; with ``require_labels`` none is an error. ``rows`` selects a slice.
    """
    path = Path(path)
    pos = {str(p) for p in positive_labels}
    texts: list[str] = []
    labels: list[int] = []
    if path.suffix.lower() in (".txt", ".raw"):
        texts = [ln for ln in read_file_text(path).splitlines() if ln.strip()]
    else:
        for n, row in read_rows(path):
            t = row.get(text_field)
            if not isinstance(t, str):
                raise SteerportError(f"{path}:{n}: no string field {text_field!r}")
            texts.append(t)
            if label_field in row:
                if len(labels) != len(texts) - 1:
                    raise SteerportError(f"{path}:{n}: has a {label_field!r} field, but earlier rows do not")
                labels.append(int(str(row[label_field]) in pos))
            elif labels:
                raise SteerportError(f"{path}:{n}: no {label_field!r} field, but earlier rows have one")
    if rows is not None:
        texts, labels = texts[rows], labels[rows]
    if not texts:
        raise SteerportError(f"{path}: no texts")
    if require_labels and not labels:
        raise SteerportError(f"{path}: no {label_field!r} field; labeled data is needed here")
    return texts, (labels or None)

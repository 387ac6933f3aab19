"""Read plain texts (neutral / detect text) from .txt, .raw or .jsonl files.

Example::

    texts = read_texts(DEFAULT_TEXT, limit=100)          # vendored WikiText-2 slice
    texts = read_texts("sst2/test.jsonl", limit=200)      # field "text" (or prompt.text / prompt)
"""

from __future__ import annotations

import json
from pathlib import Path

from steerport.errors import SteerportError

DEFAULT_TEXT = Path(__file__).parent / "data" / "text" / "wikitext2_test_100.txt"  # see steerport/data/SOURCE.md


def read_texts(path: str | Path | None = None, *, limit: int | None = None, skip: int = 0, min_chars: int = 40) -> list[str]:
    """Texts of at least ``min_chars`` characters, one per line; WikiText headings (``= x =``) dropped.

    ``skip`` and ``limit`` select a window of the kept texts (e.g. detect vs held-out split).
    """
    path = Path(path) if path is not None else DEFAULT_TEXT
    if not path.is_file():
        raise SteerportError(f"{path}: no such text file")
    texts: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except ValueError:
                raise SteerportError(f"{path}:{n}: not valid JSON") from None
            t = row.get("text", row.get("prompt")) if isinstance(row, dict) else None
            if isinstance(t, dict):
                t = t.get("text")
            if not isinstance(t, str):
                raise SteerportError(f"{path}:{n}: no text, prompt or prompt.text field")
            line = t.strip()
        elif line.startswith("= ") and line.endswith(" ="):
            continue
        if len(line) >= min_chars:
            texts.append(line)
    texts = texts[skip:]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise SteerportError(f"{path}: no texts of at least {min_chars} characters (after skipping {skip})")
    return texts

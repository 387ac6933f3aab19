"""Cut the small data slices shipped inside the package (steerport/data/) from the full data sets.

DATA is a folder with ``sentiment/sst2/{train,test}.jsonl``, ``toxicity/paradetox/{train,test}.jsonl``,
``text/wikitext2_test.raw`` and ``prompts/{sentiment/neutral_prompts,rtp_nontoxic}.jsonl`` (sources
in ``steerport/data/SOURCE.md``). Deterministic (seed 0): rerun it to reproduce the vendored files.

    python tools/vendor_data.py DATA
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "steerport" / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{path.relative_to(OUT.parent.parent)}: {len(rows)} rows, {path.stat().st_size // 1024} KB")


def balanced(rows: list[dict], per_class: int, rng: random.Random) -> list[dict]:
    out = []
    for label in sorted({r["label"] for r in rows}):
        pool = [r for r in rows if r["label"] == label]
        out += rng.sample(pool, per_class)
    rng.shuffle(out)
    return out


def pairs(rows: list[dict], n_pairs: int, rng: random.Random) -> list[dict]:
    """n_pairs ParaDetox pairs: the toxic sentence and its first non-toxic rewrite."""
    by_pair: dict[int, dict[int, dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair_id"], {}).setdefault(r["label"], r)
    ids = sorted(p for p, d in by_pair.items() if 0 in d and 1 in d)
    out = []
    for p in sorted(rng.sample(ids, n_pairs)):
        out += [by_pair[p][1], by_pair[p][0]]
    return out


def detokenize(line: str) -> str:
    """WikiText's spaced-out punctuation, lightly joined: ``@-@`` -> ``-``, no space before , . ; : ! ? ) % or 's."""
    line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    line = re.sub(r" 's\b", "'s", line)
    line = re.sub(r" ([.,;:!?)\]}%])", r"\1", line)
    return re.sub(r"([(\[{]) ", r"\1", line)


def cut(line: str, limit: int = 600) -> str:
    """At most ``limit`` characters, cut at a word boundary."""
    if len(line) <= limit:
        return line
    head = line[:limit]
    return head[: head.rfind(" ")] if " " in head else head


def write_neutral(raw: Path, out: Path) -> None:
    """The bundled neutral corpus: the last 360 paragraphs (> 80 characters, no headings) of WikiText-2
    test, detokenized and cut to 600 characters (splits: ``steerport.texts.NEUTRAL_SPLITS``)."""
    lines = [ln.strip() for ln in raw.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if len(ln) > 80 and not ln.startswith("=")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(cut(detokenize(ln)) for ln in lines[-360:]) + "\n", encoding="utf-8")
    print(f"{out}: 360 lines, {out.stat().st_size // 1024} KB")


def main(shared: Path) -> None:
    rng = random.Random(0)
    write_jsonl(OUT / "sentiment" / "sst2_train.jsonl", balanced(read_jsonl(shared / "sentiment/sst2/train.jsonl"), 500, rng))
    write_jsonl(OUT / "sentiment" / "sst2_test.jsonl", balanced(read_jsonl(shared / "sentiment/sst2/test.jsonl"), 200, rng))
    write_jsonl(OUT / "toxicity" / "paradetox_train.jsonl", pairs(read_jsonl(shared / "toxicity/paradetox/train.jsonl"), 500, rng))
    write_jsonl(OUT / "toxicity" / "paradetox_test.jsonl", pairs(read_jsonl(shared / "toxicity/paradetox/test.jsonl"), 200, rng))
    write_neutral(shared / "text/wikitext2_test.raw", OUT / "text" / "neutral_360.txt")
    neutral = read_jsonl(shared / "prompts/sentiment/neutral_prompts.jsonl")
    write_jsonl(OUT / "prompts" / "sentiment_neutral_50.jsonl",
                [{"prompt": {"text": r["prompt"]["text"]}} for r in rng.sample(neutral, 50)])
    rtp = read_jsonl(shared / "prompts/rtp_nontoxic.jsonl")
    write_jsonl(OUT / "prompts" / "rtp_nontoxic_50.jsonl", [{"prompt": {"text": r["prompt"]["text"]}} for r in rng.sample(rtp, 50)])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="folder with the full data sets (see above)")
    main(ap.parse_args().data)

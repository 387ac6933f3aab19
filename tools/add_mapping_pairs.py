"""Store the aligned token pairs in mapping files that lack them (H, G and metadata untouched).

A mapping file written before the pairs were stored makes every transfer that reuses it align
the two vocabularies again (seconds to tens of seconds). This aligns them once, checks the
result against the file's own record (pair count and alignment report must be the same, and
both models' fingerprints must match the file), and rewrites the file with the pairs added.

Usage (from the repository root; the models must be local)::

    python tools/add_mapping_pairs.py                       # every shipped file in steerport/mappings
    python tools/add_mapping_pairs.py path/to/a.safetensors # given files (specs are read from the files)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from steerport.embeddings import ModelEmbeddings, load_embeddings
from steerport.errors import SteerportError
from steerport.mapping import Mapping, shipped_dir
from steerport.vocab import align_vocab


def add_pairs(path: Path, models: dict[str, ModelEmbeddings]) -> str:
    m = Mapping.load(path)
    if m.pairs is not None:
        return f"{path.name}: already has its pairs"
    for spec in (m.source["spec"], m.target["spec"]):
        if spec not in models:
            models[spec] = load_embeddings(spec)
    se, te = models[m.source["spec"]], models[m.target["spec"]]
    m.check(se.fingerprint, te.fingerprint, where=str(path))
    al = align_vocab(se.tokenizer, te.tokenizer)
    if al.n != m.n_pairs or al.report() != m.alignment:
        raise SteerportError(f"{path}: today's alignment ({al.n} pairs) differs from the file's record ({m.n_pairs}); refit it")
    H, G, before = m.H.clone(), m.G.clone(), m.metadata()
    m.pairs = (al.src_ids, al.tgt_ids)
    size = path.stat().st_size
    m.save(path)
    back = Mapping.load(path)
    assert back.pairs is not None and torch.equal(back.pairs[0], al.src_ids) and torch.equal(back.pairs[1], al.tgt_ids)
    assert torch.equal(back.H, H) and torch.equal(back.G, G) and back.metadata() == before
    return f"{path.name}: {al.n} pairs added, {size} -> {path.stat().st_size} bytes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path)
    args = ap.parse_args()
    files = args.files or sorted(shipped_dir().glob("*.safetensors"))
    models: dict[str, ModelEmbeddings] = {}
    try:
        for f in files:
            print(add_pairs(f, models), flush=True)
    except SteerportError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

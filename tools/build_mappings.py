"""Build the shipped mapping files for the offline ladder and compare fitting methods.

For every ordered pair of models: align the vocabularies once, fit each method on the same
90 % of pairs, report held-out R² / cosine / nearest-neighbour accuracy of H (e_src ≈ H e_tgt)
and G (e_tgt ≈ G e_src) and the wall times; save the default (lstsq) mapping as
``steerport/mappings/SRC__TGT.safetensors``. Results go to ``steerport/mappings/diagnostics.json`` (+ a markdown
table printed to stdout for the README).

Usage (from the repository root, steerport installed editable so the files land in this checkout)::

    python tools/build_mappings.py                      # the three catalog models, all six directions
    python tools/build_mappings.py smollm2-135m gemma3-270m
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from steerport.embeddings import load_embeddings
from steerport.fileio import atomic_write_json
from steerport.mapping import FitOptions, fit_mapping, shipped_dir, shipped_name
from steerport.vocab import align_vocab

MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]
METHODS = {
    "lstsq": FitOptions(),
    "ridge(0.01)": FitOptions(method="ridge", ridge=1e-2),
    "procrustes": FitOptions(method="procrustes"),
    "lstsq+center+normalize": FitOptions(center=True, normalize=True),
    "lstsq top-10k": FitOptions(top_k=10_000),
    "lstsq zipf-weighted": FitOptions(weighting="zipf"),
}


def main(models: list[str]) -> None:
    torch.set_num_threads(2)
    t = time.perf_counter()
    emb = {m: load_embeddings(m) for m in models}
    print(f"loaded embeddings of {len(models)} models in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    results = []
    for src, tgt in itertools.permutations(models, 2):
        t0 = time.perf_counter()
        al = align_vocab(emb[src].tokenizer, emb[tgt].tokenizer)
        t_align = time.perf_counter() - t0
        row = {"source": src, "target": tgt, "alignment": al.report(), "align_seconds": round(t_align, 2), "methods": {}}
        for name, opts in METHODS.items():
            t1 = time.perf_counter()
            m = fit_mapping(emb[src], emb[tgt], opts, alignment=al)
            secs = time.perf_counter() - t1
            row["methods"][name] = {"options": opts.to_dict(), "seconds": round(secs, 2), "diagnostics": m.diagnostics}
            print(f"{src} -> {tgt} {name}: H R² {m.diagnostics['H']['heldout']['r2']:.4f} "
                  f"cos {m.diagnostics['H']['heldout']['cosine']:.4f}  ({secs:.1f} s)", file=sys.stderr)
            if name == "lstsq":
                m.meta["made_by"] = "tools/build_mappings.py (FitOptions() defaults: lstsq, 10% held out, seed 0)"
                m.save(shipped_dir() / shipped_name(src, tgt))
        results.append(row)
    atomic_write_json(shipped_dir() / "diagnostics.json", results)
    print(markdown(results))


def markdown(results: list[dict]) -> str:
    lines = [("| source → target | pairs (raw) | coverage src / tgt | method | H held-out R² | H cos | H NN acc | "
              "G held-out R² | G cos | G NN acc | fit s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        a = row["alignment"]
        for i, (name, r) in enumerate(row["methods"].items()):
            h, g = r["diagnostics"]["H"]["heldout"], r["diagnostics"]["G"]["heldout"]
            head = (f"{row['source']} → {row['target']} | {a['pairs']} ({a['raw_string_matches']}) | "
                    f"{a['coverage_src']:.1%} / {a['coverage_tgt']:.1%}") if i == 0 else " | | "
            lines.append(f"| {head} | {name} | {h['r2']:.3f} | {h['cosine']:.3f} | {h['nn_acc']:.3f} | "
                         f"{g['r2']:.3f} | {g['cosine']:.3f} | {g['nn_acc']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=MODELS, help=f"model specs (default: {' '.join(MODELS)})")
    main(ap.parse_args().models)

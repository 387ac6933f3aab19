"""How many candidates the top-k head keeps (``TrainConfig.topk``, K): fit time against quality.

Each fit step costs about O(n·K·r) (the candidates' shifts) plus the distinct candidates' E·B, so a
smaller K is a cheaper step. What it gives up is in the tail, which only the second-order term
carries. For one model and one data set, in one process, each K in ``--ks`` trains with the CLI's
defaults (``bench_train.py``'s rank, lr and ε₀). The table gives the timings, the steps, and the
summary's *exact* held-out losses and AUC.

With ``--workdir`` every K shares one cached body pass (trains on large data without paying the
pass per K; after the first K, the "body pass" column times only that K's statistics sweep). ``--approx`` also
measures the approximation itself on the held-out positions, for the first K's steer at values ±1:
the mean |error| of the steered-minus-unsteered loss per token, top-k head vs exact head.

Examples (the numbers in ``results/bench_topk_k_*.md``; run from the repository root)::

    PYTHONPATH=. python benchmarks/bench_topk_k.py smollm2-135m --per-class 150 --reps 2 --approx \\
        --out benchmarks/results/bench_topk_k_smollm2-135m
    PYTHONPATH=. python benchmarks/bench_topk_k.py gemma3-270m --per-class 100 --reps 2 --approx \\
        --out benchmarks/results/bench_topk_k_gemma3-270m
    PYTHONPATH=. python benchmarks/bench_topk_k.py smollm2-135m --data ../shared/data/toxicity/paradetox/train.jsonl \\
        --positive-label 0 --per-class 5000 --rank 8 --ks 64,32 --reps 1 --workdir /tmp/topk-work \\
        --out benchmarks/results/bench_topk_k_smollm2-135m_toxicity
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.bench_train import SHARED
from steerport import __version__
from steerport.capture import cache_hidden, tokenize
from steerport.data import DataOptions, load_data
from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.models import cpu_name, load_model
from steerport.train import TrainConfig, train
from steerport.train.headloss import head_token_loss
from steerport.train.topk import topk_stats, topk_token_loss

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def shift_errors(lm, texts: list[str], steer, ks: list[int]) -> dict[int, dict[str, float]]:
    """Per K: mean |top-k − exact| of the per-token loss change at values ±1, and the mean |change| itself."""
    cache = cache_hidden(lm, token_lists=tokenize(lm.tokenizer, texts, 128), predicted_only=True)
    E, bias, y = lm.output_embeddings.detach(), lm.lm_head_bias, cache.targets.long()
    h, idx = cache.h.float(), torch.arange(cache.n_positions)
    out = {}
    for k in ks:
        stats = topk_stats(cache, E, bias, k=k)
        errs, sizes = [], []
        for v in (1.0, -1.0):
            u, B = v * steer.epsilon * (h @ steer.A.float()), steer.B.float()
            exact = head_token_loss(cache.h, u, B, E, bias, y) - head_token_loss(cache.h, torch.zeros_like(u), B, E, bias, y)
            approx = topk_token_loss(stats, idx, u, B, E) - stats.base_loss(idx)
            errs.append(float((approx - exact).abs().mean()))
            sizes.append(float(exact.abs().mean()))
        out[k] = {"shift_abs_error": sum(errs) / 2, "shift_abs_mean": sum(sizes) / 2}
    return out


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = ["# Top-k head: candidates per token (bench_topk_k.py)", "",
             f"{doc['date']}; {doc['machine']}; steerport {doc['version']}. {s['model']}, data {s['data']} "
             f"({s['per_class']} texts per class, 10 % held out), rank {s['rank']}, lr {s['lr']}, ε₀ {s['epsilon']}, "
             f"seed 0, the CLI's other defaults; {s['reps']} repetition(s), K in the order {s['ks']}"
             + ("; one shared body pass (--workdir): the first K's body column is the body pass, the others' only their "
                "statistics sweep over the cached states" if s["workdir"] else "") + ".",
             "", "| K | rep | body pass s | fit s | summary s | total s | steps (best) | held-out loss exact | unsteered | "
             "gain | AUC |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        t = r["timings"]
        body = t["cache_s"] if not s["workdir"] else t.get("topk_stats_s", 0.0) + t["cache_s"]
        lines.append(f"| {r['k']} | {r['rep']} | {body:.2f} | {t['fit_s']:.2f} | {t['summary_s']:.2f} | {t['total_s']:.2f} | "
                     f"{r['steps']} ({r['best_step']}) | {r['loss']:.6f} | {r['unsteered']:.6f} | {r['unsteered'] - r['loss']:.6f} | "
                     f"{r['auc']:.4f} |")
    if doc.get("approx"):
        lines += ["", f"Approximation on the held-out positions, the K = {s['ks'][0]} steer at values ±1 (mean over both): "
                  "mean |top-k − exact| of the per-token loss change, beside the mean |change|:", "",
                  "| K | error | mean change | error / change |", "|---|---|---|---|"]
        for k, e in doc["approx"].items():
            lines.append(f"| {k} | {e['shift_abs_error']:.2e} | {e['shift_abs_mean']:.4f} | "
                         f"{e['shift_abs_error'] / e['shift_abs_mean']:.2%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--data", default=str(SHARED) if SHARED.exists() else "sst2")
    ap.add_argument("--positive-label", default="1")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--ks", default="64,32,16")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="share one body pass between the K's (large data)")
    ap.add_argument("--approx", action="store_true", help="also measure the approximation error per K")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_topk_k")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    lm = load_model(args.model, dtype="auto")
    data = load_data(DataOptions(files=[args.data], positive_labels=[args.positive_label],
                                 limit_per_class=args.per_class, heldout_fraction=0.1, seed=0))
    config = TrainConfig(rank=args.rank, lr=1e-2, epsilon=1e-3, seed=0)
    if args.workdir is None:  # warm-up: oneDNN compiles the body pass's shapes once
        train(lm, data, config)
    runs, first = [], None
    for rep in range(args.reps):
        for k in ks:
            t0 = time.perf_counter()
            res = train(lm, data, replace(config, topk=k), workdir=args.workdir)
            r = res.results
            runs.append({"k": k, "rep": rep, "wall_s": time.perf_counter() - t0,
                         "timings": res.steer.meta["training"]["timings"], "steps": r["steps"], "best_step": r["best_step"],
                         "loss": r["heldout_loss_steered"], "unsteered": r["heldout_loss_unsteered"], "auc": r["heldout_auc"]})
            print(json.dumps(runs[-1]), flush=True)
            first = first or res.steer
    doc = {"benchmark": "bench_topk_k", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "version": __version__,
           "machine": f"{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
           "settings": {"model": args.model, "data": args.data, "per_class": args.per_class, "ks": ks, "rank": args.rank,
                        "lr": config.lr, "epsilon": config.epsilon, "reps": args.reps, "workdir": args.workdir is not None},
           "runs": runs}
    if args.approx and first is not None:
        doc["approx"] = {str(k): v for k, v in shift_errors(lm, [e.text for e in data.heldout], first, ks).items()}
    atomic_write_json(args.out.with_suffix(".json"), doc)
    atomic_write_text(args.out.with_suffix(".md"), markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()

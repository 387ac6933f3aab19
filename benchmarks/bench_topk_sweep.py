"""The trainer's top-k statistics sweep against the bare head it rides on.

``steerport train``'s default head (``head="topk"``) needs, for every cached position, the
target's logit, the K−1 best other logits, the tail's log-mass and its probability-weighted mean
embedding (:func:`steerport.train.topk.rows_stats`). They come out of one sweep over the
vocabulary during the body pass. This benchmark times that sweep against the *logits alone* —
the same chunked matmul in the same dtype, converted to fp32, which is what the head of a plain
forward pass costs — on real final hidden states of each catalog model (bundled neutral text),
interleaved, and reports the median ratio. The floor is about 2 plus the exponentials: the tail's
mean embedding is a second matmul of the same size as the logits.

Usage::

    python benchmarks/bench_topk_sweep.py                     # smollm2-135m, gemma3-270m, qwen2.5-0.5b
    python benchmarks/bench_topk_sweep.py --models smollm2-135m --rows 512 --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

from steerport import __version__
from steerport.capture import cache_hidden
from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.models import cpu_name, load_model, parse_dtype
from steerport.texts import neutral
from steerport.train.headloss import vocab_chunk
from steerport.train.topk import TopKWriter, rows_stats

HERE = Path(__file__).resolve().parent


def logits_only(h: torch.Tensor, E: torch.Tensor) -> None:
    """The head's logits in the sweep's chunks and dtype, nothing else (the baseline)."""
    hc = h.to(E.dtype)
    c = vocab_chunk(len(h), E.shape[0])
    for v0 in range(0, E.shape[0], c):
        (hc @ E[v0 : v0 + c].T).float()


def statistics_sweep(h: torch.Tensor, y: torch.Tensor, E: torch.Tensor, k: int) -> None:
    """The statistics as the trainer computes them during the body pass (:class:`TopKWriter`, in memory)."""
    TopKWriter(len(h), h.shape[1], k, E, None, E.dtype)(torch.arange(len(h)), h, y)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-0.5b")
    ap.add_argument("--rows", type=int, default=1024, help="cached positions per sweep (the trainer's block)")
    ap.add_argument("--k", type=int, default=64, help="candidates per position (TrainConfig.topk)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_topk_sweep"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = parse_dtype("auto", "cpu")  # the trainer's default compute dtype on this machine
    rows = []
    for spec in args.models.split(","):
        lm = load_model(spec)
        cache = cache_hidden(lm, neutral("fit", limit=64), predicted_only=True)
        n = min(args.rows, cache.n_positions)
        h, y = cache.h[:n].float(), cache.targets[:n]
        E = lm.output_embeddings.detach().to(dtype)
        rows_stats(h[:256], y[:256], E, None, args.k)  # warm-up
        base, sweep = [], []
        for _ in range(args.reps):  # interleaved: a slow phase of the machine hits both
            base.append(timed(partial(logits_only, h, E)))
            sweep.append(timed(partial(statistics_sweep, h, y, E, args.k)))
        ratios = [s / b for s, b in zip(sweep, base)]
        row = {"model": spec, "vocab": E.shape[0], "hidden": E.shape[1], "rows": n, "k": args.k,
               "dtype": str(dtype).removeprefix("torch."), "logits_s": statistics.median(base),
               "sweep_s": statistics.median(sweep), "ratio": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios)}
        print(row, flush=True)
        rows.append(row)
        del lm, cache  # one model in memory at a time
    doc = {"benchmark": "bench_topk_sweep", "steerport_version": __version__,
           "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": {"cpu": cpu_name(), "torch_threads": args.threads, "loadavg_end": os.getloadavg()},
           "settings": vars(args), "rows": rows}
    atomic_write_json(Path(args.out + ".json"), doc)
    lines = ["# Top-k statistics sweep vs the logits alone", "",
             f"{doc['when']}; {cpu_name()}, torch threads {args.threads}, load average at the end "
             f"{os.getloadavg()[0]:.1f}; {args.rows} real final hidden states (bundled neutral text), K = {args.k}; "
             f"medians of {args.reps} interleaved repetitions. `python benchmarks/bench_topk_sweep.py`", "",
             "| model | vocabulary | dtype | logits alone s | statistics sweep s | sweep / logits (min–max) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['vocab']} | {r['dtype']} | {r['logits_s']:.3f} | {r['sweep_s']:.3f} | "
                     f"**{r['ratio']:.2f}** ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |")
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

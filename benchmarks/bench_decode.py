"""Steered vs unsteered decoding speed: what a steer costs at generation time.

One run, side by side on the same machine, for each model: greedy generation of exactly
``--new-tokens`` tokens (``min_new_tokens = max_new_tokens``, so every setting decodes the same
number of steps) at batch 1 and batch 8, for

* ``unsteered`` — the plain model;
* ``lm-steer x1`` — one LM-Steer steer (rank 8) at the head input;
* ``lm-steer x3`` — three composed LM-Steer steers;
* ``actadd`` — an all-positions ActAdd vector at 40 % depth;
* ``merged`` — the one LM-Steer steer folded into a copy of the checkpoint (no hooks at all).

Settings are interleaved within each repetition (a random order per repetition, seeded), so slow
phases of a shared machine hit every setting alike; the table reports the median wall time per
setting and its ratio to the unsteered median. Results: ``benchmarks/results/bench_decode.{json,md}``.

Usage::

    python benchmarks/bench_decode.py                              # smollm2-135m, gemma3-270m, qwen2.5-0.5b
    python benchmarks/bench_decode.py --models smollm2-135m --reps 3 --new-tokens 16
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch

import steerport as sp
from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.models import LoadedModel
from steerport.texts import bundled, read_texts

RESULTS = Path(__file__).resolve().parent / "results"


def random_lm_steer(lm: LoadedModel, seed: int, rank: int = 8) -> sp.Steer:
    """A random rank-8 LM-Steer steer whose effect is of a trained steer's order (κ ≈ 0.05 at value 1)."""
    g = torch.Generator().manual_seed(seed)
    d = lm.hidden_size
    A, B = torch.randn(d, rank, generator=g) / d**0.5, torch.randn(d, rank, generator=g) / d**0.5
    return sp.Steer.lm_steer(A, B, epsilon=1.0, model={"spec": lm.spec, "fingerprint": lm.fingerprint})


def settings_for(lm: LoadedModel) -> dict[str, tuple[LoadedModel, list]]:
    """name -> (model to run, steers with values)."""
    one = random_lm_steer(lm, 1)
    three = [one, random_lm_steer(lm, 2), random_lm_steer(lm, 3)]
    actadd = sp.make_actadd(lm, [(" Love", " Hate")], layer=0.4, coeff=1.0, positions="all")
    merged = LoadedModel(spec=lm.spec, model=copy.deepcopy(lm.model), tokenizer=lm.tokenizer)
    sp.merge_into_model(merged, [(one, 1.0)], force=True)
    return {
        "unsteered": (lm, []),
        "lm-steer x1": (lm, [(one, 1.0)]),
        "lm-steer x3": (lm, [(s, 1.0) for s in three]),
        "actadd": (lm, [(actadd, 1.0)]),
        "merged": (merged, []),
    }


@torch.no_grad()
def decode_seconds(lm: LoadedModel, steers: list, prompts: list[str], new_tokens: int) -> float:
    tok = lm.tokenizer
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    with sp.steered(lm, steers, force=True):
        t0 = time.perf_counter()
        out = lm.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id, top_k=None, top_p=None, temperature=None)
        seconds = time.perf_counter() - t0
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return seconds


def machine() -> dict:
    cpu = platform.processor()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), cpu)
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-0.5b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_decode")
    args = ap.parse_args()
    prompts_all = read_texts(bundled("prompts-sentiment"), min_chars=1)
    result = {"machine": machine(), "new_tokens": args.new_tokens, "reps": args.reps, "models": {}}
    rng = random.Random(0)
    for spec in args.models.split(","):
        lm = sp.load_model(spec, dtype="float32")
        settings = settings_for(lm)
        per_model = {}
        for b in map(int, args.batches.split(",")):
            prompts = prompts_all[:b]
            times: dict[str, list[float]] = {name: [] for name in settings}
            for name, (model, steers) in settings.items():  # warm-up, not timed
                decode_seconds(model, steers, prompts, 4)
            for _ in range(args.reps):
                order = list(settings)
                rng.shuffle(order)
                for name in order:
                    model, steers = settings[name]
                    times[name].append(decode_seconds(model, steers, prompts, args.new_tokens))
            base = statistics.median(times["unsteered"])
            per_model[f"batch {b}"] = {name: {"median_s": statistics.median(t), "ratio": statistics.median(t) / base,
                                              "all_s": t} for name, t in times.items()}
            print(spec, f"batch {b}", {n: round(v["ratio"], 3) for n, v in per_model[f"batch {b}"].items()}, flush=True)
        result["models"][spec] = per_model
    result["machine"]["load_average_end"] = os.getloadavg()
    atomic_write_json(args.out.with_suffix(".json"), result)
    lines = [f"# Steered vs unsteered decoding ({args.new_tokens} new tokens, greedy, median of {args.reps} interleaved runs)",
             "", f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']} ({result['machine']['torch_threads']} threads), fp32; load average "
             f"{result['machine']['load_average_start'][0]:.1f} at start, {result['machine']['load_average_end'][0]:.1f} at end.",
             "", "Each cell: median seconds (ratio to unsteered). Targets: one LM-Steer steer ≤ 1.03×, three ≤ 1.05×.", ""]
    names = list(next(iter(next(iter(result["models"].values())).values())))
    lines += ["| model | batch | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for spec, per_model in result["models"].items():
        for b, row in per_model.items():
            lines.append(f"| {spec} | {b.split()[1]} | " + " | ".join(f"{row[n]['median_s']:.2f} s ({row[n]['ratio']:.3f}×)"
                                                                      for n in names) + " |")
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

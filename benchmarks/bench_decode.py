"""Steered vs unsteered decoding speed: what a steer costs at generation time.

For each model, greedy generation of exactly ``--new-tokens`` tokens (``min_new_tokens =
max_new_tokens``, so every setting decodes the same number of steps) at batch 1 and batch 8, for

* ``unsteered`` — the plain model;
* ``lm-steer x1`` — one LM-Steer steer (rank 8) at the head input;
* ``lm-steer x3`` — three composed LM-Steer steers;
* ``actadd`` — an all-positions ActAdd vector at 40 % depth;
* ``merged`` — the one LM-Steer steer folded into a copy of the checkpoint (no hooks at all).

Two measurements, because a few percent is below the noise of a shared machine:

1. **End to end, paired.** Many short repetitions; each repetition runs every setting once and
   ``unsteered`` twice, in a random (seeded) order, and each setting's time is divided by the mean
   of the two unsteered runs *of the same repetition* — so slow phases of the machine cancel.
   Reported: the median of these per-repetition ratios with a 95 % bootstrap interval, and an
   A/A control (first unsteered run / second unsteered run) that shows the noise floor. The base
   model is a private copy like the merged one, so both hold their weights in the same kind of memory.
2. **The hooks' own time.** During real generations, every hook a steer registers is wrapped by
   a timer, so the time spent inside the hooks is measured directly, plus torch's extra dispatch
   cost for a module with hooks (timed on an identity module). Hook time / generation time is the
   steer's cost with the machine's noise taken out.

Torch threads are fixed (``--threads``, default 1 on CPU: a loaded 2-core machine preempts a
2-thread matmul at random), and every setting is warmed up first.
Results: ``benchmarks/results/bench_decode.{json,md}`` (``--out`` to change).

Usage::

    python benchmarks/bench_decode.py                              # smollm2-135m, gemma3-270m, qwen2.5-0.5b
    python benchmarks/bench_decode.py --models smollm2-135m --reps 5 --new-tokens 8
    python benchmarks/bench_decode.py --device cuda --dtype bfloat16 --out benchmarks/results/gpu/bench_decode
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

import steerport as sp
from steerport.errors import SteerportError
from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.models import LoadedModel, check_device, cpu_name
from steerport.texts import bundled, read_texts

if TYPE_CHECKING:
    from transformers import GenerationMixin

RESULTS = Path(__file__).resolve().parent / "results"
STEERED = ["lm-steer x1", "lm-steer x3", "actadd"]
SETTINGS = ["unsteered", *STEERED, "merged"]
TARGETS = {"lm-steer x1": 1.03, "lm-steer x3": 1.05}
CLOCKS = ("wall", "cpu")  # wall-clock seconds; CPU seconds of this process (what a loaded machine perturbs least)


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HookTimer:
    """Wraps every forward (pre-)hook added to a model inside :meth:`wrap`, summing the seconds spent in them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0  # wall
        self.cpu_seconds = 0.0  # CPU time of this process
        self.calls = 0

    @contextmanager
    def wrap(self, model: torch.nn.Module, before: dict[int, set]) -> Iterator[None]:
        for module in model.modules():
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key in [k for k in hooks if k not in before.get(id(hooks), set())]:
                    hooks[key] = self._timed(hooks[key])
        yield

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            sync(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.process_time() - c0
            self.calls += 1
            return out

        return timed


def hook_keys(model: torch.nn.Module) -> dict[int, set]:
    """The hooks a model has now, per hook dict (so only the ones a steer adds get timed)."""
    return {id(h): set(h) for m in model.modules() for h in (m._forward_pre_hooks, m._forward_hooks)}


@torch.no_grad()
def decode_seconds(lm: LoadedModel, steers: list, prompts: list[str], new_tokens: int,
                   timer: HookTimer | None = None) -> tuple[float, float]:
    """Wall and CPU seconds of one greedy generation of exactly ``new_tokens`` tokens."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True).to(lm.device)
    before = hook_keys(lm.model)
    with sp.steered(lm, steers, force=True):
        with timer.wrap(lm.model, before) if timer else nullcontext():
            sync(lm.device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = cast("GenerationMixin", lm.model).generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id, top_k=None, top_p=None, temperature=None)
            sync(lm.device)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return seconds, cpu


def dispatch_seconds(device: torch.device, calls: int = 20000) -> float:
    """torch's extra cost per call of a module that has a (with_kwargs) forward pre-hook: identity module, no-op hook."""
    m = torch.nn.Identity().to(device)
    x = torch.zeros(1, device=device)

    def loop() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            m(x)
        return time.perf_counter() - t0

    plain, hooked = [], []
    for _ in range(7):
        plain.append(loop())
        handle = m.register_forward_pre_hook(lambda mod, args, kwargs: None, with_kwargs=True)
        hooked.append(loop())
        handle.remove()
    return max(0.0, (statistics.median(hooked) - statistics.median(plain)) / calls)


def bootstrap_median(xs: list[float], n: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the median."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def summary(xs: list[float]) -> dict:
    lo, hi = bootstrap_median(xs)
    return {"median": statistics.median(xs), "ci95": [lo, hi], "all": xs}


def machine(device: torch.device) -> dict:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "gpu": gpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average_start": os.getloadavg(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def bench_batch(settings: dict, prompts: list[str], args: argparse.Namespace, rng: random.Random) -> dict:
    device = settings["unsteered"][0].device
    for name in SETTINGS:  # warm-up, not timed
        model, steers = settings[name]
        decode_seconds(model, steers, prompts, min(4, args.new_tokens))
    times: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in SETTINGS} for clock in CLOCKS}
    ratios: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in [*STEERED, "merged", "unsteered A/A"]}
                                                 for clock in CLOCKS}
    for _ in range(args.reps):
        order = [*SETTINGS, "unsteered"]
        rng.shuffle(order)
        got: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
        for name in order:
            model, steers = settings[name]
            got[name].append(decode_seconds(model, steers, prompts, args.new_tokens))
        for k, clock in enumerate(CLOCKS):
            u1, u2 = (t[k] for t in got["unsteered"])
            for name in SETTINGS:
                times[clock][name] += [t[k] for t in got[name]]
                if name != "unsteered":
                    ratios[clock][name].append(got[name][0][k] / ((u1 + u2) / 2))
            ratios[clock]["unsteered A/A"].append(u1 / u2)
    hooks = {}
    for name in STEERED:  # the hooks' own time, inside real generations
        model, steers = settings[name]
        share: dict[str, list[float]] = {clock: [] for clock in CLOCKS}
        per_token: dict[str, list[float]] = {clock: [] for clock in CLOCKS}
        for _ in range(args.hook_reps):
            timer = HookTimer(device)
            total = decode_seconds(model, steers, prompts, args.new_tokens, timer)
            for k, (clock, inside) in enumerate(zip(CLOCKS, (timer.seconds, timer.cpu_seconds))):
                spent = inside + timer.calls * args.dispatch_s
                share[clock].append(spent / total[k])
                per_token[clock].append(spent / args.new_tokens)
        hooks[name] = {clock: {"hook_share": statistics.median(share[clock]),
                               "hook_us_per_token": 1e6 * statistics.median(per_token[clock])} for clock in CLOCKS}
        hooks[name]["hook_calls_per_generation"] = timer.calls
    return {"ms_per_token_unsteered": {c: 1e3 * statistics.median(times[c]["unsteered"]) / args.new_tokens for c in CLOCKS},
            "median_s": {c: {n: statistics.median(t) for n, t in times[c].items()} for c in CLOCKS},
            "ratio": {c: {n: summary(r) for n, r in ratios[c].items()} for c in CLOCKS}, "hooks": hooks, "all_s": times}


def markdown(result: dict, args: argparse.Namespace) -> str:
    m = result["machine"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores"
    primary = "wall" if args.device.startswith("cuda") else "cpu"
    lines = [f"# Steered vs unsteered decoding ({args.new_tokens} new tokens, greedy, {args.reps} paired repetitions)", "",
             f"{m['date']}. Machine: {where}; torch {m['torch']} ({m['torch_threads']} threads), {args.device}, "
             f"{args.dtype}; load average {m['load_average_start'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end.",
             f"Command: `python benchmarks/bench_decode.py {' '.join(result['argv'])}`", "",
             "Targets: one LM-Steer steer ≤ 1.03×, three ≤ 1.05×. Each end-to-end cell: median over repetitions of "
             "(setting's time / mean of the two unsteered runs of the same repetition), with its 95 % bootstrap "
             "interval. `A/A`: unsteered / unsteered, the noise floor. CPU time (the process's CPU seconds) is what "
             "a crowded machine perturbs least; wall time also counts the waits for a core.", ""]
    cols = ["unsteered A/A", *STEERED, "merged"]
    for clock in (primary, *[c for c in CLOCKS if c != primary]):
        lines += [f"## End to end, {clock} time", "",
                  "| model | batch | unsteered ms/token | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
        for spec, per_model in result["models"].items():
            for b, row in per_model.items():
                r = row["ratio"][clock]
                cells = [f"{r[c]['median']:.3f} [{r[c]['ci95'][0]:.3f}, {r[c]['ci95'][1]:.3f}]" for c in cols]
                lines.append(f"| {spec} | {b.split()[1]} | {row['ms_per_token_unsteered'][clock]:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## The hooks' own time", "",
              f"Time spent inside the steer's hooks during real generations (median of {args.hook_reps}), plus torch's "
              f"dispatch cost of a hooked module ({1e6 * args.dispatch_s:.2f} µs per call, measured), per new token "
              f"and as a share of the generation's {primary} time: the steer's cost without the machine's noise. "
              "`1 + share` is the slowdown it implies.", ""]
    lines += ["| model | batch | " + " | ".join(STEERED) + " |", "|---|---|" + "---|" * len(STEERED)]
    for spec, per_model in result["models"].items():
        for b, row in per_model.items():
            cells = [f"{row['hooks'][c][primary]['hook_us_per_token']:.0f} µs ({100 * row['hooks'][c][primary]['hook_share']:.2f} %)"
                     for c in STEERED]
            lines.append(f"| {spec} | {b.split()[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-0.5b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=12, help="paired repetitions (each runs every setting, unsteered twice)")
    ap.add_argument("--hook-reps", type=int, default=3, help="generations per steered setting with the hooks timed")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU, torch's default on CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_decode")
    args = ap.parse_args()
    if args.threads or not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device)
    prompts_all = read_texts(bundled("prompts-sentiment"), min_chars=1)
    try:
        check_device(args.device)
    except SteerportError as e:
        sys.exit(f"bench_decode: {e}")
    result: dict = {"machine": machine(device), "argv": sys.argv[1:], "settings": {k: v for k, v in vars(args).items() if k != "out"}, "models": {}}
    rng = random.Random(args.seed)
    for spec in args.models.split(","):
        lm = sp.load_model(spec, dtype=args.dtype, device=args.device)
        lm.model = copy.deepcopy(lm.model)  # private memory, like the merged copy (not pages mapped from the file)
        args.dispatch_s = dispatch_seconds(lm.device)
        result["settings"]["dispatch_s"] = args.dispatch_s
        settings = settings_for(lm)
        per_model = {}
        for b in map(int, args.batches.split(",")):
            row = bench_batch(settings, prompts_all[:b], args, rng)
            per_model[f"batch {b}"] = row
            print(spec, f"batch {b}", {c: {n: round(r["median"], 3) for n, r in row["ratio"][c].items()} for c in CLOCKS},
                  {n: f"{100 * h['cpu']['hook_share']:.2f}%" for n, h in row["hooks"].items()}, flush=True)
        result["models"][spec] = per_model
        del lm, settings
        result["machine"]["load_average_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)  # written after each model: a cut-short run keeps what it has
        atomic_write_json(args.out.parent / f"{args.out.name}.json", result)
        atomic_write_text(args.out.parent / f"{args.out.name}.md", markdown(result, args))
    print(markdown(result, args))


if __name__ == "__main__":
    main()

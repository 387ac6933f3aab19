"""Transfer speed: closed-form map fits vs the anchor's Adam fit, and transfer end to end.

One run, side by side on the same machine:

1. **Fit alone, synthetic.** X_t (n x d) Gaussian, X_s = X_t Hᵀ + noise, d_s = d_t = d, for
   n in {5k, 20k, 50k} at d = 256 and 1024, and d = 4096 at n = 5k and 50k: wall time of ``fit_linear`` (lstsq, ridge,
   Procrustes), next to the anchor-style Adam fit at its defaults (random start, lr 1e-3,
   10,000 steps, first 4,000 pairs, both directions). The Adam fit is timed over a few steps and
   extrapolated to 10,000 (marked in the table): running it fully at d = 4096 on a CPU takes days.
2. **End to end, real models.** ``transfer_steer()`` of a random rank-8 steer from the first given
   model to each of the others, embeddings-only (load embeddings + tokenizers, align, fit H and G with
   diagnostics, carry, embed calibration), once with no cached mapping and once reusing it.

Results: ``benchmarks/results/bench_transfer.{json,md}``.

Usage (steerport installed, e.g. ``pip install -e .``)::

    python benchmarks/bench_transfer.py                       # full grid + smollm2/gemma3/qwen
    python benchmarks/bench_transfer.py --quick               # small grid, two models
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.linmap import gram, solve_map
from steerport.transfer import anchor_fit

RESULTS = Path(__file__).resolve().parent / "results"
ANCHOR_STEPS = 10_000


def timed(fn, *args, **kw) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kw)
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def bench_fits(grid: list[tuple[int, int]], anchor_probe_steps: dict[int, int], out: Callable[[dict], None],
               device: str = "cpu") -> list[dict]:
    """Closed form = Gram products (shared by all methods) + a d x d solve per method."""
    rows = []
    for n, d in grid:
        g = torch.Generator().manual_seed(0)
        Xt = torch.randn(n, d, generator=g)
        perm = torch.randperm(d, generator=g)
        Xs = 0.5 * Xt[:, perm] + 0.1 * torch.randn(n, d, generator=g)  # a planted linear map (cheap to make)
        Xt, Xs = Xt.to(device), Xs.to(device)
        row = {"n": n, "d": d}
        secs, (XtX, XtY) = timed(gram, Xt, Xs)
        row["gram_s"] = round(secs, 3)
        for method in ("lstsq", "ridge", "procrustes"):
            secs, _ = timed(solve_map, XtX, XtY, method)
            row[f"{method}_solve_s"] = round(secs, 3)
            row[f"{method}_s"] = round(row["gram_s"] + secs, 3)
        steps = anchor_probe_steps.get(d, 5)
        if d <= 1024:
            anchor_fit(Xs, Xt, steps=1, top_k=4000)  # warm-up
        secs, _ = timed(anchor_fit, Xs, Xt, steps=steps, top_k=4000)
        row["anchor_probe_steps"] = steps
        row["anchor_step_s"] = round(secs / steps, 5)
        row["anchor_10k_steps_s_extrapolated"] = round(secs / steps * ANCHOR_STEPS, 1)
        row["anchor_over_lstsq"] = round(row["anchor_10k_steps_s_extrapolated"] / max(row["lstsq_s"], 1e-9), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        out({"fits": rows})
        del Xt, Xs
    return rows


def bench_end_to_end(models: list[str], dtype: str = "float32", device: str = "cpu") -> list[dict]:
    from steerport.models import load_embeddings
    from steerport.steer import Steer
    from steerport.transfer import TransferOptions, transfer_steer

    rows = []
    for src, tgt in [(models[0], m) for m in models[1:]]:  # the first model to each other one
        t_load, se = timed(load_embeddings, src)
        t_load2, _te = timed(load_embeddings, tgt)
        g = torch.Generator().manual_seed(0)
        steer = Steer.lm_steer(torch.randn(se.hidden_size, 8, generator=g), torch.randn(se.hidden_size, 8, generator=g),
                               epsilon=1e-3, model={"spec": src, "fingerprint": se.fingerprint})
        with tempfile.TemporaryDirectory() as tmp:
            mfile = Path(tmp) / "m.safetensors"
            t_first, r1 = timed(transfer_steer, steer, src, tgt, TransferOptions(dtype=dtype, device=device), mapping_path=mfile)
            t_again, r2 = timed(transfer_steer, steer, src, tgt, TransferOptions(dtype=dtype, device=device), mapping_path=mfile)
        row = {"source": src, "target": tgt, "pairs": r1.mapping.n_pairs,
               "load_embeddings_s": round(t_load + t_load2, 2),
               "transfer_fit_mapping_s": round(t_first, 2), "transfer_reuse_mapping_s": round(t_again, 2),
               "stages_first": r1.lineage["seconds"], "stages_reuse": r2.lineage["seconds"],
               "mapping_total_s": r1.mapping.meta.get("total_seconds"),
               "align_s": r1.mapping.meta.get("align_seconds"),
               "fit_H_s": r1.mapping.diagnostics["H"]["fit_seconds"], "fit_G_s": r1.mapping.diagnostics["G"]["fit_seconds"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(res: dict) -> str:
    out = [f"# bench_transfer — {res['created']}", "", f"Machine: {res['machine']}", "",
           "## Map fit alone (synthetic, d_s = d_t = d)", "",
           ("Closed-form fits use all n pairs; the anchor-style Adam fit (its defaults: lr 1e-3, 10,000 steps, "
           "first 4,000 pairs, both directions) is timed over a few steps and extrapolated to 10,000 steps."), "",
           ("| n | d | Gram s (shared) | lstsq s | ridge s | Procrustes s | Adam s/step (steps timed) | "
            "Adam 10k steps s (extrapolated) | Adam / lstsq |"),
           "|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("fits", []):
        out.append(f"| {r['n']} | {r['d']} | {r['gram_s']} | {r['lstsq_s']} | {r['ridge_s']} | {r['procrustes_s']} | "
                   f"{r['anchor_step_s']} ({r['anchor_probe_steps']}) | {r['anchor_10k_steps_s_extrapolated']} | "
                   f"{r['anchor_over_lstsq']}x |")
    if res.get("end_to_end"):
        out += ["", "## Transfer end to end (real models, embeddings only, default form logit + embed calibration)", "",
                ("| source → target | aligned pairs | load embeddings s | transfer, fitting the mapping s | "
                "of which align s / fit H s / fit G s | transfer, reusing the mapping s |"),
                "|---|---|---|---|---|---|"]
        for r in res["end_to_end"]:
            out.append(f"| {r['source']} → {r['target']} | {r['pairs']} | {r['load_embeddings_s']} | {r['transfer_fit_mapping_s']} | "
                       f"{r['align_s']} / {r['fit_H_s']} / {r['fit_G_s']} | {r['transfer_reuse_mapping_s']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid and two models")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the synthetic fits run, and full models load (cpu, cuda)")
    ap.add_argument("--dtype", default="float32", help="full models' dtype (embeddings-only transfer reads float32)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        grid, models = [(2000, 128), (5000, 256)], ["smollm2-135m", "gemma3-270m"]
    else:  # n grows at d = 256 and 1024; d grows at n = 5k and 50k
        grid = [(n, d) for d in (256, 1024) for n in (5000, 20000, 50000)] + [(5000, 4096), (20000, 4096), (50000, 4096)]
        models = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]
    if args.models is not None:
        models = args.models
    res = {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
                      f"{args.threads} torch threads, torch {torch.__version__}"}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = "bench_transfer_quick" if args.quick else "bench_transfer"

    def save(part: dict) -> None:  # after every row, so a long run that is stopped keeps its numbers
        res.update(part)
        atomic_write_json(args.out_dir / f"{name}.json", res)
        atomic_write_text(args.out_dir / f"{name}.md", markdown(res))

    bench_fits(grid, {128: 50, 256: 50, 1024: 10, 4096: 1}, save, device=args.device)
    save({"end_to_end": bench_end_to_end(models, args.dtype, args.device) if models else []})
    print(markdown(res))


if __name__ == "__main__":
    main()

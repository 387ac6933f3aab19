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
3. **Cold and warm, shipped mapping** (``--cold-warm``; the issue's "transfer in seconds" target, ≤ 2 s warm).
   For catalog pairs (smollm2→gemma3, smollm2→qwen2.5, gemma3→smollm2 by default), a random rank-8 steer
   made for the source, ``steerport transfer SRC TGT --steer S --calibrate embed`` (form logit, the shipped
   mapping) timed as whole processes: **cold** = a fresh process after removing steerport's caches for the
   pair (the model identities in ``STEERPORT_HOME/fingerprints`` and the calibration proxy maps); **warm** =
   the next fresh process. The same through the API (``transfer_steer()`` in a fresh process, torch already
   imported: the call alone), and, as the floor every process pays, ``python -c "import torch"``. Repetitions
   interleave pairs and kinds; medians are reported with the machine and the load average. The operating
   system's page cache is not dropped (the machine is shared): cold means steerport's caches, not the disk's.
   Every run's steer is checked tensor-equal to the first run's.

Results: ``benchmarks/results/bench_transfer.{json,md}`` (``--cold-warm`` alone updates only its section).

Usage (steerport installed, e.g. ``pip install -e .``)::

    python benchmarks/bench_transfer.py                       # full grid + smollm2/gemma3/qwen + cold/warm
    python benchmarks/bench_transfer.py --quick               # small grid, two models
    python benchmarks/bench_transfer.py --cold-warm --reps 3  # only the cold/warm section
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from steerport.anchor import anchor_fit
from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.linmap import gram, solve_map
from steerport.models import cpu_name

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
    from steerport.embeddings import load_embeddings
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


COLD_WARM_PAIRS = [("smollm2-135m", "gemma3-270m"), ("smollm2-135m", "qwen2.5-0.5b"), ("gemma3-270m", "smollm2-135m")]

API_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import torch
from steerport.steer import Steer
from steerport.transfer import TransferOptions, transfer_steer
t_import = time.perf_counter() - t0
steer = Steer.load(sys.argv[3])
times = []
for _ in range(2):
    t = time.perf_counter()
    res = transfer_steer(steer, sys.argv[1], sys.argv[2], TransferOptions(calibrate="embed"))
    times.append(time.perf_counter() - t)
res.steer.save(sys.argv[4])
print(json.dumps({"import_s": t_import, "first_call_s": times[0], "second_call_s": times[1],
                  "stages": res.lineage["seconds"]}))
"""


def clear_caches(src: str, tgt: str) -> None:
    """Remove steerport's caches that an embeddings-only transfer of (src, tgt) uses (not the shipped mapping)."""
    from steerport.catalog import steerport_home
    from steerport.headfile import _model_folder, cache_file, open_head

    fps = []
    for spec in (src, tgt):
        head = open_head(spec)
        assert head is not None, spec
        fps.append(head.fingerprint)
        folder = _model_folder(spec)
        assert folder is not None
        cache_file(folder).unlink(missing_ok=True)
    for p in (steerport_home() / "calibration").glob(f"{fps[0]}_{fps[1]}_*.safetensors"):
        p.unlink()


def run_wall(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return wall


def same_steer(a: Path, b: Path) -> bool:
    from steerport.steer import Steer

    x, y = Steer.load(a), Steer.load(b)
    return (x.tensors.keys() == y.tensors.keys() and all(torch.equal(x.tensors[k], y.tensors[k]) for k in x.tensors)
            and x.epsilon == y.epsilon)


def bench_cold_warm(pairs: list[tuple[str, str]], reps: int, tmp: Path) -> dict:
    """Whole-process wall times, cold and warm, CLI and API, with the import-torch floor; medians over reps."""
    from steerport.headfile import open_head
    from steerport.steer import Steer

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    steers = {}
    for src in {s for s, _ in pairs}:  # a random rank-8 steer made for each source
        head = open_head(src)
        assert head is not None
        g = torch.Generator().manual_seed(0)
        A, B = torch.randn(head.hidden_size, 8, generator=g), torch.randn(head.hidden_size, 8, generator=g)
        steers[src] = Steer.lm_steer(A, B, epsilon=1e-3, model={"spec": src, "fingerprint": head.fingerprint}).save(
            tmp / f"{src}.st")
    samples: dict[str, dict[str, list[float]]] = {f"{s}->{t}": {} for s, t in pairs}
    equal: dict[str, bool] = {}
    loads: list[list[float]] = []
    floor: list[float] = []
    for rep in range(reps):
        for src, tgt in pairs:
            key = f"{src}->{tgt}"
            cli = [sys.executable, "-m", "steerport.cli", "transfer", src, tgt, "--steer", str(steers[src]),
                   "--calibrate", "embed"]
            ref = tmp / f"{key}.ref.st"
            loads.append(list(os.getloadavg()))
            clear_caches(src, tgt)
            runs = {"cli_cold_s": "cold", "cli_warm_s": "warm"}
            for name, tag in runs.items():
                out = tmp / f"{key}.{tag}.st"
                samples[key].setdefault(name, []).append(run_wall(cli + ["--out", str(out)], env))
                if not ref.exists():
                    out.rename(ref)
                else:
                    equal[key] = equal.get(key, True) and same_steer(ref, out)
            clear_caches(src, tgt)
            api_out = tmp / f"{key}.api.st"
            proc = subprocess.run([sys.executable, "-c", API_SCRIPT, src, tgt, str(steers[src]), str(api_out)],
                                  env=env, capture_output=True, text=True, check=True)
            api = json.loads(proc.stdout.strip().splitlines()[-1])
            equal[key] = equal[key] and same_steer(ref, api_out)
            samples[key].setdefault("api_cold_s", []).append(api["first_call_s"])
            samples[key].setdefault("api_warm_s", []).append(api["second_call_s"])
            samples[key].setdefault("import_torch_steerport_s", []).append(api["import_s"])
            samples[key].setdefault("api_warm_stages", []).append(api["stages"])
            floor.append(run_wall([sys.executable, "-c", "import torch"], env))
            print(json.dumps({"rep": rep, "pair": key, **{k: round(v[-1], 2) for k, v in samples[key].items()
                                                           if k != "api_warm_stages"}}), flush=True)
    rows = []
    for src, tgt in pairs:
        key = f"{src}->{tgt}"
        row: dict = {"source": src, "target": tgt, "steer_equal_across_runs": equal[key], "reps": reps}
        for name, vals in samples[key].items():
            if name == "api_warm_stages":
                row["api_warm_stages_last"] = vals[-1]
            else:
                row[name] = round(statistics.median(vals), 3)
                row[name.replace("_s", "_all_s")] = [round(v, 3) for v in vals]
        rows.append(row)
    return {"rows": rows, "import_torch_s": round(statistics.median(floor), 3),
            "import_torch_all_s": [round(v, 3) for v in floor],
            "loadavg_1_5_15_min": [round(statistics.median(x[i] for x in loads), 2) for i in range(3)],
            "loadavg_range_1min": [round(min(x[0] for x in loads), 2), round(max(x[0] for x in loads), 2)]}


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
    if res.get("cold_warm"):
        out.append(cold_warm_markdown(res["cold_warm"]))
    return "\n".join(out) + "\n"


COLD_WARM_TITLE = "## Embeddings-only transfer with the shipped mapping: cold and warm"


def cold_warm_markdown(cw: dict) -> str:
    out = []
    if cw:
        out += ["", COLD_WARM_TITLE + " (target ≤ 2 s warm)", "",
                (f"{cw['created']}; {cw['machine']}; load average (1/5/15 min, median over the repetitions) "
                 f"{' / '.join(map(str, cw['loadavg_1_5_15_min']))}, 1-min range {cw['loadavg_range_1min'][0]}–"
                 f"{cw['loadavg_range_1min'][1]}. Medians of {cw['rows'][0]['reps']} interleaved repetitions, seconds. "
                 "`steerport transfer SRC TGT --steer S --calibrate embed` (form logit); CLI = whole fresh process; "
                 "API = the `transfer_steer()` call alone in a fresh process (torch imported). Cold = steerport's caches "
                 "for the pair removed (model identities, calibration proxy map), the page cache not dropped; warm = "
                 "the next run."), "",
                f"Floor every process pays: `python -c \"import torch\"` takes {cw['import_torch_s']} s here.", "",
                "| source → target | CLI cold | CLI warm | CLI warm − import torch | API cold | API warm | "
                "import torch+steerport in the API process | steer tensor-equal in every run |",
                "|---|---|---|---|---|---|---|---|"]
        for r in cw["rows"]:
            out.append(f"| {r['source']} → {r['target']} | {r['cli_cold_s']} | {r['cli_warm_s']} | "
                       f"{round(r['cli_warm_s'] - cw['import_torch_s'], 2)} | {r['api_cold_s']} | "
                       f"{r['api_warm_s']} | {r['import_torch_steerport_s']} | {r['steer_equal_across_runs']} |")
        out += ["", "API warm stages (last repetition, s): " + "; ".join(
            f"{r['source']} → {r['target']}: " + ", ".join(f"{k} {v}" for k, v in r["api_warm_stages_last"].items())
            for r in cw["rows"])]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid and two models")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the synthetic fits run, and full models load (cpu, cuda)")
    ap.add_argument("--dtype", default="float32", help="full models' dtype (embeddings-only transfer reads float32)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--cold-warm", action="store_true", help="only the cold/warm section (kept beside the other results)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the cold/warm section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cold_warm:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path = args.out_dir / "bench_transfer.json"
        res = json.loads(path.read_text()) if path.exists() else {
            "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_name()}
        with tempfile.TemporaryDirectory() as tmp:
            cw = bench_cold_warm(COLD_WARM_PAIRS, args.reps, Path(tmp))
        cw["created"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        cw["machine"] = f"{cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}"
        res["cold_warm"] = cw
        atomic_write_json(path, res)
        md_path = args.out_dir / "bench_transfer.md"  # keep the other sections' text (and notes added by hand)
        old_md = md_path.read_text() if md_path.exists() else markdown({**res, "cold_warm": None})
        head = old_md.split("\n" + COLD_WARM_TITLE)[0].rstrip("\n")
        atomic_write_text(md_path, head + "\n" + cold_warm_markdown(cw) + "\n")
        print(md_path.read_text())
        return
    if args.quick:
        grid, models = [(2000, 128), (5000, 256)], ["smollm2-135m", "gemma3-270m"]
    else:  # n grows at d = 256 and 1024; d grows at n = 5k and 50k
        grid = [(n, d) for d in (256, 1024) for n in (5000, 20000, 50000)] + [(5000, 4096), (20000, 4096), (50000, 4096)]
        models = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]
    if args.models is not None:
        models = args.models
    res = {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{cpu_name()}, {os.cpu_count()} cores visible, "
                      f"{args.threads} torch threads, torch {torch.__version__}"}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = "bench_transfer_quick" if args.quick else "bench_transfer"

    def save(part: dict) -> None:  # after every row, so a long run that is stopped keeps its numbers
        res.update(part)
        atomic_write_json(args.out_dir / f"{name}.json", res)
        atomic_write_text(args.out_dir / f"{name}.md", markdown(res))

    bench_fits(grid, {128: 50, 256: 50, 1024: 10, 4096: 1}, save, device=args.device)
    save({"end_to_end": bench_end_to_end(models, args.dtype, args.device) if models else []})
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            cw = bench_cold_warm(COLD_WARM_PAIRS, args.reps, Path(tmp))
        cw.update(created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  machine=f"{cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}")
        save({"cold_warm": cw})
    print(markdown(res))


if __name__ == "__main__":
    main()

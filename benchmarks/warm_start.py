"""Warm start vs native training: held-out quality against total wall time (issue 12, part 3).

On the target model, side by side in one process:

* **native** — ``steerport.train.train`` from random factors on all the task's shipped training
  texts (the CLI's defaults: early stopping on a 10 % dev split);
* **warm f** — the same trainer started from the transferred steer (``init=``) on only the first
  fraction ``f`` of those texts (train and dev split alike), for each ``f`` in ``--fractions``.

Each run's cost is the trainer's own total wall time (tokenizing, the body pass over its texts
with the top-k head statistics, the fit, the summary); the transfer's wall time is reported
beside it (it loads both models and measures strength curves, so it is paid once per steer,
whatever the target data). Quality is the steer-as-classifier ROC AUC (mean log-prob at +1 minus
at −1, ``steerport.scoring.HeadScorer``) on the task's shipped **test** slice, never used for
training or early stopping, with a bootstrap 95 % interval over texts; the steers along each
run's fit (at its held-out evaluations) are scored too, for the curve. Scoring is not timed.

Example (SmolLM2 → Gemma-3 sentiment, the shipped source steer; ~25 min on 2 busy cores)::

    python benchmarks/warm_start.py --task sentiment --fractions 0.05,0.1,0.25

Results: ``benchmarks/results/warm_start_{task}.{json,md}``. Stages are cached in ``--work``
(the transferred steer, the test cache, each run), so a rerun with other fractions reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steerport import __version__  # noqa: E402
from steerport.data import DataOptions, Dataset, load_data  # noqa: E402
from steerport.metrics import roc_auc  # noqa: E402
from steerport.models import cpu_name, load_model  # noqa: E402
from steerport.scoring import HeadScorer, capture_hidden, per_text_mean  # noqa: E402
from steerport.steer import Steer  # noqa: E402
from steerport.train import TrainConfig, train  # noqa: E402

TASKS = {  # task: (builtin data name, shipped source steer, its source model)
    "sentiment": ("sst2", "benchmarks/steers/smollm2-135m-sst2-positive.st"),
    "toxicity": ("paradetox", "benchmarks/steers/smollm2-135m-paradetox-nontoxic.st"),
}
RESULTS = ROOT / "benchmarks" / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict[str, Any]:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "steerport": __version__}


def fraction_of(data: Dataset, f: float) -> Dataset:
    """The first share ``f`` of the training texts and of the dev split (both already shuffled, so
    the classes stay about balanced); at least 2 texts of each."""
    n_tr, n_dev = max(2, round(f * len(data.train))), max(2, round(f * len(data.heldout)))
    return Dataset(data.train[:n_tr], data.heldout[:n_dev], data.positive_name,
                   {**data.summary, "fraction": f, "counts_used": {"train": n_tr, "heldout": n_dev}})


class TestSet:
    """The test slice's LM-head inputs, cached once; scores lm-steer factors at ±1 without the body."""

    def __init__(self, lm: Any, texts: list[str], labels: torch.Tensor, max_tokens: int):
        self.scorer = HeadScorer(lm, capture_hidden(lm, texts, max_tokens=max_tokens))
        self.labels = labels  # (n,) +1 / -1

    def evaluate(self, steers: list[Steer], boot: int = 1000) -> list[dict[str, float]]:
        """Per steer: test AUC (+ bootstrap 95 % interval over texts), separation, test loss at each text's label."""
        settings = [[(s, v)] for s in steers for v in (1.0, -1.0)]
        stats = self.scorer.stats_many(settings, kl=False)
        y = self.labels
        g = torch.Generator().manual_seed(0)
        picks = torch.randint(0, len(y), (boot, len(y)), generator=g)
        out = []
        base = per_text_mean(self.scorer.base_token_logprob, self.scorer)
        for i in range(len(steers)):
            lp_pos = per_text_mean(stats[2 * i].token_logprob, self.scorer)
            lp_neg = per_text_mean(stats[2 * i + 1].token_logprob, self.scorer)
            score = lp_pos - lp_neg
            aucs = sorted(roc_auc(score[p], y[p]) for p in picks if len(set(y[p].tolist())) == 2)
            at_label = torch.where(y > 0, lp_pos, lp_neg)
            out.append({"auc": roc_auc(score, y), "auc_lo": aucs[int(0.025 * len(aucs))],
                        "auc_hi": aucs[int(0.975 * len(aucs)) - 1], "separation": float(score[y > 0].mean() - score[y <= 0].mean()),
                        "test_loss_at_label": float(-at_label.mean()), "test_loss_unsteered": float(-base.mean())})
        return out


def run_train(lm: Any, data: Dataset, cfg: TrainConfig, init: Steer | None, path: Path) -> dict[str, Any]:
    """One trainer run; keeps its returned steer, its eval history and the factors at each evaluation."""
    if path.with_suffix(".json").exists():
        return json.loads(path.with_suffix(".json").read_text())
    snaps: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def progress(phase: str, info: dict[str, Any]) -> None:
        if phase == "eval":
            snaps.append({"step": info["step"], "s": time.perf_counter() - t0, "heldout_loss": info["heldout_loss"],
                          "factors": info["factors"]()})

    res = train(lm, data, cfg, progress=progress, init=init)
    total = time.perf_counter() - t0
    res.steer.save(path.with_suffix(".st"))
    torch.save([{k: v for k, v in s.items()} for s in snaps], path.with_suffix(".snaps.pt"))
    r = res.results
    out = {"total_s": total, "timings": res.steer.meta["training"]["timings"], "texts": len(data.train) + len(data.heldout),
           "train_texts": len(data.train), "dev_texts": len(data.heldout), "steps": r["steps"], "best_step": r["best_step"],
           "stopped": r["stopped"], "dev_auc": r.get("heldout_auc"), "dev_loss_steered": r.get("heldout_loss_steered"),
           "dev_loss_unsteered": r.get("heldout_loss_unsteered"), "init_dev_loss": r.get("init_heldout_loss"),
           "evals": [{k: v for k, v in s.items() if k != "factors"} for s in snaps], "settings": asdict(cfg)}
    path.with_suffix(".json").write_text(json.dumps(out, indent=1))
    return out


def time_reps(lm: Any, specs: dict[str, tuple[Dataset, TrainConfig, Steer | None]], reps: int, path: Path) -> dict[str, Any]:
    """Rerun the native and warm runs ``reps`` times, interleaved (order reversed every other repetition); the same
    steers come out (the trainer is deterministic), only the clock matters. Cached in ``path``."""
    names = [n for n in specs if not n.startswith("scratch")]  # the native run and the warm runs
    done: list[dict[str, Any]] = json.loads(path.read_text())["reps"] if path.exists() else []
    for i in range(len(done), reps):
        order = names if i % 2 == 0 else names[::-1]
        rep: dict[str, Any] = {"load_avg": [], "total_s": {}}
        for name in order:
            t = time.perf_counter()
            train(lm, *specs[name][:2], init=specs[name][2])
            rep["total_s"][name] = time.perf_counter() - t
            rep["load_avg"].append(os.getloadavg()[0])
            log(f"timing rep {i}: {name} {rep['total_s'][name]:.0f}s (load {rep['load_avg'][-1]:.1f})")
        done.append(rep)
        path.write_text(json.dumps({"reps": done}, indent=1))
    done = done[:reps]
    med = lambda xs: float(torch.tensor(xs, dtype=torch.float64).median())  # noqa: E731 (lower median for even counts)
    return {"reps": done, "total_s_median": {n: med([r["total_s"][n] for r in done]) for n in names},
            "ratio_median": {n: med([r["total_s"][n] / r["total_s"]["native"] for r in done]) for n in names},
            "note": "interleaved repetitions on the shared machine; ratio = run / native in the same repetition, median"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="sentiment")
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--fractions", default="0.05,0.1,0.25")
    ap.add_argument("--work", type=Path, default=Path("/tmp/steerport-warm-start"))
    ap.add_argument("--warm-lr", type=float, default=None, help="learning rate of the warm runs (default: the trainer's)")
    ap.add_argument("--tag", default="", help="suffix of the warm runs' cache names and of the results (variants)")
    ap.add_argument("--test-max-tokens", type=int, default=64)
    ap.add_argument("--scratch-fractions", default="", help="also train from scratch on these fractions (comma list)")
    ap.add_argument("--time-reps", type=int, default=0, help="rerun every run this many times, interleaved, for the cost "
                    "ratios (median over repetitions of each run's time / native's in the same repetition)")
    ap.add_argument("--curve-points", type=int, default=5, help="steers scored along each run's fit")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    data_name, src_steer = TASKS[a.task]
    work = a.work / a.task
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t_all = time.time()

    # ---- the transferred steer (timed: the CLI's default transfer)
    moved_path = work / f"transferred.{a.target}.st"
    tinfo_path = moved_path.with_suffix(".json")
    if not tinfo_path.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "steerport.cli", "transfer", a.source, a.target, "--steer", str(ROOT / src_steer),
                        "--out", str(moved_path)], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        tinfo_path.write_text(json.dumps({"transfer_s": time.perf_counter() - t, "command": "steerport transfer "
                                          f"{a.source} {a.target} --steer {src_steer}"}))
    tinfo = json.loads(tinfo_path.read_text())
    moved = Steer.load(moved_path)
    log(f"transferred steer: {tinfo}")

    lm = load_model(a.target)
    data = load_data(DataOptions(files=[data_name]))
    test_rows = [json.loads(ln) for ln in Path(ROOT / "steerport" / "data" / ("sentiment/sst2_test.jsonl" if a.task == "sentiment"
                                                                               else "toxicity/paradetox_test.jsonl")).read_text().splitlines()]
    pos_label = 1 if a.task == "sentiment" else 0
    test_cache: list[TestSet] = []

    def test() -> TestSet:  # built on first use (a rerun with everything scored needs no test pass)
        if not test_cache:
            test_cache.append(TestSet(lm, [r["text"] for r in test_rows],
                                      torch.tensor([1.0 if r["label"] == pos_label else -1.0 for r in test_rows]), a.test_max_tokens))
            log(f"test cache: {len(test_rows)} texts")
        return test_cache[0]

    cfg = TrainConfig()
    runs: dict[str, dict[str, Any]] = {"native": run_train(lm, data, cfg, None, work / "native")}
    specs: dict[str, tuple[Dataset, TrainConfig, Steer | None]] = {"native": (data, cfg, None)}
    log(f"native: {runs['native']['total_s']:.0f}s, {runs['native']['steps']} steps")
    warm_cfg = replace(cfg, lr=a.warm_lr) if a.warm_lr else cfg
    for f in [float(x) for x in a.scratch_fractions.split(",") if x]:  # native training on the same small data
        name = f"scratch_{round(100 * f):g}pct"
        specs[name] = (fraction_of(data, f), cfg, None)
        runs[name] = run_train(lm, *specs[name], work / name)
        log(f"{name}: {runs[name]['total_s']:.0f}s, {runs[name]['steps']} steps, stopped: {runs[name]['stopped']}")
    for f in [float(x) for x in a.fractions.split(",")]:
        name = f"warm{a.tag}_{round(100 * f):g}pct"  # no dot: the name takes file suffixes
        specs[name] = (fraction_of(data, f), warm_cfg, moved)
        runs[name] = run_train(lm, *specs[name], work / name)
        log(f"{name}: {runs[name]['total_s']:.0f}s, {runs[name]['steps']} steps, stopped: {runs[name]['stopped']}")

    # ---- scoring on the test slice (not timed): each run's returned steer, its evaluations, and the start
    def as_steer(factors: dict[str, torch.Tensor], eps: float) -> Steer:
        return Steer("lm-steer", {k: v.float() for k, v in factors.items()}, eps, model=dict(moved.model))

    moved_test = work / f"transferred.{a.target}.test.json"
    if not moved_test.exists():
        moved_test.write_text(json.dumps(test().evaluate([moved])[0]))
    scored: dict[str, Any] = {"transferred": json.loads(moved_test.read_text())}
    for name, r in runs.items():
        if "test" not in r:  # scored once, kept in the run's file
            final = Steer.load((work / name).with_suffix(".st"))
            snaps = torch.load((work / name).with_suffix(".snaps.pt"))
            if len(snaps) > a.curve_points:  # each scored steer costs two exact head passes over the test slice
                keep = sorted({round(i * (len(snaps) - 1) / (a.curve_points - 1)) for i in range(a.curve_points)})
                snaps = [snaps[i] for i in keep]
            ev = test().evaluate([final] + [as_steer(s["factors"], final.epsilon) for s in snaps])
            r["test"] = ev[0]
            r["curve"] = [{"step": s["step"], "s": s["s"], "heldout_loss": s["heldout_loss"], **e} for s, e in zip(snaps, ev[1:])]
            (work / name).with_suffix(".json").write_text(json.dumps(r, indent=1))
        log(f"{name}: test AUC {r['test']['auc']:.3f} [{r['test']['auc_lo']:.3f}, {r['test']['auc_hi']:.3f}] in {r['total_s']:.0f}s")

    timing = time_reps(lm, specs, a.time_reps, work / f"timing{a.tag}.json") if a.time_reps else None
    nat = runs["native"]
    nat_s = timing["total_s_median"]["native"] if timing else nat["total_s"]

    def ratio_of(name: str) -> float:
        if timing and name in timing["ratio_median"]:
            return float(timing["ratio_median"][name])
        return float(runs[name]["total_s"] / nat["total_s"])

    summary = {name: {"fraction": None if name == "native" else float(name.split("_")[-1].removesuffix("pct")) / 100, "total_s": r["total_s"],
                      "cost_ratio": ratio_of(name),
                      "cost_ratio_with_transfer": (ratio_of(name) + tinfo["transfer_s"] / nat_s) if name.startswith("warm") else None,
                      "test_auc": r["test"]["auc"], "reaches_native": r["test"]["auc"] >= nat["test"]["auc"]}
               for name, r in runs.items()}
    result = {"timing": timing, "task": a.task, "source": a.source, "target": a.target, "source_steer": src_steer, "transfer": tinfo,
              "transferred_test": scored["transferred"], "runs": runs, "summary": summary,
              "settings": {"native": asdict(cfg), "warm": asdict(warm_cfg), "fractions": a.fractions,
                           "test_max_tokens": a.test_max_tokens, "data": data.summary},
              "machine": machine(), "load_avg_start": load0, "load_avg_end": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_min": (time.time() - t_all) / 60,
              "command": "python benchmarks/warm_start.py " + " ".join(sys.argv[1:])}
    out = a.out or RESULTS / f"warm_start_{a.task}{a.tag}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    log(f"wrote {out}.json/.md")


def markdown(r: dict[str, Any]) -> str:
    m, nat = r["machine"], r["runs"]["native"]
    lines = [f"# Warm start vs native training: {r['task']}, {r['source']} → {r['target']}", "",
             f"Generated by `{r['command']}` on {r['date']} (steerport {m['steerport']}); {m['cpu']}, {m['cores']} cores, "
             f"torch {m['torch']} with {m['torch_threads']} threads; load average {r['load_avg_start'][0]:.1f} at the start, "
             f"{r['load_avg_end'][0]:.1f} at the end (the machine is shared: seconds are noisy, compare ratios).", "",
             f"Source steer `{r['source_steer']}`, carried by `{r['transfer']['command']}` in {r['transfer']['transfer_s']:.0f} s "
             "(loads both models, measures strength curves; paid once per steer). Quality: steer-as-classifier ROC AUC on the "
             "shipped test slice (never used for training or early stopping), bootstrap 95 % interval over texts. Cost: the "
             "trainer's total wall time (body pass with top-k statistics, fit, summary).", "",
             "| run | texts (train + dev) | steps (best) | stopped | total s | cost / native | with transfer | test AUC [95 %] | reaches native |",
             "|---|---|---|---|---|---|---|---|---|"]
    t = r["transferred_test"]
    lines.append(f"| transferred, no fit | 0 | – | – | – | – | – | {t['auc']:.3f} [{t['auc_lo']:.3f}, {t['auc_hi']:.3f}] | "
                 f"{'yes' if t['auc'] >= nat['test']['auc'] else 'no'} |")
    for name, run in r["runs"].items():
        s, e = r["summary"][name], run["test"]
        wt = "–" if s["cost_ratio_with_transfer"] is None else f"{s['cost_ratio_with_transfer']:.3f}"
        lines.append(f"| {name} | {run['train_texts']} + {run['dev_texts']} | {run['steps']} ({run['best_step']}) | {run['stopped']} | "
                     f"{run['total_s']:.0f} | **{s['cost_ratio']:.3f}** | {wt} | {e['auc']:.3f} [{e['auc_lo']:.3f}, {e['auc_hi']:.3f}] | "
                     f"{'yes' if s['reaches_native'] or name == 'native' else 'no'} |")
    tm = r.get("timing")
    if tm:
        lines += ["", f"Cost ratios: median over {len(tm['reps'])} interleaved repetitions of every run (each run's time / native's "
                  "in the same repetition; the table's total s is the first, scored run). Times per repetition (s): "
                  + "; ".join(", ".join(f"{n} {v:.0f}" for n, v in rep["total_s"].items()) + f" (load {min(rep['load_avg']):.1f}–"
                              f"{max(rep['load_avg']):.1f})" for rep in tm["reps"]) + "."]
    lines += ["", "Curves (test AUC at the trainer's held-out evaluations; seconds from the run's start):", ""]
    for name, run in r["runs"].items():
        pts = ", ".join(f"{p['step']}: {p['auc']:.3f} @{p['s']:.0f}s" for p in run["curve"])
        lines.append(f"- {name}: {pts}")
    lines += ["", f"Settings: native `{json.dumps(r['settings']['native'])}`; warm `{json.dumps(r['settings']['warm'])}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Strength ratio of transferred steers: the target value that reproduces the source's κ at s = 1.

For each source steer and target model, the steer is carried with the default transfer (KL
calibration on the target against the source's recorded strength curve) and, for comparison,
with ``--calibrate embed`` (embeddings only). Then, by an *independent* measurement — full forward
passes with the steer's hook (``ForwardScorer``, not the head-only scorer the calibration uses), on
neutral text that no transfer step reads (the *last* bundled ``calib`` paragraphs: the calibration
reads the first 16, the refined form's fit all of ``fit``), the same characters on both models —
κ_src(1) is measured on the source, and the target value s_t with κ_tgt(s_t) = κ_src(1) is solved
for (``steerport.metrics.find_values_for_kl``, 1 % tolerance). The strength ratio is s_t: 1 means
value 1 has the same strength on both models. Target: 0.8 ≤ s_t ≤ 1.25.

With ``--all-pairs`` every ordered pair of the ladder is measured: the steers on the other models
are the default-calibrated transfers of the source steers (their own recorded curves made there).

Usage::

    python benchmarks/strength_ratio.py --out benchmarks/results/strength_ratio
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from steerport import __version__
from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.metrics import find_values_for_kl
from steerport.models import LoadedModel, cpu_name, load_model
from steerport.scoring import ForwardScorer
from steerport.steer import Steer
from steerport.strength import CURVE_TEXTS, cut, record_curve
from steerport.texts import neutral
from steerport.transfer import TransferOptions, transfer_steer

HERE = Path(__file__).resolve().parent
STEERS = {"sentiment": HERE / "steers" / "smollm2-135m-sst2-positive.st",
          "detox": HERE / "steers" / "smollm2-135m-paradetox-nontoxic.st"}
LADDER = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]


def eval_texts(n: int) -> list[str]:
    """Independent neutral text, cut like the curve text: the last ``n`` ``calib`` paragraphs.

    The calibration reads the first :data:`~steerport.strength.CURVE_TEXTS` of them and the refined
    form's fit the ``fit`` split, so these are seen by neither.
    """
    texts = neutral("calib")
    if n > len(texts) - CURVE_TEXTS:
        raise SystemExit(f"--n-texts {n}: only {len(texts) - CURVE_TEXTS} calib paragraphs are unused by the calibration")
    return [cut(t) for t in texts[-n:]]


def strength_ratio(src: LoadedModel, s_steer: Steer, tgt: LoadedModel, t_steer: Steer, texts: list[str],
                   scorers: dict, k_src_cache: dict) -> dict:
    """s_t with κ_tgt(s_t) = κ_src(1), both by full forward passes on ``texts``."""
    for lm in (src, tgt):
        if lm.spec not in scorers:
            scorers[lm.spec] = ForwardScorer(lm, texts, batch_size=4, max_tokens=1024, max_base_bytes=2 << 30)
    key = (src.spec, s_steer.fingerprint)
    if key not in k_src_cache:
        k_src_cache[key] = scorers[src.spec].stats([(s_steer, 1.0)]).kl
    k_src = k_src_cache[key]
    sc = scorers[tgt.spec]
    found = find_values_for_kl(lambda s: sc.stats([(t_steer, s)]).kl, [k_src], rel_tol=0.01)[k_src]
    return {"ratio": found.value, "kappa_src_at_1": k_src, "kappa_tgt_at_ratio": found.kl,
            "kappa_tgt_at_1": found.history[0][1], "evaluations": found.evaluations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="sentiment,detox")
    ap.add_argument("--calibrations", default="auto,embed", help="TransferOptions.calibrate values to compare")
    ap.add_argument("--all-pairs", action="store_true", help="every ordered pair of the ladder, not only from smollm2-135m")
    ap.add_argument("--n-texts", type=int, default=16,
                    help="independent neutral texts: the last N calib paragraphs (read by no transfer step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", default=",".join(LADDER), help="target models (the ladder by default)")
    ap.add_argument("--merge", nargs="+", default=None, help="only merge the rows of these result .json files into --out")
    ap.add_argument("--out", default="benchmarks/results/strength_ratio")
    args = ap.parse_args()
    if args.merge:  # runs split over processes (tasks, targets) become one result
        docs = [json.loads(Path(p).read_text()) for p in args.merge]
        args.n_texts = docs[0]["settings"]["n_texts"]
        seen: dict[tuple, dict] = {}  # one row per cell (a cell measured by two processes: the first kept)
        for r in (r for d in docs for r in d["rows"]):
            seen.setdefault((r["task"], r["source"], r["target"], r["calibrate"]), r)
        write(Path(args.out + ".json"), Path(args.out + ".md"), sorted(seen.values(), key=lambda r: (
            r["task"], r["source"], r["target"], r["calibrate"])), args,
              sum(d["seconds"] for d in docs), machines=[d["machine"] for d in docs])
        return
    torch.set_num_threads(args.threads)
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")
    texts = eval_texts(args.n_texts)
    targets = args.targets.split(",")
    needed = LADDER if args.all_pairs else ["smollm2-135m", *targets]
    models = {spec: load_model(spec, dtype="float32") for spec in LADDER if spec in needed}
    scorers: dict = {}
    k_src: dict = {}
    rows: list[dict] = []
    t_start = time.perf_counter()
    tasks = args.tasks.split(",")
    sources: dict[str, dict[str, Steer]] = {}
    for task in tasks:
        base = Steer.load(STEERS[task])
        src0 = models[base.model["spec"]]
        t = time.perf_counter()
        record_curve(src0, base)  # the shipped files predate recorded curves: record it, as `calibrate` would
        print(f"{task}: source curve on {src0.spec} in {time.perf_counter() - t:.1f} s: {base.meta['strength_curve']['kappa']}")
        sources[task] = {src0.spec: base}
    # phase 1: from the shipped steers' model; phase 2 (--all-pairs): from their calibrated transfers
    phases = [list(sources[t]) for t in tasks][0:1]
    if args.all_pairs:
        phases.append([spec for spec in LADDER if spec not in phases[0]])
    for phase in phases:
        for task in tasks:
            base = next(iter(sources[task].values()))
            for s_spec in phase:
                if s_spec not in sources[task]:
                    sources[task][s_spec] = transfer_steer(base, models[base.model["spec"]], models[s_spec],
                                                           TransferOptions()).steer
                s_steer = sources[task][s_spec]
                for t_spec in (x for x in LADDER if x != s_spec and (args.all_pairs or x in targets)):
                    for cal in (args.calibrations.split(",") if phase is phases[0] else ["auto"]):
                        t = time.perf_counter()
                        res = transfer_steer(s_steer, models[s_spec], models[t_spec], TransferOptions(calibrate=cal))
                        secs = time.perf_counter() - t
                        r = strength_ratio(models[s_spec], s_steer, models[t_spec], res.steer, texts, scorers, k_src)
                        c = res.lineage["calibration"]
                        row = {"task": task, "source": s_spec, "target": t_spec, "calibrate": cal, "method": c["method"],
                               "factor": c["factor"], "transfer_s": round(secs, 1), **r,
                               "within_target": 0.8 <= r["ratio"] <= 1.25}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        write(out_json, out_md, rows, args, time.perf_counter() - t_start)


def machine() -> dict:
    return {"cpu": cpu_name(), "loadavg": os.getloadavg(), "torch_threads": torch.get_num_threads()}


def write(out_json: Path, out_md: Path, rows: list[dict], args, seconds: float, machines: list | None = None) -> None:
    doc = {"benchmark": "strength_ratio", "steerport_version": __version__, "machine": (machines or [machine()])[0],
           "machines": machines or [machine()],
           "settings": {"n_texts": args.n_texts, "text": "last n_texts neutral calib paragraphs (unused by calibration and refinement), cut to 400 characters",
                        "measure": "ForwardScorer (full forward with the hook), secant on log κ vs log s to 1 %",
                        "transfer": "TransferOptions() default form; calibrate as listed"},
           "seconds": round(seconds, 1), "rows": rows}
    atomic_write_json(out_json, doc)
    lines = ["# Strength ratio: target value reproducing the source's κ at s = 1", "",
             f"Independent measurement: full forward passes with the steer's hook on the last {args.n_texts} bundled neutral `calib` "
             "paragraphs, cut to 400 characters: text no transfer step reads (the calibration reads the first "
             f"{CURVE_TEXTS} `calib` "
             "paragraphs with the head-only scorer, the refined form's fit the `fit` split). "
             "Target: 0.8–1.25.", "", f"Machine: {doc['machine']['cpu']}, load average {[m['loadavg'] for m in doc['machines']]}, "
             f"steerport {__version__}.", "",
             "| task | source → target | calibrate | method | ε₀ factor | strength ratio | κ_src(1) | in 0.8–1.25 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['source']} → {r['target']} | {r['calibrate']} | {r['method']} | "
                     f"{r['factor']:.3f} | **{r['ratio']:.3f}** | {r['kappa_src_at_1']:.4f} | "
                     f"{'yes' if r['within_target'] else 'no'} |")
    atomic_write_text(out_md, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

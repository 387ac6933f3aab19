"""Transfer quality across model sizes: native against transferred steers at matched KL.

For every task: train a native steer on every model (same data, settings, seed), carry each
source steer to every other model, and evaluate transferred against native on each target at
matched KL (``steerport.evaluate.evaluate_steers``). Ablations on one pair (mapping method,
explicit form, calibration, the anchor's recipe) and a warm start (the target's trainer
started from the transferred steer, against native training from scratch, quality vs wall
time). Every stage caches its output under the work folder, so an interrupted run resumes.

Run from the repository root with steerport installed (``--quick`` builds its tiny models with
the test suite's tokenizer, ``tests.tiny``, so it runs as a module)::

    python -m benchmarks.transfer_quality --models smollm2-135m,gemma3-270m,qwen2.5-0.5b \\
        --task sentiment --task toxicity --data-root DATA      # DATA: the full SST-2 / ParaDetox files
    python -m benchmarks.transfer_quality --quick          # tiny random models, a few minutes

Writes ``<out>/transfer_quality[_quick].json``, ``.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerport.fileio import atomic_write_bytes, atomic_write_json
from steerport.models import LoadedModel, load_model
from steerport.steer import Steer
from steerport.texts import DATA_DIR as VENDORED

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Task:
    """Where a task's data lives and which label is the steer's positive side."""

    name: str
    train: str  # JSONL; rows [0, train_rows) are the steers' pool (the judge trains on later rows)
    train_rows: int
    positive_label: str
    positive_name: str
    heldout: str  # labeled held-out JSONL (evaluation; never trained on)
    prompts: str
    judge: str


def tasks(quick: bool, data_root: Path) -> dict[str, Task]:
    if quick:
        v = VENDORED
        return {
            "sentiment": Task("sentiment", str(v / "sentiment/sst2_train.jsonl"), 1000, "1", "positive sentiment",
                              str(v / "sentiment/sst2_test.jsonl"), str(v / "prompts/sentiment_neutral_50.jsonl"), "sentiment"),
            "toxicity": Task("toxicity", str(v / "toxicity/paradetox_train.jsonl"), 1000, "0", "non-toxic",
                             str(v / "toxicity/paradetox_test.jsonl"), str(v / "prompts/rtp_nontoxic_50.jsonl"), "toxicity"),
        }
    d = data_root
    return {
        # the shipped sentiment judge trains on SST-2 train rows 2000: + dev; the steers draw from rows :2000
        "sentiment": Task("sentiment", str(d / "sentiment/sst2/train.jsonl"), 2000, "1", "positive sentiment",
                          str(d / "sentiment/sst2/test.jsonl"), str(d / "prompts/sentiment/neutral_prompts.jsonl"), "sentiment"),
        # the shipped toxicity judge trains on ParaDetox train rows 10000: + OLID; the steers draw from rows :10000
        "toxicity": Task("toxicity", str(d / "toxicity/paradetox/train.jsonl"), 10000, "0", "non-toxic",
                         str(d / "toxicity/paradetox/test.jsonl"), str(d / "prompts/rtp_nontoxic.jsonl"), "toxicity"),
    }


@dataclass
class Plan:
    """Sizes of everything; the defaults fit the full ladder on 2 shared CPU cores in about an hour."""

    per_class: int = 300  # training texts per class (from the task's steer pool)
    train_max_tokens: int = 32
    rank: int = 8
    steps: int = 30
    tokens_per_batch: int = 1024
    lr: float = 1e-2
    epsilon: float = 1e-3  # the trainer's base scale ε₀
    head: str = "topk"  # the trainer's opt-in top-k head (one exact head pass, then cheap steps); "exact" = full softmax
    kappa: float = 0.05  # matched KL budget (nats per token) on neutral text
    heldout_per_class: int = 80
    heldout_max_tokens: int = 32
    neutral_texts: int = 24
    neutral_max_tokens: int = 48
    n_prompts: int = 10
    samples: int = 2
    max_new_tokens: int = 20
    anchor_steps: int = 1500
    hidden_texts: int = 120
    warm_steps: int = 12
    warm_eval_every: int = 2
    warm_fraction: float = 0.1  # share of the training texts the warm-small run trains on
    curve: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0)
    curve_chars: int = 0  # >0: the strength-curve text (KL calibration) cut to this many characters (tiny models' contexts)


QUICK = Plan(per_class=40, train_max_tokens=24, rank=4, steps=6, tokens_per_batch=256, lr=5e-2, epsilon=0.3, kappa=0.01,
             heldout_per_class=12, heldout_max_tokens=24, neutral_texts=6, neutral_max_tokens=32, n_prompts=3, samples=2,
             max_new_tokens=6, anchor_steps=50, hidden_texts=20, warm_steps=4, warm_eval_every=2, warm_fraction=0.3, curve=(0.5, 1.0, 2.0),
             curve_chars=100)


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def short(spec: str) -> str:
    return Path(spec).name if "/" in spec else spec


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)


def steer_pool(task: Task, work: Path) -> Path:
    """The first ``train_rows`` rows of the task's training file (disjoint from the judge's rows)."""
    out = work / "data" / f"{task.name}_steer_pool.jsonl"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = Path(task.train).read_text(encoding="utf-8").splitlines()[: task.train_rows]
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def load_task_data(task: Task, work: Path, plan: Plan, seed: int):
    from steerport.data import DataOptions, load_data

    return load_data(DataOptions(files=[str(steer_pool(task, work))], positive_labels=[task.positive_label],
                                 positive_name=task.positive_name, limit_per_class=plan.per_class,
                                 heldout_fraction=0.1, seed=seed))


def train_config(plan: Plan, seed: int):
    from steerport.train import TrainConfig

    return TrainConfig(rank=plan.rank, steps=plan.steps, tokens_per_batch=plan.tokens_per_batch, lr=plan.lr, epsilon=plan.epsilon,
                       max_tokens=plan.train_max_tokens, seed=seed, dtype="float32", eval_every=max(1, plan.steps // 6),
                       patience=100, head=plan.head)


def load(spec: str, dtype: str = "float32") -> LoadedModel:
    t = time.time()
    lm = load_model(spec, dtype=dtype)
    log(f"loaded {spec} in {time.time() - t:.1f}s")
    return lm


# --------------------------------------------------------------------------- stage 1: native steers


def stage_train(models: list[str], task_list: list[Task], seeds_for: dict[str, int], plan: Plan, work: Path,
                only_existing: bool = False) -> dict:
    from steerport.train import train

    info: dict[str, Any] = {}
    for spec in models:
        lm = None
        for task in task_list:
            for seed in range(seeds_for[spec]):
                path = work / "native" / task.name / f"{short(spec)}.s{seed}.st"
                if only_existing and not path.exists():
                    continue
                if not path.exists():
                    lm = lm or load(spec)
                    data = load_task_data(task, work, plan, seed)
                    t = time.time()
                    res = train(lm, data, train_config(plan, seed))
                    res.steer.save(path)
                    log(f"native {task.name} {spec} seed {seed}: {time.time() - t:.1f}s, held-out {res.results}")
                st = Steer.load(path)
                tr = st.meta.get("training", {})
                info[f"{task.name}/{short(spec)}/s{seed}"] = {"path": str(path.relative_to(work)), "results": tr.get("results"),
                                                               "timings": tr.get("timings")}
        del lm
    return info


# --------------------------------------------------------------------------- stage 2: transfers


def ablation_options(plan: Plan) -> dict[str, Any]:
    from steerport.mapping import FitOptions
    from steerport.texts import neutral
    from steerport.transfer import TransferOptions

    # Retained effect, AUC and agreement are measured at matched κ, so they do not depend on the
    # calibration factor; the form/method ablations therefore skip calibration (it only scales ε₀ and
    # costs a vocabulary alignment each) — their "value ratio" is then uncalibrated by design.
    none = {"calibrate": "none"}
    # the default KL calibration's text: the library's, or (tiny models) the same paragraphs cut shorter
    kl = {"calib_texts": [t[: plan.curve_chars] for t in neutral("calib", limit=16)]} if plan.curve_chars else {}
    return {
        "default": TransferOptions(**kl),
        "calibration=none": TransferOptions(**none),
        "form=paper": TransferOptions(form="paper", **none),
        "form=logit-pinv": TransferOptions(form="logit-pinv", **none),
        "anchor": TransferOptions(form="anchor", anchor_steps=plan.anchor_steps),
        # the hidden-state map on 120 neutral paragraphs of <= 64 tokens (the transfer default is 300 x 128)
        "form=hidden": TransferOptions(form="hidden", hidden_texts=neutral("fit")[:plan.hidden_texts], hidden_max_tokens=64,
                                       **kl),
        "method=procrustes": TransferOptions(fit=FitOptions(method="procrustes"), **none),
        "method=ridge": TransferOptions(fit=FitOptions(method="ridge"), **none),
        "calibration=kl": TransferOptions(calibrate="kl", **kl),
    }


def stage_transfer(models, task_list, seeds_for, plan, work, ablation_pair, only_existing: bool = False) -> dict:
    from steerport.transfer import transfer_steer

    info: dict[str, Any] = {}
    opts_all = ablation_options(plan)
    full_models: dict[str, LoadedModel] = {}
    for task in task_list:
        for src in models:
            for tgt in models:
                if src == tgt:
                    continue
                variants = list(opts_all) if (src, tgt) == ablation_pair else ["default"]
                for seed in range(min(seeds_for[src], seeds_for[tgt])):
                    for var in variants if seed == 0 else ["default"]:
                        out = work / "transferred" / task.name / f"{short(src)}-to-{short(tgt)}.{var}.s{seed}.st"
                        if only_existing and not out.exists():
                            continue
                        if not out.exists():
                            steer = Steer.load(work / "native" / task.name / f"{short(src)}.s{seed}.st")
                            opt = opts_all[var]
                            need = opt.form == "hidden" or opt.calibration_method() == "kl"
                            if need:
                                for m in (src, tgt):
                                    if m not in full_models:
                                        full_models[m] = load(m)
                            t = time.time()
                            res = transfer_steer(steer, full_models.get(src, src), full_models.get(tgt, tgt), opt)
                            res.steer.save(out)
                            log(f"transfer {task.name} {src}->{tgt} [{var}] seed {seed}: {time.time() - t:.1f}s, "
                                f"calibration {res.lineage['calibration'].get('factor')}")
                        lin = Steer.load(out).meta.get("lineage", {})
                        info[f"{task.name}/{short(src)}->{short(tgt)}/{var}/s{seed}"] = {
                            "path": str(out.relative_to(work)), "form": lin.get("form"),
                            "mapping": {k: lin.get("mapping", {}).get(k) for k in ("method", "n_pairs", "diagnostics")},
                            "calibration": {k: v for k, v in lin.get("calibration", {}).items() if k != "iterations"},
                            "seconds": lin.get("seconds")}
    full_models.clear()
    return info


# --------------------------------------------------------------------------- stage 3: evaluation


def reference_for(target: str, models: list[str], preferred: str | None = None) -> str | None:
    """Perplexity reference: ``preferred`` unless it is the target, else the first other model in the list."""
    if preferred and short(preferred) != short(target):
        return preferred
    others = [m for m in models if m != target]
    return others[0] if others else None


def stage_evaluate(models, task_list, seeds_for, plan, work, ablation_pair, generation: bool, targets=None,
                   plan_reference: str | None = None) -> dict:
    from steerport.evaluate import (
        EvalSettings,
        balanced_sample,
        evaluate_steers,
        file_info,
        read_neutral,
    )
    from steerport.judges import load_judge, read_jsonl_labeled

    out: dict[str, Any] = {}
    settings = EvalSettings(kappa=plan.kappa, neutral_texts=plan.neutral_texts, neutral_max_tokens=plan.neutral_max_tokens,
                            heldout_per_class=plan.heldout_per_class, heldout_max_tokens=plan.heldout_max_tokens,
                            curve=plan.curve, n_prompts=plan.n_prompts, samples_per_prompt=plan.samples,
                            max_new_tokens=plan.max_new_tokens, seed=0)
    neutral = read_neutral(None, plan.neutral_texts)
    for tgt in targets or models:
        lm = None
        for task in task_list:
            path = work / "eval" / task.name / f"{short(tgt)}.json"
            if path.exists():
                out[f"{task.name}/{short(tgt)}"] = json.loads(path.read_text())
                continue
            lm = lm or load(tgt)
            steers: list[tuple[str, Steer]] = []
            for seed in range(seeds_for[tgt]):
                steers.append((f"native.s{seed}", Steer.load(work / "native" / task.name / f"{short(tgt)}.s{seed}.st")))
            for f in sorted((work / "transferred" / task.name).glob(f"*-to-{short(tgt)}.*.st")):
                src_short = f.name.split("-to-")[0]
                if src_short in {short(m) for m in models}:
                    steers.append((f.name.removesuffix(".st").replace(f"-to-{short(tgt)}", ""), Steer.load(f)))
            texts, labels = read_jsonl_labeled(task.heldout, positive_label=task.positive_label)
            heldout = balanced_sample(texts, labels, plan.heldout_per_class, seed=0)
            prompts = [json.loads(ln)["prompt"]["text"] for ln in Path(task.prompts).read_text().splitlines()[: plan.n_prompts]]
            ref_spec = reference_for(tgt, models, plan_reference) if generation else None
            ref = load(ref_spec, dtype="bfloat16") if ref_spec else None  # bf16: half the memory; ppl changes < 0.5%
            gen_names = [n for n, _ in steers if n.endswith(".default.s0") or n == "native.s0"]
            t = time.time()
            report = evaluate_steers(lm, steers, heldout=heldout, neutral=neutral, settings=settings, native=0,
                                     prompts=prompts if generation else (), judge=load_judge(task.judge) if generation else None,
                                     reference=ref, generate_names=gen_names,
                                     progress=lambda m, tgt=tgt, task=task: log(f"  {tgt} {task.name}: {m}"))
            del ref
            report["files"] = {"heldout": file_info(task.heldout), "prompts": file_info(task.prompts)}
            report["seconds"] = time.time() - t
            write_json(path, report)
            log(f"evaluated {task.name} on {tgt}: {report['seconds']:.0f}s")
            out[f"{task.name}/{short(tgt)}"] = report
        del lm
    return out


# --------------------------------------------------------------------------- stage 4: warm start


def stage_warm(pair: tuple[str, str], task: Task, plan: Plan, work: Path) -> dict:
    """Fit the target from the transferred steer and from scratch; held-out quality vs total wall time.

    Three runs on the target, same settings and seed: ``scratch`` (native training on all training
    texts), ``warm`` (from the transferred steer, same texts) and ``warm-small`` (from the transferred
    steer on only the first ``warm_fraction`` of the training texts). Each run's clock counts its own
    body pass over its training texts, the top-k head statistics and the fit; the body pass over the
    held-out texts (used only to measure quality) is counted for none of them.
    """
    from steerport.capture import HiddenCache, cache_hidden
    from steerport.metrics import roc_auc
    from steerport.train import Fitter, batch_for_step, topk_stats

    path = work / "warm" / f"{task.name}_{short(pair[0])}-to-{short(pair[1])}.json"
    if path.exists():
        return json.loads(path.read_text())
    src, tgt = pair
    lm = load(tgt)
    data = load_task_data(task, work, plan, seed=0)
    cfg = train_config(plan, seed=0)
    train_texts, held_texts = [e.text for e in data.train], [e.text for e in data.heldout]
    labels = torch.tensor([e.label for e in data.train] + [e.label for e in data.heldout])
    n_train = len(train_texts)
    n_small = max(2, round(plan.warm_fraction * n_train))
    y = labels[n_train:]

    def body(texts: list[str]) -> tuple[HiddenCache, float]:
        t = time.time()
        c = cache_hidden(lm, texts, max_tokens=cfg.max_tokens, predicted_only=True, dtype=torch.bfloat16,
                         tokens_per_batch=cfg.cache_tokens_per_batch)
        return c, time.time() - t

    held, _ = body(held_texts)
    full, full_s = body(train_texts)
    small, small_s = body(train_texts[:n_small])

    def with_held(c: HiddenCache) -> HiddenCache:  # held-out texts keep ids n_train.. so labels line up
        return HiddenCache(torch.cat([c.h, held.h]), torch.cat([c.targets, held.targets]),
                           torch.cat([c.text_id, held.text_id + n_train]), n_train + held.n_texts)

    moved = Steer.load(work / "transferred" / task.name / f"{short(src)}-to-{short(tgt)}.default.s0.st")
    runs = (("scratch", full, full_s, None, plan.steps), ("warm", full, full_s, moved, plan.warm_steps),
            ("warm-small", small, small_s, moved, plan.warm_steps))
    curves, totals = {}, {}
    stats_of: dict[int, tuple[Any, float]] = {}  # per training cache: top-k statistics and the seconds they took
    for name, train_cache, body_s, init, total in runs:
        cache = with_held(train_cache)
        is_train = cache.text_id < n_train
        train_idx, held_idx = torch.nonzero(is_train).flatten(), torch.nonzero(~is_train).flatten()
        f = Fitter(lm, cache, labels, cfg)
        stats_s = 0.0
        if cfg.head == "topk":  # one exact head pass over this run's cache (shared by runs on the same texts)
            if id(train_cache) not in stats_of:
                t = time.time()
                stats_of[id(train_cache)] = (topk_stats(f.cache, f.E, f.bias, cfg.topk), time.time() - t)
            f.stats, stats_s = stats_of[id(train_cache)]
        if init is not None:  # the transferred steer at the trainer's base scale: fold ε_t/ε₀ into A
            f.load_tensors({**f.tensors(), "A": init.A * (init.epsilon / cfg.epsilon), "B": init.B.clone()})

        def point(step: int, fit_s: float, f=f, held_idx=held_idx, body_s=body_s, stats_s=stats_s) -> dict[str, float]:
            lpp, lpn = f.text_logprob(held_idx, 1.0)[n_train:], f.text_logprob(held_idx, -1.0)[n_train:]
            return {"step": step, "fit_s": fit_s, "total_s": body_s + stats_s + fit_s,
                    "heldout_loss": f.mean_loss(held_idx, domain=False), "auc": roc_auc(lpp - lpn, y)}

        every = plan.warm_eval_every if init is not None else max(plan.warm_eval_every, total // 10)
        fit_s, points = 0.0, [point(0, 0.0)]
        for step in range(total):
            t = time.time()
            f.step(batch_for_step(train_idx, step, cfg.tokens_per_batch, cfg.seed))
            fit_s += time.time() - t
            if (step + 1) % every == 0 or step + 1 == total:
                points.append(point(step + 1, fit_s))
        curves[name] = points
        totals[name] = {"texts": n_small if name == "warm-small" else n_train, "body_s": body_s, "topk_stats_s": stats_s}
        log(f"warm-start {task.name} {src}->{tgt} {name}: {points[-1]}")
    nat = curves["scratch"][-1]
    reach = {name: next((p for p in curves[name] if p["auc"] >= nat["auc"]), None) for name in ("warm", "warm-small")}
    result = {"pair": [src, tgt], "task": task.name, "head": cfg.head, "warm_fraction": plan.warm_fraction,
              "runs": totals, "curves": curves, "native_final": nat, "reaches_native_auc_at": reach,
              "time_ratio": {name: (p["total_s"] / nat["total_s"] if p else None) for name, p in reach.items()},
              "note": "total_s = the run's body pass over its training texts + top-k head statistics + fit; quality "
                      "points use the trainer's held-out measures on the same held-out texts (top-k approximation when head=topk)"}
    write_json(path, result)
    return result


# --------------------------------------------------------------------------- summary, markdown, plots


def summarize(evals: dict, models: list[str], task_names: list[str], seeds_for: dict[str, int], ablation_pair) -> dict:
    """Matrices source x target of retained effect, AUC, agreement, generation retention (mean, std over seeds)."""
    shorts = [short(m) for m in models]
    out: dict[str, Any] = {}
    for task in task_names:
        mats: dict[str, Any] = {k: {} for k in ("retained_effect", "auc", "agreement", "generation_retention", "value_ratio")}
        native: dict[str, Any] = {}
        for tgt in shorts:
            rep = evals.get(f"{task}/{tgt}")
            if rep is None:
                continue
            S = rep["steers"]
            nseeds = sum(1 for n in S if n.startswith("native.s"))
            native[tgt] = {"auc": [S[f"native.s{k}"]["auc"] for k in range(nseeds)],
                           "separation": [S[f"native.s{k}"]["separation"] for k in range(nseeds)]}
            for src in shorts:
                if src == tgt:
                    continue
                ret, auc, agr, vr = [], [], [], []
                for k in range(nseeds):
                    name = f"{src}.default.s{k}"
                    if name not in S:
                        continue
                    ret.append(S[name]["separation"] / S[f"native.s{k}"]["separation"])
                    auc.append(S[name]["auc"])
                    agr.append(S[name]["agreement"][f"native.s{k}"])
                    vr.append(S[name]["value"] / S[f"native.s{k}"]["value"])
                for key, vals in (("retained_effect", ret), ("auc", auc), ("agreement", agr), ("value_ratio", vr)):
                    if vals:
                        mats[key][f"{src}->{tgt}"] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals),
                                                      "values": vals}
                g = (rep.get("generation") or {}).get("runs", {}).get(f"{src}.default.s0")
                if g is not None:
                    mats["generation_retention"][f"{src}->{tgt}"] = {"mean": g.get("generation_retention"), "n": 1}
        abl = {}
        if ablation_pair:
            rep = evals.get(f"{task}/{short(ablation_pair[1])}")
            if rep:
                S = rep["steers"]
                for name, r in S.items():  # seed 0 only: the variants other than "default" exist for seed 0
                    if name.startswith(f"{short(ablation_pair[0])}.") and name.endswith(".s0"):
                        var = name.split(".", 1)[1].rsplit(".s", 1)[0]
                        abl[var] = {"retained_effect": r["retained_effect"], "auc": r["auc"],
                                    "agreement": r["agreement"]["native.s0"], "value_ratio": r["value_ratio"],
                                    "kl_at_native_value": r["kl_at_native_value"]}
        out[task] = {"matrices": mats, "native": native, "ablations": abl}
    return out


def fmt(cell: dict | None, digits: int = 2) -> str:
    if not cell or cell.get("mean") is None or (isinstance(cell["mean"], float) and math.isnan(cell["mean"])):
        return "—"
    s = f"{cell['mean']:.{digits}f}"
    if cell.get("n", 1) > 1:
        s += f" ± {cell['std']:.{digits}f} (n={cell['n']})"
    return s


def markdown(result: dict, models: list[str]) -> str:
    shorts = [short(m) for m in models]
    lines = [f"# Transfer quality across model sizes{' (quick: tiny random models)' if result['quick'] else ''}", "",
             (f"Generated by `{result['command']}` on {result['finished']} (steerport {result['steerport_version']}); "
             f"wall time {result['wall_s'] / 60:.1f} min. Settings: `{json.dumps(result['plan'])}`."), "",
             ("Rows: source model (steer trained there); columns: target model. Diagonal: the native steer itself "
             "(retained effect 1 by definition; AUC shows the native steer's own held-out AUC). "
             "Mean ± std over seeds where n > 1."), ""]
    if result.get("native"):
        lines += ["## Native steers (trainer's own summary on its 10% held-out split of the training pool, value 1)", "",
                  "| task / model / seed | held-out AUC | separation | train tokens | wall time (s) |", "|---|---|---|---|---|"]
        for key, n in result["native"].items():
            r, t = n.get("results") or {}, n.get("timings") or {}
            lines.append(f"| {key} | {r.get('heldout_auc', float('nan')):.3f} | {r.get('separation', float('nan')):.3f} | "
                         f"{r.get('train_tokens')} | {t.get('total_s', float('nan')):.0f} |")
        lines.append("")
    for task, summ in result["summary"].items():
        lines += [f"## {task}", ""]
        for key, title in (("retained_effect", "Retained effect Sep_transferred / Sep_native at matched κ"),
                           ("auc", "Steer-as-classifier ROC AUC on held-out text (target model)"),
                           ("agreement", "Spearman ρ of per-token log-prob shifts vs native (neutral text)"),
                           ("generation_retention", "Generation retention (base − transferred)/(base − native), judge attribute rate"),
                           ("value_ratio", "Matched value ratio s_transferred / s_native (1 = calibration made values comparable)")):
            lines += [f"**{title}**", "", "| source \\ target | " + " | ".join(shorts) + " |",
                      "|---|" + "---|" * len(shorts)]
            for src in shorts:
                row = []
                for tgt in shorts:
                    if src == tgt:
                        nat = summ["native"].get(tgt)
                        if key == "auc" and nat:
                            row.append(f"*{np.mean(nat['auc']):.2f}*" + (f" ± {np.std(nat['auc']):.2f}" if len(nat["auc"]) > 1 else ""))
                        else:
                            row.append("*1*" if key != "auc" else "—")
                    else:
                        row.append(fmt(summ["matrices"][key].get(f"{src}->{tgt}")))
                lines.append(f"| {src} | " + " | ".join(row) + " |")
            lines.append("")
        if summ["ablations"]:
            pair = result["ablation_pair"]
            lines += [f"**Ablations on {pair[0]} → {pair[1]} (seed 0)**", "",
                      "| variant | retained effect | AUC | ρ vs native | value ratio | κ at native's value |", "|---|---|---|---|---|---|"]
            for var, a in sorted(summ["ablations"].items()):
                lines.append(f"| {var} | {a['retained_effect']:.2f} | {a['auc']:.2f} | {a['agreement']:.2f} | "
                             f"{a['value_ratio']:.2f} | {a['kl_at_native_value']:.3g} |")
            lines.append("")
        gens = {k: v for k, v in result["evaluations"].items() if k.startswith(task + "/") and v.get("generation")}
        if gens:
            lines += ["**Generation** (judge attribute rate; perplexity under another ladder model; distinct-n)", "",
                      "| target | run | attr. rate | gen. retention | ppl | dist-1 | dist-2 | dist-3 |",
                      "|---|---|---|---|---|---|---|---|"]
            for k, rep in gens.items():
                g = rep["generation"]
                for name, r in g["runs"].items():
                    retention = r.get("generation_retention")
                    lines.append(f"| {k.split('/')[1]} | {name} | {r.get('attribute_rate', float('nan')):.2f} | "
                                 f"{retention if retention is not None else float('nan'):.2f} | "
                                 f"{r.get('perplexity', float('nan')):.1f} | {r['distinct_1']:.2f} | {r['distinct_2']:.2f} | "
                                 f"{r['distinct_3']:.2f} |")
                acc = ", ".join(f"{h['accuracy']:.2f}" for h in (g.get("judge") or {}).get("heldout", []))
                lines.append(f"| {k.split('/')[1]} | judge held-out accuracy | {acc} | "
                             f"| ref: {(g.get('reference_model') or {}).get('spec')} | | | |")
            lines.append("")
    if result.get("warm"):
        lines += ["## Warm start (target trainer from the transferred steer vs native training from scratch)", "",
                  "Times are totals: the run's body pass over its own training texts + top-k statistics + fit.", "",
                  ("| task | pair | native final AUC (total s) | transferred, step 0 AUC | warm, same data: reaches native AUC at "
                  "(step, total s, ratio) | warm on a fraction of the data: (fraction, step, total s, ratio) |"),
                  "|---|---|---|---|---|---|"]
        for w in result["warm"].values():
            if "reaches_native_auc_at" not in w:
                continue
            nat, r, ratio = w["native_final"], w["reaches_native_auc_at"], w["time_ratio"]

            def cell(name: str, r=r, ratio=ratio) -> str:
                p = r[name]
                return f"{p['step']}, {p['total_s']:.1f}, **{ratio[name]:.2f}**" if p else "not reached"

            lines.append(f"| {w['task']} | {w['pair'][0]} → {w['pair'][1]} | {nat['auc']:.3f} ({nat['total_s']:.0f}) | "
                         f"{w['curves']['warm'][0]['auc']:.3f} | {cell('warm')} | {w['warm_fraction']:g}: {cell('warm-small')} |")
        lines.append("")
    return "\n".join(lines)


def plots(result: dict, models: list[str], out: Path, suffix: str) -> list[str]:
    from matplotlib.figure import Figure

    def save(fig: Figure, path: Path) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        atomic_write_bytes(path, buf.getvalue())

    shorts = [short(m) for m in models]
    files = []
    for task, summ in result["summary"].items():
        fig = Figure(figsize=(10, 4))
        axes = fig.subplots(1, 2)
        for ax, key, title in ((axes[0], "retained_effect", "retained effect (matched κ)"), (axes[1], "auc", "AUC on target")):
            M = np.full((len(shorts), len(shorts)), np.nan)
            for i, s in enumerate(shorts):
                for j, t in enumerate(shorts):
                    if s == t:
                        nat = summ["native"].get(t)
                        M[i, j] = 1.0 if key == "retained_effect" else (np.mean(nat["auc"]) if nat else np.nan)
                    else:
                        c = summ["matrices"][key].get(f"{s}->{t}")
                        M[i, j] = c["mean"] if c else np.nan
            im = ax.imshow(M, cmap="viridis", vmin=0 if key == "retained_effect" else 0.5, vmax=1.2 if key == "retained_effect" else 1.0)
            for i in range(len(shorts)):
                for j in range(len(shorts)):
                    if not np.isnan(M[i, j]):
                        ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", color="w" if M[i, j] < 0.8 else "k")
            ax.set_xticks(range(len(shorts)), shorts, rotation=20)
            ax.set_yticks(range(len(shorts)), shorts)
            ax.set_xlabel("target")
            ax.set_ylabel("source")
            ax.set_title(f"{task}: {title}")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        f = out / f"transfer_quality{suffix}_{task}_heatmap.png"
        save(fig, f)
        files.append(f.name)
    # separation vs KL for native and transferred on one pair per task
    pair = result.get("ablation_pair")
    for task in result["summary"]:
        rep = result["evaluations"].get(f"{task}/{short(pair[1])}") if pair else None
        if not rep:
            continue
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for name, r in rep["steers"].items():
            if "curve" not in r or not (name == "native.s0" or name.endswith(".s0") and name.startswith(short(pair[0]))):
                continue
            xs = [0.0] + [p["kl"] for p in r["curve"]]
            ys = [0.0] + [p["separation"] for p in r["curve"]]
            ax.plot(xs, ys, marker="o", lw=2.5 if name == "native.s0" else 1, label=name.removesuffix(".s0"))
        ax.axvline(rep["kappa_target"], color="gray", ls=":", lw=1)
        ax.set_xlabel("κ: mean KL from unsteered on neutral text (nats/token)")
        ax.set_ylabel("separation on held-out text")
        ax.set_title(f"{task} on {short(pair[1])}: native vs transferred from {short(pair[0])}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        f = out / f"transfer_quality{suffix}_{task}_sep_vs_kl.png"
        save(fig, f)
        files.append(f.name)
    for key, w in (result.get("warm") or {}).items():
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for name, pts in w["curves"].items():
            ax.plot([p["total_s"] for p in pts], [p["auc"] for p in pts], marker="o", label=name)
        ax.set_xlabel("wall time (s): body pass over the run's training texts + top-k statistics + fit")
        ax.set_ylabel("held-out AUC")
        ax.set_title(f"warm start {w['task']}: {short(w['pair'][0])} → {short(w['pair'][1])}")
        ax.legend()
        fig.tight_layout()
        f = out / f"transfer_quality{suffix}_warm_{key}.png"
        save(fig, f)
        files.append(f.name)
    return files


# --------------------------------------------------------------------------- quick mode: tiny models


def tiny_models(work: Path) -> list[str]:
    """Three tiny random models of different architectures and hidden sizes, saved as local directories."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    specs = []
    for name, mt, d in (("tiny-llama-32", "llama", 32), ("tiny-gemma3-48", "gemma3_text", 48), ("tiny-qwen2-64", "qwen2", 64)):
        path = work / "models" / name
        if not (path / "config.json").exists():
            kw = {"hidden_size": d, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 2 * d,
                      "max_position_embeddings": 128, "vocab_size": len(tok), "bos_token_id": tok.eos_token_id,
                      "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
            if mt == "gemma3_text":
                kw.update(head_dim=12, sliding_window=16)
            torch.manual_seed(d)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **kw), dtype=torch.float32)
            model.save_pretrained(path)
            tok.save_pretrained(path)
        specs.append(str(path))
    return specs


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-0.5b")
    ap.add_argument("--task", action="append", choices=["sentiment", "toxicity"])
    ap.add_argument("--quick", action="store_true", help="tiny random models and tiny data: the whole pipeline in minutes")
    ap.add_argument("--seeds", type=int, default=1, help="seeds for native steers (and their transfers)")
    ap.add_argument("--seeds-largest", type=int, default=None, help="seeds for the last (largest) model; default --seeds")
    ap.add_argument("--ablation-pair", default=None, help="SRC:TGT for the ablations (default: second model -> first)")
    ap.add_argument("--warm-pair", default=None, help="SRC:TGT for the warm start (default: first model -> second)")
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--no-warm", action="store_true")
    ap.add_argument("--no-ablations", action="store_true", help="only the default transfer on every pair")
    ap.add_argument("--reference", default=None, help="perplexity reference model (default: the first other model in --models)")
    ap.add_argument("--eval-targets", default=None, help="evaluate only these targets (comma-separated; default all)")
    ap.add_argument("--data-root", type=Path, default=None,
                    help="folder with the full task data (sentiment/sst2/*.jsonl, toxicity/paradetox/*.jsonl, prompts/); "
                         "needed without --quick")
    ap.add_argument("--work", type=Path, default=None, help="work folder (caches every stage; default benchmarks/work/...)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stages", default="train,transfer,evaluate,warm,report")
    ap.add_argument("--set", action="append", default=[], help="override a Plan field, e.g. --set steps=20")
    a = ap.parse_args(argv)
    t0 = time.time()
    plan = QUICK if a.quick else Plan()
    for kv in a.set:
        k, _, v = kv.partition("=")
        cur = getattr(plan, k)
        plan = replace(plan, **{k: type(cur)(v) if not isinstance(cur, tuple) else tuple(float(x) for x in v.split(",") if x)})
    work = a.work or ROOT / "benchmarks" / "work" / ("quick" if a.quick else "ladder")
    work.mkdir(parents=True, exist_ok=True)
    models = tiny_models(work) if a.quick else [m.strip() for m in a.models.split(",") if m.strip()]
    if len(models) < 2:
        ap.error("need at least two models")
    task_names = a.task or ["sentiment", "toxicity"]
    if not a.quick and a.data_root is None:
        ap.error("--data-root is needed without --quick")
    tmap = tasks(a.quick, a.data_root)
    task_list = [tmap[t] for t in task_names]
    seeds_for = {m: a.seeds for m in models}
    if a.seeds_largest is not None:
        seeds_for[models[-1]] = a.seeds_largest

    def pair(arg, default):
        if not arg:
            return default
        s, _, t = arg.partition(":")
        lookup = {short(m): m for m in models}
        return (lookup.get(s, s), lookup.get(t, t))

    ablation_pair = None if a.no_ablations else pair(a.ablation_pair, (models[1], models[0]))
    warm_pair = pair(a.warm_pair, (models[0], models[1]))
    stages = set(a.stages.split(","))
    result: dict[str, Any] = {"quick": a.quick, "models": models, "tasks": {t.name: asdict(t) for t in task_list},
                              "plan": asdict(plan), "seeds": seeds_for, "ablation_pair": list(ablation_pair) if ablation_pair else None,
                              "command": "python -m benchmarks.transfer_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                                          "torch": torch.__version__}}
    timings = {}
    if "train" in stages:
        t = time.time()
        result["native"] = stage_train(models, task_list, seeds_for, plan, work)
        timings["train_s"] = time.time() - t
    if "transfer" in stages:
        t = time.time()
        result["transfers"] = stage_transfer(models, task_list, seeds_for, plan, work, ablation_pair)
        timings["transfer_s"] = time.time() - t
    if "evaluate" in stages:
        t = time.time()
        targets = [m for m in models if not a.eval_targets or short(m) in a.eval_targets.split(",")]
        result["evaluations"] = stage_evaluate(models, task_list, seeds_for, plan, work, ablation_pair, not a.no_generation,
                                               targets=targets, plan_reference=a.reference)
        timings["evaluate_s"] = time.time() - t
    if "warm" in stages and not a.no_warm:
        t = time.time()
        result["warm"] = {f"{task.name}": stage_warm(warm_pair, task, plan, work) for task in task_list}
        timings["warm_s"] = time.time() - t
    if "report" in stages and "evaluate" not in stages:  # report only: collect whatever stages have finished
        result["evaluations"] = {f"{t.name}/{short(m)}": json.loads((work / "eval" / t.name / f"{short(m)}.json").read_text())
                                 for t in task_list for m in models if (work / "eval" / t.name / f"{short(m)}.json").exists()}
        result["native"] = stage_train(models, task_list, seeds_for, plan, work, only_existing=True)
        result["transfers"] = stage_transfer(models, task_list, seeds_for, plan, work, ablation_pair, only_existing=True)
        if not a.no_warm:
            result["warm"] = {p.stem.split("_")[0]: json.loads(p.read_text()) for p in sorted((work / "warm").glob("*.json"))}
    if "report" in stages and "evaluations" in result:
        from steerport import __version__

        result["summary"] = summarize(result["evaluations"], models, task_names, seeds_for, ablation_pair)
        result["steerport_version"] = __version__
        result["timings"] = timings
        result["wall_s"] = time.time() - t0
        result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        suffix = "_quick" if a.quick else ""
        a.out.mkdir(parents=True, exist_ok=True)
        result["plots"] = plots(result, models, a.out, suffix)
        write_json(a.out / f"transfer_quality{suffix}.json", result)
        (a.out / f"transfer_quality{suffix}.md").write_text(markdown(result, models), encoding="utf-8")
        log(f"wrote {a.out / f'transfer_quality{suffix}.md'} ({result['wall_s'] / 60:.1f} min)")
    return result


if __name__ == "__main__":
    main()

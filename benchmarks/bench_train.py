"""Trainer benchmark: ``steerport train`` at its DEFAULT settings vs an anchor-style loop, per model.

For each model (same data, rank, learning rate, ε₀, seed and initialisation):

1. ``plain forward``: one ordinary forward pass (logits included) over the training tokens, in
   length-bucketed batches — the unit of cost ("forward passes over the training tokens");
2. ``steerport``: :func:`steerport.train.train` with the CLI's default settings (top-k head with its
   statistics computed during the one body pass, held-out subset evaluations at the default
   cadence, default early stopping) — only rank, lr and ε₀ are set, to the anchor's values;
3. ``anchor``: a loop in the style of the original LM-Steer code (written here, for the benchmark
   only): every step runs the frozen model body on a padded batch of texts, then the steered head
   with gradients, Adam; a fixed number of steps;
4. optionally ``steerport --head exact`` (the exact head, same defaults otherwise).

One judge scores every steer: the exact head loss (and steer-as-classifier AUC) on the held-out
texts' hidden states (:func:`steerport.train.summarize`); its time is excluded from every clock.
Time to quality = the first judged evaluation at or below the anchor's final held-out loss.

Memory: the real CLI (``python -m steerport.cli train``, defaults) runs in a child process at two
data sizes while its resident memory is sampled (VmRSS and RssAnon, the anonymous part that
cannot be paged out; the cache and the top-k statistics are memory-mapped files).

The CPU is shared with other jobs: ratios taken in one run are meaningful, bare seconds much less.

    python benchmarks/bench_train.py --models smollm2-135m,gemma3-270m --per-class 1000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from steerport.capture import batch_inputs, batch_plan, cache_hidden, capture, tokenize
from steerport.data import DataOptions, load_data
from steerport.models import cpu_has_fast_bf16, cpu_name, load_model
from steerport.steer import Steer
from steerport.train import Fitter, TrainConfig, summarize, train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path("/work/shared/data/sentiment/sst2/train.jsonl")


@torch.no_grad()
def plain_forward_seconds(lm, token_lists, tokens_per_batch: int, packed: bool = False) -> tuple[float, float, float]:
    """Wall and CPU seconds of one ordinary forward pass (logits included), and the padded share of its tokens.

    ``packed``: texts laid end to end in rows, as the trainer's body pass lays them (the cheapest forward
    pass over these tokens); else one text per row, right-padded, in batches of similar length (what a
    plain batched forward pass does).
    """
    pad = lm.tokenizer.pad_token_id or 0
    t0, c0 = time.perf_counter(), time.process_time()
    real = padded = 0
    for rows in batch_plan(token_lists, tokens_per_batch, packed=packed):
        inputs = batch_inputs(lm, [[token_lists[i] for i in row] for row in rows], pad)
        lm.model(**inputs, use_cache=False).logits.sum()
        real, padded = real + sum(len(token_lists[i]) for row in rows for i in row), padded + inputs["input_ids"].numel()
    return time.perf_counter() - t0, time.process_time() - c0, 1 - real / padded


def anchor_loop(lm, data, config: TrainConfig, steps: int, batch_texts: int, judge, eval_every: int):
    """LM-Steer-style training: body forward on every padded batch, steered head, Adam."""
    d, r, eps = lm.hidden_size, config.rank, config.epsilon
    g = torch.Generator().manual_seed(config.seed)  # same initialisation as steerport's Fitter
    A = (torch.randn(d, r, generator=g) * config.init_scale).to(lm.device).requires_grad_()
    B = (torch.randn(d, r, generator=g) * config.init_scale).to(lm.device).requires_grad_()
    opt = torch.optim.Adam([A, B], lr=config.lr, weight_decay=config.weight_decay)
    E = lm.output_embeddings.detach()
    bias = lm.lm_head_bias
    texts = [e.text for e in data.train]
    labels = torch.tensor([e.label for e in data.train], device=lm.device)
    tok = lm.tokenizer
    history, clock, cpu, step, epoch = [], 0.0, 0.0, 0, 0
    while step < steps:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(config.seed * 7919 + epoch))
        epoch += 1
        for k in range(0, len(order) - batch_texts + 1, batch_texts):
            if step >= steps:
                break
            t0, c0 = time.perf_counter(), time.process_time()
            rows = order[k : k + batch_texts]
            enc = tok([texts[i] for i in rows], return_tensors="pt", padding=True, truncation=True, max_length=config.max_tokens).to(lm.device)
            (h,) = capture(lm, ["head"], input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])  # frozen body, every step
            s = labels[rows.to(lm.device)][:, None, None].to(h.dtype)
            hs = h + (s * eps) * ((h @ A.to(h.dtype)) @ B.to(h.dtype).T)  # steered head input (b, T, d)
            logits = hs @ E.T + (0 if bias is None else bias)  # (b, T, V)
            keep = enc["attention_mask"][:, 1:].bool()
            loss = F.cross_entropy(logits[:, :-1][keep].float(), enc["input_ids"][:, 1:][keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            clock += time.perf_counter() - t0
            cpu += time.process_time() - c0
            if step % eval_every == 0 or step == steps:
                held = judge({"A": A.detach().clone(), "B": B.detach().clone()})["heldout_loss_steered"]
                history.append({"step": step, "heldout_loss": held, "seconds": round(clock, 3), "cpu_seconds": round(cpu, 3)})
                print(f"  anchor step {step}: held-out {held:.5f} ({clock:.1f} s)", flush=True)
    return {"A": A.detach(), "B": B.detach()}, clock, cpu, history


def steerport_run(lm, data, config: TrainConfig, judge) -> dict[str, Any]:
    """steerport.train with ``config``; every held-out evaluation's factors are judged (judge time off the clock)."""
    judged: list[dict[str, Any]] = []
    off = [0.0]
    t_start = time.perf_counter()

    def progress(phase: str, info: dict) -> None:
        if phase == "eval":
            t = time.perf_counter() - t_start - off[0]
            j0 = time.perf_counter()
            judged.append({"step": info["step"], "seconds": round(t, 3), "train_heldout_loss": info["heldout_loss"],
                           "heldout_loss": judge(info["factors"]())["heldout_loss_steered"]})
            off[0] += time.perf_counter() - j0

    c0 = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:  # a work folder, as the CLI uses: memory-mapped cache and statistics
        result = train(lm, data, config, workdir=tmp, progress=progress)
    seconds = time.perf_counter() - t_start - off[0]
    return {"seconds": seconds, "cpu_seconds": time.process_time() - c0, "judged_history": judged,
            "timings": result.steer.meta["training"]["timings"], "results": result.results,
            "heldout": judge({k: result.steer.tensors[k] for k in ("A", "B")})}


def time_to(history, target: float) -> float | None:
    for h in history:
        if h["heldout_loss"] <= target:
            return h["seconds"]
    return None


def bench_model(model: str, args) -> dict[str, Any]:
    print(f"== {model}", flush=True)
    lm = load_model(model, dtype=args.dtype, device=args.device)
    data = load_data(DataOptions(files=[args.data], positive_labels=[args.positive_label],
                                 limit_per_class=args.per_class_of[model], heldout_fraction=0.1, seed=args.seed))
    train_tokens = tokenize(lm.tokenizer, [e.text for e in data.train], 128)
    n_train_tokens = sum(len(t) - 1 for t in train_tokens)
    config = TrainConfig(rank=args.rank, lr=args.lr, epsilon=args.epsilon, seed=args.seed, dtype=args.dtype)  # CLI defaults
    print(f"data: {len(data.train)} train / {len(data.heldout)} held-out texts, {n_train_tokens} predicted train tokens; "
          f"model dtype {lm.dtype}", flush=True)

    # the judge: exact held-out loss/AUC on cached held-out hidden states (fp32 storage and head)
    held_tokens = tokenize(lm.tokenizer, [e.text for e in data.heldout], 128)
    held_cache = cache_hidden(lm, token_lists=held_tokens, predicted_only=True, dtype=torch.float32)
    judge_fit = Fitter(lm, held_cache, torch.tensor([e.label for e in data.heldout]),
                       TrainConfig(rank=args.rank, epsilon=args.epsilon, dtype="float32"))
    all_idx = torch.arange(held_cache.n_positions)

    def judge(tensors):
        judge_fit.load_tensors(tensors)
        return summarize(judge_fit, all_idx, 0)

    out: dict[str, Any] = {"train_texts": len(data.train), "heldout_texts": len(data.heldout), "train_tokens": n_train_tokens,
                           "model_dtype": str(lm.dtype).removeprefix("torch.")}
    # an untimed padded pass first: the first one in a process ran 14–69 % slower on Gemma-3 (cause not pinned down;
    # oneDNN builds a kernel per new batch shape), and the trainer's body pass meets its packed shapes warm (the
    # packed pass below runs them first), so the baseline should be warm too
    plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch)
    fwd, cpu_fwd, pad_share = plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch)
    out["plain_forward"] = {"seconds": fwd, "cpu_seconds": cpu_fwd, "padded_share": pad_share}
    pk, cpu_pk, pk_share = plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch, packed=True)
    out["packed_forward"] = {"seconds": pk, "cpu_seconds": cpu_pk, "padded_share": pk_share}
    print(f"plain forward over the training tokens: {fwd:.1f} s (padding {pad_share:.1%}); packed {pk:.1f} s "
          f"(padding {pk_share:.1%})", flush=True)
    sp = steerport_run(lm, data, config, judge)
    out["steerport_defaults"] = sp
    print(f"steerport (defaults): {sp['seconds']:.1f} s {sp['timings']}; judged {sp['heldout']}", flush=True)
    if model in args.exact_models:
        from dataclasses import replace

        ex = steerport_run(lm, data, replace(config, head="exact"), judge)
        out["steerport_exact_head"] = ex
        print(f"steerport (--head exact): {ex['seconds']:.1f} s; judged {ex['heldout']}", flush=True)
    fwd2, cpu_fwd2, _ = plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch)  # interleaved repeat
    out["plain_forward"].update(seconds_repeat=fwd2, cpu_seconds_repeat=cpu_fwd2)
    pk2, _, _ = plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch, packed=True)
    out["packed_forward"].update(seconds_repeat=pk2)
    anchor_t, t_anchor, cpu_anchor, anchor_hist = anchor_loop(lm, data, config, args.anchor_steps, args.batch_texts, judge,
                                                              args.anchor_eval_every)
    res_anchor = judge(anchor_t)
    out["anchor"] = {"seconds": t_anchor, "cpu_seconds": cpu_anchor, "heldout": res_anchor, "history": anchor_hist,
                     "steps": args.anchor_steps, "batch_texts": args.batch_texts}
    target = res_anchor["heldout_loss_steered"]
    fwd_med = (fwd + fwd2) / 2
    ttq = time_to(sp["judged_history"], target)
    R: dict[str, Any] = {
        "plain_forward_mean_s": fwd_med,
        "time_to_anchor_quality_s": ttq,
        "time_to_quality_over_anchor_wall": None if ttq is None else ttq / t_anchor,
        "training_over_forward": sp["seconds"] / fwd_med,
        "packed_forward_mean_s": (pk + pk2) / 2,
        "training_over_packed_forward": sp["seconds"] / ((pk + pk2) / 2),
        "training_over_forward_cpu": sp["cpu_seconds"] / ((cpu_fwd + cpu_fwd2) / 2),
        "heldout_loss_rel_diff_vs_anchor": (sp["heldout"]["heldout_loss_steered"] - target) / target,
    }
    if "steerport_exact_head" in out:
        e = out["steerport_exact_head"]["heldout"]["heldout_loss_steered"]
        R["heldout_loss_rel_diff_topk_vs_exact_head"] = (sp["heldout"]["heldout_loss_steered"] - e) / e
    out["ratios"] = R
    del lm
    return out


def memory_probe(model: str, per_class: int, args) -> dict[str, Any]:
    """The real CLI at its defaults in a child process; resident memory sampled every 50 ms."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "steerport.cli", "train", model, "--data", args.data, "--positive-label", args.positive_label,
               "--limit-per-class", str(per_class), "--rank", str(args.rank), "--lr", str(args.lr), "--epsilon", str(args.epsilon),
               "--out", f"{tmp}/s.st"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}

        def sample() -> None:
            while proc.poll() is None:
                try:
                    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                        k, _, v = line.partition(":")
                        if k in peak:
                            peak[k] = max(peak[k], int(v.split()[0]))
                except (OSError, ValueError, IndexError):
                    pass
                time.sleep(0.05)

        th = threading.Thread(target=sample)
        th.start()
        _, err = proc.communicate()
        th.join()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"CLI failed: {err[-2000:]}")
        steer = Steer.load(f"{tmp}/s.st")
    t = steer.meta["training"]
    return {"per_class": per_class, "command": " ".join(cmd[1:]), "wall_s_with_model_load": wall,
            "peak_MiB": {k: round(v / 1024, 1) for k, v in peak.items()}, "timings": t["timings"],
            "results": t["results"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--data", default=str(SHARED) if SHARED.exists() else "sst2")
    ap.add_argument("--positive-label", default="1")
    ap.add_argument("--per-class", default="1000", help="texts per class: N, or per model: smollm2-135m=250,gemma3-270m=150")
    ap.add_argument("--anchor-steps", type=int, default=200)
    ap.add_argument("--batch-texts", type=int, default=16, help="anchor batch in texts")
    ap.add_argument("--anchor-eval-every", type=int, default=10)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--epsilon", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", help="as the CLI's default")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--exact-models", default="", help="comma-separated models that also run --head exact")
    ap.add_argument("--memory-model", default="smollm2-135m")
    ap.add_argument("--memory-per-class", default="250,1000", help="two data sizes for the memory probe ('' skips it)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a crowded CPU")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_train")
    ap.add_argument("--render", type=Path, help="only rewrite the markdown of this result json")
    args = ap.parse_args()
    if args.render:
        doc = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render(doc))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes: dict[str, str] = dict(x.split("=", 1) if "=" in x else ("*", x) for x in args.per_class.split(","))
    args.per_class_of = {m: int(sizes.get(m, sizes.get("*", "1000"))) for m in args.models.split(",") + [args.memory_model]}
    args.exact_models = [m for m in args.exact_models.split(",") if m]
    t_begin = time.time()
    models: dict[str, Any] = {}
    memory: list[dict[str, Any]] = []
    order = [m for m in args.models.split(",") if m]
    for i, m in enumerate(order):  # results are written after each part, so a cut-off run still leaves numbers
        models[m] = bench_model(m, args)
        write(args, models, memory, t_begin)
        if i == 0:
            memory += [memory_probe(args.memory_model, int(n), args) for n in args.memory_per_class.split(",") if n]
            write(args, models, memory, t_begin)
    if not order:
        memory += [memory_probe(args.memory_model, int(n), args) for n in args.memory_per_class.split(",") if n]
    print(write(args, models, memory, t_begin))


def write(args, models: dict[str, Any], memory: list[dict[str, Any]], t_begin: float) -> str:
    """Write the json and markdown results of what has run so far; returns the markdown."""
    result: dict[str, Any] = {
        "benchmark": "bench_train", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "fast_bf16": cpu_has_fast_bf16(), "load_average_at_end": os.getloadavg(),
                    "minutes": round((time.time() - t_begin) / 60, 1),
                    "note": "compare ratios, not seconds; a load average above the core count means other jobs shared the CPU"},
        "settings": {**vars(args), "out": str(args.out)}, "models": models, "memory": memory,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    md = render(result)
    args.out.with_suffix(".md").write_text(md)
    return md


def render(result: dict[str, Any]) -> str:
    """The markdown summary of a result document."""
    def f(x, fmt="{:.3f}"):
        return "n/a (not reached)" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)

    m, s = result["machine"], result["settings"]
    md = ["# Trainer benchmark (bench_train.py)", "",
          f"{result['date']}; CPU {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, fast bf16 "
          f"{m['fast_bf16']}; load average at the end {m['load_average_at_end'][0]:.1f} (above {m['cpu_count']}: other jobs "
          f"shared the CPU); the whole run took {m['minutes']} min; torch threads {s['threads'] or 'default'}. Data {s['data']} "
          f"(texts per class {s['per_class']}, 10 % held out); "
          f"rank {s['rank']}, lr {s['lr']}, ε₀ {s['epsilon']}, seed {s['seed']}, dtype {s['dtype']}. steerport: the CLI's default "
          f"settings; anchor: {s['anchor_steps']} steps of {s['batch_texts']} texts.", "",
          "| model | run | wall s | × one forward | judged held-out loss | unsteered | held-out AUC | time to anchor's final loss |",
          "|---|---|---|---|---|---|---|---|"]
    for name, r in result["models"].items():
        fwd = r["ratios"]["plain_forward_mean_s"]
        a = r["anchor"]
        md.append(f"| {name} | plain forward (logits) | {fwd:.1f} | 1.00 | | | | |")
        if "packed_forward_mean_s" in r["ratios"]:
            pk = r["ratios"]["packed_forward_mean_s"]
            md.append(f"| {name} | plain forward, texts packed in rows | {pk:.1f} | {pk / fwd:.2f} | | | | |")
        md.append(f"| {name} | anchor-style loop | {a['seconds']:.1f} | {a['seconds'] / fwd:.2f} | "
                  f"{a['heldout']['heldout_loss_steered']:.5f} | {a['heldout']['heldout_loss_unsteered']:.5f} | "
                  f"{f(a['heldout'].get('heldout_auc'))} | {a['seconds']:.1f} s |")
        for key, label in (("steerport_defaults", "steerport train (defaults)"), ("steerport_exact_head", "steerport --head exact")):
            if key in r:
                x = r[key]
                ttq = time_to(x["judged_history"], a["heldout"]["heldout_loss_steered"])
                md.append(f"| {name} | {label} | {x['seconds']:.1f} | {x['seconds'] / fwd:.2f} | "
                          f"{x['heldout']['heldout_loss_steered']:.5f} | {x['heldout']['heldout_loss_unsteered']:.5f} | "
                          f"{f(x['heldout'].get('heldout_auc'))} | {f(ttq, '{:.1f} s')} |")
    md.append("")
    for name, r in result["models"].items():
        R, sp = r["ratios"], r["steerport_defaults"]
        t = sp["timings"]
        res = sp["results"]
        md += [f"**{name}** ({r['train_texts']} train / {r['heldout_texts']} held-out texts, {r['train_tokens']} train tokens, "
               f"model {r['model_dtype']}):", "",
               f"- time to the anchor's final quality / anchor wall time: {f(R['time_to_quality_over_anchor_wall'])} (target ≤ 0.2)",
               f"- total training time / one forward pass over the training tokens: {R['training_over_forward']:.2f} wall, "
               f"{R['training_over_forward_cpu']:.2f} CPU seconds (target ≤ 1.3); forward passes "
               f"{r['plain_forward']['seconds']:.1f} s and {r['plain_forward']['seconds_repeat']:.1f} s (before and after)"
               + (f"; against a forward pass with the texts packed in rows as the body pass lays them: "
                  f"{R['training_over_packed_forward']:.2f}" if "training_over_packed_forward" in R else ""),
               f"- judged held-out loss vs the anchor's: {R['heldout_loss_rel_diff_vs_anchor']:+.3%}"
               + (f"; top-k (default) vs exact head: {R['heldout_loss_rel_diff_topk_vs_exact_head']:+.3%} (target within 0.5 %)"
                  if "heldout_loss_rel_diff_topk_vs_exact_head" in R else ""),
               f"- where steerport's time goes: body pass with the top-k statistics {t['cache_s']:.1f} s, fit "
               f"{t['fit_s'] - (t['total_s'] - sp['seconds']):.1f} s (the benchmark's judging taken out) "
               f"({res['steps']} steps, best at {res['best_step']}, {res['stopped']}; held-out evaluations of "
               f"{res['eval_tokens']} positions every {res['eval_every']} steps), summary {t['summary_s']:.1f} s, total "
               f"{sp['seconds']:.1f} s; padding: {r['plain_forward']['padded_share']:.1%} of a padded forward's tokens"
               + (f", {r['packed_forward']['padded_share']:.1%} of the packed body pass's" if "packed_forward" in r else ""), ""]
    runs = [("this run", result["memory"])] if result["memory"] else []
    runs += [(r["label"], r["probes"]) for r in result.get("memory_runs", [])]  # further probes merged in by hand
    for label, probes in runs:
        md += [f"Peak memory of `steerport train` (the CLI, defaults) at two data sizes — {label}:", "",
               "| texts per class | train tokens | peak RssAnon MiB | peak VmRSS MiB | peak RssFile MiB | wall s (incl. load) |",
               "|---|---|---|---|---|---|"]
        for p in probes:
            md.append(f"| {p['per_class']} | {p['results']['train_tokens']} | {p['peak_MiB']['RssAnon']} | {p['peak_MiB']['VmRSS']} | "
                      f"{p['peak_MiB']['RssFile']} | {p['wall_s_with_model_load']:.1f} |")
        md.append("")
    if result.get("notes"):
        md += ["What the numbers say:", "", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()

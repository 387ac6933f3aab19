"""Trainer benchmark: steerport's cached-hidden fit vs an anchor-style loop, in one process.

Same model, data, steps, batch size (in tokens), initialisation and seed for:

1. ``steerport-exact``: steerport.train with the full softmax (body run once, head-only steps);
2. ``steerport-topk``: the same with the opt-in top-k head approximation (reuses run 1's cache;
   its reported time includes run 1's measured body-pass time);
3. ``anchor``: a loop in the style of the original LM-Steer code (written here, for the benchmark
   only): every step runs the frozen model body on a padded batch of texts, then the steered
   head with gradients, Adam.

Every held-out number comes from one judge: the exact head loss on the held-out texts' cached
hidden states (steerport.train.summarize). Reported: wall-time ratio at equal steps, final
held-out loss of each, time to quality (first time the held-out loss reaches the anchor's final
loss), and the floor ratio (total training time / one plain forward pass over the training
tokens). The CPU of the machine this ran on is shared with other jobs: ratios taken in one run
are meaningful, bare seconds much less.

    python benchmarks/bench_train.py --per-class 500 --steps 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from steerport.capture import cache_hidden, capture, pack_by_length, padded_batch, tokenize
from steerport.data import DataOptions, load_data
from steerport.models import cpu_has_fast_bf16, load_model
from steerport.train import Fitter, TrainConfig, summarize, train

HERE = Path(__file__).resolve().parent
SHARED = Path("/work/shared/data/sentiment/sst2/train.jsonl")


@torch.no_grad()
def plain_forward_seconds(lm, token_lists, tokens_per_batch: int) -> tuple[float, float]:
    """Wall and CPU seconds of one ordinary forward pass (logits included) over all texts, length-packed batches."""
    pad = lm.tokenizer.pad_token_id or 0
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in pack_by_length([len(t) for t in token_lists], tokens_per_batch):
        ids, mask = padded_batch([token_lists[i] for i in batch], pad)
        lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).logits.sum()
    return time.perf_counter() - t0, time.process_time() - c0


def anchor_loop(lm, data, config: TrainConfig, batch_texts: int, judge, eval_every: int):
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
    history, clock, cpu, step = [], 0.0, 0.0, 0
    epoch, steps = 0, config.steps or 0  # main() always sets steps
    while step < steps:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(config.seed * 7919 + epoch))
        epoch += 1
        for k in range(0, len(order) - batch_texts + 1, batch_texts):
            if step >= steps:
                break
            t0, c0 = time.perf_counter(), time.process_time()
            rows = order[k : k + batch_texts]
            enc = tok([texts[i] for i in rows], return_tensors="pt", padding=True, truncation=True,
                      max_length=config.max_tokens).to(lm.device)
            (h,) = capture(lm, ["head"], input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])  # frozen body, every step
            s = labels[rows.to(lm.device)][:, None, None].to(h.dtype)
            hs = h + (s * eps) * ((h @ A.to(h.dtype)) @ B.to(h.dtype).T)  # steered head input (b, T, d)
            logits = hs @ E.T + (0 if bias is None else bias)  # (b, T, V)
            keep = enc["attention_mask"][:, 1:].bool()
            loss = F.cross_entropy(logits[:, :-1][keep], enc["input_ids"][:, 1:][keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            clock += time.perf_counter() - t0
            cpu += time.process_time() - c0
            if step % eval_every == 0 or step == steps:
                held = judge({"A": A.detach().clone(), "B": B.detach().clone()})["heldout_loss_steered"]
                history.append({"step": step, "heldout_loss": held, "seconds": round(clock, 3), "cpu_seconds": round(cpu, 3)})
                print(f"anchor step {step}: held-out {held:.5f} ({clock:.1f} s)", flush=True)
    return {"A": A.detach(), "B": B.detach()}, clock, cpu, history


def time_to(history, target: float, offset: float = 0.0) -> float | None:
    for h in history:
        if h["heldout_loss"] <= target:
            return h["seconds"] + offset
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(SHARED) if SHARED.exists() else "sst2")
    ap.add_argument("--positive-label", default="1")
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-texts", type=int, default=16, help="anchor batch in texts; steerport gets the same mean tokens")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--epsilon", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_train")
    args = ap.parse_args()

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    data = load_data(DataOptions(files=[args.data], positive_labels=[args.positive_label],
                                 limit_per_class=args.per_class, heldout_fraction=0.1, seed=args.seed))
    train_tokens = tokenize(lm.tokenizer, [e.text for e in data.train], 128)
    mean_pred = sum(len(t) - 1 for t in train_tokens) / len(train_tokens)
    tokens_per_batch = max(1, round(args.batch_texts * mean_pred))
    config = TrainConfig(rank=args.rank, lr=args.lr, epsilon=args.epsilon, steps=args.steps, tokens_per_batch=tokens_per_batch,
                         seed=args.seed, eval_every=args.eval_every, patience=10**9, dtype=args.dtype)
    print(f"data: {len(data.train)} train / {len(data.heldout)} held-out texts, {sum(len(t) - 1 for t in train_tokens)} "
          f"predicted train tokens; {args.steps} steps of {args.batch_texts} texts ~ {tokens_per_batch} tokens", flush=True)

    # the judge: exact held-out loss/AUC on cached held-out hidden states (fp32 cache)
    held_tokens = tokenize(lm.tokenizer, [e.text for e in data.heldout], 128)
    held_cache = cache_hidden(lm, token_lists=held_tokens, predicted_only=True, dtype=torch.float32)
    held_labels = torch.tensor([e.label for e in data.heldout])
    judge_fit = Fitter(lm, held_cache, held_labels, config)
    all_idx = torch.arange(held_cache.n_positions)

    def judge(tensors):
        judge_fit.load_tensors(tensors)
        return summarize(judge_fit, all_idx, 0, data)

    # 0. one plain forward pass over the training tokens
    t_fwd, cpu_fwd = plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch)
    print(f"plain forward over the training tokens: {t_fwd:.1f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        # 1. steerport, exact head
        t0, c0 = time.perf_counter(), time.process_time()
        exact = train(lm, data, config, workdir=tmp)
        t_exact, cpu_exact = time.perf_counter() - t0, time.process_time() - c0
        cache_s = exact.steer.meta["training"]["timings"]["cache_s"]
        print(f"steerport exact: {t_exact:.1f} s (body pass {cache_s:.1f} s)", flush=True)
        # 2. steerport, top-k head (same cache: add the body pass time measured in run 1)
        t0, c0 = time.perf_counter(), time.process_time()
        topk = train(lm, data, TrainConfig(**{**config.__dict__, "head": "topk", "topk": args.topk}), workdir=tmp)
        t_topk = time.perf_counter() - t0 + cache_s
        cpu_topk = time.process_time() - c0  # without the reused body pass
        print(f"steerport topk: {t_topk:.1f} s (incl. the body pass)", flush=True)

    # 3. anchor-style loop
    anchor_tensors, t_anchor, cpu_anchor, anchor_hist = anchor_loop(lm, data, config, args.batch_texts, judge, args.eval_every)

    res_anchor = judge(anchor_tensors)
    res_exact = judge({k: exact.steer.tensors[k] for k in ("A", "B")})
    res_topk = judge({k: topk.steer.tensors[k] for k in ("A", "B")})
    target = res_anchor["heldout_loss_steered"]
    # steerport's history seconds count from the start of train(); the top-k run's start
    # skipped the body pass (reused cache), so add it back
    ttq_exact = time_to(exact.history, target)
    ttq_topk = time_to(topk.history, target, offset=cache_s)

    def rel(a, b):
        return abs(a - b) / abs(b)

    result: dict[str, Any] = {
        "benchmark": "bench_train", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "fast_bf16": cpu_has_fast_bf16(), "load_average_at_end": os.getloadavg(),
                    "note": "compare ratios, not seconds; a load average above the core count means other jobs shared the CPU"},
        "settings": {**vars(args), "out": str(args.out), "tokens_per_batch": tokens_per_batch,
                     "model_dtype": str(lm.dtype).removeprefix("torch."),
                     "train_texts": len(data.train), "heldout_texts": len(data.heldout),
                     "train_tokens": sum(len(t) - 1 for t in train_tokens)},
        "plain_forward_s": t_fwd,
        "cpu_seconds": {"plain_forward": cpu_fwd, "steerport_exact": cpu_exact, "steerport_topk_without_body_pass": cpu_topk,
                        "anchor": cpu_anchor,
                        "note": "process CPU time (all threads): the fairer measure when the machine is oversubscribed"},
        "runs": {
            "anchor": {"seconds": t_anchor, "heldout": res_anchor, "history": anchor_hist},
            "steerport_exact": {"seconds": t_exact, "timings": exact.steer.meta["training"]["timings"], "heldout": res_exact,
                                "history": exact.history, "time_to_anchor_quality_s": ttq_exact},
            "steerport_topk": {"seconds": t_topk, "timings": topk.steer.meta["training"]["timings"], "heldout": res_topk,
                               "history": topk.history, "time_to_anchor_quality_s": ttq_topk,
                               "note": "reuses the exact run's cache; seconds include that run's body pass"},
        },
        "ratios": {
            "anchor_over_steerport_exact_equal_steps": t_anchor / t_exact,
            "anchor_over_steerport_topk_equal_steps": t_anchor / t_topk,
            "heldout_loss_rel_diff_exact_vs_anchor": rel(res_exact["heldout_loss_steered"], target),
            "heldout_loss_rel_diff_topk_vs_exact": rel(res_topk["heldout_loss_steered"], res_exact["heldout_loss_steered"]),
            "time_to_quality_exact_over_anchor": None if ttq_exact is None else ttq_exact / t_anchor,
            "time_to_quality_topk_over_anchor": None if ttq_topk is None else ttq_topk / t_anchor,
            "floor_exact": t_exact / t_fwd,
            "floor_topk": t_topk / t_fwd,
            "floor_exact_to_quality": None if ttq_exact is None else ttq_exact / t_fwd,
            "floor_topk_to_quality": None if ttq_topk is None else ttq_topk / t_fwd,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    R = result["ratios"]

    def f(x, fmt="{:.3f}"):
        return "n/a (not reached)" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)

    md = [
        "# Trainer benchmark (bench_train.py)", "",
        f"{result['date']}; model {args.model} ({result['settings']['model_dtype']}); data {args.data}: "
        f"{len(data.train)} train / {len(data.heldout)} held-out texts, {result['settings']['train_tokens']} train tokens; "
        f"rank {args.rank}, lr {args.lr}, ε₀ {args.epsilon}, {args.steps} steps of {args.batch_texts} texts "
        f"(~{tokens_per_batch} tokens), seed {args.seed}. CPU: {os.cpu_count()} cores "
        f"(load average at the end {os.getloadavg()[0]:.1f}: above ~2 means other jobs shared them); "
        f"bf16 fast path: {cpu_has_fast_bf16()}.", "",
        "| run | wall s (equal steps) | held-out loss | unsteered | held-out AUC | time to anchor's final loss |",
        "|---|---|---|---|---|---|",
        f"| anchor-style loop (body every step, padded) | {t_anchor:.1f} | {res_anchor['heldout_loss_steered']:.5f} | "
        f"{res_anchor['heldout_loss_unsteered']:.5f} | {f(res_anchor.get('heldout_auc'))} | {t_anchor:.1f} s |",
        f"| steerport exact head | {t_exact:.1f} | {res_exact['heldout_loss_steered']:.5f} | {res_exact['heldout_loss_unsteered']:.5f} "
        f"| {f(res_exact.get('heldout_auc'))} | {f(ttq_exact, '{:.1f} s')} |",
        f"| steerport top-{args.topk} head (opt-in) | {t_topk:.1f} | {res_topk['heldout_loss_steered']:.5f} | "
        f"{res_topk['heldout_loss_unsteered']:.5f} | {f(res_topk.get('heldout_auc'))} | {f(ttq_topk, '{:.1f} s')} |",
        "",
        f"- one plain forward pass over the training tokens: {t_fwd:.1f} s",
        f"- process CPU seconds (fairer under contention): plain forward {cpu_fwd:.0f}, steerport exact {cpu_exact:.0f}, "
        f"steerport top-k {cpu_topk:.0f} + the exact run's body pass, anchor {cpu_anchor:.0f}",
        f"- wall ratio anchor / steerport at equal steps: exact {R['anchor_over_steerport_exact_equal_steps']:.2f}×, "
        f"top-k {R['anchor_over_steerport_topk_equal_steps']:.2f}×",
        f"- final held-out loss, relative difference steerport-exact vs anchor: {R['heldout_loss_rel_diff_exact_vs_anchor']:.2%}; "
        f"top-k vs exact: {R['heldout_loss_rel_diff_topk_vs_exact']:.3%}",
        f"- time to the anchor's final quality / anchor wall time: exact {f(R['time_to_quality_exact_over_anchor'])}, "
        f"top-k {f(R['time_to_quality_topk_over_anchor'])} (target ≤ 0.2)",
        f"- floor ratio (training time / one forward pass): exact {R['floor_exact']:.2f} (all steps), "
        f"{f(R['floor_exact_to_quality'], '{:.2f}')} (to quality); top-k {R['floor_topk']:.2f} (all steps), "
        f"{f(R['floor_topk_to_quality'], '{:.2f}')} (to quality) (target ≤ 1.5)",
        f"- steerport exact timings: {exact.steer.meta['training']['timings']}",
        f"- steerport top-k timings: {topk.steer.meta['training']['timings']}",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Evaluate a trained steer on held-out labeled text and on generations.

1. Steer as a classifier on a held-out test split: score(x) = ℓ_{+s}(x) − ℓ_{−s}(x)
   (steerport.scoring.steer_scores), ROC AUC against the labels; also the separation
   Sep(s) = [ℓ_s(D+) − ℓ_0(D+)] − [ℓ_s(D−) − ℓ_0(D−)] (steerport.metrics.separation).
2. Greedy continuations of prompts at several steer values, judged by an offline TF-IDF +
   logistic-regression judge (steerport.judges.TfidfJudge) trained on a separate labeled file
   (the attribute rate), with a few samples shown.

    python benchmarks/eval_steer.py smollm2-135m sst2.st --test sst2_test.jsonl --positive-label 1 \
        --judge-train sst2_train.jsonl --prompts prompts.jsonl --values -10,0,10 --out results/sst2_eval
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.hooks import generate
from steerport.judges import TfidfJudge
from steerport.metrics import distinct_n, roc_auc, separation
from steerport.models import load_model
from steerport.scoring import mean_logprob
from steerport.steer import Steer
from steerport.texts import read_texts, read_texts_and_labels


def judge(train_file: Path, positive_labels: list[str], text_field: str, label_field: str) -> TfidfJudge:
    """TF-IDF + logistic regression on a labeled file: P(positive) of any text."""
    texts, labels = read_texts_and_labels(train_file, text_field=text_field, label_field=label_field,
                                          positive_labels=positive_labels)
    return TfidfJudge.fit(texts, labels, positive="positive", meta={"train": str(train_file)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("steer", type=Path)
    ap.add_argument("--test", type=Path, required=True, help="held-out labeled JSONL")
    ap.add_argument("--positive-label", action="append", required=True)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--label-field", default="label")
    ap.add_argument("--limit-per-class", type=int, default=200)
    ap.add_argument("--score-value", type=float, default=1.0, help="steer value s for the classifier score")
    ap.add_argument("--judge-train", type=Path, help="labeled file to train the offline judge on (never the test file)")
    ap.add_argument("--prompts", type=Path)
    ap.add_argument("--n-prompts", type=int, default=30)
    ap.add_argument("--values", default="-10,0,10")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--samples", type=int, default=4, help="continuations shown per value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, required=True, help="output prefix: writes .json and .md")
    args = ap.parse_args()

    t0 = time.perf_counter()
    steer = Steer.load(args.steer)
    lm = load_model(args.model, dtype=args.dtype)
    all_texts, all_labels = read_texts_and_labels(args.test, text_field=args.text_field, label_field=args.label_field,
                                                  positive_labels=args.positive_label)
    rng = random.Random(args.seed)
    pos = [t for t, y in zip(all_texts, all_labels) if y == 1]
    neg = [t for t, y in zip(all_texts, all_labels) if y == 0]
    rng.shuffle(pos)
    rng.shuffle(neg)
    pos, neg = pos[: args.limit_per_class], neg[: args.limit_per_class]
    texts, labels = pos + neg, torch.tensor([1] * len(pos) + [-1] * len(neg))
    s = args.score_value
    lp0 = mean_logprob(lm, texts)
    lpp = mean_logprob(lm, texts, [(steer, s)])
    lpn = mean_logprob(lm, texts, [(steer, -s)])
    P, N = labels > 0, labels < 0
    result: dict = {
        "model": args.model, "steer": str(args.steer), "steer_fingerprint": steer.fingerprint,
        "test": {"file": str(args.test), "positive": int(P.sum()), "negative": int(N.sum()), "seed": args.seed},
        "classifier": {"value": s, "auc": roc_auc(lpp - lpn, labels),
                       "separation": separation(lpp[P], lp0[P], lpp[N], lp0[N])},
        "training": steer.meta.get("training", {}).get("results"),
    }
    print(json.dumps(result["classifier"]), flush=True)

    gens = {}
    if args.prompts:
        prompts = read_texts(args.prompts, limit=args.n_prompts, min_chars=1)
        clf = judge(args.judge_train, args.positive_label, args.text_field, args.label_field) if args.judge_train else None
        for v in [float(x) for x in args.values.split(",")]:
            outs = generate(lm, prompts, [(steer, v)] if v else [], max_new_tokens=args.max_new_tokens, seed=args.seed)
            row = {"value": v, "samples": [{"prompt": p, "continuation": o} for p, o in zip(prompts, outs)]}
            if clf is not None:
                p = clf.score(outs)
                row["judge_positive_rate"] = float(p.mean()) if outs else 0.0
                row["judge_positive_share"] = float((p > 0.5).mean()) if outs else 0.0
            row["distinct_1"] = distinct_n(outs, 1)
            gens[str(v)] = row
            print(v, {k: row[k] for k in row if k not in ("samples",)}, flush=True)
        result["generation"] = {"prompts": str(args.prompts), "n": len(prompts), "max_new_tokens": args.max_new_tokens,
                                "decoding": "greedy", "judge": f"tf-idf + logistic regression on {args.judge_train}" if clf else None,
                                "by_value": gens}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(args.out.with_suffix(".json"), result)
    md = [f"# {args.steer.name} on {args.model}", "",
          (f"Held-out test {args.test} ({result['test']['positive']} positive / {result['test']['negative']} negative): "
          f"steer-as-classifier ROC AUC **{result['classifier']['auc']:.3f}** (value ±{s:g}), "
          f"separation {result['classifier']['separation']:.4f} nats/token."), ""]
    if gens:
        md += ["| steer value | judge P(positive) | share judged positive | distinct-1 |", "|---|---|---|---|"]
        for v, row in gens.items():
            md.append(f"| {v} | {row.get('judge_positive_rate', float('nan')):.3f} | "
                      f"{row.get('judge_positive_share', float('nan')):.3f} | {row['distinct_1']:.3f} |")
        md.append("")
        for v, row in gens.items():
            md.append(f"**value {v}**")
            md.append("")
            for smp in row["samples"][: args.samples]:
                md.append(f"- *{smp['prompt']}*{smp['continuation']}".replace("\n", " "))
            md.append("")
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(md))


if __name__ == "__main__":
    main()

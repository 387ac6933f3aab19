"""Evaluate a trained steer on held-out labeled text and on generations.

1. Steer as a classifier on a held-out test split: score(x) = ℓ_{+s}(x) − ℓ_{−s}(x)
   (steerport.scoring.steer_scores), ROC AUC against the labels; also the separation
   Sep(s) = [ℓ_s(D+) − ℓ_0(D+)] − [ℓ_s(D−) − ℓ_0(D−)] (DESIGN.md §5).
2. Greedy continuations of prompts at several steer values, judged by an offline TF-IDF +
   logistic-regression classifier trained on a separate labeled file (the attribute rate),
   with a few samples shown.

    python benchmarks/eval_steer.py smollm2-135m sst2.st --test sst2_test.jsonl --positive-label 1 \
        --judge-train sst2_train.jsonl --prompts prompts.jsonl --values -10,0,10 --out results/sst2_eval
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from steerport.cli import read_prompts  # noqa: E402
from steerport.data import read_labeled  # noqa: E402
from steerport.hooks import generate  # noqa: E402
from steerport.models import load_model  # noqa: E402
from steerport.scoring import mean_logprob, roc_auc  # noqa: E402
from steerport.steer import Steer  # noqa: E402


def judge(train_file: Path, positive_labels: list[str], text_field: str, label_field: str):
    """TF-IDF + logistic regression on a labeled file: P(positive) of any text."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    ex, _ = read_labeled(train_file, text_field=text_field, label_field=label_field, positive_labels=positive_labels)
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, lowercase=True),
                        LogisticRegression(max_iter=2000, C=4.0))
    clf.fit([e.text for e in ex], [int(e.label > 0) for e in ex])
    return clf


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
    ex, _ = read_labeled(args.test, text_field=args.text_field, label_field=args.label_field,
                         positive_labels=args.positive_label)
    rng = random.Random(args.seed)
    pos = [e for e in ex if e.label > 0]
    neg = [e for e in ex if e.label < 0]
    rng.shuffle(pos)
    rng.shuffle(neg)
    test = pos[: args.limit_per_class] + neg[: args.limit_per_class]
    texts, labels = [e.text for e in test], torch.tensor([e.label for e in test])
    s = args.score_value
    lp0 = mean_logprob(lm, texts)
    lpp = mean_logprob(lm, texts, [(steer, s)])
    lpn = mean_logprob(lm, texts, [(steer, -s)])
    P, N = labels > 0, labels < 0
    result: dict = {
        "model": args.model, "steer": str(args.steer), "steer_fingerprint": steer.fingerprint,
        "test": {"file": str(args.test), "positive": int(P.sum()), "negative": int(N.sum()), "seed": args.seed},
        "classifier": {"value": s, "auc": roc_auc(lpp - lpn, labels),
                       "separation": float((lpp[P] - lp0[P]).mean() - (lpp[N] - lp0[N]).mean())},
        "training": steer.meta.get("training", {}).get("results"),
    }
    print(json.dumps(result["classifier"]), flush=True)

    gens = {}
    if args.prompts:
        prompts = read_prompts(args.prompts)[: args.n_prompts]
        clf = judge(args.judge_train, args.positive_label, args.text_field, args.label_field) if args.judge_train else None
        for v in [float(x) for x in args.values.split(",")]:
            outs = generate(lm, prompts, [(steer, v)] if v else [], max_new_tokens=args.max_new_tokens, seed=args.seed)
            row = {"value": v, "samples": [{"prompt": p, "continuation": o} for p, o in zip(prompts, outs)]}
            if clf is not None:
                row["judge_positive_rate"] = float(clf.predict_proba(outs)[:, 1].mean() if outs else 0)
                row["judge_positive_share"] = float((clf.predict_proba(outs)[:, 1] > 0.5).mean())
            words = [w for o in outs for w in o.split()]
            row["distinct_1"] = len(set(words)) / max(len(words), 1)
            gens[str(v)] = row
            print(v, {k: row[k] for k in row if k not in ("samples",)}, flush=True)
        result["generation"] = {"prompts": str(args.prompts), "n": len(prompts), "max_new_tokens": args.max_new_tokens,
                                "decoding": "greedy", "judge": f"tf-idf + logistic regression on {args.judge_train}" if clf else None,
                                "by_value": gens}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    md = [f"# {args.steer.name} on {args.model}", "",
          f"Held-out test {args.test} ({result['test']['positive']} positive / {result['test']['negative']} negative): "
          f"steer-as-classifier ROC AUC **{result['classifier']['auc']:.3f}** (value ±{s:g}), "
          f"separation {result['classifier']['separation']:.4f} nats/token.", ""]
    if gens:
        md += ["| steer value | judge P(positive) | share judged positive | distinct-1 |", "|---|---|---|---|"]
        for v, row in gens.items():
            md.append(f"| {v} | {row.get('judge_positive_rate', float('nan')):.3f} | {row.get('judge_positive_share', float('nan')):.3f} | {row['distinct_1']:.3f} |")
        md.append("")
        for v, row in gens.items():
            md.append(f"**value {v}**")
            md.append("")
            for smp in row["samples"][: args.samples]:
                md.append(f"- *{smp['prompt']}*{smp['continuation']}".replace("\n", " "))
            md.append("")
    args.out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()

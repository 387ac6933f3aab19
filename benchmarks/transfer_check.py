"""Real-model transfer check: carry a source steer to targets by several forms and measure it there.

For each target and each FORM:CALIBRATION: transfer the steer, then on held-out labeled texts of
the target report steer-as-classifier AUC (score = ℓ_{+v} − ℓ_{−v}), separation
Sep(v) = [ℓ_v − ℓ_0](D+) − [ℓ_v − ℓ_0](D−) and κ(v) (mean KL from the unsteered model on neutral
text), next to the same numbers of the source steer on its own model; plus a few greedy
generations (unsteered, +v, −v). Writes JSON after every form, so a stopped run keeps its numbers.

Usage::

    python benchmarks/transfer_check.py positive.st --targets gemma3-270m,qwen2.5-0.5b \\
        --forms logit:embed,paper:embed,logit:kl,hidden:kl --value 1 --n 100 --out benchmarks/results/transfer_check.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steerport import TransferOptions, transfer_steer
from steerport.fileio import atomic_write_json
from steerport.hooks import generate
from steerport.metrics import roc_auc, separation
from steerport.models import load_model
from steerport.scoring import mean_kl, mean_logprob
from steerport.steer import Steer
from steerport.texts import bundled, neutral, read_texts, read_texts_and_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steer")
    ap.add_argument("--source", default=None, help="source model (default: the steer's model spec)")
    ap.add_argument("--targets", default="gemma3-270m,qwen2.5-0.5b")
    ap.add_argument("--forms", default="logit:embed,paper:embed,logit:kl,hidden:kl")
    ap.add_argument("--value", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=100, help="held-out texts per class")
    ap.add_argument("--data", default=str(bundled("sst2-test")), help="held-out labeled texts (default: bundled SST-2 test)")
    ap.add_argument("--prompts", default=str(bundled("prompts-sentiment")), help="prompts (default: bundled neutral prompts)")
    ap.add_argument("--dtype", default="float32", help="float32: on this CPU bf16 ran 3x slower single-threaded")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-source", action="store_true", help="do not evaluate the source steer on its own model")
    ap.add_argument("--out", default="benchmarks/results/transfer_check.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    all_texts, all_labels = read_texts_and_labels(args.data)
    pos = [t for t, y in zip(all_texts, all_labels) if y == 1][: args.n]
    neg = [t for t, y in zip(all_texts, all_labels) if y == 0][: args.n]
    texts, labels = pos + neg, [1] * len(pos) + [0] * len(neg)
    prompts = read_texts(args.prompts, limit=3, min_chars=1)
    kl_texts = neutral("calib", 16)
    v = args.value

    def evaluate(lm, steer) -> dict:
        t = time.time()
        l0 = mean_logprob(lm, texts, [], max_tokens=args.max_tokens)
        lp = mean_logprob(lm, texts, [(steer, v)], max_tokens=args.max_tokens)
        ln = mean_logprob(lm, texts, [(steer, -v)], max_tokens=args.max_tokens)
        y = torch.tensor(labels).bool()
        return {"auc": roc_auc(lp - ln, labels), "sep": separation(lp[y], l0[y], lp[~y], l0[~y]),
                "kappa": mean_kl(lm, kl_texts, [(steer, v)], max_tokens=64), "eval_s": round(time.time() - t, 1)}

    def gens(lm, steer) -> dict:
        return {f"+{v:g}": generate(lm, prompts, [(steer, v)], max_new_tokens=20),
                f"-{v:g}": generate(lm, prompts, [(steer, -v)], max_new_tokens=20)}

    src_steer = Steer.load(args.steer)
    source = args.source or src_steer.model["spec"]
    res = {"steer": args.steer, "source": source, "value": v, "dtype": args.dtype, "n_per_class": args.n,
           "data": args.data, "prompts": prompts, "kl_text": "bundled neutral calib split, first 16 lines, 64 tokens"}
    out = Path(args.out)
    save = lambda: atomic_write_json(out, res)
    src_lm = load_model(source, dtype=args.dtype)
    if not args.skip_source:
        res["source_eval"] = evaluate(src_lm, src_steer)
        res["source_eval"]["generations"] = {"unsteered": generate(src_lm, prompts, [], max_new_tokens=20),
                                             **gens(src_lm, src_steer)}
        print(json.dumps(res["source_eval"]), flush=True)
        save()
    for tgt in args.targets.split(","):
        tgt_lm = load_model(tgt, dtype=args.dtype)
        res[tgt] = {"unsteered_generations": generate(tgt_lm, prompts, [], max_new_tokens=20)}
        for fc in args.forms.split(","):
            form, cal = fc.split(":")
            t = time.time()
            r = transfer_steer(src_steer, src_lm, tgt_lm, TransferOptions(
                form=form, calibrate=cal, calib_value=v, hidden_texts=neutral("fit", 200), hidden_max_tokens=96),
                source_path=args.steer)
            ev = evaluate(tgt_lm, r.steer)
            ev.update(transfer_s=round(time.time() - t - ev["eval_s"], 1), calibration=r.lineage["calibration"],
                      hidden_map=r.lineage.get("hidden_map"), stages_s=r.lineage["seconds"])
            ev["generations"] = gens(tgt_lm, r.steer)
            res[tgt][fc] = ev
            print(tgt, fc, json.dumps({k: x for k, x in ev.items() if k != "generations"}), flush=True)
            save()
        del tgt_lm
    save()


if __name__ == "__main__":
    main()

"""The refined form's keyword term: its keywords, and held-out AUC of one carried steer per setting.

Carries the ladder's seed-0 native steer of SOURCE to TARGET with the refined form at several keyword
settings (``--variants keywords:weight[:words],...``; ``words``: only tokens with a letter) and prints, per setting, the carried steer's held-out AUC on
the ladder's test texts (the steer as a classifier at its value for κ 0.05 on neutral text, as
``benchmarks.transfer_ladder`` measures it) and the refinement's held-out terms. ``--list N`` first
prints the source steer's N keywords. The target's test cache is built once for all settings.

    python -m benchmarks.refine_keywords qwen2.5-0.5b smollm2-135m --task sentiment \\
        --work <ladder work dir> --variants 0:1,16:1,16:1:words,64:0.1 --list 40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.refine_check import HeadEval
from benchmarks.transfer_ladder import AUC_KAPPA, matched_values, native_path, neutral_scorer, sentiment, toxicity
from steerport.metrics import roc_auc
from steerport.models import load_model
from steerport.refine import RefineOptions, keyword_problem
from steerport.refine_cache import cached_prepare_refine
from steerport.steer import Steer
from steerport.texts import neutral
from steerport.transfer import TransferOptions, transfer_steer
from steerport.vocab import align_vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("target")
    ap.add_argument("--task", default="toxicity", choices=["toxicity", "sentiment"])
    ap.add_argument("--work", required=True, help="the ladder's work folder (its native steers)")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--variants", default="0:1,64:1", help="keywords:weight[:words], comma separated")
    ap.add_argument("--list", type=int, default=0, help="print the source steer's first N keywords")
    args = ap.parse_args()
    task = {"toxicity": toxicity, "sentiment": sentiment}[args.task](Path(args.data_root), 400, 100, False)
    src, tgt = load_model(args.source, dtype="float32"), load_model(args.target, dtype="float32")
    native = Steer.load(native_path(Path(args.work), args.task, args.source, 0))
    if args.list:
        al = align_vocab(src.tokenizer, tgt.tokenizer)
        data = cached_prepare_refine(src, tgt, al.src_ids, al.tgt_ids, neutral("fit"))
        kw = keyword_problem(data.problem, native.A, native.B, src, tgt, al.src_ids, al.tgt_ids, args.list, data.fit_idx)
        print("keywords:", [al.surface_strings[int(i)].decode("utf-8", "replace") for i in kw.pairs])
    he, scorer, y = HeadEval(tgt, task.test_texts, 64), neutral_scorer(tgt), np.array(task.test_labels)
    for item in args.variants.split(","):
        m, lam, *flags = item.split(":")
        words_only = "words" in flags
        t = time.perf_counter()
        opts = TransferOptions(form="refined", refine=RefineOptions(keywords=int(m), keyword_weight=float(lam),
                                                                    keyword_words_only=words_only))
        res = transfer_steer(native, src, tgt, opts)
        v = matched_values(scorer, res.steer, (AUC_KAPPA,))[str(AUC_KAPPA)]["value"]
        auc = roc_auc(np.array([float(x) for x in he.scores(res.steer, v)]), y)
        rec = res.lineage["refine"]
        print(json.dumps({"pair": f"{args.source} -> {args.target}", "task": args.task, "keywords": int(m), "words_only": words_only,
                          "weight": float(lam), "auc": round(float(auc), 4), "value": round(v, 3),
                          "heldout_terms": rec.get("heldout_terms"), "heldout_loss": rec["heldout_loss"],
                          "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()

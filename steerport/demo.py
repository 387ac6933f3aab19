"""The main job on the embedded default: train on one real model, transfer, measure both.

1. train a sentiment steer on ``source`` from the SST-2 slice shipped in the package;
2. score it as a classifier on the shipped held-out SST-2 test slice (ROC AUC);
3. transfer it to ``target`` (another tokenizer and hidden size), with value calibration;
4. score the transferred steer on the target the same way;
5. greedy continuations of a few prompts at -s, 0, +s on both models.

Everything is written to ``out_dir`` (the two steers, ``results.json``). It uses only
shipped data and catalog models (pulled on first use), so it runs offline.

Example::

    results = run_demo(Path("steerport-demo"))
    print(results["source"]["auc"], results["target"]["auc"])
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from steerport.data import DataOptions, load_data
from steerport.fileio import atomic_write_text
from steerport.hooks import generate
from steerport.metrics import roc_auc
from steerport.models import load_model
from steerport.scoring import steer_scores
from steerport.strength import try_record_curve
from steerport.texts import bundled, read_texts_and_labels
from steerport.train import TrainConfig, train
from steerport.transfer import TransferOptions, transfer

PROMPTS = ["The movie was", "My neighbour's new restaurant", "I finally read the book, and", "The weather this weekend"]


def held_out_sst2(limit_per_class: int) -> tuple[list[str], torch.Tensor]:
    """The shipped SST-2 test slice (never trained on), balanced: texts and ±1 labels."""
    texts, labels = read_texts_and_labels(bundled("sst2-test"))
    assert labels is not None  # require_labels
    pos = [t for t, y in zip(texts, labels) if y == 1][:limit_per_class]
    neg = [t for t, y in zip(texts, labels) if y == 0][:limit_per_class]
    return pos + neg, torch.tensor([1] * len(pos) + [-1] * len(neg))


def run_demo(
    out_dir: Path,
    *,
    source: str = "smollm2-135m",
    target: str = "gemma3-270m",
    limit_per_class: int = 300,
    test_per_class: int = 100,
    value: float = 1.0,
    log: Callable[[str], None] = print,
    train_progress: Callable[[str, dict], None] | None = None,
    dtype: str = "auto",
    device: str = "cpu",
) -> dict:
    """Run the five steps above; returns (and saves) every number with its settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    texts, labels = held_out_sst2(test_per_class)
    results: dict = {"value": value, "test_texts": len(texts), "prompts": PROMPTS}

    log(f"[1/5] training a sentiment steer on {source} (shipped SST-2 slice, {limit_per_class} per class)")
    src = load_model(source, dtype=dtype, device=device)
    data = load_data(DataOptions(files=["sst2"], limit_per_class=limit_per_class, seed=0))
    trained = train(src, data, TrainConfig(seed=0, head="topk"), progress=train_progress)
    try_record_curve(src, trained.steer, log)  # the transfer then calibrates against it on the target alone
    src_path = trained.steer.save(out_dir / f"positive.{source}.st")
    log(f"      saved {src_path}")

    log(f"[2/5] scoring it as a classifier on {len(texts)} held-out SST-2 test sentences")
    auc_src = roc_auc(steer_scores(src, trained.steer, texts, value), labels)
    results["source"] = {"model": source, "steer": str(src_path), "auc": auc_src, "train": trained.results}

    log(f"[3/5] transferring the steer to {target}")
    moved = transfer(trained.steer, source, target, TransferOptions(device=device), log=lambda m: log(f"      {m}"))
    tgt_path = moved.steer.save(out_dir / f"positive.{target}.st")
    results["lineage"] = moved.lineage

    log(f"[4/5] scoring the transferred steer on {target}")
    del src
    tgt = load_model(target, dtype=dtype, device=device)
    auc_tgt = roc_auc(steer_scores(tgt, moved.steer, texts, value), labels)
    results["target"] = {"model": target, "steer": str(tgt_path), "auc": auc_tgt}

    log(f"[5/5] greedy continuations at values -{value:g}, 0, +{value:g}")
    generations = {}
    for name, lm, steer in ((target, tgt, moved.steer), (source, load_model(source, dtype=dtype, device=device), trained.steer)):
        generations[name] = {
            f"{s:+g}": generate(lm, PROMPTS, [(steer, s)], max_new_tokens=24) for s in (-value, 0.0, value)
        }
    results["generations"] = generations
    results["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    return results

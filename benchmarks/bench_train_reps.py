"""The trainer's cost in forward passes, repeated in one process: steadier than one run of bench_train.py.

One model, the benchmark's data and settings (``bench_train.py``): a warm-up forward pass, then
``--reps`` times: a plain forward pass, ``steerport.train.train`` with the CLI's defaults, a plain
forward pass. Each repetition's ratio is the training's wall time over the mean of the two forward
passes around it, so a slow phase of a shared machine hits both; ``ratio`` is against padded batches
(one text per row), ``ratio_packed`` against texts packed in rows as the trainer's body pass lays them. The first repetition also pays
oneDNN's kernel compilation for the body pass's new batch shapes; later ones do not. One JSON line
goes to stdout.

To compare two versions of the trainer, run it once per version, alternating (``PYTHONPATH`` picks the
steerport package; this script and ``bench_train.py`` come from the current tree where the other has none)::

    git worktree add ../before <commit>
    for rep in 1 2; do
      for tree in ../before .; do PYTHONPATH=$tree:. python benchmarks/bench_train_reps.py smollm2-135m 150; done
    done
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.bench_train import SHARED, plain_forward_seconds
from steerport.capture import tokenize
from steerport.data import DataOptions, load_data
from steerport.models import cpu_name, load_model
from steerport.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("per_class", type=int, help="texts per class (10 %% held out), as bench_train.py's --per-class")
    ap.add_argument("--data", default=str(SHARED) if SHARED.exists() else "sst2")
    ap.add_argument("--positive-label", default="1")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype="auto")  # the CLI's default dtype
    data = load_data(DataOptions(files=[args.data], positive_labels=[args.positive_label],
                                 limit_per_class=args.per_class, heldout_fraction=0.1, seed=0))
    train_tokens = tokenize(lm.tokenizer, [e.text for e in data.train], 128)
    config = TrainConfig(rank=64, lr=1e-2, epsilon=1e-3, seed=0)  # bench_train.py's settings
    plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch)  # warm-up
    plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch, packed=True)
    reps = []
    for _ in range(args.reps):
        before = plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch)[0]
        packed_before = plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch, packed=True)[0]
        t0 = time.perf_counter()
        result = train(lm, data, config)
        seconds = time.perf_counter() - t0
        after = plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch)[0]
        packed_after = plain_forward_seconds(lm, train_tokens, config.cache_tokens_per_batch, packed=True)[0]
        forward, packed = (before + after) / 2, (packed_before + packed_after) / 2
        timings = result.steer.meta["training"]["timings"]
        reps.append({"forward_s": round(forward, 3), "train_s": round(seconds, 3), "ratio": round(seconds / forward, 3),
                     "packed_forward_s": round(packed, 3), "ratio_packed": round(seconds / packed, 3),
                     "body_pass_ratio": round(timings["cache_s"] / forward, 3), "timings": timings,
                     "steps": result.results["steps"], "heldout_loss_steered": result.results["heldout_loss_steered"]})
    print(json.dumps({"model": args.model, "per_class": args.per_class, "cpu": cpu_name(), "threads": args.threads,
                      "dtype": str(lm.dtype).removeprefix("torch."), "reps": reps}))


if __name__ == "__main__":
    main()

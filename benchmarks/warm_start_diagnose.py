"""Why a warm start does not improve (issue 12, part 3): one fraction of the data, fixed steps, three learning rates.

Starts the trainer from the transferred steer cached by ``benchmarks/warm_start.py`` (run that first),
on the first ``FRACTION`` of the shipped SST-2 training slice, for 40 steps without early stopping
(evaluations every 4 steps), at lr 1e-2 (the default), 1e-3 and 3e-4; prints the dev loss along each
fit and the test-slice AUC, separation and loss at each text's label of the start and of steps 4, 12, 40.

    python benchmarks/warm_start_diagnose.py 0.1 > benchmarks/results/warm_start_diagnose_sentiment.txt
"""

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from warm_start import TestSet, fraction_of  # noqa: E402

from steerport.data import DataOptions, load_data  # noqa: E402
from steerport.models import load_model  # noqa: E402
from steerport.steer import Steer  # noqa: E402
from steerport.train import TrainConfig, train  # noqa: E402

WORK = Path("/tmp/steerport-warm-start/sentiment")
moved = Steer.load(WORK / "transferred.gemma3-270m.st")
lm = load_model("gemma3-270m")
data = fraction_of(load_data(DataOptions(files=["sst2"])), float(sys.argv[1]))
rows = [json.loads(ln) for ln in (ROOT / "steerport/data/sentiment/sst2_test.jsonl").read_text().splitlines()]
test = TestSet(lm, [r["text"] for r in rows], torch.tensor([1.0 if r["label"] == 1 else -1.0 for r in rows]), 64)
print(f"fraction {sys.argv[1]}: {len(data.train)} training + {len(data.heldout)} dev texts", flush=True)
steers, names = [moved], ["init"]
for lr in (1e-2, 1e-3, 3e-4):
    snaps: dict[int, tuple[float, dict]] = {}

    def prog(phase: str, info: dict, snaps: dict = snaps) -> None:
        if phase == "eval":
            snaps[info["step"]] = (info["heldout_loss"], info["factors"]())

    t = time.perf_counter()
    r = train(lm, data, TrainConfig(steps=40, eval_every=4, patience=100, lr=lr), init=moved, progress=prog)
    print(f"lr {lr:g}: {time.perf_counter() - t:.1f} s; dev loss by step", [(s, round(v[0], 4)) for s, v in sorted(snaps.items())],
          f"unsteered {r.results['heldout_loss_unsteered']}", flush=True)
    for s in (4, 12, 40):
        steers.append(Steer("lm-steer", snaps[s][1], 1e-3, model=dict(moved.model)))
        names.append(f"lr {lr:g} step {s}")
for n, e in zip(names, test.evaluate(steers, boot=200)):
    print(f"{n}: " + ", ".join(f"{k} {v:.4f}" for k, v in e.items()), flush=True)

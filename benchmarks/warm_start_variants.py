"""Why a warm start does not improve (issue 12, part 3): the scale, the factor fitted, a pull to the start, a ranking term.

The transferred steer (SmolLM2 → Gemma-3 sentiment, the shipped source steer, the default transfer) is the start.
On the first ``FRACTION`` of the shipped SST-2 slice (train and dev split alike, as ``warm_start.py``) this script

* measures the training texts' LM loss at each text's label along the ray c · steer (c = 0.5 … 6): if the
  calibrated value were too weak or too strong for the target's data, the fit would first have to rescale it;
* runs the trainer's defaults from the start, and the same with one factor frozen (its gradient dropped before
  each Adam step), with a penalty λ Σ ‖P − P₀‖² / ‖P₀‖² pulling A and B towards the start, or with a ranking
  term α · mean softplus(−y · 10 · score) over the batch's texts, score = mean log-prob at +1 minus at −1, the
  steer-as-classifier score (``Fitter.step`` replaced for the run: an experiment, not a trainer option);
* scores every steer on the shipped test slice (never trained on): AUC with a bootstrap 95 % interval,
  separation, and the test loss at each text's label.

    python benchmarks/warm_start_variants.py 0.1 0.25 > benchmarks/results/warm_start_variants.txt
"""

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from warm_start import TestSet, fraction_of  # noqa: E402

import steerport.train.fitter as fitter_module  # noqa: E402
from steerport.data import DataOptions, load_data  # noqa: E402
from steerport.models import cpu_name, load_model  # noqa: E402
from steerport.steer import Steer  # noqa: E402
from steerport.train import TrainConfig, train  # noqa: E402
from steerport.transfer import transfer_steer  # noqa: E402

SOURCE = ROOT / "benchmarks/steers/smollm2-135m-sst2-positive.st"
SCALES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
VARIANTS = {"warm (defaults)": {}, "fit B only": {"freeze": "A"}, "fit A only": {"freeze": "B"},
            "pull λ 0.03": {"pull": 0.03}, "pull λ 0.3": {"pull": 0.3}, "ranking α 1": {"rank": 1.0}}


def step_with(freeze: str | None = None, pull: float = 0.0, rank: float = 0.0):
    """A replacement for ``Fitter.step``: one factor frozen, a pull towards the factors of the first step, or a
    ranking term on the texts' classifier scores."""
    def step(self, idx: torch.Tensor) -> float:
        if not hasattr(self, "start"):
            self.start = {k: v.detach().clone() for k, v in self.params.items()}
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.token_loss(idx).mean()
        total = loss + pull * sum(((self.params[k] - self.start[k]) ** 2).sum() / (self.start[k] ** 2).sum()
                                  for k in ("A", "B")) if pull else loss
        if rank:
            d = self.token_loss(idx, sign=-1.0) - self.token_loss(idx, sign=1.0)  # log p at +1 − at −1, per position
            texts, inv = torch.unique(self.cache.text_id[idx].long(), return_inverse=True)
            score = torch.zeros(len(texts)).index_add(0, inv, d) / torch.bincount(inv, minlength=len(texts))
            total = total + rank * F.softplus(-self.labels[texts] * 10.0 * score).mean()
        total.backward()
        if freeze:
            self.params[freeze].grad = None
        self.optimizer.step()
        return loss.item()
    return step


def main() -> None:
    torch.set_num_threads(2)
    fractions = [float(f) for f in sys.argv[1:]] or [0.1]
    print(f"# {' '.join(sys.argv)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu_name()}, 2 threads", flush=True)
    t = time.time()
    start = transfer_steer(Steer.load(SOURCE), "smollm2-135m", "gemma3-270m").steer
    print(f"transfer (default form and calibration): {time.time() - t:.0f} s", flush=True)
    lm = load_model("gemma3-270m")
    rows = [json.loads(ln) for ln in (ROOT / "steerport/data/sentiment/sst2_test.jsonl").read_text().splitlines()]
    test = TestSet(lm, [r["text"] for r in rows], torch.tensor([1.0 if r["label"] == 1 else -1.0 for r in rows]), 64)
    plain_step = fitter_module.Fitter.step
    for frac in fractions:
        data = fraction_of(load_data(DataOptions(files=["sst2"])), frac)
        print(f"\n## fraction {frac}: {len(data.train)} training + {len(data.heldout)} dev texts", flush=True)
        train_set = TestSet(lm, [e.text for e in data.train], torch.tensor([float(e.label) for e in data.train]), 128)
        ray = train_set.evaluate([replace(start, epsilon=start.epsilon * c) for c in SCALES], boot=10)
        print("training texts' loss at label along c · start: " + ", ".join(
            f"c {c:g}: {r['test_loss_at_label']:.4f}" for c, r in zip(SCALES, ray)) + f" (unsteered {ray[0]['test_loss_unsteered']:.4f})")
        steers = {"start (transferred)": start}
        for name, kw in VARIANTS.items():
            fitter_module.Fitter.step = step_with(**kw)
            try:
                t = time.time()
                res = train(lm, data, TrainConfig(), init=start)
            finally:
                fitter_module.Fitter.step = plain_step
            steers[name] = res.steer
            print(f"{name}: {time.time() - t:.1f} s, steps {res.results['steps']} (best {res.results['best_step']})", flush=True)
        for name, e in zip(steers, test.evaluate(list(steers.values()))):
            print(f"{name:>20}: test AUC {e['auc']:.3f} [{e['auc_lo']:.3f}, {e['auc_hi']:.3f}], separation {e['separation']:.3f}, "
                  f"test loss at label {e['test_loss_at_label']:.4f} (unsteered {e['test_loss_unsteered']:.4f})")


if __name__ == "__main__":
    main()

"""Where a steer's separation lives: its context-free part against its context-dependent part.

An LM-Steer steer shifts logit v by u·(Bᵀ e_v), with u = ε·h·A depending on the context h. Split u
at the mean state h̄ of neutral text:

    bias-only:      u = ε·h̄·A           (the same shift at every position: a vocabulary bias)
    context-only:   u = ε·(h − h̄)·A     (what the context adds)

Each version is scaled to mean KL κ = 0.05 on neutral text (the ladder's bundled ``fit``
paragraphs, exact head), then scored on the ladder's held-out test texts as
``transfer_ladder.py`` scores a whole steer: separation (mean per-token log-prob shift at +value on the
texts labelled 1 minus on the others; negative when a part pushes the wrong way) and steer-as-classifier AUC. It reads the
steers of a ladder work folder (``transfer_ladder.py --work``): the target's native steer and every
steer carried into it with ``--form``.

Example (the numbers in ``results/retained_parts_toxicity.md``)::

    python -m benchmarks.retained_parts --task toxicity --work ~/.cache/steerport-bench/ladder \\
        --out benchmarks/results/retained_parts_toxicity
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.refine_check import HeadEval
from benchmarks.transfer_ladder import native_path, neutral_texts, sentiment, toxicity, transferred_path
from steerport import __version__
from steerport.capture import cache_hidden
from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.metrics import find_value_for_kl, kl_divergence, roc_auc
from steerport.models import LoadedModel, cpu_name, load_model
from steerport.scoring import per_text_mean
from steerport.steer import Steer
from steerport.train.topk import topk_token_loss

HERE = Path(__file__).resolve().parent
SPECS = ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b")
KAPPA = 0.05
ROWS = 256  # neutral positions per exact head chunk

Shift = Callable[[torch.Tensor], torch.Tensor]  # states h (n, d) -> u (n, r) at value 1


class NeutralKL:
    """Exact mean KL(p_steered ‖ p) on neutral text for any u(h) (the ladder's neutral scorer's texts)."""

    def __init__(self, lm: LoadedModel, n_texts: int = 16):
        cache = cache_hidden(lm, neutral_texts(n_texts), max_tokens=256, predicted_only=True)
        self.h = cache.h.float()
        self.E = lm.output_embeddings.detach().float()
        self.bias = None if lm.lm_head_bias is None else lm.lm_head_bias.detach().float()

    def mean_state(self) -> torch.Tensor:
        return self.h.mean(0)

    @torch.no_grad()
    def __call__(self, shift: Shift, B: torch.Tensor, value: float) -> float:
        EB, total = self.E @ B, 0.0  # (V, r)
        for i in range(0, len(self.h), ROWS):
            h = self.h[i : i + ROWS]
            z0 = h @ self.E.T + (0 if self.bias is None else self.bias)
            lp0 = torch.log_softmax(z0, -1)
            lp = torch.log_softmax(z0 + value * shift(h) @ EB.T, -1)
            total += float(kl_divergence(lp, lp0).double().sum())
        return total / len(self.h)


def parts(steer: Steer, h_bar: torch.Tensor) -> dict[str, Shift]:
    A, eps = steer.A.float(), steer.epsilon
    return {"full": lambda h: eps * h @ A,
            "bias-only": lambda h: (eps * h_bar @ A).expand(len(h), -1),
            "context-only": lambda h: eps * (h - h_bar) @ A}


@torch.no_grad()
def score(he: HeadEval, shift: Shift, B: torch.Tensor, value: float, labels: np.ndarray, lp0: torch.Tensor) -> dict[str, float]:
    u = value * shift(he.cache.h.float())
    lp_plus = -topk_token_loss(he.stats, he.idx, u, B, he.E)
    lp_minus = -topk_token_loss(he.stats, he.idx, -u, B, he.E)
    d = per_text_mean(lp_plus - lp0, he.cache).numpy()
    return {"separation": float(d[labels == 1].mean() - d[labels == 0].mean()),  # signed as the ladder's
            "auc": roc_auc(per_text_mean(lp_plus - lp_minus, he.cache).numpy(), labels)}


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = ["# Where separation lives: context-free vs context-dependent part (retained_parts.py)", "",
             f"{doc['date']}; {doc['machine']}; steerport {doc['version']}. Task {s['task']}, seed {s['seed']}, carried "
             f"form {s['form']}; {s['per_class']} test texts per class; each version at mean KL {KAPPA} on neutral text.", "",
             "| target | steer | full: sep (AUC) | bias-only: sep (AUC) | context-only: sep (AUC) |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        cells = [f"{r[p]['separation']:.3f} ({r[p]['auc']:.3f})" for p in ("full", "bias-only", "context-only")]
        lines.append(f"| {r['target']} | {r['steer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="toxicity", choices=["toxicity", "sentiment"])
    ap.add_argument("--targets", default=",".join(SPECS))
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/steerport-bench/ladder")
    ap.add_argument("--form", default="refined")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "retained_parts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = (toxicity if args.task == "toxicity" else sentiment)(args.data, args.per_class, 0, False)
    labels = np.array(task.test_labels)
    rows = []
    for tgt in args.targets.split(","):
        steers = {"native": native_path(args.work, args.task, tgt, args.seed)}
        steers.update({f"from {src}": transferred_path(args.work, args.task, src, tgt, args.seed, args.form)
                       for src in SPECS if src != tgt})
        steers = {k: p for k, p in steers.items() if p.exists()}
        if not steers:
            continue
        lm = load_model(tgt, dtype="float32")  # as the ladder
        he, kl = HeadEval(lm, task.test_texts, 64), NeutralKL(lm)
        lp0, h_bar = he.token_lp(None), kl.mean_state()
        for name, path in steers.items():
            steer = Steer.load(path)
            row = {"target": tgt, "steer": name, "file": str(path)}
            for part, shift in parts(steer, h_bar).items():
                value = find_value_for_kl(lambda v: kl(shift, steer.B.float(), v), KAPPA, rel_tol=0.02).value
                row[part] = {"value": value, **score(he, shift, steer.B.float(), value, labels, lp0)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"benchmark": "retained_parts", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "version": __version__,
           "machine": f"{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
           "settings": {"task": args.task, "form": args.form, "seed": args.seed, "per_class": args.per_class, "kappa": KAPPA},
           "rows": rows}
    atomic_write_json(args.out.with_suffix(".json"), doc)
    atomic_write_text(args.out.with_suffix(".md"), markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()

"""Fidelity of LM-Steer transfer forms: does the carried steer do on the target what the source does?

For each task (a source steer and held-out labeled texts shipped in steerport/data), each target
and each form (logit, hidden, refined, emb2emb): carry the steer with ``--calibrate none`` (so the
forms' own magnitudes show) and measure on the target

* **AUC**: the steer as a classifier, score = ℓ_{+1} − ℓ_{−1} (mean per-token log-likelihood under
  value ±1), on the same held-out texts the source steer is scored on with its own model;
* **fidelity** = (AUC_target − 0.5) / (AUC_source − 0.5);
* **ρ**: Spearman correlation of the steer's log-prob shift (value +1 minus unsteered) of the same
  character spans on both models: spans between consecutive positions where both tokenizations
  end at the same character, over the held-out texts;
* **κ ratio**: mean KL from the unsteered model at value 1 on neutral text, target / source —
  how well a form keeps the strength without calibration.

``hidden`` and ``refined`` share one pass over neutral text per target (:func:`steerport.refine.prepare_refine`):
``hidden`` is the closed form the refinement starts from (K fitted on the refinement's fit texts,
80 % of them), ``refined`` the fitted result. ``emb2emb`` is the Emb2Emb recipe (Lee et al., COLM 2025) written for LM-Steer: one least-squares
map M between the models' *input* token embeddings on the aligned vocabulary (e_t ≈ M e_s), applied
to every hidden-space vector of the steer: A_t = M A_s, B_t = M B_s.

Usage::

    python benchmarks/refine_check.py --targets gemma3-270m --tasks sentiment,toxicity \\
        --forms logit,hidden,refined,emb2emb --n 100 --out benchmarks/results/refine_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import torch

from steerport import __version__
from steerport.capture import pair_by_end_offset, token_end_offsets
from steerport.fileio import atomic_write_json
from steerport.linmap import fit_map
from steerport.mapping import get_mapping
from steerport.metrics import roc_auc, spearman
from steerport.models import LoadedModel, ModelEmbeddings, load_model
from steerport.refine import RefineData, prepare_refine, refined_carry
from steerport.scoring import mean_kl, token_logprobs
from steerport.steer import Steer
from steerport.texts import bundled, neutral, read_texts_and_labels
from steerport.transfer import TransferOptions, transfer_steer
from steerport.vocab import align_vocab

TASKS = {  # steer file, held-out data, label of the steer's positive class
    "sentiment": ("benchmarks/steers/smollm2-135m-sst2-positive.st", "sst2-test", 1),
    "toxicity": ("benchmarks/steers/smollm2-135m-paradetox-nontoxic.st", "paradetox-test", 0),
}


def held_out(task: str, n: int) -> tuple[list[str], list[int]]:
    """Up to n texts per class of the task's shipped test split; label 1 = the steer's positive class."""
    _, data, positive = TASKS[task]
    texts, labels = read_texts_and_labels(bundled(data))
    assert labels is not None  # required by default
    pos = [t for t, y in zip(texts, labels) if y == positive][:n]
    neg = [t for t, y in zip(texts, labels) if y != positive][:n]
    return pos + neg, [1] * len(pos) + [0] * len(neg)


def span_shifts(lm: LoadedModel, steer: Steer, texts: list[str], max_tokens: int) -> list[torch.Tensor]:
    """Per text, the log-prob shift (value +1 minus unsteered) of each token after the first."""
    base = token_logprobs(lm, texts, [], max_tokens=max_tokens)
    steered = token_logprobs(lm, texts, [(steer, 1.0)], max_tokens=max_tokens)
    return [s - b for s, b in zip(steered, base)]


def aligned_spans(tok_s: Any, tok_t: Any, texts: list[str], shifts_s: list[torch.Tensor], shifts_t: list[torch.Tensor],
                  max_tokens: int) -> tuple[list[float], list[float]]:
    """Shifts of the same character spans on both models: between consecutive paired positions
    (i_j, i_{j+1}] the span's tokens are i_j+1 .. i_{j+1}, whose log-probs are entries i_j .. i_{j+1}−1."""
    xs: list[float] = []
    xt: list[float] = []
    for text, ds, dt in zip(texts, shifts_s, shifts_t):
        _, es = token_end_offsets(tok_s, text, max_tokens)
        _, et = token_end_offsets(tok_t, text, max_tokens)
        ia, ib = pair_by_end_offset(es, et)
        for j in range(len(ia) - 1):
            if ia[j + 1] <= len(ds) and ib[j + 1] <= len(dt):
                xs.append(float(ds[ia[j] : ia[j + 1]].sum()))
                xt.append(float(dt[ib[j] : ib[j + 1]].sum()))
    return xs, xt


def emb2emb(steer: Steer, src: LoadedModel, tgt: LoadedModel) -> Steer:
    """A_t = M A_s, B_t = M B_s with e_t ≈ M e_s fitted on the aligned input embeddings."""
    al = align_vocab(src.tokenizer, tgt.tokenizer)
    W_s = cast(torch.Tensor, src.model.get_input_embeddings().weight)  # (V_s, d_s)
    W_t = cast(torch.Tensor, tgt.model.get_input_embeddings().weight)  # (V_t, d_t)
    X_s, X_t = W_s.detach().float()[al.src_ids], W_t.detach().float()[al.tgt_ids]
    M = fit_map(X_s, X_t, holdout=0.0).M.T  # Y ≈ X Mᵀᵀ: rows e_t ≈ M e_s, M (d_t, d_s)
    return Steer("lm-steer", {"A": M @ steer.A, "B": M @ steer.B}, steer.epsilon, positive=steer.positive,
                 model={"spec": tgt.spec, "fingerprint": tgt.fingerprint})


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                .splitlines() if ln.startswith("Model name")), platform.processor())
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "steerport": __version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--targets", default="gemma3-270m")
    ap.add_argument("--tasks", default="sentiment,toxicity")
    ap.add_argument("--forms", default="logit,hidden,refined,emb2emb")
    ap.add_argument("--n", type=int, default=100, help="held-out texts per class")
    ap.add_argument("--rho-texts", type=int, default=60, help="held-out texts (per class) for ρ of span shifts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hidden-texts", type=int, default=200, help="neutral fit texts for hidden / refined")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/refine_check.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    res.update(settings=vars(args), machine=machine())
    save = lambda: atomic_write_json(out, res)
    src = load_model(args.source)
    kl_texts = neutral("calib", 16)
    targets: dict[str, LoadedModel] = {}  # kept loaded across tasks (3 small models fit in memory)
    prepared: dict[str, RefineData] = {}  # the neutral pass and K, shared by hidden and refined and by tasks
    for task in args.tasks.split(","):
        steer_path = TASKS[task][0]
        steer = Steer.load(steer_path)
        texts, labels = held_out(task, args.n)
        rho_texts = texts[: args.rho_texts] + texts[len(texts) // 2 : len(texts) // 2 + args.rho_texts]
        cell = res.setdefault(task, {})
        if "source" not in cell:
            t = time.time()
            lp = torch.stack([x.mean() for x in token_logprobs(src, texts, [(steer, 1.0)], max_tokens=args.max_tokens)])
            ln = torch.stack([x.mean() for x in token_logprobs(src, texts, [(steer, -1.0)], max_tokens=args.max_tokens)])
            cell["source"] = {"auc": roc_auc(lp - ln, labels), "kappa": mean_kl(src, kl_texts, [(steer, 1.0)], max_tokens=64),
                              "n": len(texts), "eval_s": round(time.time() - t, 1)}
            print(task, "source", cell["source"], flush=True)
            save()
        src_shifts = span_shifts(src, steer, rho_texts, args.max_tokens)
        for tgt_spec in args.targets.split(","):
            tgt = targets.get(tgt_spec) or targets.setdefault(tgt_spec, load_model(tgt_spec))
            data = prepared.get(tgt_spec)
            tc = cell.setdefault(tgt_spec, {})
            al = align_vocab(src.tokenizer, tgt.tokenizer)
            for form in args.forms.split(","):
                if form in tc:
                    continue
                t = time.time()
                info: dict[str, Any] = {}
                if form == "emb2emb":
                    new = emb2emb(steer, src, tgt)
                elif form in ("hidden", "refined"):  # both from one pass over neutral text per target
                    if data is None:
                        t = time.time()
                        data = prepare_refine(src, tgt, al.src_ids, al.tgt_ids, neutral("fit", args.hidden_texts),
                                              max_tokens=96)
                        res.setdefault("prepare_s", {})[tgt_spec] = round(time.time() - t, 1)
                        t = time.time()
                    H = get_mapping(ModelEmbeddings.from_loaded(src), ModelEmbeddings.from_loaded(tgt))[0].H
                    rc = refined_carry(steer, H, data)
                    factors = rc.closed_form if form == "hidden" else rc.factors
                    new = Steer("lm-steer", factors, steer.epsilon, positive=steer.positive,
                                model={"spec": tgt.spec, "fingerprint": tgt.fingerprint})
                    info = {"hidden_map": rc.hidden_map, **({"refine": rc.refine} if form == "refined" else {})}
                else:
                    r = transfer_steer(steer, src, tgt, TransferOptions(
                        form=form, calibrate="none", hidden_texts=neutral("fit", args.hidden_texts), hidden_max_tokens=96))
                    new = r.steer
                    info = {k: r.lineage[k] for k in ("hidden_map", "refine") if k in r.lineage}
                transfer_s = time.time() - t
                t = time.time()
                lp = torch.stack([x.mean() for x in token_logprobs(tgt, texts, [(new, 1.0)], max_tokens=args.max_tokens)])
                ln = torch.stack([x.mean() for x in token_logprobs(tgt, texts, [(new, -1.0)], max_tokens=args.max_tokens)])
                auc = roc_auc(lp - ln, labels)
                xs, xt = aligned_spans(src.tokenizer, tgt.tokenizer, rho_texts, src_shifts,
                                       span_shifts(tgt, new, rho_texts, args.max_tokens), args.max_tokens)
                kappa = mean_kl(tgt, kl_texts, [(new, 1.0)], max_tokens=64)
                tc[form] = {"auc": auc, "fidelity": (auc - 0.5) / (cell["source"]["auc"] - 0.5),
                            "rho": spearman(xs, xt), "n_spans": len(xs), "kappa": kappa,
                            "kappa_ratio": kappa / cell["source"]["kappa"], "transfer_s": round(transfer_s, 1),
                            "eval_s": round(time.time() - t, 1), **info}
                print(task, tgt_spec, form, {k: v for k, v in tc[form].items() if k not in info}, flush=True)
                save()
            if data is not None:
                prepared[tgt_spec] = data
    save()


if __name__ == "__main__":
    main()

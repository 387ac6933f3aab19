"""Fidelity of LM-Steer transfer forms: does the carried steer do on the target what the source does?

For each task (a source steer and held-out labeled texts shipped in steerport/data), each target
and each form (logit, hidden, refined, emb2emb): carry the steer with ``--calibrate none`` (so the
forms' own magnitudes show) and measure on the target

* **AUC**: the steer as a classifier, score = ℓ_{+1} − ℓ_{−1} (mean per-token log-likelihood under
  value ±1), on the same held-out texts the source steer is scored on with its own model;
* **fidelity** = (AUC_target − 0.5) / (AUC_source − 0.5);
* **ρ**: Spearman correlation of the steer's log-prob shift (value +1 minus unsteered) of the same
  character spans on both models: spans between consecutive positions where both tokenizations
  end at the same character, over the same held-out texts;
* **κ ratio**: mean KL from the unsteered model at value 1 on neutral text, target / source —
  how well a form keeps the strength without calibration;
* **kept**: separation (mean per-token log-prob shift on the steer's positive texts minus on the
  others) at the value where the steer's mean KL on neutral text is 0.05, target / source: how much
  effect per unit of KL the carry keeps (the ladder's "kept" figure, with the source steer as the
  yardstick instead of a native one).

Log-probs come from one body pass and one full LM-head pass per model and text set (the trainer's
top-k statistics, :mod:`steerport.train.topk`: the 256 most likely tokens of each position exact,
the tail to first order); ``topk_check`` in the result compares it with full forward passes.

``hidden`` and ``refined`` share one pass over neutral text per target (:func:`steerport.refine.prepare_refine`):
``hidden`` is the closed form the refinement starts from (K fitted on the refinement's fit texts,
80 % of them), ``refined`` the fitted result. ``emb2emb`` is the Emb2Emb recipe (Lee et al., COLM 2025) written for LM-Steer: one least-squares
map M between the models' *input* token embeddings on the aligned vocabulary (e_t ≈ M e_s), applied
to every hidden-space vector of the steer: A_t = M A_s, B_t = M B_s.

Two variants of the refinement that the library does not use (measured on one steer and one task in
``benchmarks/results/refine_variants.md``: small gains in "kept", none in AUC, not enough evidence to
change the default):

* ``refined-steered``: the tokens of each position re-chosen, and weighted, with the source model's
  *steered* next-token distributions counted too: w = ½·½(p_s + p_t) + ½·½(p_s^{+σ} + p_s^{−σ})
  (``--steered σ:mix``, default 3:0.5), so the tokens a steer promotes or suppresses (rare on neutral text) enter
  the fit;
* ``--refine-text domain`` (or ``both``): the neutral pass (hence K and the refinement) on the task's
  shipped *training* texts, unlabeled, instead of (or after) the bundled neutral text; form names get
  ``@domain`` (``@both``).

Usage::

    python benchmarks/refine_check.py --targets gemma3-270m --tasks sentiment,toxicity \\
        --forms logit,hidden,refined,emb2emb --n 100 --out benchmarks/results/refine_check.json
    python benchmarks/refine_check.py --targets qwen2.5-0.5b --tasks toxicity --forms hidden,refined,refined-steered \\
        --hidden-texts 0 --hidden-max-tokens 128 --n 200 --out benchmarks/results/refine_variants.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, cast

import torch

from steerport import __version__
from steerport.capture import cache_hidden
from steerport.embeddings import ModelEmbeddings
from steerport.fileio import atomic_write_json
from steerport.linmap import fit_map
from steerport.mapping import get_mapping
from steerport.metrics import find_values_for_kl, roc_auc, spearman
from steerport.models import LoadedModel, cpu_name, load_model
from steerport.pairing import pair_by_end_offset, token_end_offsets
from steerport.refine import RefineData, ShiftProblem, prepare_refine, refined_carry, shared_token_stats
from steerport.scoring import HeadScorer, mean_kl, per_text_mean, token_logprobs
from steerport.steer import Steer
from steerport.texts import bundled, neutral, read_texts_and_labels
from steerport.train.headloss import apply_softcap
from steerport.train.topk import topk_stats, topk_token_loss
from steerport.transfer import TransferOptions, transfer_steer
from steerport.vocab import align_vocab

TASKS = {  # steer file, held-out data, label of the steer's positive class, training texts (read unlabeled)
    "sentiment": ("benchmarks/steers/smollm2-135m-sst2-positive.st", "sst2-test", 1, "sst2-train"),
    "toxicity": ("benchmarks/steers/smollm2-135m-paradetox-nontoxic.st", "paradetox-test", 0, "paradetox-train"),
}


def held_out(task: str, n: int) -> tuple[list[str], list[int]]:
    """Up to n texts per class of the task's shipped test split; label 1 = the steer's positive class."""
    _, data, positive, _ = TASKS[task]
    texts, labels = read_texts_and_labels(bundled(data))
    assert labels is not None  # required by default
    pos = [t for t, y in zip(texts, labels) if y == positive][:n]
    neg = [t for t, y in zip(texts, labels) if y != positive][:n]
    return pos + neg, [1] * len(pos) + [0] * len(neg)


class HeadEval:
    """Per-token log-probs of fixed texts under any LM-Steer steer, from one body pass and one full
    head pass (the trainer's ``head="topk"`` statistics: the top ``k`` candidates of each position
    exact, the tail to first order), so every form and value costs O(N·k·r), not a forward pass.
    ``check`` compares it with full forward passes on a few texts."""

    def __init__(self, lm: LoadedModel, texts: list[str], max_tokens: int, k: int = 256):
        self.lm, self.texts = lm, texts
        self.cache = cache_hidden(lm, texts, max_tokens=max_tokens, predicted_only=True)
        self.stats = topk_stats(self.cache, lm.output_embeddings.detach(), lm.lm_head_bias, k=k)
        self.E = lm.output_embeddings.detach()
        self.idx = torch.arange(self.cache.n_positions)

    @torch.no_grad()
    def token_lp(self, steer: Steer | None, value: float = 1.0) -> torch.Tensor:
        """log p(next token) at every cached position (N,)."""
        h = self.cache.h.float()
        if steer is None:
            u, B = h.new_zeros(len(h), 1), h.new_zeros(h.shape[1], 1)
        else:
            u, B = value * steer.epsilon * (h @ steer.A.float()), steer.B.float()
        return -topk_token_loss(self.stats, self.idx, u, B, self.E)

    def per_text(self, lp: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(lp, torch.bincount(self.cache.text_id, minlength=len(self.texts)).tolist()))

    def scores(self, steer: Steer, value: float = 1.0) -> torch.Tensor:
        """The steer as a classifier: mean log-likelihood under +value minus under −value, per text."""
        d = self.token_lp(steer, value) - self.token_lp(steer, -value)
        return per_text_mean(d, self.cache)

    def shifts(self, steer: Steer) -> list[torch.Tensor]:
        """Per text, the log-prob shift of each token after the first (value +1 minus unsteered)."""
        return self.per_text(self.token_lp(steer) - self.token_lp(None))

    def check(self, steer: Steer, n: int, max_tokens: int) -> dict[str, float]:
        """Max |approximate − exact| per-token shift at value 1 on the first n texts (full forward passes)."""
        exact = [s - b for s, b in zip(token_logprobs(self.lm, self.texts[:n], [(steer, 1.0)], max_tokens=max_tokens),
                                       token_logprobs(self.lm, self.texts[:n], [], max_tokens=max_tokens))]
        approx = self.shifts(steer)[:n]
        e, a = torch.cat(exact), torch.cat(approx)
        return {"max_abs_err": float((e - a).abs().max()), "rms_shift": float(e.pow(2).mean().sqrt()),
                "spearman": spearman(e.tolist(), a.tolist()), "tokens": len(e)}


KEPT_KAPPA = 0.05  # mean KL per token on neutral text at which separations are compared


def kl_scorer(lm: LoadedModel) -> HeadScorer:
    """Mean KL on the last 16 bundled ``calib`` paragraphs, which no transfer or refinement reads."""
    return HeadScorer(lm, cache_hidden(lm, neutral("calib")[-16:], max_tokens=128), max_base_bytes=2 << 30)


def separation_at_kappa(ev: HeadEval, scorer: HeadScorer, steer: Steer, labels: list[int]) -> tuple[float, float]:
    """(value, separation) at the value where the steer's mean KL on the scorer's text is KEPT_KAPPA."""
    v = find_values_for_kl(lambda x: scorer.stats([(steer, x)]).kl, (KEPT_KAPPA,))[KEPT_KAPPA].value
    shift = per_text_mean(ev.token_lp(steer, v) - ev.token_lp(None), ev.cache)  # (n_texts,)
    y = torch.tensor(labels)
    return v, float(shift[y == 1].mean() - shift[y == 0].mean())


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


@torch.no_grad()
def steered_problem(prob: ShiftProblem, steer: Steer, src: LoadedModel, tgt: LoadedModel, src_ids: torch.Tensor,
                    tgt_ids: torch.Tensor, sigma: float, mix: float = 0.5, rows: int = 256) -> ShiftProblem:
    """``prob`` with each position's K tokens re-chosen by w = (1 − mix)·½(p_s + p_t) + mix·½(p_s^{+σ} + p_s^{−σ}),
    p_s^{±σ} the source's next-token distribution under the steer at value ±σ (the ``refined-steered`` variant)."""
    E_s, E_t = src.output_embeddings.detach().float(), tgt.output_embeddings.detach().float()
    N, K = prob.ids.shape
    EB = E_s @ steer.B.float()  # (V_s, r)
    ids, w = torch.empty(N, K, dtype=torch.long), torch.empty(N, K)
    sl_s, sl_t = torch.empty(N, K), torch.empty(N, K)
    for i in range(0, N, rows):
        hs, ht = prob.h_s[i : i + rows], prob.h_t[i : i + rows]
        ps, ss, _ = shared_token_stats(hs, E_s, src.lm_head_bias, src.softcap, src_ids)
        pt, st, _ = shared_token_stats(ht, E_t, tgt.lm_head_bias, tgt.softcap, tgt_ids)
        z = hs @ E_s.T + (src.lm_head_bias.float() if src.lm_head_bias is not None else 0.0)  # (n, V_s)
        dz = steer.epsilon * (hs @ steer.A.float()) @ EB.T  # the steer's logit shift at value 1
        steered = sum(0.5 * torch.softmax(apply_softcap(z + v * dz, src.softcap)[0], 1)[:, src_ids] for v in (sigma, -sigma))
        top = ((1 - mix) * 0.5 * (ps + pt) + mix * steered).topk(K, dim=1)
        ids[i : i + rows], w[i : i + rows] = top.indices, top.values
        sl_s[i : i + rows], sl_t[i : i + rows] = ss.gather(1, top.indices), st.gather(1, top.indices)
    used, local = torch.unique(ids, return_inverse=True)
    return dataclasses.replace(prob, ids=local, w=w, slope_s=sl_s, slope_t=sl_t, pairs=used,
                               X_s=E_s[src_ids[used]], X_t=E_t[tgt_ids[used]])


def machine() -> dict[str, Any]:
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "steerport": __version__}


def markdown(res: dict[str, Any]) -> str:
    """The result as a table per task: source, then each target's forms."""
    st, m = res["settings"], res["machine"]
    lines = [f"# Transfer fidelity by form: {st['source']} -> {st['targets']}", "",
             f"Held-out texts: {st['n']} per class of the shipped test split; value ±1, no calibration; "
             f"steerport {m['steerport']}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}. Refinement text: "
             f"{st['hidden_texts'] or 'all'} bundled neutral `fit` texts of up to {st['hidden_max_tokens']} tokens (forms "
             "marked @domain: the task's shipped training texts, unlabeled, instead; @both: after them); refined-steered: "
             "σ = 3, mix = 0.5 unless named.", "",
             "AUC: steer-as-classifier on the target; fidelity = (AUC − 0.5) / (AUC_source − 0.5); "
             "ρ: Spearman of the log-prob shifts of the same character spans on source and target; "
             "κ ratio: mean KL at value 1 on neutral text, target / source (1 = strength kept without calibration); "
             "kept (where measured): separation (mean per-token log-prob shift on the steer's positive texts minus on the "
             "others) at the value where the steer's mean KL on 16 held-out neutral paragraphs is 0.05, target / source; "
             "shift loss: the refinement's held-out relative weighted loss (closed form → refined); "
             "transfer s: hidden and refined come from one call that also runs the refinement, after the shared "
             "neutral pass (its time below). Log-probs from cached body states and the top-256 head statistics.", ""]
    if res.get("note"):
        lines += [res["note"], ""]
    for task in TASKS:
        if task not in res:
            continue
        cell = res[task]
        src = cell["source"]
        lines += [f"## {task}", "", f"Source steer on {st['source']}: AUC {src['auc']:.3f}, κ {src['kappa']:.4f}"
                  + (f", separation {src['separation']:.3f} at value {src['value_at_kappa']:.2f} (κ {KEPT_KAPPA})"
                     if "separation" in src else "") + " "
                  f"(top-k head vs full forward passes: Spearman {src['topk_check']['spearman']:.4f} over "
                  f"{src['topk_check']['tokens']} token shifts).", "",
                  "| target | form | AUC | fidelity | ρ (spans) | κ ratio | kept | shift loss | transfer s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for tgt, forms in cell.items():
            if tgt == "source":
                continue
            for form, r in forms.items():
                if not isinstance(r, dict):
                    continue
                loss = r.get("refine", {}).get("heldout_loss")
                ls = f"{loss['init']:.3f} → {loss['final']:.3f}" if loss else ""
                kept = f"{r['kept']:.2f}" if "kept" in r else "–"
                lines.append(f"| {tgt} | {form} | {r['auc']:.3f} | {r['fidelity']:.2f} | {r['rho']:.3f} | "
                             f"{r['kappa_ratio']:.2f} | {kept} | {ls} | {r['transfer_s']:.0f} |")
        lines.append("")
    if "prepare_s" in res:
        lines += [f"One pass of both models over neutral text (shared by hidden and refined, both tasks): "
                  f"{res['prepare_s']} s.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--targets", default="gemma3-270m")
    ap.add_argument("--tasks", default="sentiment,toxicity")
    ap.add_argument("--forms", default="logit,hidden,refined,emb2emb")
    ap.add_argument("--n", type=int, default=100, help="held-out texts per class")
    ap.add_argument("--topk", type=int, default=256, help="exact head candidates per position (the rest first-order)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hidden-texts", type=int, default=120, help="neutral fit texts for hidden / refined (0: all)")
    ap.add_argument("--refine-text", choices=("neutral", "domain", "both"), default="neutral",
                    help="text of the neutral pass: the bundled neutral text, the task's training texts (unlabeled) or both")
    ap.add_argument("--steered", default="3:0.5", help="refined-steered settings σ:mix, comma-separated (σ: the steer "
                    "value of the source's steered distributions; mix: their share of the weights)")
    ap.add_argument("--hidden-max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/refine_check.json")
    ap.add_argument("--report", action="store_true", help="only rewrite the .md from the existing .json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if args.report:
        out.with_suffix(".md").write_text(markdown(res))
        return
    res.update(settings=vars(args), machine=machine())
    def save() -> None:
        atomic_write_json(out, res)
        out.with_suffix(".md").write_text(markdown(res))

    src = load_model(args.source)
    kl_texts = neutral("calib", 16)
    grid = [tuple(float(x) for x in g.split(":")) for g in args.steered.split(",")]  # refined-steered (σ, mix)
    runs = [(f, g) for f in args.forms.split(",") for g in (grid if f == "refined-steered" else [(3.0, 0.5)])]
    targets: dict[str, LoadedModel] = {}  # kept loaded across tasks (3 small models fit in memory)
    prepared: dict[str, RefineData] = {}  # the neutral pass and K, shared by hidden and refined and by tasks
    for task in args.tasks.split(","):
        steer_path = TASKS[task][0]
        steer = Steer.load(steer_path)
        texts, labels = held_out(task, args.n)
        cell = res.setdefault(task, {})
        t = time.time()
        src_eval = HeadEval(src, texts, args.max_tokens, k=args.topk)
        if "separation" not in cell.get("source", {}):  # (results before the kept figure lack it)
            auc = roc_auc(src_eval.scores(steer), labels)
            v, sep = separation_at_kappa(src_eval, kl_scorer(src), steer, labels)
            cell["source"] = {"auc": auc, "kappa": mean_kl(src, kl_texts, [(steer, 1.0)], max_tokens=64), "n": len(texts),
                              "value_at_kappa": v, "separation": sep,
                              "topk_check": src_eval.check(steer, 12, args.max_tokens), "eval_s": round(time.time() - t, 1)}
            print(task, "source", cell["source"], flush=True)
            save()
        src_shifts = src_eval.shifts(steer)
        for tgt_spec in args.targets.split(","):
            tgt = targets.get(tgt_spec) or targets.setdefault(tgt_spec, load_model(tgt_spec))
            data = prepared.get(tgt_spec)
            tc = cell.setdefault(tgt_spec, {})
            al = align_vocab(src.tokenizer, tgt.tokenizer)
            t = time.time()
            tgt_eval = HeadEval(tgt, texts, args.max_tokens, k=args.topk)
            tgt_scorer = kl_scorer(tgt)
            tc["eval_cache_s"] = round(time.time() - t, 1)
            for form, (sigma, mix) in runs:
                key = form + (f"@{args.refine_text}" if args.refine_text != "neutral" and form.startswith(("hidden", "refined")) else "")
                if form == "refined-steered" and (sigma, mix) != (3.0, 0.5):
                    key += f"[σ={sigma:g},mix={mix:g}]"
                if key in tc:
                    continue  # a rerun resumes
                t = time.time()
                info: dict[str, Any] = {}
                if form == "emb2emb":
                    new = emb2emb(steer, src, tgt)
                elif form in ("hidden", "refined", "refined-steered"):  # one pass over neutral text per target
                    if data is None:
                        t = time.time()
                        rtexts = [] if args.refine_text == "domain" else neutral("fit")
                        if args.refine_text != "neutral":  # the task's training texts, their labels unread
                            rtexts += read_texts_and_labels(bundled(TASKS[task][3]))[0]
                        rtexts = rtexts[: args.hidden_texts or None]
                        data = prepare_refine(src, tgt, al.src_ids, al.tgt_ids, rtexts, max_tokens=args.hidden_max_tokens)
                        res.setdefault("prepare_s", {})[tgt_spec] = round(time.time() - t, 1)
                        t = time.time()
                    H = get_mapping(ModelEmbeddings.from_loaded(src), ModelEmbeddings.from_loaded(tgt))[0].H
                    if form == "refined-steered":
                        rc = refined_carry(steer, H, dataclasses.replace(data, problem=steered_problem(
                            data.problem, steer, src, tgt, al.src_ids, al.tgt_ids, sigma, mix)))
                    else:
                        rc = refined_carry(steer, H, data)
                    factors = rc.closed_form if form == "hidden" else rc.factors
                    new = Steer("lm-steer", factors, steer.epsilon, positive=steer.positive,
                                model={"spec": tgt.spec, "fingerprint": tgt.fingerprint})
                    info = {"hidden_map": rc.hidden_map, **({"refine": rc.refine} if form != "hidden" else {})}
                else:
                    r = transfer_steer(steer, src, tgt, TransferOptions(
                        form=form, calibrate="none", hidden_texts=neutral("fit", args.hidden_texts or None), hidden_max_tokens=args.hidden_max_tokens))
                    new = r.steer
                    info = {k: r.lineage[k] for k in ("hidden_map", "refine") if k in r.lineage}
                transfer_s = time.time() - t
                t = time.time()
                auc = roc_auc(tgt_eval.scores(new), labels)
                xs, xt = aligned_spans(src.tokenizer, tgt.tokenizer, texts, src_shifts, tgt_eval.shifts(new),
                                       args.max_tokens)
                kappa = mean_kl(tgt, kl_texts, [(new, 1.0)], max_tokens=64)
                v, sep = separation_at_kappa(tgt_eval, tgt_scorer, new, labels)
                tc[key] = {"auc": auc, "fidelity": (auc - 0.5) / (cell["source"]["auc"] - 0.5),
                            "rho": spearman(xs, xt), "n_spans": len(xs), "kappa": kappa,
                            "kappa_ratio": kappa / cell["source"]["kappa"], "value_at_kappa": v, "separation": sep,
                            "kept": sep / cell["source"]["separation"], "transfer_s": round(transfer_s, 1),
                            "eval_s": round(time.time() - t, 1), **info}
                print(task, tgt_spec, key, {k: v for k, v in tc[key].items() if k not in info}, flush=True)
                save()
            if data is not None and args.refine_text == "neutral":  # domain text differs by task
                prepared[tgt_spec] = data
    save()


if __name__ == "__main__":
    main()

"""Transfer on the model ladder, measured so that it can tell (converged natives, intervals).

The reworked transfer benchmark. Per task (sentiment: SST-2; toxicity: ParaDetox) and model of
the ladder:

1. ``train``: native steers with the CLI's default settings (``TrainConfig()``: early stopping on
   held-out loss) on the **full** training set (SST-2 train, 6,920 sentences; ParaDetox, 5,000
   texts per class), stopped on a dev split (SST-2 dev; 500 ParaDetox texts per class from pairs
   never trained on), for 3 seeds. The seeds share the data and its cached body pass; they differ
   in the initial factors, batch order and evaluation subset. Their spread is reported first: a
   ratio means nothing when it is large.
2. ``transfer``: every seed's steer carried to every other model by the ``logit`` form with KL
   calibration against the source's strength curve (the default transfer when the ladder first
   ran), and seed 0 (``--form-seeds``) by the other ``--forms`` too (default: ``refined``), so the
   benchmark can decide the default form (it decided ``refined``; ``TransferOptions()`` uses it).
   ``refined-steered`` names the refined form fitted also on texts the source model writes under the
   steer (:func:`transfer_options`; ``transfer --steered-texts``), ``refined-short`` its control.
3. ``evaluate``: on every model, on ``--heldout`` texts per class of the task's **test** split
   (never seen in training or model selection), every native and transferred steer:

   * AUC of the steer as a classifier (ℓ(+v) − ℓ(−v), per-text mean log-likelihood, v its value at κ = 0.05);
   * separation at matched κ ∈ {0.02, 0.05, 0.1, 0.2} (the value reaching mean KL κ per token on
     neutral text), the retained effect Sep_transferred / Sep_native(target), and the kept effect
     Sep_transferred / Sep_source (on its own model): how much separation per unit of KL the carry
     itself loses, apart from the two models' differences;
   * fidelity: (AUC_transferred − 0.5) / (AUC_source on its own model − 0.5), and ρ, the Spearman
     correlation of the per-token log-prob shifts of the same character spans on source and target;
   * transfer efficiency: (AUC_transferred − 0.5) / min(AUC_source − 0.5, AUC_native(target) − 0.5).

   Every figure comes with a bootstrap 95 % interval over held-out texts (the same resampled texts
   for every quantity of a cell) and the spread over seeds.
4. ``generate``: per task and target, the smallest κ of {0.05, 0.1, 0.2, 0.4} where the native steer
   (seed 0) moves the shipped offline judge by at least 0.2 on ``--prompts`` prompts; there, the
   unsteered model, the native steer and each transferred steer (seed 0): judge rate (Wilson 95 %
   interval), perplexity under another ladder model and distinct-1/2/3 (bootstrap over prompts).
   Each task steers toward one side (``TaskData.direction``): sentiment toward positive (+value);
   toxicity toward **toxic** (−value), because the judge already calls nearly every unsteered
   continuation of the non-toxic prompts non-toxic, which leaves the steer's own side no room for +0.2.
   The judge rate is the share of continuations on the side steered toward.
5. ``report``: ``<out>.json`` (every number, settings, machine, version) and ``<out>.md``.

Log-probabilities come from one body pass per model and text set and the trainer's top-k head
statistics (``benchmarks.refine_check.HeadEval``: the 256 most likely tokens of each position exact,
the tail to first order), so every steer and value costs O(N·k·r) instead of a forward pass.

Every stage writes its results under ``--work`` (default ``~/.cache/steerport-bench/ladder``) as
it goes; an interrupted run resumes, a finished stage is skipped. Run from the repository root::

    python -m benchmarks.transfer_ladder --data-root ../shared/data --stages train,transfer,evaluate,generate,report
    python -m benchmarks.transfer_ladder --quick --work /tmp/ladder-quick   # 120 training texts, a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from benchmarks.refine_check import HeadEval, aligned_spans
from benchmarks.refine_check import machine as refine_check_machine
from steerport import __version__
from steerport.capture import cache_hidden
from steerport.data import Dataset, Example
from steerport.evaluate import EvalSettings, continuation_nll, sample_continuations
from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.judges import load_judge
from steerport.metrics import distinct_n, find_values_for_kl, spearman, wilson_interval
from steerport.metrics import roc_auc as auc
from steerport.models import LoadedModel, load_model
from steerport.refine import RefineOptions
from steerport.scoring import HeadScorer, per_text_mean
from steerport.steer import Steer
from steerport.steeredtext import KEEP_NEUTRAL
from steerport.strength import cut, record_curve
from steerport.texts import neutral
from steerport.train import TrainConfig, train
from steerport.transfer import TransferOptions, transfer_steer

LADDER = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]
KAPPAS = (0.02, 0.05, 0.1, 0.2)
AUC_KAPPA = 0.05
GEN_KAPPAS = (0.05, 0.1, 0.2, 0.4)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data


@dataclass
class TaskData:
    """One task's splits: training and dev examples (label = steer value ±1) and labeled test texts
    (label 1 = the steer's positive side)."""

    name: str
    positive_name: str
    train: list[Example]
    dev: list[Example]
    test_texts: list[str]
    test_labels: list[int]
    prompts: list[str]
    judge: str
    files: dict[str, str]
    direction: int = 1  # generation steers at direction × value: +1 toward the positive side, −1 away from it


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _test_sample(rows: list[dict[str, Any]], positive: int, per_class: int, seed: int) -> tuple[list[str], list[int]]:
    """``per_class`` texts of each class, seeded, label 1 = the steer's positive side."""
    rng = random.Random(seed)
    pos = [r["text"] for r in rows if r["label"] == positive]
    neg = [r["text"] for r in rows if r["label"] != positive]
    rng.shuffle(pos)
    rng.shuffle(neg)
    return pos[:per_class] + neg[:per_class], [1] * min(per_class, len(pos)) + [0] * min(per_class, len(neg))


def _examples(rows: list[dict[str, Any]], positive: int, where: str) -> list[Example]:
    return [Example(r["text"], 1.0 if r["label"] == positive else -1.0, f"{where}:{i}") for i, r in enumerate(rows)]


def _cap(rows: list[dict[str, Any]], per_class: int) -> list[dict[str, Any]]:
    """The first ``per_class`` rows of each label, in their order."""
    seen: dict[Any, int] = defaultdict(int)
    out = []
    for r in rows:
        seen[r["label"]] += 1
        if seen[r["label"]] <= per_class:
            out.append(r)
    return out


def sentiment(root: Path, heldout: int, n_prompts: int, quick: bool) -> TaskData:
    d = root / "sentiment/sst2"
    train_rows, dev_rows, test_rows = _rows(d / "train.jsonl"), _rows(d / "dev.jsonl"), _rows(d / "test.jsonl")
    if quick:
        train_rows, dev_rows = train_rows[:120], dev_rows[:40]
    texts, labels = _test_sample(test_rows, 1, heldout, seed=1)
    prompts = [r["prompt"]["text"] for r in _rows(root / "prompts/sentiment/neutral_prompts.jsonl")[:n_prompts]]
    return TaskData("sentiment", "positive sentiment", _examples(train_rows, 1, "sst2/train"),
                    _examples(dev_rows, 1, "sst2/dev"), texts, labels, prompts, "sentiment",
                    {"train": str(d / "train.jsonl"), "dev": str(d / "dev.jsonl"), "test": str(d / "test.jsonl")})


def toxicity(root: Path, heldout: int, n_prompts: int, quick: bool, per_class: int = 5000, dev_per_class: int = 500) -> TaskData:
    """ParaDetox pairs (a toxic sentence and its detoxified paraphrases share a pair_id) are kept whole
    on one side of the train/dev split, so no paraphrase of a dev text is trained on."""
    d = root / "toxicity/paradetox"
    rows = _rows(d / "train.jsonl")
    if quick:
        per_class, dev_per_class = 60, 20
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r.get("pair_id", id(r))].append(r)
    order = list(groups)
    random.Random(0).shuffle(order)
    dev: list[dict[str, Any]] = []
    tr: list[dict[str, Any]] = []
    n_dev: Counter[int] = Counter()  # rows per label on each side
    n_tr: Counter[int] = Counter()
    for key in order:
        side, n = (dev, n_dev) if min(n_dev[0], n_dev[1]) < dev_per_class else (tr, n_tr)
        if side is tr and min(n_tr[0], n_tr[1]) >= per_class:
            break
        side.extend(groups[key])
        n.update(r["label"] for r in groups[key])
    # a pair holds one toxic text and one or more paraphrases: cap each class, in split order
    dev = _cap(dev, dev_per_class)
    tr = _cap(tr, per_class)
    texts, labels = _test_sample(_rows(d / "test.jsonl"), 0, heldout, seed=1)
    prompts = [r["prompt"]["text"] for r in _rows(root / "prompts/rtp_nontoxic.jsonl")[:n_prompts]]
    return TaskData("toxicity", "non-toxic", _examples(tr, 0, "paradetox/train"), _examples(dev, 0, "paradetox/train"),
                    texts, labels, prompts, "toxicity",
                    {"train": str(d / "train.jsonl"), "test": str(d / "test.jsonl")}, direction=-1)


# --------------------------------------------------------------------------- helpers


class Models:
    """Load each ladder model once, on first use."""

    def __init__(self, threads: int):
        self.loaded: dict[str, LoadedModel] = {}
        torch.set_num_threads(threads)

    def __getitem__(self, spec: str) -> LoadedModel:
        if spec not in self.loaded:
            log(f"loading {spec}")
            self.loaded[spec] = load_model(spec, dtype="float32")
        return self.loaded[spec]


# --------------------------------------------------------------------------- stage 1: native steers


def stage_train(work: Path, task: TaskData, models: Models, specs: list[str], seeds: list[int], config: TrainConfig) -> None:
    data = Dataset(task.train, task.dev, task.positive_name,
                   {"files": task.files, "train": len(task.train), "heldout": len(task.dev), "split": "benchmark"})
    for spec in specs:
        for seed in seeds:
            out = native_path(work, task.name, spec, seed)
            if out.exists():
                continue
            lm = models[spec]
            log(f"train {task.name} {spec} seed {seed}: {len(task.train)} texts, dev {len(task.dev)}")
            t = time.perf_counter()
            last = [0.0]

            def progress(phase: str, info: dict[str, Any]) -> None:
                if time.perf_counter() - last[0] > 60:
                    last[0] = time.perf_counter()
                    log(f"  {phase} {info if phase != 'eval' else {k: v for k, v in info.items() if k != 'factors'}}")

            res = train(lm, data, replace(config, seed=seed),
                        workdir=work / "trainwork" / task.name / spec, progress=progress)
            record_curve(lm, res.steer)  # as `steerport train` does: the file carries its strength curve
            res.steer.save(out)
            atomic_write_json(out.with_suffix(".json"), {"results": res.results, "seconds": time.perf_counter() - t,
                                                         "timings": res.steer.meta["training"]["timings"]})
            log(f"  done in {time.perf_counter() - t:.0f} s: {json.dumps({k: res.results.get(k) for k in ('heldout_auc', 'steps', 'stopped')})}")


# --------------------------------------------------------------------------- stage 2: transfers


def native_path(work: Path, task: str, spec: str, seed: int) -> Path:
    return work / "native" / task / spec / f"seed{seed}.st"


def transferred_path(work: Path, task: str, src: str, tgt: str, seed: int, form: str = "logit") -> Path:
    return work / "transferred" / task / (f"{src}__{tgt}" + ("" if form == "logit" else f"__{form}")) / f"seed{seed}.st"


def carried(src: str, form: str) -> str:
    """The name of a steer carried from ``src`` by ``form`` (the default form keeps the bare source name)."""
    return src if form == "logit" else f"{src}+{form}"


STEERED = "refined-steered"  # a ladder form name: refined, also fitted on texts the source writes (--steered-texts)
SHORT = "refined-short"  # its control: refined on the neutral texts it keeps (steerport.steeredtext.KEEP_NEUTRAL) alone


def transfer_options(form: str, keywords: int = 0, words_only: bool = False, steered_texts: int = 96) -> TransferOptions:
    """What a ladder form name stands for: a library form, ``refined-steered`` (the refined form with
    ``steered_texts`` texts per sign that the source steer writes: ``transfer --steered-texts``) or its
    control ``refined-short`` (the neutral texts that form keeps, without the steered ones);
    ``refined-steered-sK`` samples with seed 1000·K, ``refined-short-rK`` draws its neutral texts at random (seed K):
    how much the refinement depends on which neutral texts it sees."""
    refine = RefineOptions(keywords=keywords, keyword_words_only=words_only)
    if form == STEERED or form.startswith(f"{STEERED}-s"):  # refined-steered-sK: sampling seed 1000·K
        seed = 1000 * int(form.removeprefix(f"{STEERED}-s")) if form != STEERED else 0
        return TransferOptions(form="refined", steered_texts=steered_texts, steered_seed=seed, refine=refine)
    if form == SHORT:
        return TransferOptions(form="refined", hidden_texts=neutral("fit", limit=KEEP_NEUTRAL), refine=refine)
    if form.startswith(f"{SHORT}-r"):  # refined-short-rK: as many neutral texts, drawn at random (seed K) from the 300
        texts = random.Random(int(form.removeprefix(f"{SHORT}-r"))).sample(neutral("fit"), KEEP_NEUTRAL)
        return TransferOptions(form="refined", hidden_texts=texts, refine=refine)
    return TransferOptions(form=form, refine=refine)


def stage_transfer(work: Path, task: TaskData, models: Models, specs: list[str], seeds: list[int], forms: list[str],
                   form_seeds: int, keywords: int = 0, words_only: bool = False, steered_texts: int = 96) -> None:
    """Every seed by the default form; the other forms (a refinement costs minutes) on the first ``form_seeds`` seeds.
    ``keywords``, ``words_only``, ``steered_texts``: see :func:`transfer_options`."""
    for seed, form in ((n, f) for f in forms for n in (seeds if f == "logit" else seeds[:form_seeds])):
        for src in specs:
            if not native_path(work, task.name, src, seed).exists():
                log(f"transfer {task.name}: no native steer on {src} seed {seed} yet; skipped")
                continue
            for tgt in (x for x in specs if x != src):
                out = transferred_path(work, task.name, src, tgt, seed, form)
                if out.exists():
                    continue
                t = time.perf_counter()
                res = transfer_steer(Steer.load(native_path(work, task.name, src, seed)), models[src], models[tgt],
                                     transfer_options(form, keywords, words_only, steered_texts))
                res.steer.save(out)
                cal = res.lineage.get("calibration", {})
                atomic_write_json(out.with_suffix(".json"), {"seconds": time.perf_counter() - t, "calibration": cal})
                log(f"transfer {task.name} {src} -> {tgt} ({form}) seed {seed}: {time.perf_counter() - t:.0f} s, "
                    f"calibration {cal.get('method')} factor {cal.get('factor')}")


# --------------------------------------------------------------------------- stage 3: evaluation on held-out texts


def scores_path(work: Path, task: str, spec: str) -> Path:
    """The evaluation record of every steer scored on ``spec``."""
    return work / "eval" / task / spec / "scores.json"


def shift_path(work: Path, task: str, spec: str, name: str) -> Path:
    """The per-token log-prob shift at κ = 0.05 of steer ``name`` ("native/seed0") scored on ``spec``."""
    return scores_path(work, task, spec).parent / f"{name.replace('/', '__')}.safetensors"


def steers_on(work: Path, task: str, tgt: str, specs: list[str], seeds: list[int], forms: list[str]) -> dict[str, Path]:
    """Every steer that runs on ``tgt``: its natives ("native/seed0") and the transfers into it ("smollm2-135m/seed0")."""
    out = {f"native/seed{n}": native_path(work, task, tgt, n) for n in seeds}
    out.update({f"{carried(src, f)}/seed{n}": transferred_path(work, task, src, tgt, n, f)
                for f in forms for src in specs if src != tgt for n in seeds})
    return {k: v for k, v in out.items() if v.exists()}


def neutral_texts(n: int = 16) -> list[str]:
    """Neutral text the calibration never sees: the first ``n`` bundled ``fit`` paragraphs, cut at a word boundary."""
    return [cut(t) for t in neutral("fit", limit=n)]


def neutral_scorer(lm: LoadedModel, n: int = 16) -> HeadScorer:
    """Mean KL per token on :func:`neutral_texts`."""
    return HeadScorer(lm, cache_hidden(lm, neutral_texts(n), max_tokens=256, tokens_per_batch=1024), max_base_bytes=2 << 30)


def matched_values(scorer: HeadScorer, steer: Steer, kappas: tuple[float, ...], rel_tol: float = 0.02) -> dict[str, dict[str, float]]:
    """Per κ, the value v > 0 with mean KL κ per token on the neutral text (to ``rel_tol``)."""
    found = find_values_for_kl(lambda v: scorer.stats([(steer, v)]).kl, kappas, rel_tol=rel_tol)
    return {str(k): {"value": f.value, "kl": f.kl, "evals": f.evaluations} for k, f in found.items()}


def stage_evaluate(work: Path, task: TaskData, models: Models, specs: list[str], seeds: list[int], forms: list[str],
                   max_tokens: int) -> None:
    for tgt in specs:
        steers = steers_on(work, task.name, tgt, specs, seeds, forms)
        doc_path = scores_path(work, task.name, tgt)
        folder = doc_path.parent
        doc: dict[str, Any] = json.loads(doc_path.read_text()) if doc_path.exists() else {"steers": {}}
        todo = [k for k in steers if k not in doc["steers"]]
        if not todo:
            continue
        lm = models[tgt]
        t = time.perf_counter()
        he = HeadEval(lm, task.test_texts, max_tokens)
        nscorer = neutral_scorer(lm)
        doc["cache_s"] = time.perf_counter() - t
        lp0 = he.token_lp(None)
        doc["n_tokens"] = [int(x.numel()) for x in he.per_text(lp0)]
        log(f"evaluate {task.name} on {tgt}: caches in {doc['cache_s']:.0f} s; {len(todo)} steers")
        for name in todo:
            t = time.perf_counter()
            steer = Steer.load(steers[name])
            vals = matched_values(nscorer, steer, KAPPAS)
            rec: dict[str, Any] = {"file": str(steers[name]), "fingerprint": steer.fingerprint, "matched": vals,
                                   "text_shift": {}}
            token_shift = {}  # κ -> (N,) per-token log-prob change at +v_κ
            for k in KAPPAS:  # per text: its mean
                token_shift[k] = he.token_lp(steer, vals[str(k)]["value"]) - lp0
                rec["text_shift"][str(k)] = per_text_mean(token_shift[k], he.cache).tolist()
            v = vals[str(AUC_KAPPA)]["value"]
            rec["auc_score"] = [float(x) for x in he.scores(steer, v)]
            folder.mkdir(parents=True, exist_ok=True)
            save_file({"token_shift": token_shift[AUC_KAPPA].float().contiguous()},  # for ρ of aligned spans
                      str(shift_path(work, task.name, tgt, name)))
            rec["seconds"] = time.perf_counter() - t
            doc["steers"][name] = rec
            atomic_write_json(doc_path, doc)
            log(f"  {name}: v(0.05) {v:.3f}, AUC {auc(np.array(rec['auc_score']), np.array(task.test_labels)):.3f}, "
                f"{rec['seconds']:.0f} s")


# --------------------------------------------------------------------------- stage 4: generation


def on_side(judge_prob: Any, direction: int) -> np.ndarray:
    """Per continuation: does the judge put it on the side steered toward (P(positive) > 0.5 for direction
    +1, ≤ 0.5 for −1)?"""
    p = np.asarray(judge_prob) > 0.5
    return p if direction > 0 else ~p


def judge_rate(run: dict[str, Any], direction: int) -> float:
    """Share of a generation run's continuations the judge puts on the side steered toward."""
    return float(np.mean(on_side(run["judge_prob"], direction)))


def stage_generate(work: Path, task: TaskData, models: Models, specs: list[str], forms: list[str], max_new_tokens: int,
                   targets: list[str] | None = None) -> None:
    """Generation on each of ``targets`` (default: every model of ``specs``); perplexity under the first other model
    of ``specs``, whichever targets run."""
    judge = load_judge(task.judge)
    if judge.positive != task.positive_name:
        raise SystemExit(f"judge {task.judge} scores {judge.positive!r}, the steers {task.positive_name!r}")
    settings = EvalSettings(samples_per_prompt=1, max_new_tokens=max_new_tokens, batch_size=20)
    for tgt in targets or specs:
        path = work / "generate" / task.name / f"{tgt}.json"
        if not native_path(work, task.name, tgt, 0).exists():
            log(f"generate {task.name} on {tgt}: no native steer (seed 0) yet; skipped")
            continue
        doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"runs": {}}
        if doc.get("direction", 1) != task.direction:  # runs steered the other way measure something else
            doc = {"runs": {}}
        doc["direction"] = d = task.direction
        lm = models[tgt]
        ref_spec = next((x for x in specs if x != tgt), tgt)  # perplexity under another ladder model (the first other one)
        nscorer = None

        def run(name: str, steer: Steer | None, value: float) -> dict[str, Any]:
            if name in doc["runs"]:
                return doc["runs"][name]
            t = time.perf_counter()
            conts = [g[0] for g in sample_continuations(lm, task.prompts, [(steer, d * value)] if steer else [], settings)]
            p = judge.score(conts)
            sums, counts = continuation_nll(models[ref_spec], task.prompts, conts)
            r = {"value": d * value, "judge_prob": [float(x) for x in p], "nll_sum": sums, "nll_count": counts,
                 "distinct": {str(n): [distinct_n([c], n) for c in conts] for n in (1, 2, 3)},
                 "samples": conts[:5], "seconds": time.perf_counter() - t}
            doc["runs"][name] = r
            atomic_write_json(path, doc)
            log(f"  generate {task.name} on {tgt}, {name}: judge rate {judge_rate(r, d):.2f} "
                f"({r['seconds']:.0f} s)")
            return r

        doc["reference_model"] = ref_spec
        base_rate = judge_rate(run("unsteered", None, 0.0), d)
        native = Steer.load(native_path(work, task.name, tgt, 0))
        chosen = doc.get("kappa")
        if chosen is None:
            nscorer = nscorer or neutral_scorer(lm)
            values = matched_values(nscorer, native, GEN_KAPPAS)
            for k in GEN_KAPPAS:  # the smallest κ where the native moves the judge by 0.2 (else the largest)
                chosen = k
                reached = judge_rate(run(f"native@{k}", native, values[str(k)]["value"]), d) - base_rate >= 0.2
                if reached:
                    break
            doc["kappa"], doc["kappa_reaches_0.2"] = chosen, reached
            atomic_write_json(path, doc)
        assert chosen is not None  # read back, or chosen above
        for src, form in ((x, f) for f in forms for x in specs if x != tgt):
            f = transferred_path(work, task.name, src, tgt, 0, form)
            if f.exists() and f"{carried(src, form)}@{chosen}" not in doc["runs"]:
                nscorer = nscorer or neutral_scorer(lm)
                steer = Steer.load(f)
                run(f"{carried(src, form)}@{chosen}", steer, matched_values(nscorer, steer, (chosen,))[str(chosen)]["value"])


# --------------------------------------------------------------------------- stage 5: report


def ratio(a: float, b: float) -> float:
    return float(a / b) if b != 0 else math.nan


def interval(samples: list[float]) -> list[float]:
    a = np.array([x for x in samples if math.isfinite(x)])
    return [float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))] if len(a) else [math.nan, math.nan]


def summary(point_per_seed: list[float], boot: list[float]) -> dict[str, Any]:
    """Mean over seeds, their std, and the bootstrap 95 % interval of that mean."""
    p = np.array(point_per_seed, dtype=float)
    return {"mean": float(p.mean()), "seed_std": float(p.std(ddof=1)) if len(p) > 1 else 0.0,
            "per_seed": [float(x) for x in p], "ci95": interval(boot)}


def span_rho(tok_s: Any, tok_t: Any, texts: list[str], n_src: list[int], n_tgt: list[int],
             shift_src: torch.Tensor, shift_tgt: torch.Tensor, max_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shifts of the same character spans on both models: (source shift, target shift, text index) per span."""
    xs: list[float] = []
    xt: list[float] = []
    owner: list[int] = []
    per_s, per_t = torch.split(shift_src, n_src), torch.split(shift_tgt, n_tgt)
    for i, text in enumerate(texts):
        a, b = aligned_spans(tok_s, tok_t, [text], [per_s[i]], [per_t[i]], max_tokens)
        xs += a
        xt += b
        owner += [i] * len(a)
    return np.array(xs), np.array(xt), np.array(owner)


def rank_corr(x: np.ndarray, y: np.ndarray) -> float:
    return spearman(x, y) if len(x) > 2 else math.nan


def cell_figures(work: Path, task: TaskData, src: str, tgt: str, form: str, seeds: list[int], models: Models,
                 max_tokens: int, n_boot: int, rng: np.random.Generator) -> dict[str, Any] | None:
    """Every figure of one ordered pair: point per seed, spread over seeds and bootstrap interval over texts."""
    e_src = json.loads(scores_path(work, task.name, src).read_text())
    e_tgt = json.loads(scores_path(work, task.name, tgt).read_text())
    seeds = [n for n in seeds if f"native/seed{n}" in e_src["steers"] and f"native/seed{n}" in e_tgt["steers"]
             and f"{carried(src, form)}/seed{n}" in e_tgt["steers"]]
    if not seeds:
        return None
    y = np.array(task.test_labels)
    n = len(y)
    def arr(doc: dict[str, Any], name: str, key: str, k: str | None = None) -> np.ndarray:
        r = doc["steers"][name]
        return np.array(r[key][k] if k else r[key])

    def figures(idx: np.ndarray) -> dict[str, list[float]]:
        out: dict[str, list[float]] = defaultdict(list)
        yy = y[idx]
        for s in seeds:
            a_src = auc(arr(e_src, f"native/seed{s}", "auc_score")[idx], yy)
            a_nat = auc(arr(e_tgt, f"native/seed{s}", "auc_score")[idx], yy)
            a_tr = auc(arr(e_tgt, f"{carried(src, form)}/seed{s}", "auc_score")[idx], yy)
            out["auc_source"].append(a_src)
            out["auc_native"].append(a_nat)
            out["auc_transferred"].append(a_tr)
            out["fidelity"].append(ratio(a_tr - 0.5, a_src - 0.5))
            out["efficiency"].append(ratio(a_tr - 0.5, min(a_src - 0.5, a_nat - 0.5)))
            for k in KAPPAS:
                sep = {}
                for who, doc, name in (("tr", e_tgt, f"{carried(src, form)}/seed{s}"), ("nat", e_tgt, f"native/seed{s}"),
                                       ("src", e_src, f"native/seed{s}")):
                    d = arr(doc, name, "text_shift", str(k))[idx]
                    sep[who] = d[yy == 1].mean() - d[yy == 0].mean()
                out[f"retained@{k}"].append(ratio(sep["tr"], sep["nat"]))
                out[f"kept@{k}"].append(ratio(sep["tr"], sep["src"]))
                out[f"sep_native@{k}"].append(sep["nat"])
                out[f"sep_source@{k}"].append(sep["src"])
        return out

    point = figures(np.arange(n))
    boots = [figures(rng.integers(0, n, n)) for _ in range(n_boot)]
    res: dict[str, Any] = {key: summary(vals, [float(np.mean(b[key])) for b in boots]) for key, vals in point.items()}
    # ρ of aligned spans (both tokenizers)
    rho_point, pairs = [], []
    for s in seeds:
        sh_s = load_file(str(shift_path(work, task.name, src, f"native/seed{s}")))["token_shift"]
        sh_t = load_file(str(shift_path(work, task.name, tgt, f"{carried(src, form)}/seed{s}")))["token_shift"]
        xs, xt, owner = span_rho(models[src].tokenizer, models[tgt].tokenizer, task.test_texts, e_src["n_tokens"],
                                 e_tgt["n_tokens"], sh_s, sh_t, max_tokens)
        rho_point.append(rank_corr(xs, xt))
        pairs.append((xs, xt, owner))
    rho_boot = []
    for _ in range(min(n_boot, 200)):
        pick = rng.integers(0, n, n)
        counts = np.bincount(pick, minlength=n)
        vals = []
        for xs, xt, owner in pairs:  # a span is repeated as often as its text was drawn
            rep = np.repeat(np.arange(len(owner)), counts[owner])
            vals.append(rank_corr(xs[rep], xt[rep]))
        rho_boot.append(float(np.mean(vals)))
    res["rho"] = summary(rho_point, rho_boot)
    res["n_spans"] = int(np.mean([len(p[0]) for p in pairs]))
    res["seeds"] = seeds
    return res


def wilson(k: int, n: int) -> list[float]:
    lo, hi = wilson_interval(k, n)
    return [lo, hi]


def generation_figures(doc: dict[str, Any], rng: np.random.Generator, n_boot: int) -> dict[str, Any]:
    """Judge rate (on the side steered toward) with its Wilson interval; perplexity and distinct-n with bootstrap
    intervals over prompts."""
    direction = doc.get("direction", 1)
    out: dict[str, Any] = {"kappa": doc.get("kappa"), "kappa_reaches_0.2": doc.get("kappa_reaches_0.2"),
                           "reference_model": doc.get("reference_model"), "direction": direction, "runs": {}}
    for name, r in doc["runs"].items():
        p = on_side(r["judge_prob"], direction)
        nll, cnt = np.array(r["nll_sum"]), np.array(r["nll_count"])
        n = len(p)
        def ppl(idx: np.ndarray) -> float:
            return float(np.exp(nll[idx].sum() / max(cnt[idx].sum(), 1)))
        boot_idx = [rng.integers(0, n, n) for _ in range(n_boot)]
        out["runs"][name] = {
            "value": r["value"], "judge_rate": float(p.mean()), "judge_rate_ci95": wilson(int(p.sum()), n),
            "perplexity": ppl(np.arange(n)), "perplexity_ci95": interval([ppl(i) for i in boot_idx]),
            **{f"distinct_{k}": float(np.mean(v)) for k, v in r["distinct"].items()},
            **{f"distinct_{k}_ci95": interval([float(np.mean(np.array(v)[i])) for i in boot_idx]) for k, v in r["distinct"].items()},
            "n_prompts": n, "samples": r["samples"][:2]}
    return out


def stage_report(work: Path, tasks: list[TaskData], specs: list[str], seeds: list[int], models: Models, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    doc: dict[str, Any] = {"benchmark": "transfer_ladder", "steerport_version": __version__, "machine": machine(),
                           "settings": {"train": asdict(TrainConfig()), "model_dtype": "float32", "kappas": KAPPAS,
                                        "auc_kappa": AUC_KAPPA, "generation_kappas": GEN_KAPPAS,
                                        "heldout_per_class": args.heldout, "max_tokens": args.max_tokens,
                                        "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                                        "bootstrap": args.bootstrap, "seeds": seeds, "models": specs,
                                        "transfer": "TransferOptions(form=F), KL calibration", "forms": args.forms.split(","),
                                        "refine_keywords": args.refine_keywords, "refine_keywords_words_only": args.refine_keywords_words_only,
                                        "steered_texts": args.steered_texts,
                                        "head": "top-256 candidates exact, tail first order (benchmarks.refine_check.HeadEval)"},
                           "tasks": {}}
    for task in tasks:
        t: dict[str, Any] = {"data": {"train": len(task.train), "dev": len(task.dev), "test": len(task.test_texts),
                                      "files": task.files}, "natives": {}, "cells": {}, "generation": {}}
        y = np.array(task.test_labels)
        for spec in specs:
            f = scores_path(work, task.name, spec)
            runs = [json.loads(native_path(work, task.name, spec, s).with_suffix(".json").read_text())
                    for s in seeds if native_path(work, task.name, spec, s).with_suffix(".json").exists()]
            if not f.exists() or not runs:
                continue
            e = json.loads(f.read_text())
            names = [f"native/seed{s}" for s in seeds if f"native/seed{s}" in e["steers"]]
            scores = [np.array(e["steers"][nm]["auc_score"]) for nm in names]
            boots = [rng.integers(0, len(y), len(y)) for _ in range(args.bootstrap)]
            t["natives"][spec] = {
                "test_auc": summary([auc(sc, y) for sc in scores], [float(np.mean([auc(sc[i], y[i]) for sc in scores])) for i in boots]),
                "dev_auc": [r["results"].get("heldout_auc") for r in runs], "steps": [r["results"].get("steps") for r in runs],
                "epochs": [r["results"].get("epochs") for r in runs], "stopped": [r["results"].get("stopped") for r in runs],
                "train_s": [round(r["seconds"], 1) for r in runs],
                "value_at_0.05": [e["steers"][nm]["matched"][str(AUC_KAPPA)]["value"] for nm in names]}
        for form in args.forms.split(","):
            for src, tgt in ((a, b) for a in specs for b in specs if a != b):
                if all(scores_path(work, task.name, m).exists() for m in (src, tgt)):
                    c = cell_figures(work, task, src, tgt, form, seeds, models, args.max_tokens, args.bootstrap, rng)
                    if c is not None:
                        key = f"{src} -> {tgt}" + ("" if form == "logit" else f" ({form})")
                        t["cells"][key] = {"form": form, **c}
                        log(f"report {task.name} {key}: efficiency {c['efficiency']['mean']:.2f}")
        for spec in specs:
            g = work / "generate" / task.name / f"{spec}.json"
            if g.exists():
                t["generation"][spec] = generation_figures(json.loads(g.read_text()), rng, args.bootstrap)
        doc["tasks"][task.name] = t
    out = Path(args.out)
    keep_measured_tasks(doc, out.with_suffix(".json"))
    atomic_write_json(out.with_suffix(".json"), doc)
    atomic_write_text(out.with_suffix(".md"), markdown(doc))
    log(f"wrote {out.with_suffix('.json')} and .md")


def keep_measured_tasks(doc: dict[str, Any], previous: Path) -> None:
    """Keep a task from the previous result file where this run has none of its figures (not asked
    for, or its cache is gone): the report of one task does not erase the other's measurements."""
    if not previous.exists():
        return
    before = json.loads(previous.read_text()).get("tasks", {})
    for name, t in before.items():
        now = doc["tasks"].get(name)
        if now is None or not (now["natives"] or now["cells"] or now["generation"]):
            doc["tasks"][name] = {**t, "from_previous_report": True}
            log(f"report: {name} kept from {previous} (no cached figures in this run)")


def fmt(f: dict[str, Any], digits: int = 2) -> str:
    lo, hi = f["ci95"]
    return f"{f['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] ±{f['seed_std']:.{digits}f}"


def kept(c: dict[str, Any], k: float) -> str:
    """The kept effect at κ k of one cell; for results written before it was recorded, the mean over
    seeds of retained × native separation / source separation (per seed, no interval)."""
    if f"kept@{k}" in c:
        return fmt(c[f"kept@{k}"])
    per = [r * n / s_ for r, n, s_ in zip(c[f"retained@{k}"]["per_seed"], c[f"sep_native@{k}"]["per_seed"],
                                          c[f"sep_source@{k}"]["per_seed"])]
    return f"{np.mean(per):.2f}"


def markdown(doc: dict[str, Any]) -> str:
    st, m = doc["settings"], doc["machine"]
    lines = ["# Transfer on the model ladder: converged natives, fidelity, retained, efficiency", "",
             f"steerport {doc['steerport_version']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']}; models in {st['model_dtype']}; "
             f"seeds {st['seeds']}; {st['heldout_per_class']} test texts per class (never trained on or used for model selection); "
             f"bootstrap {st['bootstrap']} resamples of the texts.", "",
             "Each figure: mean over seeds [bootstrap 95 % interval of that mean over held-out texts] ±std over seeds. "
             "AUC: the steer as a classifier, ℓ(+v) − ℓ(−v) at its value v for κ = 0.05 on neutral text. "
             "Fidelity: (AUC_transferred − 0.5) / (AUC_source − 0.5); efficiency: (AUC_transferred − 0.5) / "
             "min(AUC_source − 0.5, AUC_native − 0.5) (target ≥ 0.9); ρ: Spearman of the log-prob shifts of the same "
             "character spans on source and target; retained: separation of the transferred steer / the target's native "
             "steer at matched κ (target ≥ 0.9 where the source native is at least as strong as the target native). "
             "Rows marked (refined): `--form refined` on the seeds named in the row (one seed: ±0.00 is no spread, not a "
             "measured one).", ""]
    if any(f.startswith((STEERED, SHORT)) for f in st["forms"]):
        lines += [f"Form refined-steered: `transfer --steered-texts {st.get('steered_texts', 96)}`, the refinement also fitted on "
                  "that many texts per sign that the source model writes under the steer at ±v (v where its κ is 0.3), beside "
                  f"the first {KEEP_NEUTRAL} neutral texts (refined-steered-sK: the same with sampling seed 1000·K). "
                  f"refined-short: the control, refined on those neutral texts alone (refined-short-rK: {KEEP_NEUTRAL} "
                  "neutral texts drawn at random with seed K).", ""]
    for name, t in doc["tasks"].items():
        d = t["data"]
        n_pairs = len(st["models"]) * (len(st["models"]) - 1)
        done_pairs = len({key.split(" (")[0] for key in t["cells"]})  # ordered pairs with a cell of any form
        lines += [f"## {name}", "", f"Coverage: native steers evaluated on {len(t['natives'])} of {len(st['models'])} models, "
                  f"{done_pairs} of {n_pairs} ordered pairs{' (the rest not run yet)' if done_pairs < n_pairs else ''}.", ""]
        if t.get("from_previous_report"):
            lines += ["Measured by an earlier run of this benchmark (same settings); kept as it was.", ""]
        if not t["natives"]:
            continue
        lines += [f"Native steers: `TrainConfig()` defaults (early stopping on the dev split) on "
                  f"{d['train']} training texts, dev {d['dev']}, test {d['test']}.", "",
                  "| model | test AUC | dev AUC per seed | steps per seed | train s per seed | value at κ 0.05 |", "|---|---|---|---|---|---|"]
        for spec, n in t["natives"].items():
            lines.append(f"| {spec} | {fmt(n['test_auc'], 3)} | {', '.join(f'{x:.3f}' for x in n['dev_auc'] if x is not None)} | "
                         f"{', '.join(str(x) for x in n['steps'])} | {', '.join(f'{x:.0f}' for x in n['train_s'])} | "
                         f"{', '.join(f'{x:.2f}' for x in n['value_at_0.05'])} |")
        if t["cells"]:
            lines += ["", "| source → target | AUC source | AUC transferred | AUC native | fidelity | **efficiency** | ρ (spans) |",
                      "|---|---|---|---|---|---|---|"]
            for key, c in t["cells"].items():
                rho = fmt(c["rho"]) if "rho" in c else "–"
                label = key if c["form"] == "logit" else f"{key}, seed{'s' if len(c['seeds']) > 1 else ''} {','.join(map(str, c['seeds']))}"
                lines.append(f"| {label} | {fmt(c['auc_source'], 3)} | {fmt(c['auc_transferred'], 3)} | {fmt(c['auc_native'], 3)} | "
                             f"{fmt(c['fidelity'])} | **{fmt(c['efficiency'])}** | {rho} |")
            lines += ["", "Retained vs the target's native steer at matched κ (native separation in nats beside it):", "",
                      "| source → target | " + " | ".join(f"κ = {k}" for k in st["kappas"]) + " | source native stronger? |",
                      "|---" * (len(st["kappas"]) + 2) + "|"]
            for key, c in t["cells"].items():
                k0 = st["kappas"][1]
                stronger = c[f"sep_source@{k0}"]["mean"] >= c[f"sep_native@{k0}"]["mean"]
                lines.append(f"| {key} | " + " | ".join(f"{fmt(c[f'retained@{k}'])} (nat {c[f'sep_native@{k}']['mean']:.3f})"
                                                        for k in st["kappas"]) + f" | {'yes' if stronger else 'no'} |")
            lines += ["", "Kept vs the source steer on its own model at matched κ: separation of the transferred steer on the "
                      "target / the source steer's on the source (1 = the carry loses no separation per unit of KL)"
                      + ("" if all(f"kept@{st['kappas'][0]}" in c for c in t["cells"].values()) else
                         "; no interval where the result predates this figure (mean over seeds of the recorded per-seed "
                         "retained × native separation / source separation)") + ":", "",
                      "| source → target | " + " | ".join(f"κ = {k}" for k in st["kappas"]) + " |",
                      "|---" * (len(st["kappas"]) + 1) + "|"]
            for key, c in t["cells"].items():
                lines.append(f"| {key} | " + " | ".join(kept(c, k) for k in st["kappas"]) + " |")
        if t["generation"]:
            toward = ("the steer's side (values +)" if all(g.get("direction", 1) > 0 for g in t["generation"].values()) else
                      "the side steered toward: the steer's other side, at negative values (the judge calls nearly every "
                      "unsteered continuation of these prompts the steer's side already)")
            lines += ["", "Generation (sampled, temperature 1, top-p 0.9, one continuation per prompt): judge rate of "
                      f"{toward} [Wilson 95 %], perplexity under another ladder model and distinct-2 [bootstrap 95 %].", "",
                      "| target | κ | run | value | judge rate | perplexity | distinct-2 |", "|---|---|---|---|---|---|---|"]
            for spec, g in t["generation"].items():
                for run, r in g["runs"].items():
                    lines.append(f"| {spec} | {g['kappa']}{'' if g['kappa_reaches_0.2'] else ' (native < +0.2)'} | {run} | "
                                 f"{r['value']:.2f} | {r['judge_rate']:.2f} [{r['judge_rate_ci95'][0]:.2f}, {r['judge_rate_ci95'][1]:.2f}] | "
                                 f"{r['perplexity']:.1f} [{r['perplexity_ci95'][0]:.1f}, {r['perplexity_ci95'][1]:.1f}] | "
                                 f"{r['distinct_2']:.2f} [{r['distinct_2_ci95'][0]:.2f}, {r['distinct_2_ci95'][1]:.2f}] |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    return {**refine_check_machine(), "cores": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data", help="folder with sentiment/sst2, toxicity/paradetox, prompts/")
    ap.add_argument("--work", default=str(Path.home() / ".cache/steerport-bench/ladder"))
    ap.add_argument("--out", default="benchmarks/results/transfer_ladder")
    ap.add_argument("--models", default=",".join(LADDER))
    ap.add_argument("--tasks", default="sentiment,toxicity")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--stages", default="train,transfer,evaluate,generate,report")
    ap.add_argument("--forms", default="logit,refined", help="transfer forms to compare (logit: every seed, the others on --form-seeds seeds)")
    ap.add_argument("--form-seeds", type=int, default=1, help="seeds carried by the forms other than logit")
    ap.add_argument("--refine-keywords", type=int, default=0, help="the refined form's keyword term (transfer --keywords)")
    ap.add_argument("--refine-keywords-words-only", action="store_true", help="transfer --keywords-words-only")
    ap.add_argument("--steered-texts", type=int, default=96, help=f"the {STEERED} form's texts per sign (transfer --steered-texts)")
    ap.add_argument("--heldout", type=int, default=400, help="test texts per class")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--generate-on", default="", help="models to generate on (comma list; default: every model)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per held-out text")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples of the held-out texts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny data, for a smoke run")
    args = ap.parse_args()
    root, work = Path(args.data_root), Path(args.work)
    models = Models(args.threads)
    specs, seeds, forms = args.models.split(","), list(range(args.seeds)), args.forms.split(",")
    makers = {"sentiment": sentiment, "toxicity": toxicity}
    loaded: list[TaskData] = []
    for name in args.tasks.split(","):
        task = makers[name](root, args.heldout, args.prompts, args.quick)
        log(f"{name}: train {len(task.train)}, dev {len(task.dev)}, test {len(task.test_texts)}, prompts {len(task.prompts)}")
        for stage in args.stages.split(","):
            if stage == "train":
                stage_train(work, task, models, specs, seeds, TrainConfig())
            elif stage == "transfer":
                stage_transfer(work, task, models, specs, seeds, forms, args.form_seeds, args.refine_keywords,
                               args.refine_keywords_words_only, args.steered_texts)
            elif stage == "evaluate":
                stage_evaluate(work, task, models, specs, seeds, forms, args.max_tokens)
            elif stage == "generate":
                stage_generate(work, task, models, specs, forms, args.max_new_tokens,
                               [m for m in args.generate_on.split(",") if m] or None)
        loaded.append(task)
    if "report" in args.stages.split(","):
        stage_report(work, loaded, specs, seeds, models, args)


if __name__ == "__main__":
    main()

"""Evaluate steers on one model against the unsteered model and against each other.

For each steer: the value that reaches a KL budget κ on neutral text (bisection), separation
and steer-as-classifier ROC AUC on held-out labeled text at that value, retained effect against
the native steer, Spearman agreement of the per-token log-prob shifts over the vocabulary, and
(optionally) generation metrics: a judge's attribute rate, perplexity under a reference model,
distinct-1/2/3 and generation retention.

All log-likelihood metrics run the model body once per text set and recompute only the LM head
for every steer value (:class:`steerport.scoring.HeadScorer`), so a bisection is cheap. The
metrics themselves are in :mod:`steerport.metrics` (re-exported here).

Example::

    lm = load_model("gemma3-270m")
    report = evaluate_steers(lm, [("native", native), ("from-smollm2", moved)],
                             heldout=(texts, labels), neutral=neutral("calib"), settings=EvalSettings(kappa=0.05))
    print(report["steers"]["from-smollm2"]["retained_effect"])
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from steerport.capture import HiddenCache, cache_hidden
from steerport.errors import SteerportError
from steerport.fileio import sha256_file
from steerport.hooks import SteerValue, check_compatible
from steerport.metrics import (  # noqa: F401  (re-exported: the metrics used to live here)
    BisectResult,
    distinct_n,
    find_value_for_kl,
    mean_distinct,
    retention,
    roc_auc,
    separation,
    spearman,
)
from steerport.models import LoadedModel
from steerport.scoring import HeadScorer, per_text_mean, token_logprobs, value_for_kl
from steerport.steer import Steer
from steerport.texts import neutral as neutral_split
from steerport.texts import read_texts

# --------------------------------------------------------------------------- settings and data


@dataclass
class EvalSettings:
    """Every knob of an evaluation; stored in the report next to the numbers."""

    kappa: float | None = None  # KL budget; None: κ of the native steer at its given value
    rel_tol: float = 0.02  # bisection tolerance on κ
    neutral_texts: int = 64  # lines of neutral reference text
    neutral_max_tokens: int = 64
    heldout_per_class: int = 150
    heldout_max_tokens: int = 64
    curve: tuple[float, ...] = ()  # extra multiples of each matched value for separation-vs-κ curves
    n_prompts: int = 20
    samples_per_prompt: int = 2
    max_new_tokens: int = 30
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 8
    chunk: int = 256


def file_info(path: str | Path | None) -> dict[str, Any] | None:
    """Path, size and sha256 of a data file (for the report)."""
    if path is None:
        return None
    p = Path(path)
    return {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def read_neutral(path: str | Path | None, n: int, min_chars: int = 40) -> list[str]:
    """Up to ``n`` neutral texts of at least ``min_chars`` characters: from ``path``
    (:func:`steerport.texts.read_texts`), or the bundled neutral ``calib`` split when None."""
    if path is None:
        texts = [t for t in neutral_split("calib") if len(t) >= min_chars][:n]
        if not texts:
            raise SteerportError(f"the bundled neutral text has no lines of at least {min_chars} characters")
        return texts
    return read_texts(path, limit=n, min_chars=min_chars)


def balanced_sample(texts: Sequence[str], labels: Sequence[int], per_class: int, seed: int) -> tuple[list[str], list[int]]:
    """Up to ``per_class`` texts of each label (1 / 0), chosen with a seeded shuffle, positives first."""
    rng = random.Random(seed)
    out_t, out_y = [], []
    for cls in (1, 0):
        idx = [i for i, y in enumerate(labels) if y == cls]
        rng.shuffle(idx)
        for i in idx[:per_class]:
            out_t.append(texts[i])
            out_y.append(cls)
    if len(set(out_y)) != 2:
        raise SteerportError("held-out data needs texts of both classes")
    return out_t, out_y


# --------------------------------------------------------------------------- generation helpers


def sample_continuations(lm: LoadedModel, prompts: Sequence[str], steers, s: EvalSettings, *,
                         force: bool = False) -> list[list[str]]:
    """``samples_per_prompt`` continuations of each prompt; sample j uses seed ``s.seed + 1000 j``.

    Steers made for another model are refused unless ``force``.
    """
    from steerport.hooks import generate

    per_sample = [
        generate(lm, prompts, steers, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                 seed=s.seed + 1000 * j, batch_size=s.batch_size, force=force)
        for j in range(s.samples_per_prompt)
    ]
    return [list(group) for group in zip(*per_sample)]


def continuation_nll(ref: LoadedModel, prompts: Sequence[str], continuations: Sequence[str], *,
                     batch_size: int = 8) -> tuple[list[float], list[int]]:
    """Per continuation: − Σ log p_ref(its tokens | prompt) and the number of those tokens."""
    full = [p + c for p, c in zip(prompts, continuations)]
    lps = token_logprobs(ref, full, batch_size=batch_size, max_tokens=512)
    sums: list[float] = []
    counts: list[int] = []
    for p, f, lp in zip(prompts, full, lps):
        n_cont = min(len(ref.tokenizer(f)["input_ids"]) - len(ref.tokenizer(p)["input_ids"]), lp.numel())
        sums.append(-float(lp[-n_cont:].sum()) if n_cont > 0 else 0.0)
        counts.append(max(n_cont, 0))
    return sums, counts


def conditional_perplexity(ref: LoadedModel, prompts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 8) -> float:
    """exp(− mean log p_ref(continuation tokens | prompt)), pooled over all continuation tokens."""
    sums, counts = continuation_nll(ref, prompts, continuations, batch_size=batch_size)
    return math.exp(sum(sums) / sum(counts)) if sum(counts) else math.nan


# --------------------------------------------------------------------------- the evaluation


def _kinds_ok(steers: Sequence[tuple[str, Steer]]) -> None:
    for name, st in steers:
        if st.kind == "actadd":
            raise SteerportError(f"steer {name!r} is an actadd steer: "
                                 "evaluate measures steers that act at the LM head (lm-steer, token-prob)")


def evaluate_steers(
    lm: LoadedModel,
    steers: Sequence[tuple[str, Steer]],
    *,
    heldout: tuple[Sequence[str], Sequence[int]],
    neutral: Sequence[str],
    settings: EvalSettings | None = None,
    native: int = 0,
    native_value: float = 1.0,
    prompts: Sequence[str] = (),
    judge=None,
    reference: LoadedModel | None = None,
    force: bool = False,
    generate_names: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compare ``steers`` (name, Steer) on ``lm``; ``steers[native]`` is the reference for retention.

    ``generate_names`` limits generation to those steers (default all; the native always runs).
    Returns a JSON-ready dict: the settings, κ target, and per steer its matched value,
    separation, retained effect, AUC, agreement with every other steer and generation metrics.
    """
    s = settings or EvalSettings()
    say = progress or (lambda msg: None)
    if not steers:
        raise SteerportError("give at least one steer to evaluate")
    if not 0 <= native < len(steers):
        raise SteerportError(f"native steer index {native} is out of range for {len(steers)} steers")
    _kinds_ok(steers)
    for _, st in steers:
        check_compatible(lm, st, force=force)
    names = [n for n, _ in steers]
    if len(set(names)) != len(names):
        raise SteerportError(f"steer names must be unique, got {names}")
    t0 = time.time()
    timings: dict[str, float] = {}

    # 1. neutral text: body once, κ bisection on the head only
    say(f"neutral text: {len(neutral)} texts")
    neutral_cache = cache_hidden(lm, neutral, max_tokens=s.neutral_max_tokens,
                                 tokens_per_batch=s.batch_size * s.neutral_max_tokens)
    neutral_scorer = HeadScorer(lm, neutral_cache, chunk=s.chunk, force=force)
    nat_name, nat_steer = steers[native]
    kappa = s.kappa if s.kappa is not None else neutral_scorer.stats([(nat_steer, native_value)]).kl
    results: dict[str, dict[str, Any]] = {}
    shifts: dict[str, torch.Tensor] = {}
    for name, st in steers:
        say(f"bisection for {name}")
        b = value_for_kl(lm, neutral, st, kappa, rel_tol=s.rel_tol, scorer=neutral_scorer,
                         start=1.0 if name != nat_name or s.kappa is not None else native_value)
        shift = neutral_scorer.stats([(st, b.value)], shift=True).logprob_shift
        assert shift is not None  # stats(..., shift=True) always measures the shift
        shifts[name] = shift
        results[name] = {"value": b.value, "kl": b.kl, "bisection_evals": b.evaluations, "steer_fingerprint": st.fingerprint,
                         "epsilon": st.epsilon, "rank": st.rank, "positive": st.positive, "lineage": st.meta.get("lineage")}
    # strength at the same value: κ of each steer at the native's matched value (what calibration aims at)
    v_nat = results[nat_name]["value"]
    for (name, st), k in zip(steers, neutral_scorer.stats_many([[(st, v_nat)] for _, st in steers])):
        results[name]["kl_at_native_value"] = k.kl
        results[name]["value_ratio"] = results[name]["value"] / v_nat
    timings["kl_bisection_s"] = time.time() - t0

    # 2. held-out labeled text: separation and AUC at the matched values
    t1 = time.time()
    texts, labels = heldout
    say(f"held-out text: {len(texts)} texts")
    h_cache: HiddenCache = cache_hidden(lm, texts, max_tokens=s.heldout_max_tokens,
                                        tokens_per_batch=s.batch_size * s.heldout_max_tokens)
    h_scorer = HeadScorer(lm, h_cache, chunk=s.chunk, max_base_bytes=0, force=force)
    y = torch.tensor(labels)
    pos, neg = y == 1, y == 0
    base = per_text_mean(h_scorer.base_token_logprob, h_cache)
    # every steer at +v, -v and the curve multiples in one pass over the cache (the head's matmul is shared)
    plan = [(name, st, m) for name, st in steers for m in (1.0, -1.0, *s.curve)]
    all_stats = h_scorer.stats_many([[(st, m * results[name]["value"])] for name, st, m in plan], kl=False)
    lp = {(name, m): per_text_mean(a.token_logprob, h_cache) for (name, _, m), a in zip(plan, all_stats)}
    for name, st in steers:
        v, r = results[name]["value"], results[name]
        plus, minus = lp[(name, 1.0)], lp[(name, -1.0)]
        r["separation"] = separation(plus[pos], base[pos], plus[neg], base[neg])
        r["separation_neg_value"] = separation(minus[pos], base[pos], minus[neg], base[neg])
        r["auc"] = roc_auc(plus - minus, y)
        if s.curve:
            kls = neutral_scorer.stats_many([[(st, m * v)] for m in s.curve])
            r["curve"] = [{"multiple": m, "value": m * v, "kl": k.kl,
                           "separation": separation(lp[(name, m)][pos], base[pos], lp[(name, m)][neg], base[neg])}
                          for m, k in zip(s.curve, kls)]
    nat_sep = results[nat_name]["separation"]
    for name in names:
        results[name]["retained_effect"] = results[name]["separation"] / nat_sep if nat_sep != 0 else math.nan
        results[name]["agreement"] = {o: spearman(shifts[name], shifts[o]) for o in names if o != name}
    timings["heldout_s"] = time.time() - t1

    # 3. generation
    generation = None
    if prompts:
        t2 = time.time()
        keep = set(generate_names or names) | {nat_name}
        generation = _generation(lm, [(n, st) for n, st in steers if n in keep], results, list(prompts), s, judge,
                                 reference, nat_name, say, force)
        timings["generation_s"] = time.time() - t2
    timings["total_s"] = time.time() - t0
    return {
        "model": {"spec": lm.spec, "fingerprint": lm.fingerprint, "dtype": str(lm.dtype).removeprefix("torch.")},
        "settings": asdict(s),
        "kappa_target": kappa,
        "native": nat_name,
        "counts": {"neutral_texts": len(neutral), "neutral_positions": neutral_scorer.cache.n_positions,
                   "heldout_texts": len(texts), "heldout_positive": int(pos.sum()), "heldout_negative": int(neg.sum()),
                   "heldout_positions": h_cache.n_targets},
        "steers": results,
        "generation": generation,
        "timings": timings,
    }


def _generation(lm, steers, results, prompts, s: EvalSettings, judge, reference, nat_name, say, force) -> dict[str, Any]:
    settings_run: list[tuple[str, list[SteerValue]]] = [("unsteered", [])] + [(name, [(st, results[name]["value"])]) for name, st in steers]
    gen: dict[str, Any] = {"n_prompts": len(prompts), "samples_per_prompt": s.samples_per_prompt,
                           "judge": judge.describe() if judge is not None else None,
                           "reference_model": None if reference is None else {"spec": reference.spec, "fingerprint": reference.fingerprint},
                           "runs": {}}
    texts: dict[str, list[list[str]]] = {}
    for name, st in settings_run:
        say(f"generating: {name}")
        texts[name] = sample_continuations(lm, prompts, st, s, force=force)
    for name, groups in texts.items():
        flat = [c for g in groups for c in g]
        run: dict[str, Any] = {f"distinct_{n}": mean_distinct(groups, n) for n in (1, 2, 3)}
        if judge is not None:
            p = judge.score(flat)
            run["attribute_rate"] = float((p > 0.5).mean())
            run["attribute_mean_prob"] = float(p.mean())
        if reference is not None:
            say(f"perplexity under {reference.spec}: {name}")
            run["perplexity"] = conditional_perplexity(reference, [pp for pp in prompts for _ in range(s.samples_per_prompt)], flat,
                                                       batch_size=s.batch_size)
        run["samples"] = [{"prompt": prompts[i], "continuation": groups[i][0]} for i in range(min(3, len(prompts)))]
        gen["runs"][name] = run
    if judge is not None:
        base, nat = gen["runs"]["unsteered"]["attribute_rate"], gen["runs"][nat_name]["attribute_rate"]
        for name, _ in steers:
            gen["runs"][name]["generation_retention"] = retention(base, gen["runs"][name]["attribute_rate"], nat)
    return gen


# --------------------------------------------------------------------------- presentation


def report_tables(report: dict[str, Any]) -> list:
    """Rich tables, one row per steer: likelihood metrics at matched κ, then generation metrics."""
    from rich.table import Table

    def f(x, fmt=".3f"):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    nat = report["native"]
    t = Table(title=f"{report['model']['spec']}: matched κ = {report['kappa_target']:.4g} nats, native = {nat}")
    for col in ("steer", "value", "κ", "separation", "retained", "AUC", "ρ vs native"):
        t.add_column(col, justify="left" if col == "steer" else "right")
    for name, r in report["steers"].items():
        t.add_row(name, f(r["value"], ".4g"), f(r["kl"], ".4f"), f(r["separation"], ".4f"), f(r["retained_effect"], ".2f"),
                  f(r["auc"]), "1" if name == nat else f(r["agreement"].get(nat), ".2f"))
    tables = [t]
    gen = report.get("generation")
    if gen:
        judge = gen.get("judge") or {}
        acc = ", ".join(f"{h['accuracy']:.2f}" for h in judge.get("heldout", []))
        g = Table(title=f"generation: {gen['n_prompts']} prompts x {gen['samples_per_prompt']} samples; "
                        f"judge {judge.get('kind', '—')} ({judge.get('positive', '')}; held-out acc. {acc or '—'})")
        for col in ("run", "attr. rate", "retention", "ppl", "dist-1", "dist-2", "dist-3"):
            g.add_column(col, justify="left" if col == "run" else "right")
        for name, r in gen["runs"].items():
            g.add_row(name, f(r.get("attribute_rate")), f(r.get("generation_retention"), ".2f"), f(r.get("perplexity"), ".1f"),
                      *(f(r[f"distinct_{n}"], ".2f") for n in (1, 2, 3)))
        tables.append(g)
    return tables

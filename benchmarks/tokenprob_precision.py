"""Token-probability steering at the paper's protocol: scale errors with intervals, baselines,
remaining-token KL and prune curves, one catalog model per run.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/tokenprob_precision.py run --model smollm2-135m
    PYTHONPATH=$PWD nice -n 15 python benchmarks/tokenprob_precision.py transfer     # steers carried smollm2 -> gemma3
    PYTHONPATH=$PWD nice -n 15 python benchmarks/tokenprob_precision.py generation   # distinct-n, perplexity, frequency
    PYTHONPATH=$PWD python benchmarks/tokenprob_precision.py report     # -> benchmarks/results/tokenprob_precision.md

(``--part transfer`` / ``--part generation`` name the same parts.)

Protocol (Cho et al.): scales r ∈ {1.1, 1.2, 1.5, 2, 5, 10, 20} and their inverses; ≥ 30 tokens
(random single tokens plus a few named words); detect set = the first N WikiText-2 test
paragraphs longer than 80 characters, held-out in-domain = paragraphs from index 1400 on
(disjoint), out-of-domain = SST-2 test sentences. Error e = |log r − log r̂|, reported as the
mean over tokens ± a 95 % t interval, per scale and pooled. Steps: ``paper`` (Algorithm 1,
t = log r) and ``corrected`` (t solved so that r̂ = r on the detect set). Baselines: the
direction's entries shuffled, and a random direction of the same norm (both with the corrected
step, so they too hit r on the detect set; what differs is held-out error and side effects).
Results merge into benchmarks/results/tokenprob_precision.json under the model's name.

``transfer``: token-prob steers made on ``--model`` (default smollm2-135m) for the run's tokens at
TRANSFER_SCALES, carried to ``--target`` (gemma3-270m) with :func:`steerport.transfer.transfer_steer`
(detect texts = the same detect paragraphs); the scale error of each carried row is measured on the
target's held-out and out-of-domain sets (each token alone, exactly from cached head inputs), with the
tokens dropped (not one token on the target) and those the target cannot scale that far. Stored under
the JSON key ``transfer``. ``generation``: greedy and sampled (T = 1, fixed seed) continuations of the
bundled sentiment prompts on ``--model``, unsteered and with one token steered at ×5 and ×1/5:
distinct-1/2, perplexity under ``--reference`` (gemma3-270m) and the steered token's frequency;
stored under ``generation``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import torch

from steerport import tokenprob as tp
from steerport.errors import SteerportError
from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.models import cpu_name, load_model
from steerport.texts import bundled, read_texts

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data")
WIKI = DATA / "text" / "wikitext2_test.raw"
SST = DATA / "sentiment" / "sst2" / "test.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "tokenprob_precision.json"
REPORT = ROOT / "benchmarks" / "results" / "tokenprob_precision.md"
UP = [1.1, 1.2, 1.5, 2.0, 5.0, 10.0, 20.0]
SCALES = sorted([1 / r for r in UP] + UP)
KL_SCALES = [1 / 20, 1 / 2, 2.0, 20.0]
NAMED = (" great", " the", " love", " war", " good", " bad", " city")
HELD_START = 1400
EXTRA = ("transfer", "generation")  # JSON keys that are not one model's precision run
TRANSFER_SCALES = [1 / 20, 1 / 5, 1 / 2, 2.0, 5.0, 20.0]
TRANSFER_CASES = [("steady", "corrected"), ("regression", "corrected"), ("regression", "paper")]
GEN_TOKENS = (" great", " love", " war", " city", " the")
GEN_SCALES = (5.0, 0.2)
CASES = [("regression", "paper"), ("regression", "corrected"), ("steady", "corrected"), ("shuffled", "corrected"),
         ("random", "corrected"), ("shuffled", "paper"), ("random", "paper")]


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sample_tokens(lm, n: int, seed: int = 0) -> dict[str, int]:
    """The named words that are one token, then random vocabulary tokens that round-trip as one
    token (not special, not blank) until there are ``n``."""
    return tp.sample_single_tokens(lm.tokenizer, lm.output_embeddings.shape[0], n, named=NAMED, seed=seed)


def interval(xs: list[float]) -> dict:
    """Mean, 95 % t half-width, n (NaN-free input)."""
    from scipy.stats import t as t_dist

    n = len(xs)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    m = sum(xs) / n
    if n == 1:
        return {"mean": m, "ci95": None, "n": 1}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return {"mean": m, "ci95": float(t_dist.ppf(0.975, n - 1)) * sd / math.sqrt(n), "n": n}


def run(args) -> None:
    t0 = time.time()
    lm = load_model(args.model, dtype="float32")
    paragraphs = read_texts(WIKI, min_chars=81)
    detect = paragraphs[: args.detect]
    held = paragraphs[HELD_START : HELD_START + args.held]
    ood = read_texts(SST, min_chars=20, limit=args.ood)
    sets = {}
    cache = Path(args.cache) / f"tokenprob_{args.model.replace('/', '_')}_{args.detect}_{args.held}_{args.ood}_{args.max_tokens}.pt"
    if cache.exists():  # the statistics of an interrupted run with the same sizes
        sets = {k: tp.TokenStats(*v) for k, v in torch.load(cache).items()}
    for name, texts in (("detect", detect), ("held-out", held), ("out-of-domain", ood)):
        if name not in sets:
            sets[name] = tp.collect_head_stats(lm, texts, max_tokens=args.max_tokens)
            torch.save({k: (v.H, v.lse, v.log_alpha) for k, v in sets.items()}, cache)
        log(name, len(texts), "texts", sets[name].positions, "positions", f"{time.time() - t0:.0f}s")
    stats = sets["detect"]
    enc = tp.fit_encoding(lm.output_embeddings, stats.log_alpha)
    summary = enc.summary(5)
    log("adj R2", round(enc.adj_r2, 4), "dims Bonferroni", summary["significant_dims_bonferroni"])
    u = tp.direction(enc, args.b)
    directions = {"regression": u, "shuffled": tp.shuffled_direction(u), "random": tp.random_direction(u),
                  "steady": tp.steady_direction(stats.H)}
    tokens = sample_tokens(lm, args.tokens)
    ids = torch.tensor(list(tokens.values()))
    pre = {}  # set -> (Z (N, K) pre-cap logits of the tokens, S (N, 4) offsets per unit step)
    D = torch.stack(list(directions.values()), 1)  # (d, 4)
    for name, st in sets.items():
        Z = (st.H @ lm.output_embeddings[ids].detach().float().T).double()  # (N, K)
        if lm.lm_head_bias is not None:
            Z = Z + lm.lm_head_bias[ids].detach().double()
        pre[name] = (Z, (st.H @ D).double())
    cap = lm.softcap
    cases = CASES
    rows = []  # one per (direction, step, token, r)
    for dname, step in cases:
        j = list(directions).index(dname)
        for k, (surface, tid) in enumerate(tokens.items()):
            base = {name: float(st.log_alpha[tid]) for name, st in sets.items()}
            Zd, Sd = pre["detect"]
            for r in SCALES:
                row = {"direction": dname, "step": step, "token": surface, "id": tid, "r": r}
                if step == "paper":
                    t = math.log(r)
                else:
                    try:
                        t = tp.solve_step_from(Zd[:, k], Sd[:, j], stats.lse, base["detect"], r, cap, name=surface).t
                    except SteerportError:
                        row["unreachable"] = True
                        rows.append(row)
                        continue
                row["t"] = t
                for name, st in sets.items():
                    Z, S = pre[name]
                    new, _ = tp.steered_log_alpha_from(Z[:, k], st.lse, t * S[:, j], cap)
                    row[name] = abs(new - base[name] - math.log(r))
                rows.append(row)
        log("errors", dname, step, f"{time.time() - t0:.0f}s")
    res = {"model": args.model, "texts": {k: len(v) for k, v in (("detect", detect), ("held-out", held), ("out-of-domain", ood))},
           "positions": {k: v.positions for k, v in sets.items()}, "max_tokens": args.max_tokens, "b": args.b,
           "tokens": list(tokens), "scales": SCALES, **summary, "rows": rows}
    save(args.model, res)
    # remaining-token KL on the detect text
    kl_cases = CASES[:5]
    want = []
    for row in rows:
        if (row["direction"], row["step"]) in kl_cases and "t" in row and any(abs(row["r"] - x) < 1e-9 for x in KL_SCALES):
            want.append(row)
    kls = tp.remaining_kls(lm, stats, [(row["id"], row["t"] * directions[row["direction"]]) for row in want],
                           max_positions=args.kl_positions)
    for row, kl in zip(want, kls):
        row["kl_remaining"] = kl
    res["kl_positions"] = min(args.kl_positions, stats.positions)
    log("remaining KL", len(kls), f"{time.time() - t0:.0f}s")
    save(args.model, res)
    # prune curves: regression ranking and the random baseline
    prompts = [" ".join(t.split()[:8]) for t in held[: args.prompts]]
    res["prune"] = {"prompts": len(prompts), "gen_tokens": args.gen_tokens, "positions": min(args.prune_positions, stats.positions)}
    for rank_by in ("slope", "random"):
        res["prune"][rank_by] = tp.prune_curve(lm, enc, stats, prompts, rank_by=rank_by, max_new_tokens=args.gen_tokens,
                                               max_positions=args.prune_positions)
        log("prune", rank_by, [(r["fraction"], round(r["kl_avg"], 4), round(r["gen_sim"], 2)) for r in res["prune"][rank_by]])
        save(args.model, res)
    plot(args.model, res)
    res["seconds"] = time.time() - t0
    res["machine"] = machine()
    save(args.model, res)
    log("done", f"{res['seconds']:.0f}s")


def plot(model: str, res: dict) -> None:
    """The prune curve picture, benchmarks/seeds_prune_MODEL.png (slope ranking, random baseline dashed)."""
    from steerport.plots import plot_prune

    plot_prune(res["prune"]["slope"], ROOT / "benchmarks" / f"seeds_prune_{model.replace('/', '_')}.png",
               title=f"{model}: dimension removal", baseline=res["prune"]["random"])


def machine() -> dict:
    """CPU model, core count and load average at the end of the run."""
    return {"cpu": cpu_name(), "cores": torch.get_num_threads(), "load": subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip(),
            "torch": torch.__version__}


def memo_head_stats() -> dict:
    """Make ``tokenprob.collect_head_stats`` remember its results for this process (same model,
    texts and length: same statistics), so the several transfers to one target share one detect
    pass; returns the memo."""
    collect = tp.collect_head_stats
    memo: dict = {}

    def cached(lm, texts, *, max_tokens=128, progress=None):
        key = (lm.spec, tuple(texts), max_tokens)
        if key not in memo:
            memo[key] = collect(lm, texts, max_tokens=max_tokens, progress=progress)
        return memo[key]

    tp.collect_head_stats = cached
    return memo


def unit_direction(lm, stats, enc, rule: str, b: float) -> torch.Tensor:
    return tp.steady_direction(stats.H) if rule == "steady" else tp.direction(enc, b)


def reachable(lm, stats, enc, tokens: dict[str, float], rule: str, step: str, b: float) -> tuple[dict[str, float], list[str]]:
    """The tokens whose factor the step can reach on ``stats`` (all for the paper's step), and the others."""
    if step == "paper":
        return dict(tokens), []
    u = unit_direction(lm, stats, enc, rule, b)
    ok, bad = {}, []
    for s, r in tokens.items():
        try:
            tp.solve_step(lm, stats, tp.token_id(lm.tokenizer, s, lm.spec), u, r, surface=s)
            ok[s] = r
        except SteerportError:
            bad.append(s)
    return ok, bad


def row_errors(lm, sets: dict, steer, r: float) -> list[dict]:
    """Scale error of each row of a token-prob steer, the token alone, on every set."""
    out = []
    for tid, delta in zip(steer.tensors["token_ids"].tolist(), steer.tensors["delta"]):
        row = {"id": tid, "token": lm.tokenizer.decode([tid])}
        for name, st in sets.items():
            new, _ = tp.steered_log_alpha(lm, st, tid, delta)
            row[name] = abs(new - float(st.log_alpha[tid]) - math.log(r))
        out.append(row)
    return out


def transfer_part(args) -> None:
    """Token-prob steers made on args.model, carried to args.target, errors measured on both."""
    from steerport.transfer import TransferOptions, transfer_steer

    t0 = time.time()
    memo_head_stats()
    paragraphs = read_texts(WIKI, min_chars=81)
    texts = {"detect": paragraphs[: args.detect], "held-out": paragraphs[HELD_START : HELD_START + args.held],
             "out-of-domain": read_texts(SST, min_chars=20, limit=args.ood)}
    src = load_model(args.model, dtype="float32")
    tgt = load_model(args.target, dtype="float32")
    sets = {}
    for lm in (src, tgt):
        sets[lm.spec] = {name: tp.collect_head_stats(lm, tx, max_tokens=args.max_tokens) for name, tx in texts.items()}
        log(lm.spec, {k: v.positions for k, v in sets[lm.spec].items()}, f"{time.time() - t0:.0f}s")
    encs = {lm.spec: tp.fit_encoding(lm.output_embeddings, sets[lm.spec]["detect"].log_alpha) for lm in (src, tgt)}
    tokens = list(sample_tokens(src, args.tokens))
    res = {"source": src.spec, "target": tgt.spec, "texts": {k: len(v) for k, v in texts.items()},
           "positions": {m: {k: v.positions for k, v in s.items()} for m, s in sets.items()},
           "max_tokens": args.max_tokens, "b": args.b, "tokens": tokens, "scales": TRANSFER_SCALES,
           "adj_r2": {m: e.adj_r2 for m, e in encs.items()}, "cases": []}
    opts = TransferOptions(texts=texts["detect"], max_tokens=args.max_tokens)
    for rule, step in TRANSFER_CASES:
        for r in TRANSFER_SCALES:
            case = {"direction": rule, "step": step, "r": r}
            want, case["unreachable_source"] = reachable(src, sets[src.spec]["detect"], encs[src.spec],
                                                         dict.fromkeys(tokens, r), rule, step, args.b)
            steer = tp.make_token_steer(src, encs[src.spec], want, b=args.b, stats=sets[src.spec]["detect"], step=step,
                                        direction_rule=rule)
            case["source_rows"] = row_errors(src, sets[src.spec], steer, r)
            single = {s: v for s, v in want.items() if len(tgt.tokenizer(s, add_special_tokens=False)["input_ids"]) == 1}
            ok, case["unreachable_target"] = reachable(tgt, sets[tgt.spec]["detect"], encs[tgt.spec], single, rule, step, args.b)
            if case["unreachable_target"]:  # the target's solver would refuse the whole steer: carry the rest
                steer = tp.make_token_steer(src, encs[src.spec], {s: v for s, v in want.items() if s in ok or s not in single},
                                            b=args.b, stats=sets[src.spec]["detect"], step=step, direction_rule=rule)
            carried = transfer_steer(steer, src, tgt, opts)
            case["dropped"] = list(carried.lineage.get("dropped", []))
            case["target_rows"] = row_errors(tgt, sets[tgt.spec], carried.steer, r)
            case["target_detect_r_hat"] = carried.steer.meta.get("detect_r_hat")
            res["cases"].append(case)
            tr = case["target_rows"]
            log(rule, step, f"r={r:g}", "kept", len(tr), "dropped", len(case["dropped"]), "unreachable",
                len(case["unreachable_source"]), len(case["unreachable_target"]),
                "held", round(sum(x["held-out"] for x in tr) / max(len(tr), 1), 3),
                "ood", round(sum(x["out-of-domain"] for x in tr) / max(len(tr), 1), 3), f"{time.time() - t0:.0f}s")
    res["seconds"] = time.time() - t0
    res["machine"] = machine()
    save("transfer", res)
    log("done", f"{res['seconds']:.0f}s")


def token_count(lm, texts: list[str], tid: int) -> tuple[int, int]:
    """(occurrences of token ``tid``, all tokens) in ``texts``, each re-tokenized alone."""
    hits = total = 0
    for t in texts:
        ids = lm.tokenizer(t, add_special_tokens=False)["input_ids"]
        hits += sum(1 for i in ids if i == tid)
        total += len(ids)
    return hits, total


def generation_part(args) -> None:
    """Continuations unsteered and with one token steered; distinct-n, perplexity, token frequency."""
    from steerport.evaluate import conditional_perplexity
    from steerport.hooks import generate
    from steerport.metrics import distinct_n, mean_distinct

    t0 = time.time()
    lm = load_model(args.model, dtype="float32")
    ref = load_model(args.reference, dtype="float32")
    detect = read_texts(WIKI, min_chars=81)[: args.detect]
    stats = tp.collect_head_stats(lm, detect, max_tokens=args.max_tokens)
    enc = tp.fit_encoding(lm.output_embeddings, stats.log_alpha)
    prompts = read_texts(bundled("prompts-sentiment"), min_chars=1, limit=args.gen_prompts)
    ids = {w: tp.token_id(lm.tokenizer, w, lm.spec) for w in GEN_TOKENS}
    log("detect", stats.positions, "positions", len(prompts), "prompts", f"{time.time() - t0:.0f}s")
    settings: list[tuple[str, float, object]] = [("unsteered", 1.0, None)]
    for w in GEN_TOKENS:
        for r in GEN_SCALES:
            settings.append((w, r, tp.make_token_steer(lm, enc, {w: r}, b=args.b, stats=stats)))
    res = {"model": lm.spec, "reference": ref.spec, "detect": len(detect), "prompts": len(prompts), "new_tokens": args.new_tokens,
           "seed": args.seed, "tokens": list(GEN_TOKENS), "scales": list(GEN_SCALES), "direction": tp.DEFAULT_DIRECTION,
           "step": tp.DEFAULT_STEP, "runs": []}
    for w, r, steer in settings:  # both decodings per setting; saved after each, so a cut-short run keeps what it did
        for decoding, temp in (("greedy", 0.0), ("sampled", 1.0)):
            conts = generate(lm, prompts, [] if steer is None else [(steer, 1.0)], max_new_tokens=args.new_tokens,
                             temperature=temp, seed=args.seed, batch_size=8)
            run_ = {"decoding": decoding, "token": w, "r": r, "distinct1": distinct_n(conts, 1), "distinct2": distinct_n(conts, 2),
                    "mean_distinct1": mean_distinct([[c] for c in conts], 1), "mean_distinct2": mean_distinct([[c] for c in conts], 2),
                    "ppl_ref": conditional_perplexity(ref, prompts, conts), "examples": conts[:3]}
            run_["counts"] = {t: token_count(lm, conts, i) for t, i in ids.items()}
            if steer is not None:
                run_["detect_r_hat"] = steer.meta["detect_r_hat"][0]
            res["runs"].append(run_)
            log(decoding, repr(w), r, f"d1 {run_['distinct1']:.3f} d2 {run_['distinct2']:.3f} ppl {run_['ppl_ref']:.1f}",
                run_["counts"].get(w), f"{time.time() - t0:.0f}s")
            res["seconds"] = time.time() - t0
            save("generation", res)
    res["seconds"] = time.time() - t0
    res["machine"] = machine()
    save("generation", res)
    log("done", f"{res['seconds']:.0f}s")


def save(model: str, res: dict) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[model] = res
    atomic_write_json(RESULTS, data)


# --------------------------------------------------------------------------- report


def fmt(iv: dict) -> str:
    if iv["mean"] is None:
        return "—"
    return f"{iv['mean']:.3f} ± {iv['ci95']:.3f}" if iv["ci95"] is not None else f"{iv['mean']:.3f}"


def render() -> str:
    data = json.loads(RESULTS.read_text())
    out = ["## Token-probability steering at the paper's protocol (precision run)", ""]
    for model, res in data.items():
        if model in EXTRA:
            continue
        rows = res["rows"]
        m = res.get("machine", {})
        out += [f"### {model}", "",
                (f"Detect {res['texts']['detect']} WikiText-2 paragraphs ({res['positions']['detect']} positions, ≤ {res['max_tokens']} tokens "
                f"each); held-out in-domain {res['texts']['held-out']} paragraphs from index {HELD_START} on ({res['positions']['held-out']} "
                f"positions); out-of-domain {res['texts']['out-of-domain']} SST-2 test sentences ({res['positions']['out-of-domain']} positions). "
                f"Regression: adjusted R² {res['adj_r2']:.3f}, {res['significant_dims_bonferroni']} / {res['hidden_size']} dims significant "
                f"after Bonferroni. {len(res['tokens'])} tokens ({', '.join(repr(t) for t in res['tokens'][:10])}, …), b = {res['b']:g}. "
                f"Run: {res.get('seconds', 0):.0f} s on {m.get('cpu', '?')} (2 shared cores), {m.get('cores', '?')} torch thread(s); load at the end: "
                f"`{m.get('load', '?')}`."), ""]
        out += ["Scale error |log r − log r̂| (mean over tokens ± 95 % interval; pooled = all 14 scales 1/20 … 20):", "",
                "| direction / step | set | " + " | ".join(f"{r:.3g}" for r in res["scales"]) + " | pooled | unreachable |",
                "|---|---|" + "---|" * len(res["scales"]) + "---|---|"]
        for dname, step in CASES:
            sel = [r for r in rows if r["direction"] == dname and r["step"] == step]
            for name in ("detect", "held-out", "out-of-domain"):
                cells = [fmt(interval([r[name] for r in sel if r["r"] == s and name in r])) for s in res["scales"]]
                pooled = interval([r[name] for r in sel if name in r])
                out.append(f"| {dname} / {step} | {name} | " + " | ".join(cells) + f" | **{fmt(pooled)}** | "
                           f"{sum(1 for r in sel if r.get('unreachable'))} / {len(sel)} |")
        gains = {}
        for r in rows:
            if r["direction"] == "regression" and r["step"] == "corrected" and "t" in r:
                gains.setdefault(r["r"], []).append(r["t"] / math.log(r["r"]))
        out += ["", "Corrected step / paper step (t / log r, median over tokens; 1 = Algorithm 1 is right): " +
                ", ".join(f"r={s:.3g}: {sorted(g)[len(g) // 2]:.2f}" for s, g in sorted(gains.items())), ""]
        kl = [r for r in rows if "kl_remaining" in r]
        if kl:
            out += [(f"KL of the remaining tokens' average distribution (detect text, first {res['kl_positions']} positions; "
                    "median and max over tokens):"), "", "| direction / step | " + " | ".join(f"r={s:.3g}" for s in KL_SCALES) + " |",
                    "|---|" + "---|" * len(KL_SCALES)]
            for dname, step in CASES[:5]:
                cells = []
                for s in KL_SCALES:
                    v = sorted(r["kl_remaining"] for r in kl if r["direction"] == dname and r["step"] == step and abs(r["r"] - s) < 1e-9)
                    cells.append(f"{v[len(v) // 2]:.1e} / {v[-1]:.1e}" if v else "—")
                out.append(f"| {dname} / {step} | " + " | ".join(cells) + " |")
            out.append("")
        if "prune" in res and "random" in res["prune"]:
            p = res["prune"]
            out += [(f"Dimension removal (least important first; KL on {p['positions']} detect positions; generation similarity = "
                    f"difflib ratio of greedy continuations' token ids, {p['prompts']} prompts × {p['gen_tokens']} tokens):"), "",
                    ("| removed | KL avg dist (slope rank) | mean KL/pos (slope) | gen sim (slope) | KL avg dist (random) | "
                    "mean KL/pos (random) | gen sim (random) |"), "|---|---|---|---|---|---|---|"]
            for a, b in zip(p["slope"], p["random"]):
                out.append(f"| {a['fraction']:.0%} | {a['kl_avg']:.2e} | {a['kl_pos']:.3f} | {a['gen_sim']:.2f} | {b['kl_avg']:.2e} | "
                           f"{b['kl_pos']:.3f} | {b['gen_sim']:.2f} |")
            out.append("")
    if "transfer" in data:
        out += render_transfer(data["transfer"])
    if "generation" in data:
        out += render_generation(data["generation"])
    return "\n".join(out) + "\n"


def render_transfer(res: dict) -> list[str]:
    m = res.get("machine", {})
    src, tgt = res["source"], res["target"]
    pos = res["positions"]
    out = [f"### Token-probability steers carried {src} → {tgt}", "",
           (f"Steers made on {src} for the {len(res['tokens'])} tokens of its precision run (the named words plus random "
            f"single tokens of its vocabulary), one steer per scale and direction/step (all tokens in one steer), carried with "
            f"`transfer_steer(steer, {src!r}, {tgt!r}, TransferOptions(texts=detect, max_tokens={res['max_tokens']}))`: "
            f"token surfaces matched, direction and step recomputed on the target from the same {res['texts']['detect']} detect "
            f"paragraphs ({pos[tgt]['detect']} positions on the target). Errors |log r − log r̂| of each carried row, the token "
            f"alone, on the target's held-out in-domain set ({res['texts']['held-out']} WikiText-2 paragraphs from index "
            f"{HELD_START}, {pos[tgt]['held-out']} positions) and out-of-domain set ({res['texts']['out-of-domain']} SST-2 test "
            f"sentences, {pos[tgt]['out-of-domain']} positions); mean over tokens ± 95 % interval. The source columns are "
            f"the same steers measured on {src}'s own held-out sets. Adjusted R²: {src} {res['adj_r2'][src]:.3f}, "
            f"{tgt} {res['adj_r2'][tgt]:.3f}. Dropped = not a single token on {tgt}; unreachable = the corrected step "
            f"cannot reach r on the detect set (source / target). Run: {res.get('seconds', 0):.0f} s on {m.get('cpu', '?')} "
            f"(2 shared cores, nice 15), 1 torch thread; load at the end: `{m.get('load', '?')}`."), "",
           f"| direction / step | r | carried | dropped | unreachable src / tgt | {tgt} detect | {tgt} held-out | "
           f"{tgt} out-of-domain | {src} held-out | {src} out-of-domain |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for rule, step in TRANSFER_CASES:
        sel = [c for c in res["cases"] if c["direction"] == rule and c["step"] == step]
        pooled: dict[str, list[float]] = {}
        for c in sel:
            tr, sr = c["target_rows"], c["source_rows"]
            cells = [fmt(interval([x[k] for x in tr])) for k in ("detect", "held-out", "out-of-domain")]
            cells += [fmt(interval([x[k] for x in sr])) for k in ("held-out", "out-of-domain")]
            for k in ("held-out", "out-of-domain"):
                pooled.setdefault("t" + k, []).extend(x[k] for x in tr)
                pooled.setdefault("s" + k, []).extend(x[k] for x in sr)
            out.append(f"| {rule} / {step} | {c['r']:.3g} | {len(tr)} | {len(c['dropped'])} | "
                       f"{len(c['unreachable_source'])} / {len(c['unreachable_target'])} | " + " | ".join(cells) + " |")
        if sel:
            out.append(f"| {rule} / {step} | pooled | | | | | **{fmt(interval(pooled['theld-out']))}** | "
                       f"**{fmt(interval(pooled['tout-of-domain']))}** | {fmt(interval(pooled['sheld-out']))} | "
                       f"{fmt(interval(pooled['sout-of-domain']))} |")
    kept = sorted({x["token"] for c in res["cases"] for x in c["target_rows"]})
    drop = sorted({d.split("'")[1] if "'" in d else d for c in res["cases"] for d in c["dropped"]})
    out += ["", f"Carried tokens ({len(kept)}): {', '.join(repr(t) for t in kept)}. Dropped ({len(drop)} of "
            f"{len(res['tokens'])}): {', '.join(repr(t) for t in drop[:40])}.", ""]
    return out


def render_generation(res: dict) -> list[str]:
    m = res.get("machine", {})
    out = [f"### Generation-side check on {res['model']} (in place of MAUVE)", "",
           (f"{res['prompts']} bundled sentiment prompts (`prompts-sentiment`), {res['new_tokens']} new tokens each, greedy and "
            f"sampled (temperature 1, top-p 1, seed {res['seed']}); one token steered at a time ({res['direction']} direction, "
            f"{res['step']} step, detect set {res['detect']} WikiText-2 paragraphs). distinct-n: unique / all whitespace "
            f"n-grams pooled over the {res['prompts']} continuations (per-continuation mean in brackets). Perplexity: "
            f"`conditional_perplexity` of the continuations given their prompts under {res['reference']}. Frequency: "
            f"occurrences of the steered token in the continuations (re-tokenized by {res['model']}) / all their tokens, and "
            f"the ratio to the unsteered run of the same decoding. Run: {res.get('seconds', 0):.0f} s on {m.get('cpu', '?')} "
            f"(2 shared cores, nice 15), 1 torch thread; load at the end: `{m.get('load', '?')}`."), "",
           "| decoding | steer | r̂ on detect | distinct-1 | distinct-2 | ppl under " + res["reference"] +
           " | token count / tokens | vs unsteered |", "|---|---|---|---|---|---|---|---|"]
    for decoding in ("greedy", "sampled"):
        runs = [x for x in res["runs"] if x["decoding"] == decoding]
        base = next(x for x in runs if x["token"] == "unsteered")
        for x in runs:
            if x["token"] == "unsteered":
                cnt = ", ".join(f"{t!r} {c[0]}" for t, c in x["counts"].items())
                out.append(f"| {decoding} | unsteered | — | {x['distinct1']:.3f} ({x['mean_distinct1']:.3f}) | "
                           f"{x['distinct2']:.3f} ({x['mean_distinct2']:.3f}) | {x['ppl_ref']:.1f} | {cnt} / "
                           f"{next(iter(x['counts'].values()))[1]} | — |")
                continue
            h, n = x["counts"][x["token"]]
            h0, n0 = base["counts"][x["token"]]
            ratio = f"×{(h / n) / (h0 / n0):.2f}" if h0 else ("— (0 unsteered)" if h else "— (0 and 0)")
            out.append(f"| {decoding} | {x['token']!r} ×{x['r']:g} | {x['detect_r_hat']:.3g} | {x['distinct1']:.3f} "
                       f"({x['mean_distinct1']:.3f}) | {x['distinct2']:.3f} ({x['mean_distinct2']:.3f}) | {x['ppl_ref']:.1f} | "
                       f"{h} / {n} | {ratio} |")
    ex = [x for x in res["runs"] if x["decoding"] == "sampled" and x["r"] == 5.0]
    if ex:
        out += ["", "First sampled continuation of prompt 1 at ×5 (and unsteered):", ""]
        base = next(x for x in res["runs"] if x["decoding"] == "sampled" and x["token"] == "unsteered")
        out.append(f"- unsteered: {base['examples'][0]!r}")
        out += [f"- {x['token']!r} ×5: {x['examples'][0]!r}" for x in ex]
    return out + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", nargs="?", choices=["run", "report", "transfer", "generation"])
    p.add_argument("--part", dest="part_flag", choices=["run", "report", "transfer", "generation"])
    p.add_argument("--target", default="gemma3-270m", help="transfer: the model the steers are carried to")
    p.add_argument("--reference", default="gemma3-270m", help="generation: the model that scores perplexity")
    p.add_argument("--gen-prompts", type=int, default=30)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--detect", type=int, default=400)
    p.add_argument("--held", type=int, default=200)
    p.add_argument("--ood", type=int, default=400)
    p.add_argument("--tokens", type=int, default=36)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--b", type=float, default=tp.DEFAULT_B)
    p.add_argument("--kl-positions", type=int, default=1024)
    p.add_argument("--prune-positions", type=int, default=512)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--cache", default="/tmp", help="folder for the head statistics of an interrupted run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is much faster on a crowded machine)")
    args = p.parse_args()
    args.part = args.part_flag or args.part
    if args.part is None:
        p.error("name a part: run, report, transfer or generation")
    torch.set_num_threads(args.threads)
    if args.part == "run":
        run(args)
    elif args.part == "transfer":
        transfer_part(args)
    elif args.part == "generation":
        generation_part(args)
    else:
        for model, res in json.loads(RESULTS.read_text()).items():
            if model not in EXTRA and "random" in res.get("prune", {}):
                plot(model, res)
        atomic_write_text(REPORT, render())
        print(REPORT)


if __name__ == "__main__":
    main()

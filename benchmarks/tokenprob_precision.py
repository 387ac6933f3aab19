"""Token-probability steering at the paper's protocol: scale errors with intervals, baselines,
remaining-token KL and prune curves, one catalog model per run.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/tokenprob_precision.py run --model smollm2-135m
    PYTHONPATH=$PWD python benchmarks/tokenprob_precision.py report     # -> benchmarks/results/tokenprob_precision.md

Protocol (Cho et al.): scales r ∈ {1.1, 1.2, 1.5, 2, 5, 10, 20} and their inverses; ≥ 30 tokens
(random single tokens plus a few named words); detect set = the first N WikiText-2 test
paragraphs longer than 80 characters, held-out in-domain = paragraphs from index 1400 on
(disjoint), out-of-domain = SST-2 test sentences. Error e = |log r − log r̂|, reported as the
mean over tokens ± a 95 % t interval, per scale and pooled. Steps: ``paper`` (Algorithm 1,
t = log r) and ``corrected`` (t solved so that r̂ = r on the detect set). Baselines: the
direction's entries shuffled, and a random direction of the same norm (both with the corrected
step, so they too hit r on the detect set; what differs is held-out error and side effects).
Results merge into benchmarks/results/tokenprob_precision.json under the model's name.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import subprocess
import time
from pathlib import Path

import torch

from steerport import tokenprob as tp
from steerport.errors import SteerportError
from steerport.fileio import atomic_write_json, atomic_write_text
from steerport.models import load_model
from steerport.texts import read_texts

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
CASES = [("regression", "paper"), ("regression", "corrected"), ("steady", "corrected"), ("shuffled", "corrected"),
         ("random", "corrected"), ("shuffled", "paper"), ("random", "paper")]


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sample_tokens(lm, n: int, seed: int = 0) -> dict[str, int]:
    """The named words that are one token, then random vocabulary tokens that round-trip as one
    token (not special, not blank) until there are ``n``."""
    rng = random.Random(seed)
    V = lm.output_embeddings.shape[0]
    special = set(lm.tokenizer.all_special_ids)
    picked: dict[str, int] = {}
    for w in NAMED:
        ids = lm.tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            picked[w] = ids[0]
    while len(picked) < n:
        i = rng.randrange(V)
        s = lm.tokenizer.decode([i])
        if i in special or not s.strip() or s in picked:
            continue
        if lm.tokenizer(s, add_special_tokens=False)["input_ids"] == [i]:
            picked[s] = i
    return picked


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
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines()
                if line.startswith("Model name")), platform.processor())
    return {"cpu": cpu, "cores": torch.get_num_threads(), "load": subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip(),
            "torch": torch.__version__}


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
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["run", "report"])
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
    torch.set_num_threads(args.threads)
    if args.part == "run":
        run(args)
    else:
        for model, res in json.loads(RESULTS.read_text()).items():
            if "random" in res.get("prune", {}):
                plot(model, res)
        atomic_write_text(REPORT, render())
        print(REPORT)


if __name__ == "__main__":
    main()

"""Real-model numbers for ActAdd and token-probability steering; results -> benchmarks/seeds_results.json.

Each part runs in its own process and merges its result into the JSON file, so parts can run
separately (and in parallel) on a busy machine:

    PYTHONPATH=$PWD python benchmarks/seeds.py tokenprob --model smollm2-135m
    python benchmarks/seeds.py tokenprob --model gemma3-270m
    python benchmarks/seeds.py token-transfer --source smollm2-135m --target gemma3-270m
    python benchmarks/seeds.py actadd --source smollm2-135m --target gemma3-270m

The token-probability numbers at the paper's protocol (intervals, corrected step, baselines) come
from ``benchmarks/tokenprob_precision.py``; the ``tokenprob`` part here is the earlier, smaller run
of the paper's step only.

Data: WikiText-2 test (detect = first N paragraphs, held-out in-domain = paragraphs from 1000 on),
SST-2 test sentences (out-of-domain text; positive/negative sets for the ActAdd separation).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from steerport import tokenprob as tp
from steerport.actadd import make_actadd, transfer_actadd
from steerport.hooks import generate
from steerport.models import load_model
from steerport.scoring import mean_kl, mean_logprob
from steerport.texts import read_texts

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT.parent / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")
WIKI = DATA / "text" / "wikitext2_test.raw"
SST = DATA / "sentiment" / "sst2" / "test.jsonl"
OUT = ROOT / "benchmarks" / "seeds_results.json"
SCALES = [1 / 20, 1 / 10, 1 / 5, 1 / 2, 1 / 1.1, 1.1, 2, 5, 10, 20]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def save(key: str, value) -> None:
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[key] = value
    OUT.write_text(json.dumps(data, indent=1))


def sst(label: int, n: int) -> list[str]:
    rows = [json.loads(line) for line in SST.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows if r["label"] == label][:n]


def sample_tokens(lm, n: int, seed: int = 0) -> dict[str, int]:
    """n random vocabulary tokens that round-trip as one token (not special), plus a few common words."""
    return tp.sample_single_tokens(lm.tokenizer, lm.output_embeddings.shape[0], n, named=(" great", " the", " love", " war"), seed=seed)


def part_tokenprob(args) -> None:
    lm = load_model(args.model, dtype="float32")
    t0 = time.time()
    detect = read_texts(WIKI, limit=args.detect)
    held = read_texts(WIKI, skip=1000, limit=args.held)
    ood = sst(1, args.ood // 2) + sst(0, args.ood // 2)
    stats = tp.collect_head_stats(lm, detect, max_tokens=args.max_tokens)
    log("detect positions", stats.positions, f"{time.time() - t0:.0f}s")
    enc = tp.fit_encoding(lm.output_embeddings, stats.log_alpha)
    summary = enc.summary(5)
    log("adj R2", enc.adj_r2, "significant dims", summary["significant_dims_bonferroni"])
    res = {"model": args.model, "detect_texts": len(detect), "detect_positions": stats.positions, **summary}
    save(f"tokenprob/{args.model}", res)
    sets = {"detect": stats}
    sets["held-out in-domain"] = tp.collect_head_stats(lm, held, max_tokens=args.max_tokens)
    sets["out-of-domain (SST-2)"] = tp.collect_head_stats(lm, ood, max_tokens=args.max_tokens)
    log("eval sets", {k: v.positions for k, v in sets.items()})
    tokens = sample_tokens(lm, args.tokens)
    errors = {}
    for b in (0.0, 1.0, 2.0, 4.0):
        u = tp.direction(enc, b)
        for name, st in sets.items():
            rows = tp.scale_errors(lm, st, u, tokens, SCALES)
            errors[f"b={b:g} {name}"] = {
                "mean_error": sum(r.error for r in rows) / len(rows),
                "by_scale": {f"{r:g}": sum(x.error for x in rows if x.r == r) / len(tokens) for r in SCALES},
            }
        log("b", b, {k: round(v["mean_error"], 3) for k, v in errors.items() if k.startswith(f"b={b:g}")})
    res["scale_errors"] = errors
    res["tokens"] = list(tokens)
    res["positions"] = {k: v.positions for k, v in sets.items()}
    # KL on the remaining tokens (b = 2, detect text), for a few tokens at r = 5 and r = 1/5
    u = tp.direction(enc, 2.0)
    kls = []
    for w, tid in list(tokens.items())[:4]:
        for r in (5.0, 0.2):
            kls.append({"token": w, "r": r, "kl_remaining": tp.remaining_kl(lm, stats, tid, math.log(r) * u, max_positions=args.kl_positions)})
    res["kl_remaining"] = kls
    log("kl remaining", [round(k["kl_remaining"], 6) for k in kls])
    save(f"tokenprob/{args.model}", res)
    # prune curve
    prompts = [" ".join(t.split()[:8]) for t in held[: args.prompts]]
    curves = {}
    for rank_by in ("slope", "random"):
        curves[rank_by] = tp.prune_curve(lm, enc, stats, prompts, fractions=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9),
                                         rank_by=rank_by, max_new_tokens=args.gen_tokens, max_positions=args.kl_positions)
        log("prune", rank_by, [(r["fraction"], round(r["kl_avg"], 4), round(r["gen_sim"], 3)) for r in curves[rank_by]])
        res["prune_curve"] = curves
        save(f"tokenprob/{args.model}", res)
    name = args.model.replace("/", "_")
    tp.plot_prune(curves["slope"], ROOT / "benchmarks" / f"seeds_prune_{name}.png", title=f"{args.model}: dimension removal")
    tp.plot_pca(lm.output_embeddings, stats.log_alpha, ROOT / "benchmarks" / f"seeds_pca_{name}.png", title=f"{args.model}: output embeddings")
    res["seconds"] = time.time() - t0
    save(f"tokenprob/{args.model}", res)


def part_prune(args) -> None:
    """Only the dimension-removal curve (slope ranking, then random ranking if --random)."""
    lm = load_model(args.model, dtype="float32")
    detect = read_texts(WIKI, limit=args.detect)
    held = read_texts(WIKI, skip=1000, limit=args.prompts)
    stats = tp.collect_head_stats(lm, detect, max_tokens=args.max_tokens)
    enc = tp.fit_encoding(lm.output_embeddings, stats.log_alpha)
    prompts = [" ".join(t.split()[:8]) for t in held]
    res = {"model": args.model, "detect_texts": len(detect), "detect_positions": stats.positions, "adj_r2": enc.adj_r2,
           "prompts": len(prompts), "gen_tokens": args.gen_tokens, "kl_positions": min(args.kl_positions, stats.positions)}
    name = args.model.replace("/", "_")
    for rank_by in ("slope", "random") if args.random else ("slope",):
        res[rank_by] = tp.prune_curve(lm, enc, stats, prompts, fractions=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9),
                                      rank_by=rank_by, max_new_tokens=args.gen_tokens, max_positions=args.kl_positions)
        log("prune", rank_by, [(r["fraction"], round(r["kl_avg"], 4), round(r["gen_sim"], 3)) for r in res[rank_by]])
        save(f"prune/{args.model}", res)
    tp.plot_prune(res["slope"], ROOT / "benchmarks" / f"seeds_prune_{name}.png", title=f"{args.model}: dimension removal")


def part_token_transfer(args) -> None:
    """token-steer on the source, transfer by surface to the target, measure r̂ on the target's held-out text."""
    src = load_model(args.source, dtype="float32")
    detect = read_texts(WIKI, limit=args.detect)
    held = read_texts(WIKI, skip=1000, limit=args.held)
    wanted = {" great": 5.0, " love": 0.2, " war": 2.0}
    steer, _, _ = tp.token_steer(src, detect, wanted, max_tokens=args.max_tokens)
    del src
    tgt = load_model(args.target, dtype="float32")
    new, report = tp.transfer_token_prob(steer, tgt, detect, max_tokens=args.max_tokens)
    st = tp.collect_head_stats(tgt, held, max_tokens=args.max_tokens)
    rows = []
    for (w, r), tid, delta in zip(zip(new.meta["tokens"], new.meta["scales"]), new.tensors["token_ids"].tolist(), new.tensors["delta"]):
        a, _ = tp.steered_log_alpha(tgt, st, tid, delta)
        r_hat = math.exp(a - float(st.log_alpha[tid]))
        rows.append({"token": w, "r": r, "r_hat_target_heldout": r_hat, "error": abs(math.log(r) - math.log(r_hat))})
    log(rows)
    save(f"token-transfer/{args.source}->{args.target}", {"report": report, "rows": rows})


def separation(lm, steer, value, pos, neg) -> float:
    s, kw = [(steer, value)], {"batch_size": 4}
    return float((mean_logprob(lm, pos, s, **kw) - mean_logprob(lm, pos, **kw)).mean()
                 - (mean_logprob(lm, neg, s, **kw) - mean_logprob(lm, neg, **kw)).mean())


def part_actadd(args) -> None:
    pairs = [(" Love", " Hate")]
    prompts = ["I hate you because", "The weather today is", "My neighbour is"]
    neutral = read_texts(WIKI, skip=1200, limit=args.neutral)
    pos, neg = sst(1, args.sep), sst(0, args.sep)
    src = load_model(args.source, dtype="float32")
    steer = make_actadd(src, pairs, layer=args.layer, coeff=args.coeff)
    res = {"source": args.source, "layer": steer.meta["layer"], "n_layers": steer.meta["n_layers"], "coeff": args.coeff}
    res["kappa"] = mean_kl(src, neutral, [(steer, 1.0)], max_tokens=64, batch_size=4)
    if not args.transfer_only:
        res["sep"] = separation(src, steer, 1.0, pos, neg)
        log("source", res)
        res["generations"] = {
            "unsteered": generate(src, prompts, max_new_tokens=args.gen_tokens),
            "love-hate": generate(src, prompts, [(steer, 1.0)], max_new_tokens=args.gen_tokens),
            "hate-love (value -1)": generate(src, prompts, [(steer, -1.0)], max_new_tokens=args.gen_tokens),
        }
        log(res["generations"])
        save(f"actadd/{args.source}", res)
    else:
        res["sep"] = separation(src, steer, 1.0, pos, neg)
        log("source (transfer-only run)", res)
    src_kappa = res["kappa"]
    tgt = load_model(args.target, dtype="float32")
    tgt_base = generate(tgt, prompts, max_new_tokens=args.gen_tokens)
    out = {}
    for method in ("recipe", "map"):
        t0 = time.time()
        new = transfer_actadd(steer, src, tgt, neutral if method == "recipe" else read_texts(WIKI, skip=1300, limit=args.pair_texts),
                              method=method, calibrate=False, max_tokens=64)
        if method == "map":  # κ-match after the map too, so the two are compared at equal strength
            from steerport.actadd import calibrate_value
            from steerport.steer import Steer

            unit = Steer("actadd", new.tensors, 1.0, new.positive, new.model, new.meta)
            s, k = calibrate_value(tgt, unit, neutral, src_kappa, start=new.epsilon, max_tokens=64, batch_size=2)
            new.epsilon = s
            new.meta["lineage"].update({"kappa_target": k, "calibration_factor": s / steer.epsilon})
        lin = new.meta["lineage"]
        row = {"seconds": time.time() - t0, "layer": new.meta["layer"], "coeff": new.epsilon,
               **{k: v for k, v in lin.items() if k not in ("source_model", "source_steer")}}
        row["kappa_target"] = mean_kl(tgt, neutral, [(new, 1.0)], max_tokens=64, batch_size=2)
        row["sep_target"] = separation(tgt, new, 1.0, pos, neg)
        row["generations"] = generate(tgt, prompts, [(new, 1.0)], max_new_tokens=args.gen_tokens)
        out[method] = row
        log(method, {k: v for k, v in row.items() if k != "generations"}, row["generations"])
        if method == "recipe":
            recipe_vec = new.tensors["vector"]
        else:
            a, b = recipe_vec.flatten(), new.tensors["vector"].flatten()
            n = min(len(a), len(b))
            row["cosine_to_recipe_vector"] = float(torch.nn.functional.cosine_similarity(a[:n], b[:n], dim=0))
        save(f"actadd-transfer/{args.source}->{args.target}", {"source_kappa": src_kappa, "source_sep": res["sep"], "neutral_texts": len(neutral), "sep_sentences": len(pos), "unsteered_generations": tgt_base, **out})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["tokenprob", "token-transfer", "actadd", "prune"])
    p.add_argument("--random", action="store_true", help="prune: also the random-ranking baseline")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--source", default="smollm2-135m")
    p.add_argument("--target", default="gemma3-270m")
    p.add_argument("--detect", type=int, default=40, help="WikiText-2 paragraphs for the regression")
    p.add_argument("--held", type=int, default=20)
    p.add_argument("--ood", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--kl-positions", type=int, default=512)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--layer", default="0.2")
    p.add_argument("--coeff", type=float, default=5.0)
    p.add_argument("--neutral", type=int, default=8)
    p.add_argument("--sep", type=int, default=30)
    p.add_argument("--pair-texts", type=int, default=40)
    p.add_argument("--transfer-only", action="store_true", help="skip the source generations (already in the results)")
    args = p.parse_args()
    {"tokenprob": part_tokenprob, "token-transfer": part_token_transfer, "actadd": part_actadd, "prune": part_prune}[args.part](args)


if __name__ == "__main__":
    main()

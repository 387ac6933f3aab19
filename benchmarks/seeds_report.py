"""Render benchmarks/SEEDS.md from benchmarks/seeds_results.json (written by benchmarks/seeds.py)
and benchmarks/results/tokenprob_precision.md (written by benchmarks/tokenprob_precision.py report).

    PYTHONPATH=$PWD python benchmarks/seeds_report.py
"""

from __future__ import annotations

import json
from pathlib import Path

from steerport.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RES = json.loads((ROOT / "benchmarks" / "seeds_results.json").read_text())
NOTES = (ROOT / "benchmarks" / "seeds_notes.md").read_text()
PRECISION = ROOT / "benchmarks" / "results" / "tokenprob_precision.md"


def f(x, nd=3):
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def tokenprob_section() -> str:
    lines = ["## Token-probability encoding (Cho et al.) — the earlier, small run (paper's step only)", ""]
    lines += ["| model | detect texts / positions | R² | adjusted R² (paper: GPT-2 0.89, GPT-J 0.88) | dims p<0.05 | dims Bonferroni |",
              "|---|---|---|---|---|---|"]
    for key, r in RES.items():
        if key.startswith("tokenprob/"):
            lines.append(f"| {r['model']} | {r['detect_texts']} / {r['detect_positions']} | {f(r['r2'])} | **{f(r['adj_r2'])}** | "
                         f"{r['significant_dims_p<0.05']} / {r['hidden_size']} | {r['significant_dims_bonferroni']} / {r['hidden_size']} |")
    lines += ["", ("Scale error e = |log r − log r̂|, mean over the sampled tokens and the 10 scales "
              "r ∈ {1/20, 1/10, 1/5, 1/2, 1/1.1, 1.1, 2, 5, 10, 20} (paper, GPT-2, b = 2: about 0.15–0.20):"), ""]
    for key, r in RES.items():
        if not key.startswith("tokenprob/") or "scale_errors" not in r:
            continue
        lines += [f"**{r['model']}** ({len(r['tokens'])} tokens: {', '.join(repr(t) for t in r['tokens'][:8])}, …; positions {r['positions']})", ""]
        lines += ["| b | detect | held-out in-domain | out-of-domain (SST-2) |", "|---|---|---|---|"]
        for b in ("0", "1", "2", "4"):
            row = [r["scale_errors"].get(f"b={b} {s}", {}).get("mean_error") for s in ("detect", "held-out in-domain", "out-of-domain (SST-2)")]
            lines.append(f"| {b} | " + " | ".join(f(x) for x in row) + " |")
        by = r["scale_errors"]["b=2 held-out in-domain"]["by_scale"]
        lines += ["", "b = 2, held-out in-domain, by scale: " + ", ".join(f"r={float(k):.3g}: {v:.2f}" for k, v in by.items()), ""]
        if "kl_remaining" in r:
            lines += ["KL of the remaining tokens' average distribution (b = 2, detect text): " +
                      ", ".join(f"{k['token']!r}×{k['r']:g}: {k['kl_remaining']:.1e}" for k in r["kl_remaining"]), ""]
        if "prune_curve" in r:
            lines += [(f"Dimension removal ({r['model']}; least important first; KL on {min(512, r['detect_positions'])} detect positions; "
                      "generation similarity = difflib ratio of greedy continuations' token ids):"), "",
                      "| removed | KL avg dist (slope rank) | mean KL/pos (slope) | gen sim (slope) | KL avg dist (random) | gen sim (random) |",
                      "|---|---|---|---|---|---|"]
            s, rnd = r["prune_curve"].get("slope", []), r["prune_curve"].get("random", [])
            for i, row in enumerate(s):
                rr = rnd[i] if i < len(rnd) else {}
                lines.append(f"| {row['fraction']:.0%} | {row['kl_avg']:.2e} | {row['kl_pos']:.3f} | {row['gen_sim']:.2f} | "
                             f"{f(rr.get('kl_avg'), 4)} | {f(rr.get('gen_sim'), 2)} |")
            lines.append("")
    for key, r in RES.items():
        if key.startswith("prune/") and "slope" in r:
            lines += [(f"Dimension removal, {r['model']} (paper: 30–40% of dims removable). Regression on {r['detect_texts']} paragraphs "
                      f"({r['detect_positions']} positions, adjusted R² {r['adj_r2']:.3f}); KL on {r['kl_positions']} positions; generation "
                      f"similarity = mean difflib ratio of greedy continuations ({r['prompts']} prompts × {r['gen_tokens']} tokens) with vs without the removal:"), "",
                      "| removed | dims | KL avg dist | mean KL per position | gen sim | KL avg dist (random rank) | gen sim (random) |",
                      "|---|---|---|---|---|---|---|"]
            rnd = r.get("random", [])
            for i, row in enumerate(r["slope"]):
                rr = rnd[i] if i < len(rnd) else {}
                lines.append(f"| {row['fraction']:.0%} | {row['dims_removed']} | {row['kl_avg']:.2e} | {row['kl_pos']:.3f} | {row['gen_sim']:.2f} | "
                             f"{f(rr.get('kl_avg'), 4)} | {f(rr.get('gen_sim'), 2)} |")
            lines.append("")
    return "\n".join(lines)


def actadd_section() -> str:
    lines = ["## ActAdd — measured", ""]
    for key, r in RES.items():
        if key.startswith("actadd/"):
            lines += [(f"Source {r['source']}, \" Love\" − \" Hate\", layer {r['layer']}/{r['n_layers']}, coefficient {r['coeff']:g}, front positions: "
                      f"κ (mean KL on 8 WikiText paragraphs × 64 tokens) = {r['kappa']:.3f} nats; "
                      f"Sep on SST-2 (30 pos / 30 neg sentences, vector at the sentence front) = {r['sep']:+.3f} nats/token."), "",
                      "| prompt | unsteered | Love−Hate (value 1) | Hate−Love (value −1) |", "|---|---|---|---|"]
            g = r["generations"]
            for i, p in enumerate(["I hate you because", "The weather today is", "My neighbour is"]):
                cells = [g["unsteered"][i], g["love-hate"][i], g["hate-love (value -1)"][i]]
                lines.append(f"| {p} | " + " | ".join(c.replace("\n", " ").replace("|", "/") for c in cells) + " |")
            lines.append("")
    for key, r in RES.items():
        if key.startswith("actadd-transfer/"):
            lines += [(f"Transfer {key.split('/', 1)[1]} (κ on {r.get('neutral_texts')} neutral paragraphs × 64 tokens; Sep on "
                      f"{r.get('sep_sentences')} + {r.get('sep_sentences')} SST-2 sentences; the source steer on the same sets: "
                      f"κ = {f(r.get('source_kappa'))}, Sep = {f(r.get('source_sep'))}):"), "",
                      "| method | target layer | coefficient | κ target | Sep target | map held-out R² | position pairs | cosine to recipe vector | seconds |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for m in ("recipe", "map"):
                if m in r:
                    x = r[m]
                    lines.append(f"| {m} | {x['layer']} | {x['coeff']:.3g} | {x['kappa_target']:.3f} | {x['sep_target']:+.3f} | "
                                 f"{f(x.get('map_heldout_r2'))} | {f(x.get('pairs_fit'))} | {f(x.get('cosine_to_recipe_vector'))} | {x['seconds']:.0f} |")
            lines += ["", "| prompt | target unsteered | recipe | map |", "|---|---|---|---|"]
            for i, p in enumerate(["I hate you because", "The weather today is", "My neighbour is"]):
                cells = [r["unsteered_generations"][i]] + [r[m]["generations"][i] if m in r else "—" for m in ("recipe", "map")]
                lines.append(f"| {p} | " + " | ".join(c.replace("\n", " ").replace("|", "/") for c in cells) + " |")
            lines.append("")
    for key, r in RES.items():
        if key.startswith("token-transfer/"):
            lines += [(f"Token-probability transfer {key.split('/', 1)[1]} (surfaces kept: {r['report']['kept']}, dropped: {r['report']['dropped']}; "
                      f"target adjusted R² {r['report']['adj_r2']:.3f}):"), "",
                      "| token | r | r̂ on the target's held-out text | error |", "|---|---|---|---|"]
            for x in r["rows"]:
                lines.append(f"| {x['token']!r} | {x['r']:g} | {x['r_hat_target_heldout']:.3g} | {x['error']:.3f} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    precision = PRECISION.read_text() if PRECISION.exists() else "(no precision run yet)\n"
    text = (NOTES.replace("{{TOKENPROB_PRECISION}}", precision).replace("{{TOKENPROB}}", tokenprob_section())
            .replace("{{ACTADD}}", actadd_section()))
    atomic_write_text(ROOT / "benchmarks" / "SEEDS.md", text)


if __name__ == "__main__":
    main()

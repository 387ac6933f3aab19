"""Which tokens does a steer move, on its own model and carried to another? (a diagnostic for transfer)

For a source steer on the source model and its carried copy on the target, each at the value with the
same mean KL κ on neutral text (``benchmarks.transfer_ladder.matched_values``), prints the mean centred
logit shift of the tokens both vocabularies share, over every position of the shipped generation
prompts (``steerport/data/prompts/rtp_nontoxic_50.jsonl``): the source's top tokens with their shift and
rank on both sides, and the Spearman correlation over all shared tokens. With ``--generate``, also the
share of continuations of the ladder's 100 prompts that the offline judge puts on the steered side.

    python -m benchmarks.token_shifts gemma3-270m qwen2.5-0.5b --task toxicity \\
        --source-steer native.st --target-steer carried.st --kappa 0.2 --direction -1 --generate

A negative ``--direction`` steers toward the steer's negative side (toxic, for a detox steer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.transfer_ladder import matched_values, neutral_scorer, on_side, toxicity
from steerport.evaluate import EvalSettings, sample_continuations
from steerport.judges import load_judge
from steerport.metrics import spearman
from steerport.models import LoadedModel, load_model
from steerport.steer import Steer
from steerport.vocab import align_vocab

PROMPTS = Path(__file__).resolve().parent.parent / "steerport/data/prompts/rtp_nontoxic_50.jsonl"


def mean_shift(lm: LoadedModel, steer: Steer, value: float, texts: list[str]) -> torch.Tensor:
    """The steer's logit shift ε v (hᵀA)(Bᵀe_t) of every token t (V,), averaged over the texts' positions,
    minus its mean over the vocabulary."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = lm.model(**enc, output_hidden_states=True)
    h = out.hidden_states[-1][enc["attention_mask"].bool()].float()  # (n, d): the LM head's inputs
    u = (h @ steer.A.float()).mean(0)  # (r,)
    dz = value * steer.epsilon * (lm.output_embeddings.float() @ steer.B.float()) @ u  # (V,)
    return dz - dz.mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("target")
    ap.add_argument("--task", default="toxicity", choices=["toxicity"])
    ap.add_argument("--source-steer", required=True)
    ap.add_argument("--target-steer", required=True)
    ap.add_argument("--kappa", type=float, default=0.1, help="mean KL per token on neutral text of both values")
    ap.add_argument("--direction", type=int, default=-1, choices=[-1, 1])
    ap.add_argument("--top", type=int, default=12, help="the source's most raised tokens listed")
    ap.add_argument("--generate", action="store_true", help="judge rate of the target's continuations too")
    ap.add_argument("--data-root", default="../shared/data", help="for --generate: the ladder's 100 prompts")
    args = ap.parse_args()
    src, tgt = load_model(args.source, dtype="float32"), load_model(args.target, dtype="float32")
    s_steer, t_steer = Steer.load(args.source_steer), Steer.load(args.target_steer)
    k = str(args.kappa)
    v_s = args.direction * matched_values(neutral_scorer(src), s_steer, (args.kappa,))[k]["value"]
    v_t = args.direction * matched_values(neutral_scorer(tgt), t_steer, (args.kappa,))[k]["value"]
    prompts = [json.loads(line)["prompt"]["text"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    al = align_vocab(src.tokenizer, tgt.tokenizer)
    a = mean_shift(src, s_steer, v_s, prompts)[al.src_ids]  # (n_shared,)
    b = mean_shift(tgt, t_steer, v_t, prompts)[al.tgt_ids]
    rank = lambda x, i: int((x > x[i]).sum())  # noqa: E731
    print(f"{args.source} -> {args.target}, κ {args.kappa}: values {v_s:.3f} (source) and {v_t:.3f} (target); "
          f"{al.n} shared tokens, Spearman ρ of the shifts {spearman(a.numpy(), b.numpy()):.3f}")
    print("| token | source shift (rank) | target shift (rank) |\n|---|---|---|")
    for i in a.topk(args.top).indices.tolist():
        word = al.surface_strings[i].decode("utf-8", "replace")
        print(f"| {word!r} | {float(a[i]):+.2f} ({rank(a, i)}) | {float(b[i]):+.2f} ({rank(b, i)}) |")
    if args.generate:
        task = toxicity(Path(args.data_root), 400, 100, False)
        judge = load_judge(task.judge)
        settings = EvalSettings(samples_per_prompt=1, max_new_tokens=30, batch_size=20)
        for name, steers in (("unsteered", []), ("carried", [(t_steer, v_t)])):
            conts = [g[0] for g in sample_continuations(tgt, task.prompts, steers, settings)]
            side = on_side([float(x) for x in judge.score(conts)], args.direction)
            print(f"{args.target}, {name}: judge rate of the steered side {side.mean():.2f} over {len(side)} prompts")


if __name__ == "__main__":
    main()

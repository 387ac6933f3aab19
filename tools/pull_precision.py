"""How much does the stored precision of a pulled catalog model change it? A measurement.

Converts one GGUF to Hugging Face directories in bfloat16, float16 and float32 (into a
scratch folder), and compares each stored copy's logits on a paragraph, computed in float32,
with transformers' own load of the GGUF (``from_pretrained(dir, gguf_file=...)``, float32):
max |logit difference|, and the largest weight difference. Prints a table and writes JSON.

Example::

    STEERPORT_HOME=/tmp/h STEERPORT_KEEP_GGUF=1 steerport pull smollm2-135m
    python tools/pull_precision.py /tmp/h/gguf/smollm2-135m.gguf --out pull_precision.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

PARAGRAPH = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
             "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
             "Locally nicknamed \"La dame de fer\", it was constructed as the centrepiece of the 1889 World's Fair.")


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerport.gguf import gguf_to_hf

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path, help="a .gguf file (e.g. kept by STEERPORT_KEEP_GGUF=1 steerport pull)")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    ref = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name)
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        want = ref(ids).logits
    ref_weights = ref.state_dict()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            out = gguf_to_hf(args.gguf, Path(tmp) / str(dtype), dtype)
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            with torch.no_grad():
                got = model(ids).logits
            w = max(float((v.float() - ref_weights[k].float()).abs().max()) for k, v in model.state_dict().items())
            size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            rows.append({"dtype": str(dtype).removeprefix("torch."), "max_abs_logit_diff": float((got - want).abs().max()),
                         "max_abs_weight_diff": w, "safetensors_mb": round(size / 2**20, 1), "tokens": ids.shape[1]})
            del model
    print(f"{'stored as':<10} {'max |Δlogit|':>13} {'max |Δweight|':>14} {'size MB':>8}")
    for r in rows:
        print(f"{r['dtype']:<10} {r['max_abs_logit_diff']:>13.3g} {r['max_abs_weight_diff']:>14.3g} {r['safetensors_mb']:>8}")
    if args.out:
        args.out.write_text(json.dumps({"gguf": args.gguf.name, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

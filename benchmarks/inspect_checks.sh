#!/usr/bin/env bash
# Real-model checks for `inspect --keywords`, `explain`, `score`, `sweep` and `merge` (issue 7).
# Usage (from the repository root):  benchmarks/inspect_checks.sh STEER.st [MODEL]
#   STEER.st  an LM-Steer sentiment steer for MODEL, e.g.
#             python -m steerport.cli train smollm2-135m --data sst2 --head topk --out positive.st
#   MODEL     default smollm2-135m
# Uses only bundled data: SST-2 test slice (held out from the `sst2` training slice), the
# sentiment prompts slice, and the bundled WikiText-2 paragraphs as neutral text (the default).
# Writes benchmarks/results/inspect_*; the numbers are copied into benchmarks/INSPECT.md by hand.
set -euo pipefail
ST=${1:?steer file}; MODEL=${2:-smollm2-135m}
OUT=benchmarks/results; TMP=$(mktemp -d); mkdir -p "$OUT"
export COLUMNS=${COLUMNS:-110}
SP="python -m steerport.cli"
TEST=steerport/data/sentiment/sst2_test.jsonl
PROMPTS=steerport/data/prompts/sentiment_neutral_50.jsonl
TEXT="The acting is superb and the story is moving, but the ending felt rushed and a little boring."
VALUE=${VALUE:-5}

$SP inspect "$ST" --model "$MODEL" --keywords 12 --value "$VALUE" 2>/dev/null | tee "$OUT/inspect_keywords.txt"
$SP inspect "$ST" --model "$MODEL" --keywords 12 --value "$VALUE" --json 2>/dev/null > "$OUT/inspect_keywords.json"
$SP explain "$MODEL" --steer "$ST:$VALUE" --text "$TEXT" --html "$OUT/inspect_explain.html" 2>/dev/null | tee "$OUT/inspect_explain.txt"
$SP explain "$MODEL" --steer "$ST:$VALUE" --text "$TEXT" --json 2>/dev/null > "$OUT/inspect_explain.json"
$SP score "$MODEL" --steer "$ST:$VALUE" --data "$TEST" --out "$TMP/scores.jsonl" 2>/dev/null | tee "$OUT/inspect_score.json"
$SP sweep "$MODEL" --steer "$ST" --values -10:10:11 --data "$TEST" --prompts "$PROMPTS" --limit 48 --samples 2 \
    --out "$TMP/sweep" 2>/dev/null | tee "$OUT/inspect_sweep.txt"
cp "$TMP/sweep/sweep.json" "$OUT/inspect_sweep.json"; cp "$TMP/sweep/sweep.png" "$OUT/inspect_sweep.png"
$SP merge "$MODEL" --steer "$ST:$VALUE" --out "$TMP/merged" 2>&1 | grep -v "Loading weights\|Writing" | tee "$OUT/inspect_merge.txt"
# the merged checkpoint, loaded by plain transformers, against the hooked model on 16 held-out sentences
python - "$MODEL" "$ST" "$TMP/merged" "$TEST" "$VALUE" <<'PY' 2>/dev/null | tee -a "$OUT/inspect_merge.txt"
import json, sys, torch
from transformers import AutoModelForCausalLM
from steerport import Steer, load_model, steered
model, st, merged, data, value = sys.argv[1:]
texts = [json.loads(l)["text"] for l in open(data)][:16]
lm = load_model(model); steer = Steer.load(st)
enc = lm.tokenizer(texts, return_tensors="pt", padding=True); mask = enc["attention_mask"].bool()
with torch.no_grad():
    base = lm.model(**enc).logits
    with steered(lm, [(steer, float(value))]):
        hooked = lm.model(**enc).logits
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()(**enc).logits
diff = (plain - hooked).abs()[mask]
print(json.dumps({"texts": len(texts), "tokens": int(mask.sum()), "max_abs_logit_diff": float(diff.max()),
                  "mean_abs_logit_diff": float(diff.mean()),
                  "argmax_agreement": float((plain.argmax(-1) == hooked.argmax(-1))[mask].float().mean()),
                  "steer_effect_max_abs_logit_shift": float((hooked - base).abs()[mask].max())}))
PY
rm -rf "$TMP"

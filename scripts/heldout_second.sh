#!/usr/bin/env bash
# Issue 13's greedy settings on a second held-out set (docs/results/heldout_second.jsonl: 12 Spec-Bench dev
# prompts, two per category, that neither the predictor's training nor the first held-out set used), and the bar
# judged on both sets pooled (each trace priced by the costs measured with its collection).
# A change to `adaptive` designed on the first set's replays is checked here on prompts it was not designed on.
# Needs the first set's collections (scripts/settings_bench.sh, $FIRST). Resumable (collect skips prompts it has).
# Never run it beside other CPU work: `speckv collect` measures the step costs it replays under.
set -euo pipefail
cd "$(dirname "$0")/.."
FIRST=${FIRST:-results/settings}
OUT=${OUT:-results/heldout_second}
DOCS=${DOCS:-docs/results/heldout_second}
mkdir -p "$OUT" "$DOCS" "$OUT/eval_first" "$OUT/eval_second"
grep -o 'avx512_bf16\|amx' /proc/cpuinfo | sort -u > "$OUT/cpu_flags.txt" || true
lscpu | grep -m1 'Model name' >> "$OUT/cpu_flags.txt"
cp "$OUT/cpu_flags.txt" "$DOCS/cpu_flags.txt"
for s in "fp16-fp32 fp16 float32 48" "int8 int8 auto 32" "fp16-bf16 fp16 bfloat16 48" "nf4 nf4 auto 32"; do
  set -- $s
  speckv collect --prompts docs/results/heldout_second.jsonl --tiers "$2" --dtype "$3" --max-new-tokens "$4" \
    --out "$OUT/collect_$1"
  for set in first second; do  # the first set too: both replayed by the code under test, not the first's of its day
    records=$([ "$set" = first ] && echo "$FIRST/collect_$1" || echo "$OUT/collect_$1")
    speckv evaluate --records "$records" --split all --out "$OUT/eval_$set/evaluate_$1.json"
  done
done
python -m speckv.tools.settings_report "$OUT/eval_second" "$DOCS/second"
python -m speckv.tools.settings_report "$OUT/eval_first" "$OUT/eval_second" "$DOCS/pooled"
speckv shapes --records "$OUT/collect_fp16-bf16" --split all --out "$DOCS/shapes_fp16-bf16.json"

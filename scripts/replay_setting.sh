#!/usr/bin/env bash
# Issue 13's bar for one greedy setting by exact replay, collected anew on both held-out sets
# (docs/results/heldout_issue13.jsonl and heldout_second.jsonl, 24 prompts) and judged pooled, each set's traces
# priced by the step costs measured with its own collection: for re-judging a setting after a change to what its
# passes cost (a kernel), without re-collecting the others.
#   bash scripts/replay_setting.sh fp16-fp32 fp16 float32 48 docs/results/epyc17_bf16/small_rows/replay_fp32
#   bash scripts/replay_setting.sh int8 int8 auto 32 docs/results/epyc17_bf16/small_rows/replay_int8
# ~15 min for float32, 13 for int8 on the EPYC here. Never run it beside other CPU work: `speckv collect` measures the costs.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1 TIER=$2 DTYPE=$3 TOKENS=$4 DOCS=$5
OUT=${OUT:-results/replay_$NAME}
mkdir -p "$DOCS"
grep -o 'avx512_bf16\|amx' /proc/cpuinfo | sort -u > "$DOCS/cpu_flags.txt" || true
lscpu | grep -m1 'Model name' >> "$DOCS/cpu_flags.txt"
for set in issue13 second; do
  speckv collect --prompts "docs/results/heldout_$set.jsonl" --tiers "$TIER" --dtype "$DTYPE" \
    --max-new-tokens "$TOKENS" --out "$OUT/collect_$set"
  mkdir -p "$OUT/eval_$set"
  speckv evaluate --records "$OUT/collect_$set" --split all --out "$OUT/eval_$set/evaluate_$NAME.json"
  cp "$OUT/eval_$set/evaluate_$NAME.json" "$DOCS/evaluate_$set.json"
  # the collection itself (traces and step costs, ~0.7 MB a set at 32 tokens) goes with the figures, so that a
  # later change to replay or to the oracle re-judges it without collecting again (`speckv evaluate --records`)
  mkdir -p "$DOCS/collect_$set"
  cp "$OUT/collect_$set/records_$TIER.jsonl" "$OUT/collect_$set/cost_$TIER.json" "$DOCS/collect_$set/"
done
python -m speckv.tools.settings_report "$OUT/eval_issue13" "$OUT/eval_second" "$DOCS"

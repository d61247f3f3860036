#!/usr/bin/env bash
# Issue 13, item 5: `adaptive` against none, fixed γ 1..8, heuristic and hf-assisted at every real setting this
# machine has, on held-out prompts the acceptance predictor never saw (docs/results/heldout_issue13.jsonl):
#   greedy, by exact replay of collected traces under each setting's measured step costs (`speckv collect`,
#   `speckv evaluate`): fp16 computed in bfloat16, fp16 computed in float32, int8, nf4;
#   temperature 0.7, live (`speckv bench`, replay is exact only for greedy): fp16 in bfloat16;
#   and greedy live at fp16 in bfloat16, to check replay against the live loop and time live decisions.
# Resumable (collect skips prompts it has); results under $OUT (default results/settings), summaries and plots
# under $DOCS (default docs/results/settings/). Run from the repository root: `bash scripts/settings_bench.sh`.
# Never run it beside other CPU work: the step costs it measures would be the neighbour's too.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/settings}
DOCS=${DOCS:-docs/results/settings}
PROMPTS=${PROMPTS:-docs/results/heldout_issue13.jsonl}
TOKENS=${TOKENS:-48}          # greedy traces
Q_TOKENS=${Q_TOKENS:-32}      # int8 / nf4 traces (their passes are slower here)
LIVE_LIMIT=${LIVE_LIMIT:-1}   # prompts per category in the sampled live bench
mkdir -p "$OUT" "$DOCS"
grep -o 'avx512_bf16\|amx' /proc/cpuinfo | sort -u > "$OUT/cpu_flags.txt" || true
lscpu | grep -m1 'Model name' >> "$OUT/cpu_flags.txt"

collect() {  # name, tier, dtype, tokens
  speckv collect --prompts "$PROMPTS" --tiers "$2" --dtype "$3" --max-new-tokens "$4" --out "$OUT/collect_$1"
  speckv evaluate --records "$OUT/collect_$1" --split all --out "$OUT/evaluate_$1.json" \
    --markdown "$DOCS/evaluate_$1.md" --plots "$DOCS/plots_$1"
}
collect fp16-bf16 fp16 bfloat16 "$TOKENS"
collect fp16-fp32 fp16 float32 "$TOKENS"
collect nf4 nf4 auto "$Q_TOKENS"
collect int8 int8 auto "$Q_TOKENS"

POLICIES=none,fixed:1,fixed:2,fixed:3,fixed:4,fixed:5,fixed:6,fixed:7,fixed:8,heuristic,adaptive,hf-assisted
speckv bench --prompts "$PROMPTS" --limit-per-category "$LIVE_LIMIT" --tier fp16 --temperature 0.7 --seed 0 \
  --policies "$POLICIES" --max-new-tokens 32 --out "$OUT/bench_fp16_t07.json"
speckv report "$OUT/bench_fp16_t07.json" > "$DOCS/bench_fp16_t07.md"
speckv bench --prompts "$PROMPTS" --limit-per-category "$LIVE_LIMIT" --tier fp16 \
  --policies none,fixed:1,fixed:2,adaptive,hf-assisted --max-new-tokens 32 --out "$OUT/bench_fp16_greedy.json"
speckv report "$OUT/bench_fp16_greedy.json" > "$DOCS/bench_fp16_greedy.md"
python -m speckv.tools.settings_report "$OUT" "$DOCS"

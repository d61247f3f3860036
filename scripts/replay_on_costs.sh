#!/usr/bin/env bash
# Greedy traces collected on any machine (`speckv collect`: acceptance does not depend on the hardware, beyond
# numerics) replayed under another machine's measured step costs: every fixed γ, `none` and `adaptive` (which
# starts from those costs as its calibration and learns online), as `speckv shapes` does for its built-in shapes,
# with the given costs as its "measured-here" shape. For a GPU whose real weights could not travel
# (speckv.tools.arch_costs measured its costs with random weights):
#   speckv collect --prompts docs/results/heldout_issue13.jsonl --tiers int8 --max-new-tokens 48 \
#       --out results/h100_traces/collect_int8                                  # ~15 min on a 2-core CPU
#   bash scripts/replay_on_costs.sh results/h100_traces/collect_int8 int8 docs/results/gpu/h100/arch_int8.json \
#       docs/results/gpu/h100/replay_int8.json                                  # seconds
set -euo pipefail
cd "$(dirname "$0")/.."
COLLECT=$1 TIER=$2 COSTS=$3 OUT=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$COLLECT"/records_*.jsonl "$work"/
cp "$COSTS" "$work/cost_$TIER.json"  # a file with a `cost_model` (arch_costs' output, a cost file)
speckv shapes --records "$work" --split all --tier "$TIER" --out "$OUT"

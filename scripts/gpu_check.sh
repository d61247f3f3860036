#!/usr/bin/env bash
# The prepared GPU check (issue 13, item 6): on one CUDA GPU, in under 8 minutes, every tier's calibration
# (float16 compute, bitsandbytes' CUDA kernels for int8/nf4) and none / fixed γ / adaptive / hf-assisted on
# held-out prompts the acceptance predictor never saw. Writes JSON under $OUT (default results/gpu) and prints tables.
#
# Needs: an environment with speckv installed and a CUDA build of torch (`pip install -e .` with the CUDA
# wheel index), the embedded models prepared in $SPECKV_HOME (`speckv models prepare`; the device machine
# has no network). Run from the repository root: `bash scripts/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
PROMPTS=docs/results/heldout_issue13.jsonl
python - <<'PY' | tee "$OUT/device.txt"
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device visible to torch (is this a CUDA build of torch?)")
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
PY
for tier in fp16 nf4 int8; do  # calibration: seconds on a GPU; printed as the verify curve
  timeout 120 speckv calibrate --device cuda --tier "$tier" --force --budget-s 20 | tee "$OUT/calibrate_$tier.txt"
done
for tier in fp16 nf4; do  # 7 prompts (one per category) x 6 policies x 64 tokens
  timeout 150 speckv bench --device cuda --tier "$tier" --prompts "$PROMPTS" --limit-per-category 1 \
    --policies none,fixed:2,fixed:4,fixed:6,adaptive,hf-assisted --max-new-tokens 64 --out "$OUT/bench_$tier.json"
  speckv report "$OUT/bench_$tier.json" | tee "$OUT/bench_$tier.md"
done

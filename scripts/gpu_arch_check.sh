#!/usr/bin/env bash
# The GPU check where the pair's weights cannot travel (a lent device machine: no network, 64 MiB upload), in
# under 10 minutes (the stages' bounds come to 590 s; the H100 took 4): the architecture of the embedded pair
# with random weights (speckv.tools.arch_costs) at fp16, with requests decoding together in batched passes at
# loads 1-16 (issue 14: what a batched pass costs on a GPU, and whether the calibration's batched terms predict
# it); at load 8, packed passes attending in one call against a call per row; float32 exactness, alone and
# batched; then int8 and nf4 through bitsandbytes' CUDA kernels, each bounded, with Python's stacks dumped if one
# stalls.
#
# Needs in .gpu/ (ignored by git; named in the device tool's `carry`): draft/ and target/ (config.json and
# generation_config.json of each model), tok/ (the tokenizer files; tokenizer.json may be gzipped to fit the
# upload), and optionally site/ (an unpacked bitsandbytes, where the machine has none) and wheels/ (the pinned
# transformers, where the machine has another; used only if it imports there). scripts/gpu_files.sh makes them.
# Run from the repository root: `bash scripts/gpu_arch_check.sh` (OUT: where results go; DEVICE: cuda).
#
# The device tool uploads the tracked tree, and docs/results alone is over its 64 MiB: before the call take it out
# of the index and ignore it (`git rm -r -q --cached docs/results && echo /docs/results/ >> .git/info/exclude`),
# after it put it back (`git reset -q`, and drop that line from .git/info/exclude). Nothing here reads it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
DEVICE=${DEVICE:-cuda}
G=${GPU_FILES:-.gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1  # a stage stopped by SIGABRT prints where it was
export SPECKV_HOME=${SPECKV_HOME:-/tmp/speckv_home}  # calibrations of random weights stay out of the user's cache
exec > >(tee "$OUT/log.txt") 2>&1
. scripts/gpu_env.sh
use_gpu_files "$G" /tmp/gpu_wheels
show_host
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || true
arch=(python3 -m speckv.tools.arch_costs "$G/draft/config.json" "$G/target/config.json" "$G/tok")
# 2026-12-04 on an H200: fp16 with 64 tokens and four policies a load reached 8 of 1-16 in 170 s; int8's load 8
# did not finish inside 95 s (a pass there is ~0.3 s): hence 32 tokens, three policies, and 120-130 s a quantized
# tier (48-61 s on the H100)
stage "${FP16_S:-180}" "${arch[@]}" "$OUT/arch_fp16.json" --device "$DEVICE" --dtype float16 \
  --loads 1,4,8,16 --tokens 32 --load-policies none,fixed:1,adaptive
# packed passes attending a call per row (the default) and in one call (speckv.attention.padded_attention), back
# to back: which a GPU should use
stage "${ATTN_S:-90}" "${arch[@]}" "$OUT/arch_fp16_attention.json" --device "$DEVICE" --dtype float16 \
  --loads 8 --tokens 32 --load-policies none,fixed:1,fixed:3 --attention both
[ -n "${SKIP_EXACT:-}" ] || stage "${EXACT_S:-80}" "${arch[@]}" "$OUT/exactness.json" --device "$DEVICE" --tokens 48 --exactness
for tier in nf4 int8; do
  stage "${QUANT_S:-120}" "${arch[@]}" "$OUT/arch_$tier.json" --device "$DEVICE" --tier "$tier" --loads 1,8 \
    --tokens 32 --load-policies none,fixed:2
done
sleep 1  # tee writes the last lines

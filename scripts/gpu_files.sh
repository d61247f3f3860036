#!/usr/bin/env bash
# Makes .gpu/, what scripts/gpu_arch_check.sh needs on a lent GPU machine that has no network and takes at most
# 64 MiB of upload: the embedded pair's configs (not their weights), the tokenizer (gzipped), bitsandbytes cut to
# its CUDA 13.0 library, and the pinned transformers as a wheel. Run here, from the repository root, after
# `speckv models prepare`; then name ".gpu" in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${SPECKV_HOME:-$HOME/.cache/speckv}/models
PY=${PYTHON:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/draft .gpu/target .gpu/tok .gpu/site .gpu/wheels
grep -qx '/.gpu/' .git/info/exclude 2> /dev/null || { mkdir -p .git/info && echo '/.gpu/' >> .git/info/exclude; }
cp "$MODELS"/qwen2.5-coder-0.5b-instruct/{config.json,generation_config.json} .gpu/draft/
cp "$MODELS"/qwen2.5-coder-1.5b-instruct/{config.json,generation_config.json} .gpu/target/
cp "$MODELS"/qwen2.5-coder-1.5b-instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/tok/
gzip -9 .gpu/tok/tokenizer.json
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
download=(-m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64)
tmp=$(mktemp -d)
"$PY" "${download[@]}" -d "$tmp" "bitsandbytes==$(version bitsandbytes)"
(cd .gpu/site && unzip -q "$tmp"/bitsandbytes-*.whl && find bitsandbytes -name 'libbitsandbytes_*.so' \
  ! -name libbitsandbytes_cuda130.so ! -name libbitsandbytes_cpu.so -delete)
"$PY" "${download[@]}" -d .gpu/wheels "transformers==$(version transformers)"
rm -rf "$tmp"
du -sh .gpu

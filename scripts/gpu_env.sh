# Sourced by the lent-GPU checks (scripts/gpu_arch_check.sh, scripts/gpu_serve_check.sh): what both do with the
# files scripts/gpu_files.sh puts in .gpu/, and how both run and time a stage.

# use_gpu_files G WHEELS_DIR: the tokenizer unzipped, bitsandbytes (G/site) on PYTHONPATH, and the pinned transformers
# (G/wheels) installed into WHEELS_DIR and put before the image's own where it imports there.
use_gpu_files() {
  local g=$1 wheels=$2
  [ -f "$g/tok/tokenizer.json.gz" ] && gunzip -kf "$g/tok/tokenizer.json.gz"
  [ -d "$g/site" ] && export PYTHONPATH="$PWD/$g/site${PYTHONPATH:+:$PYTHONPATH}"
  if ls "$g"/wheels/*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
      --target "$wheels" "$g"/wheels/*.whl && PYTHONPATH="$wheels:${PYTHONPATH:-}" python3 -c \
      "import transformers.models.qwen2.modeling_qwen2"; then
    export PYTHONPATH="$wheels:${PYTHONPATH:-}"
  fi
  return 0
}

# show_host: the GPU and the host CPU (an eager-mode step of these models is bound by its launches)
show_host() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  lscpu | grep -m1 'Model name' || true
}

# stage LIMIT_S CMD...: CMD at most LIMIT_S seconds, stopped by SIGABRT (with PYTHONFAULTHANDLER=1 a Python stage
# prints where it was), its start and exit logged; returns its exit status
stage() {
  local limit=$1; shift
  echo "=== $* ($(date +%T), at most ${limit} s)"
  timeout -s ABRT "$limit" "$@"
  local rc=$?
  echo "=== exit $rc ($(date +%T))"
  return $rc
}

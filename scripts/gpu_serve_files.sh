#!/usr/bin/env bash
# Makes .gpu_serve/, the Python packages the served GPU check (scripts/gpu_serve_check.sh) needs on a lent GPU
# machine that its image lacks: Ray with Serve, pydantic, FastAPI and the rest of their closure, as Python 3.12
# wheels, at the versions this checkout's environment runs. That machine has no network and one device call
# carries at most 64 MiB, and Ray's wheel alone is 75.6 MiB, so the wheels are split over two calls (with the
# tracked tree each carries, docs/results taken out of it):
#   .gpu_serve/a/  the first part of Ray's wheel, as much as fits: a first call carries it and leaves it there;
#   .gpu_serve/b/  the rest of Ray's wheel and every other wheel: the call that runs the check carries it, at once,
#                  while the machine is still warm (ignored files a call leaves are kept for the next; 30 s idle).
# PYVER=3.11 makes the same for this machine's Python, to rehearse the check here (docs/SERVING.md says how).
# Run here, from the repository root, after scripts/gpu_files.sh (the models' configs, tokenizer, bitsandbytes).
# Packages the image already holds (KINDS.md of the device tool, read 2026-11-17; IMAGE_HAS below) are left out:
# carried, they would shadow the image's own builds (numpy, protobuf) that its torch and grpcio were built against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIMIT_MIB=63  # what one call may carry, the tracked tree included (the tool's 64 MiB, less a margin)
PYVER=${PYVER:-3.12}  # the device image's Python; another only to rehearse the check here
ABI=cp${PYVER/./}
IMAGE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite
lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
canonical() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
[ -d .gpu ] || { echo "run scripts/gpu_files.sh first: the check needs .gpu/ too"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the versions this checkout runs, where a Python 3.12 wheel of them exists (the resolver takes them as constraints)
"$PY" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|nvidia-|triton|bitsandbytes|speckv)' > "$tmp/constraints.txt"
"$PY" -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$ABI" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -c "$tmp/constraints.txt" -d "$tmp/all" "ray[serve]==$(version ray)" "pydantic==$(version pydantic)" \
  "fastapi==$(version fastapi)" "starlette==$(version starlette)" "uvicorn==$(version uvicorn)"
# what every call uploads: the tracked tree without docs/results (scripts/gpu_arch_check.sh: take it out first)
tree_bytes=$(git ls-files -z | grep -zv '^docs/results/' | xargs -0 stat -c %s | awk '{t += $1} END {print t}')
rm -rf .gpu_serve && mkdir -p .gpu_serve/a .gpu_serve/b .gpu_serve/image
grep -qx '/.gpu_serve/' .git/info/exclude 2> /dev/null || { mkdir -p .git/info && echo '/.gpu_serve/' >> .git/info/exclude; }
for whl in "$tmp"/all/*.whl; do
  name=$(canonical "$(basename "$whl" | cut -d- -f1)")
  case " $(echo $IMAGE_HAS) " in  # left to the image (kept in image/, not carried: a rehearsal here installs them)
    *" $name "*) cp "$whl" .gpu_serve/image/; continue ;;
  esac
  if [ "$name" = ray ]; then
    basename "$whl" > .gpu_serve/b/ray_wheel_name.txt
    sha256sum "$whl" | cut -d' ' -f1 > .gpu_serve/b/ray_wheel_sha256.txt
    # the first call carries the tree and the first part, as much as fits: the second carries .gpu/ besides
    part=$(( LIMIT_MIB * 1048576 - tree_bytes ))
    split -b "$part" -d "$whl" "$tmp/ray.part"
    mv "$tmp/ray.part00" .gpu_serve/a/
    mv "$tmp"/ray.part* .gpu_serve/b/
  else
    cp "$whl" .gpu_serve/b/
  fi
done
ls .gpu_serve/b/*.whl | xargs -n1 basename
mib() { du -sb "$@" | awk -v t="$tree_bytes" '{s += $1} END {printf "%.1f", (s + t) / 1048576}'; }
first=$(mib .gpu_serve/a) second=$(mib .gpu_serve/b .gpu)
echo "uploads with the tree: first call (.gpu_serve/a) $first MiB, second (.gpu, .gpu_serve/b) $second MiB"
awk -v a="$first" -v b="$second" -v l="$LIMIT_MIB" 'BEGIN {exit !(a > l || b > l)}' && {
  echo "over ${LIMIT_MIB} MiB: carry .gpu in a third call, or leave wheels the check does not need out of .gpu_serve/b"
  exit 1; }
exit 0

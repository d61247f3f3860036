#!/usr/bin/env bash
# The served GPU check (issue 14: nothing had been served on a GPU): `serve run` of the shipped serve_config.yaml
# on one CUDA GPU, the draft/target pair built from their configs with random weights (the real weights cannot
# travel to a lent machine), and bounded loads of 1 and 8 clients per tier and policy through the OpenAI endpoint
# (deployments.load_run). What it measures is the serving path's throughput on a GPU: `none`'s 8-vs-1 ratio (the
# bar: 4x at int8/nf4, 2x at fp16), whether adaptive keeps level with `none` where nothing is accepted (random
# weights: the draft and target disagree, so drafting cannot pay), and that no answer is lost or cut short.
# Acceptance, and so any speed-up from drafting, is meaningless here (speckv.tools.arch_costs says why).
#
# Needs, beside the repository: .gpu/ (scripts/gpu_files.sh: configs, tokenizer, bitsandbytes, transformers) and
# .gpu_serve/ (scripts/gpu_serve_files.sh: Ray, Serve and their closure as wheels). On the device tool, calls back
# to back (each within the machine's 30 s of idle, so what the one before left is still there), with docs/results
# out of the upload as scripts/gpu_arch_check.sh says:
#   1. carry [".gpu_serve/a"], command `true`                 (leaves the first part of Ray's wheel there)
#   2. carry [".gpu", ".gpu_serve/b"], command `bash scripts/gpu_serve_check.sh`, timeout_s 600: the install, the
#      models and the server's start (~3 min on a CPU host, an estimate for the GPU), then LEVELS (policy:clients)
#      for each tier in LOAD_TIERS, each a DURATION-s load after load_run's one-at-a-time reference answers, as
#      many as end before DEADLINE_S; it prints the levels it left and keeps the server up for them;
#   3. where it left any: command `STAGE=load bash scripts/gpu_serve_check.sh`, timeout_s 600.
# STAGE=serve stops after the server's start. Rehearsed here on the CPU (docs/SERVING.md, "Served on a GPU: the
# kit"): DEVICE=cpu, with this machine's Python's wheels (PYVER=3.11 in gpu_serve_files.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_serve}
DEVICE=${DEVICE:-cuda}
TIERS=${TIERS:-fp16 int8 nf4}  # served
LOAD_TIERS=${LOAD_TIERS:-$TIERS}  # loaded
LEVELS=${LEVELS:-none:1 none:8 adaptive:8}
DURATION=${DURATION:-25}
TOKENS=${TOKENS:-64}
STAGE=${STAGE:-all}
DEADLINE_S=${DEADLINE_S:-540}  # seconds from this script's start after which no load level begins
LEVEL_EXTRA_S=${LEVEL_EXTRA_S:-30}  # a level's time beyond DURATION: its reference answers, its last requests
G=${GPU_FILES:-.gpu}
S=${SERVE_FILES:-.gpu_serve}
WORK=${WORK:-/tmp/speckv_gpu_serve}
PORT=8000
left=""  # load levels this call left for the next
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 SPECKV_HOME=${SPECKV_HOME:-$WORK/home} RAY_USAGE_STATS_ENABLED=0
exec > >(tee -a "$OUT/log.txt") 2>&1
. scripts/gpu_env.sh

if [ "$STAGE" = load ] && [ -f "$WORK/env.sh" ]; then
  . "$WORK/env.sh"  # what the call that installed and served set
elif [ -z "${SKIP_INSTALL:-}" ]; then  # Ray's wheel from its parts, then every carried wheel, into $WORK/site
  wheel="$WORK/$(cat "$S/b/ray_wheel_name.txt")"
  cat "$S"/a/ray.part* "$S"/b/ray.part* > "$wheel" 2> /dev/null || cat "$S"/b/ray.part* > "$wheel"
  echo "$(cat "$S/b/ray_wheel_sha256.txt")  $wheel" | sha256sum -c - || { echo "Ray's wheel is incomplete: was \
$S/a carried by the call before, on the same warm machine?"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$S"/b/*.whl "$wheel" || exit 2
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  use_gpu_files "$G" "$WORK/transformers"
  export PYTHONPATH="$PWD:$PYTHONPATH"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "export PYTHONPATH=$PYTHONPATH" > "$WORK/env.sh"

if [ "$STAGE" != load ]; then
  show_host
  python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'ray', ray.__version__)" || exit 2
  # the pair with random weights, saved as model directories the app loads like any local checkpoint
  stage 240 python3 - "$G" "$WORK/models" "$DEVICE" <<'PY' || exit 2
import shutil, sys
from pathlib import Path
import torch
from speckv.tools.arch_costs import random_model
files, out, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
for name in ("draft", "target"):
    model = random_model(files / name / "config.json", torch.float16, device)
    model.save_pretrained(out / name)
    del model
    shutil.copy(files / name / "generation_config.json", out / name)
    for tok in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (files / "tok" / tok).exists():
            shutil.copy(files / "tok" / tok, out / name)
print("models in", out)
PY
  # the shipped serve_config.yaml with the random pair, the tiers asked for, every tier up from the start (on
  # CUDA build_app turns its share_cores off itself)
  python3 - "$WORK/models" "$DEVICE" "$TIERS" > "$WORK/serve_gpu.yaml" <<'PY' || exit 2
import sys
import yaml
models, device, tiers = sys.argv[1], sys.argv[2], sys.argv[3].split()
config = yaml.safe_load(open("serve_config.yaml"))
app = config["applications"][0]
app["args"].update(draft_model=f"{models}/draft", target_model=f"{models}/target", tiers=tiers,
                   default_tier=tiers[0], device=device)
app["deployments"] = [d for d in app["deployments"] if not d["name"].startswith("target-")
                      or d["name"][len("target-"):] in tiers]
for d in app["deployments"]:
    scaling = d.get("autoscaling_config")
    if scaling and scaling.get("min_replicas") == 0:  # measured, not woken: the first load would wait for a load
        scaling.update(min_replicas=1, initial_replicas=1)
print(yaml.safe_dump(config, sort_keys=False))
PY
  cat "$WORK/serve_gpu.yaml"
  pkill -f "ray.serve.scripts run" ; python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1  # an earlier one
  # its own process session: it outlives this call (STAGE=load in the next one reaches it)
  setsid nohup python3 -m ray.serve.scripts run "$WORK/serve_gpu.yaml" > "$OUT/serve.log" 2>&1 < /dev/null &
  for _ in $(seq 1 150); do curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null && break; sleep 2; done
  curl -sf "http://127.0.0.1:$PORT/healthz" || { echo "no server after 300 s"; tail -50 "$OUT/serve.log"; exit 3; }
  echo " server up ($(date +%T))"
fi

if [ "$STAGE" != serve ]; then
  # each level's result is kept in $WORK/results too, which outlives the call on a warm machine ($OUT is emptied
  # before each): a level already there is not run again, and one that would end past DEADLINE_S is left for a
  # next call (STAGE=load), so a call ends inside the tool's 600 s with what it measured
  mkdir -p "$WORK/results"
  for tier in $LOAD_TIERS; do
    for level in $LEVELS; do
      policy=${level%:*} n=${level##*:}
      name="load_${tier}_${policy/:/}_c$n.json"
      [ -f "$WORK/results/$name" ] && continue
      if [ $((SECONDS + DURATION + LEVEL_EXTRA_S)) -gt "$DEADLINE_S" ]; then left="$left $tier:$level"; continue; fi
      stage $((DURATION * 4 + 120)) python3 -m deployments.load_run --url "http://127.0.0.1:$PORT" \
        --model "speckv-$tier" --policy "$policy" --clients "$n" --duration "$DURATION" --max-tokens "$TOKENS" \
        --tolerate-divergence --out "$WORK/results/$name" || echo "level $tier $level failed"
    done
  done
  cp "$WORK"/results/load_*.json "$OUT"/ 2> /dev/null
  [ -n "$left" ] && echo "left for a next call (STAGE=load bash $0, at once):$left"
  curl -s "http://127.0.0.1:$PORT/speckv/stats" > "$OUT/speckv_stats.json" || true
  python3 - "$WORK/results" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {}
for f in sorted(out.glob("load_*_c*.json")):
    tier, policy, level = f.stem.split("_")[1:]
    doc = json.loads(f.read_text())
    runs[(tier, policy, int(level[1:]))] = doc
print("| tier | policy | clients | requests ok | tokens/s (ok x max_tokens / s) | latency p50 s | cut short | differ |")
print("|---|---|---|---|---|---|---|---|")
for (tier, policy, n), doc in sorted(runs.items()):
    print(f"| {tier} | {policy} | {n} | {doc['answers_by_kind'].get('ok', 0)} | {doc['tokens_per_s_upper_bound']:.1f} "
          f"| {doc['latency_s']['p50']:.2f} | {doc['cut_short']} | {doc['mismatch_share']:.0%} |")
for (tier, policy, n), doc in sorted(runs.items()):
    one = runs.get((tier, policy, 1))
    if n > 1 and one and one["tokens_per_s_upper_bound"]:
        print(f"{tier} {policy}: {n} vs 1 clients {doc['tokens_per_s_upper_bound'] / one['tokens_per_s_upper_bound']:.2f}x")
PY
fi
if [ "$STAGE" != serve ] && [ -z "$left" ] && [ -z "${KEEP_SERVER:-}" ]; then  # else left for the next call
  pkill -f "ray.serve.scripts run" ; python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1
fi
sleep 1  # tee writes the last lines

#!/bin/bash
# The fiftieth session's A/B of the router's grouped handle calls (docs/serving_log.md, "One handle call per
# replica a turn"). usage: ab_run.sh LABEL OUTDIR, serving the deployments/ checked out now:
#   git checkout e78e320 -- deployments && ab_run.sh old OUT/before   # one handle call per request
#   git checkout HEAD -- deployments && ab_run.sh new OUT/grouped
# (the two-round 8-stream run: the same with --concurrency 8 --rounds 2; arguments after OUTDIR go to
# load_sweep after the defaults and so override them, e.g. ab_run.sh abba OUT --concurrency 8 --rounds 4)
# TIER and CONFIG pick another tier and its server config (int8: TIER=int8 CONFIG=docs/results/milan/serve_int8.yaml)
set -u
label=$1; out=$2
TIER=${TIER:-nf4}
CONFIG=${CONFIG:-docs/results/avx2/serve_sweep.yaml}
cd "$(git rev-parse --show-toplevel)"
export PATH=$PWD/.venv/bin:$PATH
pkill -f "serve run" ; ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; sleep 2
rm -f /tmp/passes_$label.jsonl
(SPECKV_PASS_LOG=/tmp/passes_$label.jsonl nohup serve run $CONFIG > /tmp/serve_$label.log 2>&1 &)
for i in $(seq 1 150); do curl -sf http://127.0.0.1:8000/healthz >/dev/null && break; sleep 2; done
curl -sf http://127.0.0.1:8000/healthz || { echo "no server"; exit 1; }
# warm up: one request of each policy
for p in none adaptive; do curl -s http://127.0.0.1:8000/v1/completions -H 'content-type: application/json' -d "{\"model\":\"speckv-$TIER\",\"prompt\":\"def add(a, b):\",\"max_tokens\":16,\"temperature\":0,\"speculation\":{\"policy\":\"$p\"}}" >/dev/null; done
python -m deployments.load_sweep --tiers $TIER --policies none,adaptive --concurrency 1,8 --rounds 1 --rate-shares "" --seconds 90 --out $out "${@:3}" > /tmp/sweep_$label.log 2>&1
curl -s http://127.0.0.1:8000/speckv/stats > $out/speckv_stats_end.json
python scripts/pass_timeline.py /tmp/passes_$label.jsonl --levels $out --out $out/passes.json > $out/passes.md 2>&1
gzip -c /tmp/passes_$label.jsonl > $out/passes.jsonl.gz
pkill -f "serve run"; ray stop --force >/dev/null 2>&1
echo done $label

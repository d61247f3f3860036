#!/bin/bash
# Run beside `SPECKV_PASS_LOG=/tmp/passes_idle.jsonl serve run docs/results/milan/serve_fp16.yaml` (warmed up);
# results land in /tmp/ab46/idle/{A1,B1,A2,B2} (copied here). docs/serving_log.md, forty-sixth session.
# ABBA: router at normal priority (A) vs SCHED_IDLE (B), within one server
cd /work/main; source .venv/bin/activate
R=$(pgrep -f "ServeReplica:speckv:router")
setp() { for t in /proc/$R/task/*; do chrt $1 -p 0 $(basename $t) 2>/dev/null; done; chrt -p $R; }
sweep() { python -m deployments.load_sweep --tiers fp16 --policies $2 --concurrency 8 --rounds 1 --rate-shares "" --seconds 90 --out /tmp/ab46/idle/$1 > /tmp/ab46/idle/$1.log 2>&1; date +%s > /tmp/ab46/idle/$1.end; }
mkdir -p /tmp/ab46/idle
setp -o; sweep A1 none,adaptive
setp -i; sweep B1 adaptive,none
setp -o; sweep A2 adaptive,none
setp -i; sweep B2 none,adaptive
setp -o

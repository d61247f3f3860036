"""What a little CPU work beside a model's pass costs the pass, on this machine's cores, and whether the
scheduling class of the process doing it changes that: a two-thread bf16 product of the 1.5B's MLP shape
(eight rows, twelve weights, ~20 ms) timed alone and beside one process that computes 2 ms of every 20 (a
tenth of a core, in bursts, as a router's work comes), run at nice 0, in SCHED_IDLE and at nice 19.

    python scripts/side_load_pass.py --out docs/results/amx_1206/side_load_pass.json      # ~1 min

Linux only (SCHED_IDLE). Never beside other CPU work: it times the cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from speckv.calibration import cpu_flags

SIDE = """
import os, sys, time
if sys.argv[1] == "idle":
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
else:
    os.nice(int(sys.argv[1]))
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < 0.002:
        sum(range(100))
    time.sleep(0.018)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--passes", type=int, default=60)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    x = torch.randn(8, 1536, dtype=torch.bfloat16)
    weights = [torch.randn(8960, 1536, dtype=torch.bfloat16) for _ in range(12)]

    def timed_passes() -> list[float]:
        times = []
        for _ in range(args.passes):
            start = time.perf_counter()
            for w in weights:
                x @ w.T
            times.append((time.perf_counter() - start) * 1e3)
        return times

    timed_passes()  # warm up
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for side in (None, "0", "idle", "19"):
            kind = "SCHED_IDLE" if side == "idle" else f"nice {side}"
            name = "alone" if side is None else f"beside a tenth of a core at {kind}"
            proc = None if side is None else subprocess.Popen([sys.executable, "-c", SIDE, side])
            time.sleep(0.5 if proc else 0.0)
            try:
                median = statistics.median(timed_passes())
            finally:
                if proc:
                    proc.kill()
                    proc.wait()
            results.setdefault(name, []).append(median)
            print(f"{name}: median pass {median:.1f} ms", flush=True)
    doc = {"cpu_flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"}),
           "median_pass_ms_by_round": results}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()

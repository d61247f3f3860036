"""CPU used by each Serve replica (and the load tool) on this machine, per level of a load sweep.

    python scripts/process_cpu.py sample /tmp/cpu.jsonl &          # every second, until killed
    ... serve run ... ; python -m deployments.load_sweep ... --out DIR
    python scripts/process_cpu.py levels /tmp/cpu.jsonl DIR          # cores each process used, per level

A sample is the CPU seconds so far (user + system, from /proc) of every process whose command line names a
replica (router, target-<tier>, draft, ProxyActor, ServeController) or the load tool (.loadtool), summed by
name. Per level (its GuideLLM report's start and end): the cores each used on average. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

NAMES = ("router", "target-fp16", "target-int8", "target-nf4", "draft", "ProxyActor", "ServeController", "loadtool")


def sample() -> dict[str, float]:
    """{name: CPU seconds so far, summed over its processes}, with the wall clock as "t"."""
    tick = os.sysconf("SC_CLK_TCK")
    row = {"t": time.time()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = next((n for n in NAMES if n in cmd), None)
        if name:
            row[name] = row.get(name, 0.0) + (int(stat[11]) + int(stat[12])) / tick
    return row


def levels(samples: list[dict], folder: str) -> dict[str, dict[str, float]]:
    """{level: {name: cores used on average over the level}} for the load sweep's levels in `folder`."""
    sys.path.insert(0, str(Path(__file__).parent))
    from pass_timeline import level_windows

    out = {}
    for level, (start, end) in level_windows(folder).items():
        inside = [s for s in samples if start <= s["t"] <= end]
        if len(inside) < 2:
            continue
        first, last = inside[0], inside[-1]
        span = last["t"] - first["t"]
        out[level] = {k: round((last[k] - first.get(k, 0.0)) / span, 3) for k in last if k != "t"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample")
    s.add_argument("out")
    lv = sub.add_parser("levels")
    lv.add_argument("samples")
    lv.add_argument("folder")
    args = parser.parse_args()
    if args.command == "sample":
        with open(args.out, "a") as f:
            while True:
                f.write(json.dumps(sample()) + "\n")
                f.flush()
                time.sleep(1.0)
    with open(args.samples) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print(json.dumps(levels(rows, args.folder), indent=1))


if __name__ == "__main__":
    main()

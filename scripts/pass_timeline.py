"""Where a served machine's time goes, from the replicas' pass log (SPECKV_PASS_LOG, speckv.batching).

    SPECKV_PASS_LOG=/tmp/passes.jsonl serve run docs/results/milan/serve_int8.yaml &
    ... load ...
    python scripts/pass_timeline.py /tmp/passes.jsonl [--since EPOCH --until EPOCH] [--out summary.json]
    python scripts/pass_timeline.py /tmp/passes.jsonl --levels docs/results/.../load_dir [--out passes.json]

With --levels, every GuideLLM report a load sweep (deployments.load_sweep) left in the folder is a window
(its benchmark's start and end), summarised apart and printed as a table.

For the window: the share of wall time some replica ran a pass (the cores are taken in turns where replicas
share them, speckv.batching.CoreLease, so passes do not overlap there), and per kind of pass (verify, draft,
prefill chunks) how many ran, the calls they carried, the tokens drafted into verify passes, their mean time and
their share of the window. Idle time is what no pass used: waits for calls, hops, the router's own work.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import defaultdict
from pathlib import Path


def summarise(passes: list[dict], since: float | None = None, until: float | None = None) -> dict:
    """The window's busy share and its passes by kind (see the module docstring)."""
    rows = [dict(p, begin=p["end"] - p["ms"] / 1e3) for p in passes]
    rows = [r for r in rows if (since is None or r["begin"] >= since) and (until is None or r["end"] <= until)]
    if not rows:
        raise SystemExit("no passes in the window")
    rows.sort(key=lambda r: r["begin"])
    start, end = rows[0]["begin"], max(r["end"] for r in rows)
    window_ms = (end - start) * 1e3
    kinds: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        kinds[r["fn"]].append(r)
    gaps = [max(0.0, (b["begin"] - a["end"]) * 1e3) for a, b in zip(rows, rows[1:])]
    return {
        "window_s": window_ms / 1e3, "passes": len(rows),
        "busy_share": sum(r["ms"] for r in rows) / window_ms,
        "gap_ms_p50": statistics.median(gaps) if gaps else 0.0, "gap_ms_mean": statistics.fmean(gaps) if gaps else 0.0,
        "kinds": {fn: {"passes": len(rs), "calls_mean": statistics.fmean(r["calls"] for r in rs),
                       "drafted_mean": statistics.fmean(r["drafted"] for r in rs),
                       "ms_mean": statistics.fmean(r["ms"] for r in rs),
                       "ms_p50": statistics.median(r["ms"] for r in rs),
                       "waited_ms_p50": statistics.median(r["waited_ms"] for r in rs),
                       "share": sum(r["ms"] for r in rs) / window_ms}
                  for fn, rs in sorted(kinds.items())},
    }


def level_windows(folder: str) -> dict[str, tuple[float, float]]:
    """{level's report name: (start, end) epoch seconds} of the GuideLLM reports a load sweep saved in `folder`."""
    windows = {}
    for path in sorted(Path(folder).glob("*.json")):
        if path.name.endswith(".scenario.json"):
            continue
        report = json.loads(path.read_text())
        if isinstance(report, dict) and report.get("benchmarks"):  # the folder's other files are not reports
            windows[path.stem] = (report["benchmarks"][0]["start_time"], report["benchmarks"][0]["end_time"])
    return windows


def table(summaries: dict[str, dict]) -> str:
    """A markdown table: per level, the busy share and per kind of pass its count, mean calls and share."""
    lines = ["| level | busy | passes: calls a pass, ms a pass, share of the window |", "|---|---|---|"]
    for level, s in summaries.items():
        kinds = "; ".join(f"{fn.split('.')[-1]} {k['passes']}: {k['calls_mean']:.1f}, {k['ms_mean']:.0f} ms, "
                          f"{k['share']:.0%}" for fn, k in s["kinds"].items())
        lines.append(f"| {level} | {s['busy_share']:.0%} | {kinds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log")
    parser.add_argument("--since", type=float, default=None, help="epoch seconds")
    parser.add_argument("--until", type=float, default=None, help="epoch seconds")
    parser.add_argument("--levels", default=None, help="a load sweep's folder: summarise each level apart")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with (gzip.open if args.log.endswith(".gz") else open)(args.log, "rt") as f:
        passes = [json.loads(line) for line in f if line.strip()]
    if args.levels:
        summary = {level: summarise(passes, *window) for level, window in level_windows(args.levels).items()}
        print(table(summary))
    else:
        summary = summarise(passes, args.since, args.until)
        print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()

"""`adaptive` with and without a tier's first look (speckv.adaptive, `AdaptivePolicy._first_look`), eight requests
started together in-process, each run a fresh process (a fresh calibration: whether a burst starts drafting
hangs on its first steps' prices, which a calibration's noise moves), the two arms alternating.

    python scripts/first_look_ab.py --tier fp16 --rounds 6 \\
        --prompts docs/results/avx2/short_prompts.jsonl,docs/results/avx2/short_prompts_2.jsonl \\
        --max-tokens 96 --out docs/results/amx_1206/first_look

Writes each run's scripts/concurrent_bench.py output, `none` and `fixed:2` once for reference, and
summary.json: per arm the median tokens/s, the runs that drafted (mean γ above 0.2), and per round the ratio
of the first look's run to the other's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).with_name("concurrent_bench.py")
ARMS = {"look": "", "no_look": "import speckv.adaptive as a; a.FIRST_LOOK = 0; "}


def bench(out: Path, policies: str, patch: str, args: argparse.Namespace) -> dict:
    """One fresh process of concurrent_bench.py, `patch` run before it; its JSON."""
    argv = [str(BENCH), "--tier", args.tier, "--policies", policies, "--prompts", args.prompts,
            "--max-tokens", str(args.max_tokens), "--out", str(out)]
    code = f"import runpy, sys; {patch}sys.argv = {argv!r}; runpy.run_path({str(BENCH)!r}, run_name='__main__')"
    subprocess.run([sys.executable, "-c", code], check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="fp16")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", required=True, help="a directory")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = bench(out / "reference.json", "none,fixed:2", "", args)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for i in range(args.rounds):
        for arm, patch in (ARMS.items() if i % 2 == 0 else reversed(ARMS.items())):
            run = bench(out / f"{arm}_{i + 1}.json", "adaptive", patch, args)["runs"][0]
            runs[arm].append({"tokens_per_s": run["tokens_per_s"], "mean_gamma": run["mean_gamma"],
                              "all_in_flight_tokens_per_s": run["all_in_flight_tokens_per_s"]})
    summary = {
        "hardware": reference["hardware"], "tier": args.tier, "max_tokens": args.max_tokens,
        "reference": {r["policy"]: r["tokens_per_s"] for r in reference["runs"]},
        "arms": {arm: {"median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                       "runs_that_drafted": sum(r["mean_gamma"] > 0.2 for r in rs), "runs": rs}
                 for arm, rs in runs.items()},
        "look_over_no_look_by_round": [a["tokens_per_s"] / b["tokens_per_s"]
                                       for a, b in zip(runs["look"], runs["no_look"])],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "arms"}, indent=1))
    for arm, s in summary["arms"].items():
        print(f"{arm}: median {s['median_tokens_per_s']:.2f} tokens/s, drafted in {s['runs_that_drafted']} of "
              f"{len(s['runs'])} runs")


if __name__ == "__main__":
    main()

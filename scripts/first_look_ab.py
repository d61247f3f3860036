"""`adaptive` in two arms, eight requests started together in-process, each run a fresh process (a fresh
calibration: whether a burst starts drafting hangs on its first steps' prices, which a calibration's noise moves),
the two arms alternating. `--arms first-look`: with and without a tier's first look (speckv.adaptive,
`AdaptivePolicy._first_look`). `--arms loaded-read`: the drafting verdict under load (speckv.estimates.LoadedRates)
leaving out steps whose passes read prompts or catch-ups, against counting them as it did before.

    python scripts/first_look_ab.py --tier fp16 --rounds 6 \\
        --prompts docs/results/avx2/short_prompts.jsonl,docs/results/avx2/short_prompts_2.jsonl \\
        --max-tokens 96 --out docs/results/amx_1206/first_look
    python scripts/first_look_ab.py --arms loaded-read --tier int8 --rounds 4 \\
        --prompts docs/results/avx2/short_prompts.jsonl,docs/results/avx2/short_prompts_2.jsonl \\
        --max-tokens 48 --out docs/results/amx_1206/loaded_read

Writes each run's scripts/concurrent_bench.py output, `none` and `fixed:2` once for reference, and
summary.json: per arm the median tokens/s (whole run, and while all eight are in flight), the runs that drafted
(mean γ above 0.2), and per round the ratio of the first arm's run to the second's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).with_name("concurrent_bench.py")
ARM_SETS = {  # name -> {arm: code run before the bench}; the first arm is the one under test
    "first-look": {"look": "", "no_look": "import speckv.adaptive as a; a.FIRST_LOOK = 0; "},
    "loaded-read": {"skip_read": "", "count_read": "import speckv.estimates as e; o = e.LoadedRates.observe; "
                    "e.LoadedRates.observe = lambda self, *a, read=False: o(self, *a); "},
}


def bench(out: Path, policies: str, patch: str, args: argparse.Namespace) -> dict:
    """One fresh process of concurrent_bench.py, `patch` run before it; its JSON."""
    argv = [str(BENCH), "--tier", args.tier, "--policies", policies, "--prompts", args.prompts,
            "--max-tokens", str(args.max_tokens), "--out", str(out)]
    code = f"import runpy, sys; {patch}sys.argv = {argv!r}; runpy.run_path({str(BENCH)!r}, run_name='__main__')"
    subprocess.run([sys.executable, "-c", code], check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", choices=sorted(ARM_SETS), default="first-look")
    parser.add_argument("--tier", default="fp16")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", required=True, help="a directory")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = ARM_SETS[args.arms]
    first, second = arms
    reference = bench(out / "reference.json", "none,fixed:2", "", args)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for i in range(args.rounds):
        for arm, patch in (arms.items() if i % 2 == 0 else reversed(arms.items())):
            run = bench(out / f"{arm}_{i + 1}.json", "adaptive", patch, args)["runs"][0]
            runs[arm].append({"tokens_per_s": run["tokens_per_s"], "mean_gamma": run["mean_gamma"],
                              "all_in_flight_tokens_per_s": run["all_in_flight_tokens_per_s"]})
    summary = {
        "hardware": reference["hardware"], "tier": args.tier, "max_tokens": args.max_tokens, "arms_compared": args.arms,
        "reference": {r["policy"]: {"tokens_per_s": r["tokens_per_s"],
                                    "all_in_flight_tokens_per_s": r["all_in_flight_tokens_per_s"]}
                      for r in reference["runs"]},
        "arms": {arm: {"median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                       "median_all_in_flight_tokens_per_s": statistics.median(r["all_in_flight_tokens_per_s"]
                                                                              for r in rs),
                       "runs_that_drafted": sum(r["mean_gamma"] > 0.2 for r in rs), "runs": rs}
                 for arm, rs in runs.items()},
        f"{first}_over_{second}_by_round": [a["tokens_per_s"] / b["tokens_per_s"]
                                            for a, b in zip(runs[first], runs[second])],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "arms"}, indent=1))
    for arm, s in summary["arms"].items():
        print(f"{arm}: median {s['median_tokens_per_s']:.2f} tokens/s ({s['median_all_in_flight_tokens_per_s']:.2f} "
              f"with all in flight), drafted in {s['runs_that_drafted']} of {len(s['runs'])} runs")


if __name__ == "__main__":
    main()

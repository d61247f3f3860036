"""What a served sweep's policies did window by window, from the router's `GET /speckv/stats` polled during it.

    while true; do echo "{\"t\": $(date +%s), \"stats\": $(curl -s localhost:8000/speckv/stats)}" \\
        >> OUT/router_estimates.jsonl; sleep 20; done &
    python -m deployments.load_sweep ... --out OUT
    python scripts/stats_windows.py OUT/router_estimates.jsonl --tier fp16

The stats are cumulative per policy; each window is the difference between two polls: steps, tokens emitted,
drafted tokens, model ms per step (draft, verify) and the rest of each step (`hop`: hops and waits), tokens per
second of a request's step time, the verify passes' sizes, and the tier's drafting-under-load verdict
(speckv.estimates.LoadedRates) at the window's end. Prints one line per window and writes OUT/windows.json
beside the input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def windows(lines: list[dict], tier: str) -> list[dict]:
    """Per policy, the difference between consecutive polls where it ran steps."""
    previous: dict[str, dict] = {}
    out = []
    for poll in lines:
        stats = poll["stats"]
        for d in stats["data"]:
            if d["tier"] != tier:
                continue
            policy, before = d["policy"], previous.get(d["policy"])
            previous[policy] = d
            if before is None or d["steps"] <= before["steps"]:
                continue
            steps = d["steps"] - before["steps"]
            tokens = steps + d["accepted_tokens"] - before["accepted_tokens"]
            ms = {k: d["timing"][k] - before["timing"][k] for k in ("draft_ms", "verify_ms", "hop_ms")}
            passes = {k: v - before["batch_histogram"].get(k, 0) for k, v in d["batch_histogram"].items()
                      if v - before["batch_histogram"].get(k, 0)}
            load = stats.get("estimates", {}).get(tier, {}).get("load", {})
            out.append({"t": poll["t"], "policy": policy, "steps": steps, "tokens": tokens,
                        "drafted": d["draft_tokens"] - before["draft_tokens"],
                        **{f"{k}_per_step": v / steps for k, v in ms.items()},
                        "tokens_per_s_per_request": tokens / sum(ms.values()) * 1e3,
                        "verify_passes_by_size": passes, "drafting_under_load": load.get("drafting_under_load")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("polls", type=Path)
    parser.add_argument("--tier", default="fp16")
    args = parser.parse_args()
    lines = [json.loads(line) for line in args.polls.read_text().splitlines() if line.strip()]
    rows = windows(lines, args.tier)
    for r in rows:
        verdicts = {k: (round(v["drafting_efficiency"] or 0, 2), round(v["target_only_efficiency"] or 0, 2),
                        v["drafting_held"]) for k, v in (r["drafting_under_load"] or {}).items()}
        print(f"{r['t']} {r['policy']:>9} steps {r['steps']:4d} tokens {r['tokens']:4d} drafted {r['drafted']:4d} "
              f"draft {r['draft_ms_per_step']:6.0f} verify {r['verify_ms_per_step']:6.0f} "
              f"hop {r['hop_ms_per_step']:5.0f} ms/step, {r['tokens_per_s_per_request']:.2f} tokens/s a request, "
              f"passes {r['verify_passes_by_size']} verdict {verdicts}")
    (args.polls.parent / "windows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

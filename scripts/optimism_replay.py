"""What `adaptive`'s optimism costs or buys per setting: exact replay of collected traces (`speckv collect`) under
their measured costs, with OPTIMISM (speckv.adaptive) at each value given. A diagnostic for the next change to
the exploration rule, not a tuning loop: the shipped value stays what speckv/adaptive.py says.

Usage: python scripts/optimism_replay.py --collections results/settings_epyc17 --settings int8,fp16-fp32 \
           --optimism 2,1,0 --out docs/results/epyc17_bf16/settings/optimism_replay.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import speckv.adaptive as adaptive
from speckv.predictor import shipped_predictor
from speckv.tools.replay import traces_from_records
from speckv.tools.training import evaluate, load_collection


def replayed(setting: str, traces: dict, costs: dict, optimism: float) -> list[dict]:
    """Each tier's `none` and `adaptive` tokens/s over the traces with OPTIMISM set to `optimism` (restored after)."""
    shipped, adaptive.OPTIMISM = adaptive.OPTIMISM, optimism
    try:
        tiers = evaluate(shipped_predictor(), traces, costs)["tiers"]
    finally:
        adaptive.OPTIMISM = shipped
    rows = []
    for tier, t in tiers.items():
        geo = {n: p["tokens_per_s_geomean"] for n, p in t["policies"].items()}
        rows.append({"setting": setting, "tier": tier, "optimism": optimism, "none": geo["none"],
                     "adaptive": geo["adaptive"], "adaptive_over_none": geo["adaptive"] / geo["none"],
                     "adaptive_tokens_per_step": t["policies"]["adaptive"]["tokens_per_step"],
                     "oracle_over_none": geo["oracle"] / geo["none"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collections", type=Path, required=True, help="folder holding collect_<setting>/")
    ap.add_argument("--settings", required=True, help="comma-separated setting names (collect_<name>)")
    ap.add_argument("--optimism", default="2,1,0", help="comma-separated OPTIMISM values")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for setting in args.settings.split(","):
        records, costs = load_collection([args.collections / f"collect_{setting}"])
        traces = traces_from_records(records)
        for value in (float(x) for x in args.optimism.split(",")):
            for row in replayed(setting, traces, costs, value):
                rows.append(row)
                print(f"{setting:10s} optimism {value:3.1f}: adaptive {row['adaptive']:.2f} tokens/s, "
                      f"{row['adaptive_over_none']:.3f}x none ({row['none']:.2f}), "
                      f"{row['adaptive_tokens_per_step']:.2f} tokens a step; "
                      f"oracle {row['oracle_over_none']:.2f}x none")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shipped_optimism": adaptive.OPTIMISM, "rows": rows}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

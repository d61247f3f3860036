"""Requests decoding together in batched passes under a step-cost shape (speckv.tools.shapes.decode_together):
aggregate tokens/s and mean γ of `none`, fixed γ 1-4 and `adaptive` at several loads, per shape, a few seeds, as a
burst (every stream one request, all to the end: scripts/concurrent_bench.py's workload) and as a steady load
(every stream four requests in a row, measured until the first stream is done: a load tool's workload).

Why: whether `adaptive` drafts where the whole pass drafting pays and not where it does not, on shapes this
machine lacks (the AMX Xeon's calibrated fp16, a GPU-like one). The requests' prompts are read, their answers
are 32 tokens, each accepts 50-90% of the draft's tokens (drawn per request), and adaptive's prior knows nothing
of the text (0.7 a token). No model runs: every call takes what the shape says. About 1 min for 20 seeds.

Each cell is then summarised over its seeds: adaptive's mean tokens/s over that of the policy with the best mean
(`summary`). The best of five policies picked per seed is biased upward (a fixed γ that a seed's draws favoured),
so the per-seed ratios alone understate adaptive where the fixed γs are close.

    python scripts/decode_together.py --out docs/results/decode_together.json
    python scripts/decode_together.py --shapes h200-fp16,h200-nf4 \
        --measured h200-fp16=docs/results/gpu/h200_batched/arch_fp16.json \
        --measured h200-nf4=docs/results/gpu/h200_batched/arch_nf4.json \
        --out docs/results/gpu/h200_batched/decode_together_h200.json

`--measured NAME=PATH` adds a shape read from a calibrated cost model (`cost_model` of speckv.tools.arch_costs'
output, or a CostModel's dict); `--shapes` picks which shapes run (default: the built-in ones).
`--free-catch-up` makes the draft's reading of what it lacks free in every shape (draft_prefill_ms_per_token 0):
to see how much of a cell the catch-ups decide. `--unseen-ms X`: every drafting pass also costs X ms of waiting
that no call's time shows (decode_together's `unseen_ms`). Every cell also runs `adaptive-unjudged`, adaptive with
drafting never held under load (speckv.estimates.LoadedRates), and reports adaptive over it:

    python scripts/decode_together.py --loads 4,8 --seeds 8 --out docs/results/decode_together_judged.json
    python scripts/decode_together.py --loads 4,8 --seeds 8 --unseen-ms 150 \
        --out docs/results/decode_together_unseen150.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
from pathlib import Path

from speckv.adaptive import AdaptivePolicy
from speckv.cost_model import CostModel
from speckv.estimates import LoadedRates, TierEstimates
from speckv.predictor import shipped_predictor
from speckv.tools.replay import fixed
from speckv.tools.shapes import AMX_FP16_BATCHED, GPU_BATCHED, decode_together, token_acceptance_predictor

SHAPES = {"amx-fp16": AMX_FP16_BATCHED, "gpu-like": GPU_BATCHED}


class Unjudged(LoadedRates):
    """Drafting under load never held: the ablation of `adaptive-unjudged`."""

    def holds(self, everyone: int) -> bool:
        return False


def unjudged(estimates: TierEstimates) -> TierEstimates:
    """The tier's estimates with drafting under load never held (idempotent: its requests share them)."""
    if not isinstance(estimates.loaded, Unjudged):
        estimates.loaded = Unjudged()
    return estimates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default="1,4,8,16")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--measured", action="append", default=[], metavar="NAME=PATH",
                        help="a shape from a measured cost model (JSON with `cost_model`, or the model's dict)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shape names to run")
    parser.add_argument("--free-catch-up", action="store_true", help="the draft's catch-up costs nothing")
    parser.add_argument("--unseen-ms", type=float, default=0.0,
                        help="wall ms every drafting pass costs beyond what the calls report")
    args = parser.parse_args()
    shapes = dict(SHAPES)
    for item in args.measured:
        name, _, path = item.partition("=")
        if not name or not path:
            parser.error(f"--measured wants NAME=PATH, got {item!r}")
        doc = json.loads(Path(path).read_text())
        shapes[name] = CostModel.from_dict(doc.get("cost_model", doc))
    unknown = set(args.shapes.split(",")) - set(shapes)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; known: {sorted(shapes)}")
    shapes = {name: shapes[name] for name in args.shapes.split(",")}
    if args.free_catch_up:
        shapes = {name: dataclasses.replace(shape, draft_prefill_ms_per_token=0.0) for name, shape in shapes.items()}
    predictor = token_acceptance_predictor(shipped_predictor(), 0.7)
    policies = {"none": lambda e: fixed(0), **{f"fixed:{g}": (lambda e, g=g: fixed(g)) for g in range(1, 5)},
                "adaptive": lambda e: AdaptivePolicy(predictor, "fp16", e),
                "adaptive-unjudged": lambda e: AdaptivePolicy(predictor, "fp16", unjudged(e))}
    rows = []
    workloads = {"burst": {"unseen_ms": args.unseen_ms},
                 "steady": {"requests": 4, "steady": True, "unseen_ms": args.unseen_ms}}
    for (shape_name, shape), (workload, kwargs) in ((s, w) for s in shapes.items() for w in workloads.items()):
        for load in (int(x) for x in args.loads.split(",")):
            for seed in range(args.seeds):
                acceptance = [random.Random(10 * seed + i).uniform(0.5, 0.9) for i in range(load)]
                runs = {name: decode_together(make, shape, acceptance, seed, **kwargs)
                        for name, make in policies.items()}
                best = max((n for n in runs if not n.startswith("adaptive")), key=lambda n: runs[n][0])
                row = {"shape": shape_name, "workload": workload, "load": load, "seed": seed, "best": best,
                       "adaptive_over_none": runs["adaptive"][0] / runs["none"][0],
                       "adaptive_over_best": runs["adaptive"][0] / runs[best][0],
                       "policies": {n: {"tokens_per_s": t, "mean_gamma": g} for n, (t, g) in runs.items()}}
                rows.append(row)
                cells = "  ".join(f"{n} {t:.1f}" for n, (t, _) in runs.items())
                print(f"{shape_name:<9} {workload:<6} load {load:>2} seed {seed}  {cells}  adaptive γ "
                      f"{runs['adaptive'][1]:.2f}  / none {row['adaptive_over_none']:.2f}  / best ({best}) "
                      f"{row['adaptive_over_best']:.2f}")
    cells = summary(rows)
    for c in cells:
        print(f"{c['shape']:<9} {c['workload']:<6} load {c['load']:>2}  best by mean {c['best']:<8} "
              f"adaptive over it {c['adaptive_over_best']:.3f}  over none {c['adaptive_over_none']:.3f}  "
              f"adaptive γ {c['mean_gamma']:.2f}  over unjudged {c['adaptive_over_unjudged']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seeds": args.seeds, "free_catch_up": args.free_catch_up, "unseen_ms": args.unseen_ms,
                       "cells": cells, "rows": rows}, f, indent=1)


def summary(rows: list[dict]) -> list[dict]:
    """Per (shape, workload, load): every policy's mean tokens/s over the seeds, and adaptive's over the best
    of the others by that mean, over `none` and over `adaptive-unjudged` (where run)."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["shape"], row["workload"], row["load"]), []).append(row)
    out = []
    for (shape, workload, load), group in cells.items():
        means = {n: statistics.mean(r["policies"][n]["tokens_per_s"] for r in group) for n in group[0]["policies"]}
        best = max((n for n in means if not n.startswith("adaptive")), key=means.get)
        out.append({"shape": shape, "workload": workload, "load": load, "seeds": len(group), "best": best,
                    "tokens_per_s": means, "adaptive_over_best": means["adaptive"] / means[best],
                    "adaptive_over_none": means["adaptive"] / means["none"],
                    "adaptive_over_unjudged": means["adaptive"] / means.get("adaptive-unjudged", means["adaptive"]),
                    "mean_gamma": statistics.mean(r["policies"]["adaptive"]["mean_gamma"] for r in group)})
    return out


if __name__ == "__main__":
    main()

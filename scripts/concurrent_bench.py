"""Concurrent requests through the in-process batched engine (no Ray, no load tool): how each policy does
when N requests share draft and verify passes, with every step's record kept.

All N requests start together; their prompts are prefilled together, then they decode in shared passes
(speckv.batching, with regrouping as a shared-cores replica has it). Reported per policy: aggregate
tokens/s over the whole run, over decoding only (from the first step of the last request to start
decoding), and while all N are in flight (from then until the first request ends: what a steady load, a new
request replacing each that ends, sees; without it a policy whose requests end at different times is charged
for the stragglers' passes of one or two sequences at the end), mean γ, sequences per verify pass, and each
request's output (greedy streams are compared with `none`'s: batched numerics in bf16/nf4 may differ slightly).

    python scripts/concurrent_bench.py --tier nf4 --policies none,fixed:2,adaptive \\
        --prompts docs/results/avx2/short_prompts.jsonl,docs/results/avx2/short_prompts_2.jsonl \\
        --max-tokens 32 --out docs/results/avx2/concurrent_nf4.json

`--dtype`/`--draft-dtype` load the pair as `speckv.local.LocalEngine.load` does (the int8 tier's activations in
float32 against bfloat16, the draft in bf16 both times: `--dtype float32 --draft-dtype auto` then `--dtype auto`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import statistics
import time
from pathlib import Path

from speckv.batching import BatchSettings
from speckv.calibration import hardware_id
from speckv.estimates import TierEstimates
from speckv.local import LocalEngine
from speckv.text import encode_prompt
from speckv.tools.bench import load_prompts


def run_policy(engine: LocalEngine, prompts: list[list[int]], policy: str, max_tokens: int) -> dict:
    requests = [engine.request(p, max_tokens) for p in prompts]
    start = time.perf_counter()
    results = asyncio.run(engine.generate_many(requests, policy))
    seconds = time.perf_counter() - start
    records = [r for result in results for r in result.records]
    tokens = sum(result.new_tokens for result in results)
    decode_start = max(result.time_to_first_token_s for result in results)  # all prefilled by then
    decode_tokens = sum(sum(r.emitted for r in result.records[1:]) for result in results)
    window_s, window_tokens = all_in_flight(results)
    return {"policy": policy, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "decode_seconds": seconds - decode_start, "decode_tokens_per_s": decode_tokens / (seconds - decode_start),
            "all_in_flight_seconds": window_s, "all_in_flight_tokens_per_s": window_tokens / window_s if window_s > 0
            else None,
            "mean_gamma": statistics.mean(r.gamma for r in records),
            "sequences_per_pass": statistics.mean(r.batch_size for r in records),
            "steps": len(records), "token_ids": [result.token_ids for result in results],
            "gammas": [[r.gamma for r in result.records] for result in results],
            "records": [[{k: v for k, v in r.to_dict().items() if k not in ("chosen_prob", "confidence", "entropy")}
                         for r in result.records] for result in results]}


def all_in_flight(results: list) -> tuple[float, int]:
    """(seconds, tokens emitted) from the end of the last request's first step to the end of the first request:
    the stretch in which all of them decode. A step ends where its request's steps' wall times (draft and verify
    calls, waits included) add up to, from the common start; the microseconds of policy between calls are left
    out."""
    ends = [list(itertools.accumulate((r.draft_ms or 0.0) + (r.verify_ms or 0.0) for r in result.records))
            for result in results]
    start, stop = max(e[0] for e in ends), min(e[-1] for e in ends)
    tokens = sum(r.emitted for result, e in zip(results, ends) for r, t in zip(result.records, e) if start < t <= stop)
    return max(stop - start, 0.0) / 1e3, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="nf4")
    parser.add_argument("--policies", default="none,fixed:2,adaptive")
    parser.add_argument("--prompts", required=True, help="Spec-Bench JSONL file(s), comma-separated")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="the target's compute dtype (LocalEngine.load)")
    parser.add_argument("--draft-dtype", default=None, help="the draft's (default: LocalEngine.load's rule)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    prompts = [p for path in args.prompts.split(",") for p in load_prompts(Path(path))]
    engine = LocalEngine.load(tier=args.tier, dtype=args.dtype, draft_dtype=args.draft_dtype)
    estimates = engine.calibrate()
    single_ms = float(estimates.cost.base.verify_ms(0))
    engine = dataclasses.replace(engine, batching=BatchSettings(max(len(prompts), 1), 0.0, 0.0, single_ms / 1e3))
    encoded = [encode_prompt(engine.tokenizer, p.text, chat=True) for p in prompts]
    engine.generate(encoded[0], "fixed:2", 4)  # warm-up
    runs = []
    for policy in args.policies.split(","):
        engine.estimates = TierEstimates.calibrated(estimates.cost.base)  # each policy starts from the calibration
        run = run_policy(engine, encoded, policy, args.max_tokens)
        runs.append(run)
        steady = run["all_in_flight_tokens_per_s"]
        print(f"{policy}: {run['tokens_per_s']:.2f} tokens/s ({run['decode_tokens_per_s']:.2f} decoding, "
              f"{steady if steady is None else round(steady, 2)} with all in flight), "
              f"mean γ {run['mean_gamma']:.2f}, {run['sequences_per_pass']:.2f} sequences a pass, "
              f"{run['seconds']:.0f} s", flush=True)
    base = next((r for r in runs if r["policy"] == "none"), None)
    if base:
        for run in runs:
            run["streams_differing_from_none"] = sum(a != b for a, b in zip(run["token_ids"], base["token_ids"]))
    with open(args.out, "w") as f:
        json.dump({"tier": args.tier, "dtype": args.dtype, "draft_dtype": args.draft_dtype,
                   "target_dtype": str(engine.target_model.dtype),
                   "hardware": hardware_id(engine.target_worker.lm.device),
                   "requests": len(encoded), "max_tokens": args.max_tokens, "runs": runs}, f, indent=1)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

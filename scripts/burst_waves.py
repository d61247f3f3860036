"""Waves of concurrent streams against a running server, the policy alternating wave by wave: per wave, the
streams' time to first token and decode inter-token latency (medians), and the tokens each policy drafted.

Why: at 16 streams the requests of a level run in lockstep (one observation per level), and this machine's
pass time drifts between levels by more than what separates `adaptive` from `none` where both do the same work.
Alternating short waves on one server puts the drift on both policies. It also shows a burst's first steps:
every stream of a wave starts at once, and a stream whose first token comes a pass later than the others'
missed the wave's prefill pass.

    serve run docs/results/milan/serve_int8_b16.yaml &
    python scripts/burst_waves.py --tier int8 --policies adaptive,none,adaptive,none,adaptive,none \
        --tokens 10 --out docs/results/milan/int8_c16_alternating_waves.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

WORDS = "alpha beta gamma delta river stone cloud table window garden paper light music north".split()


async def stream(client: httpx.AsyncClient, url: str, tier: str, i: int, policy: str, tokens: int,
                 t0: float) -> dict:
    """One greedy streamed completion of `tokens` tokens: when its chunks came (s after t0) and its
    `speculation` object."""
    r = random.Random(i)
    body = {"model": f"speckv-{tier}", "prompt": " ".join(r.choice(WORDS) for _ in range(60)), "max_tokens": tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "speculation": {"policy": policy}}
    times, speculation = [], {}
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=900) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                times.append(time.perf_counter() - t0)
                speculation = chunk.get("speculation", speculation)
    return {"ttft": times[0], "end": times[-1], "speculation": speculation}


async def waves(args: argparse.Namespace) -> list[dict]:
    rows = []
    async with httpx.AsyncClient() as client:
        for policy in args.policies.split(","):
            t0 = time.perf_counter()
            streams = await asyncio.gather(*(stream(client, args.url, args.tier, i, policy, args.tokens, t0)
                                             for i in range(args.streams)))
            drafted = sum(int(g) * n for s in streams
                          for g, n in s["speculation"].get("gamma_histogram", {}).items())
            rows.append({"policy": policy, "ttft_s": statistics.median(s["ttft"] for s in streams),
                         "itl_ms": 1e3 * statistics.median((s["end"] - s["ttft"]) / (args.tokens - 1) for s in streams),
                         "drafted": drafted})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--tier", default="int8")
    p.add_argument("--policies", default="adaptive,none,adaptive,none,adaptive,none", help="one wave each, in turn")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.tokens < 2 or args.streams < 1:
        p.error("--tokens must be at least 2 and --streams at least 1")
    try:
        rows = asyncio.run(waves(args))
    except httpx.HTTPError as e:
        p.exit(1, f"burst_waves: no answer from {args.url} ({type(e).__name__}: {e}); is the server running?\n")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

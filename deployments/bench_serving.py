"""Measure the served path: served vs in-process engine, disaggregated vs colocated, concurrency sweep.

    python -m deployments.bench_serving --prompts ../shared/datasets/spec_bench_dev.jsonl \
        --categories qa,math_reasoning --max-tokens 24 --concurrency 1,4,8 --out results/serving.json

Starts Ray in this process, deploys the app once per topology (fp16 tier only), sends greedy streaming
requests over HTTP on loopback, and prints and saves: tokens/s, time to first token, inter-token gaps
(p50/p99), hop milliseconds per step and γ-decision overhead (from the response's `speculation.timing`),
the same prompts through the in-process engine, and the resident memory of all Ray processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from speckv.tools.bench import load_prompts

PORT = 8124


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


async def stream_one(client: httpx.AsyncClient, prompt: str, max_tokens: int, policy: dict) -> dict:
    body = {"model": "speckv-fp16", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "speculation": policy}
    start = time.perf_counter()
    arrivals: list[float] = []
    text, final = [], None
    async with client.stream("POST", f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            choice = event["choices"][0]
            content = choice["delta"].get("content")
            if content:
                arrivals.append(time.perf_counter() - start)
                text.append(content)
            if choice["finish_reason"]:
                final = event
    seconds = time.perf_counter() - start
    spec = final["speculation"]
    return {"seconds": seconds, "ttft_s": arrivals[0] if arrivals else seconds, "text": "".join(text),
            "gaps_s": [b - a for a, b in zip(arrivals, arrivals[1:])], "speculation": spec}


async def run_level(prompts: list[str], concurrency: int, max_tokens: int, policy: dict, tokenizer) -> dict:
    async with httpx.AsyncClient(timeout=1800) as client:
        queue = list(prompts)
        results: list[dict] = []
        start = time.perf_counter()

        async def worker() -> None:
            while queue:
                prompt = queue.pop(0)
                results.append(await stream_one(client, prompt, max_tokens, policy))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(len(tokenizer.encode(r["text"], add_special_tokens=False)) for r in results)
    gaps = [g for r in results for g in r["gaps_s"]]
    steps = sum(r["speculation"]["steps"] for r in results)
    timing = {k: sum(r["speculation"]["timing"][k] for r in results)
              for k in ("draft_ms", "verify_ms", "hop_ms", "policy_us")}
    step_ms = (timing["draft_ms"] + timing["verify_ms"]) / steps if steps else float("nan")
    return {
        "concurrency": concurrency, "requests": len(results), "wall_s": wall, "tokens": tokens,
        "tokens_per_s": tokens / wall, "ttft_p50_s": percentile([r["ttft_s"] for r in results], 50),
        "ttft_p99_s": percentile([r["ttft_s"] for r in results], 99),
        "inter_token_p50_ms": percentile(gaps, 50) * 1e3, "inter_token_p99_ms": percentile(gaps, 99) * 1e3,
        "steps": steps, "step_ms_mean": step_ms, "hop_ms_per_step": timing["hop_ms"] / steps if steps else None,
        "hop_share_of_step": timing["hop_ms"] / (timing["draft_ms"] + timing["verify_ms"]) if steps else None,
        "decision_us_per_step": timing["policy_us"] / steps if steps else None,
        "texts": [r["text"] for r in results],
    }


def controller_hop_ms(n: int = 50) -> dict:
    """What a per-step γ decision through the controller deployment would cost (the design not taken)."""
    from ray import serve

    from speckv.cost_model import CostModel
    from speckv.policy import StepContext
    from speckv.signals import SignalSummary

    handle = serve.get_deployment_handle("controller", "speckv")
    ctx = StepContext(step=3, position=10, context_len=60, prev_gamma=2, prev_accepted=1,
                      prev_signals=SignalSummary(), prev_last_confidence=0.8, drafted_total=6, accepted_total=4)
    cost = CostModel(80.0, 250.0, 40.0)
    handle.choose.remote("fp16", ctx, cost).result()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        handle.choose.remote("fp16", ctx, cost).result()
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50": percentile(times, 50), "p99": percentile(times, 99)}


def ray_rss_bytes() -> int:
    """Resident memory of this process and every Ray process on the machine."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if proc.pid == os.getpid() or "ray" in cmd:
            try:
                total += proc.info["memory_info"].rss
            except (TypeError, AttributeError):
                pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--categories", default="qa,math_reasoning")
    parser.add_argument("--limit-per-category", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--policy", default="fixed:2", help="fixed:N, none or adaptive")
    parser.add_argument("--topologies", default="disaggregated,colocated")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=Path("results/serving.json"))
    args = parser.parse_args()

    prompts = [p.text for p in load_prompts(args.prompts, args.limit_per_category, args.categories.split(","))]
    doc: dict = {"config": vars(args) | {"prompts": str(args.prompts), "out": str(args.out)}}
    local, tokenizer = in_process(prompts, args.policy, args.max_tokens, args.dtype)
    doc["in_process"] = local
    doc["topologies"] = served(prompts, args, tokenizer)
    single = doc["topologies"].get("disaggregated", {}).get("levels", [{}])[0]
    if single and local:
        doc["served_over_in_process_tokens_per_s"] = single["tokens_per_s"] / statistics.mean(
            r["tokens_per_s"] for r in local)
        doc["served_texts_equal_in_process"] = single["texts"][: len(local)] == [r["text"] for r in local]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"written {args.out}")


def in_process(prompts: list[str], policy: str, max_tokens: int, dtype: str) -> tuple[list[dict], object]:
    """Each prompt through the in-process engine (the reference the served rows are compared with); and the
    tokenizer."""
    from speckv.local import LocalEngine
    from speckv.text import encode_prompt

    engine = LocalEngine.load(dtype=dtype)
    engine.generate(encode_prompt(engine.tokenizer, prompts[0], True), policy, 2)
    rows = []
    for prompt in prompts:
        r = engine.generate(encode_prompt(engine.tokenizer, prompt, True), policy, max_tokens)
        rows.append({"text": r.text, "tokens_per_s": r.tokens_per_s, "seconds": r.seconds,
                     "step_ms_mean": sum(x.draft_ms + x.verify_ms for x in r.records) / r.stats.steps,
                     "decision_us_p50": statistics.median(x.policy_us for x in r.records),
                     "decision_us_p99": percentile([x.policy_us for x in r.records], 99)})
        print(f"in-process: {r.tokens_per_s:.2f} tok/s", flush=True)
    return rows, engine.tokenizer


def served(prompts: list[str], args: argparse.Namespace, tokenizer) -> dict:
    """Each topology served by a fresh local Ray: every concurrency level's throughput, latency and hops."""
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from .app import build_app

    policy = ({"policy": "fixed", "gamma": int(args.policy.split(":")[1])} if args.policy.startswith("fixed:")
              else {"policy": args.policy})
    out = {}
    # logical CPUs: four single-CPU deployments must fit on a 2-core machine
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="raysb", dir="/tmp"))
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        for topology in args.topologies.split(","):
            config = {"tiers": ["fp16"], "dtype": args.dtype, "topology": topology, "torch_threads": 2,
                      "deployment_options": {"target-fp16": {"max_ongoing_requests": 16}}}
            serve.run(build_app(config), name="speckv", route_prefix="/")
            asyncio.run(run_level(prompts[:1], 1, 2, policy, tokenizer))  # warm-up
            result = {"rss_bytes_all_ray_processes": ray_rss_bytes(), "levels": [],
                      "controller_choose_hop_ms": controller_hop_ms()}
            for level in [int(c) for c in args.concurrency.split(",")]:
                reqs = (prompts * level)[: max(level, len(prompts))]
                row = asyncio.run(run_level(reqs, level, args.max_tokens, policy, tokenizer))
                result["levels"].append(row)
                print(f"{topology} c={level}: {row['tokens_per_s']:.2f} tok/s, ttft p50 {row['ttft_p50_s']:.2f}s, "
                      f"itl p50/p99 {row['inter_token_p50_ms']:.0f}/{row['inter_token_p99_ms']:.0f} ms, "
                      f"hop {row['hop_ms_per_step']:.1f} ms/step ({row['hop_share_of_step']:.1%} of step)", flush=True)
            out[topology] = result
            serve.delete("speckv")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


if __name__ == "__main__":
    main()

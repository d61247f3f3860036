"""Where an in-process verify pass runs: on the event loop's thread (as speckv.local does) or in a worker thread
(as it did before), the same requests in one process, interleaved, paired by prompt and round.

Found while comparing live steps with transformers' assisted generation at nf4 on an AVX2-only EPYC: every
pass of ours was slower than the same-sized pass of transformers' loop, which runs in one thread.

    python scripts/verify_thread_ab.py --tier nf4 --policy fixed:6 --rounds 2 \\
        --prompts docs/results/avx2/short_prompts.jsonl --out docs/results/avx2/verify_thread_ab.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from speckv.calibration import hardware_id
from speckv.engine import SplitExecutor, run_to_completion
from speckv.local import LocalEngine
from speckv.text import encode_prompt
from speckv.tools.bench import load_prompts
from speckv.tools.stats import paired_speedup


def threaded_executor(engine: LocalEngine) -> SplitExecutor:
    """The in-process executor as it was: the verify pass in a worker thread (asyncio.to_thread)."""
    draft, target = engine.draft_worker, engine.target_worker

    async def propose(inputs):
        return draft.propose(inputs)

    async def verify(inputs, drafted):
        return await asyncio.to_thread(target.verify, inputs, drafted)

    async def close(session_id):
        draft.lm.close(session_id)
        target.lm.close(session_id)

    return SplitExecutor(propose, verify, close)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="nf4")
    parser.add_argument("--policy", default="fixed:6")
    parser.add_argument("--prompts", type=Path, default=Path("docs/results/avx2/short_prompts.jsonl"))
    parser.add_argument("--limit", type=int, default=3, help="prompts used (the first N)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    engine = LocalEngine.load(tier=args.tier)
    executors = {"loop thread": engine.executor, "worker thread": threaded_executor(engine)}
    prompts = load_prompts(args.prompts)[:args.limit]
    encoded = [encode_prompt(engine.tokenizer, p.text, chat=True) for p in prompts]
    engine.generate(encoded[0], "fixed:2", 4)  # warm-up
    runs: list[dict] = []
    for r in range(args.rounds):
        for prompt, ids in zip(prompts, encoded):
            order = list(executors) if r % 2 == 0 else list(reversed(executors))
            for name in order:
                request = engine.request(ids, args.max_tokens)
                start = time.perf_counter()
                result = asyncio.run(run_to_completion(request, executors[name], engine.policy(args.policy),
                                                       engine.tokenizer))
                seconds = time.perf_counter() - start
                steps = result.records[1:]  # the first step carries the prompt's prefill
                runs.append({"round": r, "question_id": prompt.question_id, "where": name, "seconds": seconds,
                             "steps": len(result.records),
                             "draft_ms_per_token": sum(s.draft_ms for s in steps) / max(1, sum(s.gamma for s in steps)),
                             "verify_ms_per_step": statistics.mean(s.verify_ms for s in steps) if steps else 0.0})
                print(json.dumps(runs[-1]), flush=True)
    times = {name: [x["seconds"] for x in runs if x["where"] == name] for name in executors}
    comparison = paired_speedup("loop thread", [1 / s for s in times["loop thread"]],
                                "worker thread", [1 / s for s in times["worker thread"]]).to_dict()
    doc = {"tier": args.tier, "policy": args.policy, "hardware": hardware_id(engine.target_worker.lm.device),
           "runs": runs, "loop_vs_worker_speed": comparison,
           "median_time_ratio_worker_over_loop": statistics.median(
               w / o for w, o in zip(times["worker thread"], times["loop thread"]))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"worker/loop time ratio, median of {len(times['loop thread'])} pairs: "
          f"{doc['median_time_ratio_worker_over_loop']:.3f}; loop vs worker speed {comparison}")


if __name__ == "__main__":
    main()

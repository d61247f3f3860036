"""What a new prompt costs read in a pass of its own against riding in the running requests' verify pass, and
what a verify pass of equal against different context lengths costs (speckv.workers.DEFAULT_PREFILL_CHUNK).

    python scripts/prompt_riding.py --tier fp16 --out docs/results/epyc17_bf16/prompt_riding.json
    python scripts/prompt_riding.py --tier fp16 --context 1000 --prompt 256 --out .../prompt_riding_long.json

In-process, the target of the tier, synthetic token ids: eight sessions at `--context` + 0-21 cached tokens
verifying two tokens each (a verify pass), a `--prompt`-token prompt read alone, and both in one (packed) pass,
alternated `--repeats` times; then eight sessions at one context length against eight of different lengths
around it, one token each, alternated. Prints and saves the medians (ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from speckv.calibration import hardware_id
from speckv.models import DEFAULT_TARGET, load_model
from speckv.workers import LogitsCall, SessionLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="fp16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--context", type=int, default=80, help="the running sessions' shortest context")
    parser.add_argument("--prompt", type=int, default=65, help="the new prompt's tokens")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lm = SessionLM(load_model(DEFAULT_TARGET, args.tier))
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(100, 20000, (n,), generator=g).tolist()

    def timed(calls: list[LogitsCall]) -> float:
        start = time.perf_counter()
        lm.logits_batch(calls)
        return (time.perf_counter() - start) * 1e3

    def step(contexts: dict[str, list[int]], fed: int) -> list[LogitsCall]:
        """Each session's next step: one accepted token, then `fed` tokens to score."""
        calls = []
        for session in contexts:
            contexts[session] = contexts[session] + rand(1)
            calls.append(LogitsCall(session, contexts[session] + rand(fed - 1), fed))
        return calls

    running = {f"r{i}": rand(args.context + 3 * i) for i in range(8)}
    for session, ids in running.items():
        lm.logits(session, ids, 1)
    ms: dict[str, list[float]] = {"verify_8": [], "prompt_alone": [], "verify_8_with_prompt": []}
    for r in range(args.repeats):
        ms["verify_8"].append(timed(step(running, 2)))
        ms["prompt_alone"].append(timed([LogitsCall(f"alone{r}", rand(args.prompt), 1)]))
        ms["verify_8_with_prompt"].append(timed(step(running, 2) + [LogitsCall(f"riding{r}", rand(args.prompt), 1)]))
    equal = {f"e{i}": rand(args.context + 20) for i in range(8)}
    ragged = {f"g{i}": rand(args.context + 6 + 4 * i) for i in range(8)}
    for contexts in (equal, ragged):
        for session, ids in contexts.items():
            lm.logits(session, ids, 1)
    ms["equal_contexts_8"], ms["ragged_contexts_8"] = [], []
    for _ in range(args.repeats):
        ms["equal_contexts_8"].append(timed(step(equal, 1)))
        ms["ragged_contexts_8"].append(timed(step(ragged, 1)))
    out = {"tier": args.tier, "context": args.context, "prompt": args.prompt, "hardware": hardware_id(lm.device),
           "threads": torch.get_num_threads(),
           "median_ms": {k: statistics.median(v) for k, v in ms.items()}, "ms": ms}
    for name, value in out["median_ms"].items():
        print(f"{name}: {value:.0f} ms", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

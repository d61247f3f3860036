"""Reading several prompts at once, as a replica does (chunk passes of SessionLM.prefill_step for what is longer
than a chunk, the rest in one shared pass), for the draft and the target of a tier: the passes it takes and
their time, median of `--repeats`. Run it on two commits to compare a change to the prefill path (the machine
drifts: alternate them).

    python scripts/prefill_batch.py --tier nf4 --prompts docs/results/milan/prompts8.jsonl \\
        --out docs/results/milan/prefill_no_logits_after.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from speckv.calibration import hardware_id
from speckv.local import LocalEngine
from speckv.text import encode_prompt
from speckv.tools.bench import load_prompts
from speckv.workers import LogitsCall, SessionLM


def read_together(lm: SessionLM, prompts: list[list[int]], tag: str) -> tuple[float, int]:
    """Ms and passes to read `prompts` (all but their last token, as a first step leaves it) into new sessions."""
    items = [(f"{tag}-{k}", ids[:-1]) for k, ids in enumerate(prompts)]
    for session, ids in items:
        lm.admit(session, ids)
    start, passes = time.perf_counter(), 1
    while lm.prefill_step(items):  # the sessions it fed: none once every prompt lacks at most a chunk
        passes += 1
    lm.logits_batch([LogitsCall(session, ids, 1) for session, ids in items])  # the rest, as a first shared pass
    ms = (time.perf_counter() - start) * 1e3
    for session, _ in items:
        lm.close(session)
    return ms, passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="nf4")
    parser.add_argument("--prompts", required=True, help="Spec-Bench JSONL file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    engine = LocalEngine.load(tier=args.tier)  # calibrated at load where prompts' dtype is chosen
    prompts = [encode_prompt(engine.tokenizer, p.text, chat=True) for p in load_prompts(Path(args.prompts))]
    out = {"tier": args.tier, "hardware": hardware_id(engine.target_worker.lm.device),
           "prompt_tokens": [len(p) for p in prompts]}
    for role, lm in (("draft", engine.draft_worker.lm), ("target", engine.target_worker.lm)):
        runs = [read_together(lm, prompts, f"{role}{r}") for r in range(args.repeats)]
        ms = statistics.median(m for m, _ in runs)
        out[role] = {"ms": [m for m, _ in runs], "median_ms": ms, "passes": runs[0][1],
                     "ms_per_token": ms / sum(len(p) - 1 for p in prompts)}
        print(f"{role}: {sum(len(p) - 1 for p in prompts)} tokens in {runs[0][1]} passes, median {ms:.0f} ms "
              f"({out[role]['ms_per_token']:.1f} ms a token)", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

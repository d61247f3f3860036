"""Where a target pass's time goes, op by op: torch.profiler over the live loop's batched call (SessionLM.logits_batch)
for passes of S sequences x T tokens after each sequence's own context, for each S given. Prints the ops that took
most time and saves, per pass shape, every op's self time per pass.

    python scripts/pass_profile.py --tier int8 --sequences 1,8 --out pass_profile_int8.json
    python scripts/pass_profile.py --tier int8 --dtype float32 --sequences 1,8 --out pass_profile_int8_f32.json

What grows from one sequence to eight is what a batched pass pays per row (the ratio that caps `none`'s
aggregate throughput under load); what does not grow is the pass's fixed cost.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from speckv.calibration import hardware_id, own_contexts
from speckv.models import DEFAULT_TARGET, load_model
from speckv.workers import LogitsCall, SessionLM


def profile_passes(lm: SessionLM, tokens: int, sessions: list[tuple[str, list[int]]], passes: int) -> dict:
    """Self CPU ms per pass of every op, over `passes` profiled passes of `sessions` (`own_contexts`) after two
    unprofiled ones."""
    calls = [LogitsCall(session, context + [5] * tokens, tokens) for session, context in sessions]
    for _ in range(2):
        lm.logits_batch(calls)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            lm.logits_batch(calls)
    ops = {e.key: {"self_ms": e.self_cpu_time_total / 1e3 / passes, "calls": e.count / passes}
           for e in prof.key_averages()}
    total = sum(op["self_ms"] for op in ops.values())
    return {"sequences": len(sessions), "tokens": tokens, "pass_ms": total,
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["self_ms"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="int8")
    parser.add_argument("--model", default=DEFAULT_TARGET)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--sequences", default="1,8", help="comma-separated sequence counts")
    parser.add_argument("--tokens", type=int, default=1, help="tokens fed and scored a sequence")
    parser.add_argument("--context", type=int, default=64, help="each sequence's context tokens (N to N+S-1)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.tier, args.dtype, None)
    lm = SessionLM(model)
    counts = [int(n) for n in args.sequences.split(",")]
    sessions = own_contexts(lm, max(counts), args.context)
    shapes = [profile_passes(lm, args.tokens, sessions[:n], args.passes) for n in counts]
    for shape in shapes:
        print(f"{shape['sequences']} x {shape['tokens']}: {shape['pass_ms']:.0f} ms of op self time a pass")
        for name, op in list(shape["ops"].items())[:args.top]:
            print(f"  {op['self_ms']:7.1f} ms  {op['calls']:6.0f} calls  {name}")
    with open(args.out, "w") as f:
        json.dump({"tier": args.tier, "model": args.model, "dtype": str(model.dtype),
                   "hardware": hardware_id(lm.device), "torch": torch.__version__, "threads": args.threads,
                   "context": args.context, "passes": args.passes, "shapes": shapes}, f, indent=1)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

"""Reading several prompts at once, as a replica does (chunk passes of SessionLM.prefill_step for what is longer
than a chunk, the rest in one shared pass), for the draft and the target of a tier: the passes it takes and
their time, median of `--repeats`. Run it on two commits to compare a change to the prefill path (the machine
drifts: alternate them).

    python scripts/prefill_batch.py --tier nf4 --prompts docs/results/milan/prompts8.jsonl \\
        --out docs/results/milan/prefill_no_logits_after.json

`--synthetic N` reads eight prompts of N random token ids instead (the shape of a GuideLLM sweep's synthetic
prompts), each alone as well as together, and `--gemm` adds this CPU's rate for one large half-precision
product of the target's MLP shape: how far from the CPU's own ceiling a prompt is read, and what reading a
load sweep's prompts together rather than one by one could save.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

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


def synthetic_prompts(tokens: int, count: int = 8) -> list[list[int]]:
    """`count` prompts of `tokens` random ids (plus the last token a first step leaves unread)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1000, 30000, (tokens + 1,), generator=generator).tolist() for _ in range(count)]


MLP_PRODUCT = (512, 1536, 8960)  # rows (eight 64-token prompts) x the 1.5B target's hidden x its MLP width


def gemm_gflops(shape: tuple[int, int, int] = MLP_PRODUCT, repeats: int = 7) -> float:
    """GFLOP/s of one bf16 product of `shape` (rows, in, out), median of `repeats`: what this CPU's
    half-precision kernels reach at their best, the floor a prompt's pass is compared with."""
    rows, d_in, d_out = shape
    x, w = torch.randn(rows, d_in, dtype=torch.bfloat16), torch.randn(d_out, d_in, dtype=torch.bfloat16)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        times.append(time.perf_counter() - start)
    return 2 * rows * d_in * d_out / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="nf4")
    prompts_from = parser.add_mutually_exclusive_group(required=True)
    prompts_from.add_argument("--prompts", help="Spec-Bench JSONL file")
    prompts_from.add_argument("--synthetic", type=int, metavar="N", help="eight prompts of N random token ids")
    parser.add_argument("--gemm", action="store_true", help="also time one bf16 product of the MLP's shape")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.synthetic is not None and args.synthetic < 1:
        parser.error(f"--synthetic: a prompt needs at least 1 token, not {args.synthetic}")
    engine = LocalEngine.load(tier=args.tier)  # calibrated at load where prompts' dtype is chosen
    prompts = (synthetic_prompts(args.synthetic) if args.synthetic else
               [encode_prompt(engine.tokenizer, p.text, chat=True) for p in load_prompts(Path(args.prompts))])
    out = {"tier": args.tier, "hardware": hardware_id(engine.target_worker.lm.device),
           "torch_threads": torch.get_num_threads(), "prompt_tokens": [len(p) for p in prompts]}
    for role, lm in (("draft", engine.draft_worker.lm), ("target", engine.target_worker.lm)):
        runs = [read_together(lm, prompts, f"{role}{r}") for r in range(args.repeats)]
        ms = statistics.median(m for m, _ in runs)
        out[role] = {"ms": [m for m, _ in runs], "median_ms": ms, "passes": runs[0][1],
                     "ms_per_token": ms / sum(len(p) - 1 for p in prompts)}
        print(f"{role}: {sum(len(p) - 1 for p in prompts)} tokens in {runs[0][1]} passes, median {ms:.0f} ms "
              f"({out[role]['ms_per_token']:.1f} ms a token)", flush=True)
        if args.synthetic:  # the same prompts one by one, as a sweep's staggered arrivals read them
            alone = statistics.median(
                statistics.median(read_together(lm, [p], f"{role}{r}a{k}")[0] for r in range(args.repeats))
                for k, p in enumerate(prompts))
            out[role]["alone_median_ms"] = alone
            print(f"{role}: one prompt alone, median {alone:.0f} ms ({alone / args.synthetic:.1f} ms a token)",
                  flush=True)
    if args.gemm:
        out["gemm_bf16_gflops"] = gemm_gflops()
        print(f"bf16 product {' x '.join(map(str, MLP_PRODUCT))}: {out['gemm_bf16_gflops']:.0f} GFLOP/s", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

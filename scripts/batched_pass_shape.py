"""Time target passes of S sequences x T tokens each (the live loop's verify call pattern, after a 64-token
context), in-process, to see how a batched pass's cost grows with sequences and tokens on this machine; and
ragged passes (eight rows verifying runs of different lengths) in both layouts, packed and padded
(speckv.workers.batched_forward), with whether their greedy choices agree.

    python scripts/batched_pass_shape.py --tier nf4 --out docs/results/avx2/batched_shape_nf4.json
    python scripts/batched_pass_shape.py --tier fp16 --float32-from 8 --ragged-only --out ragged_fp16_float32.json

`--float32-from N` runs passes of N positions or more with the half-precision layers in float32, as a calibration
that chose N sets it (SessionLM.float32_from); `--ragged-only` skips the S x T grid.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from speckv import workers
from speckv.calibration import hardware_id, synthetic_ids, time_call
from speckv.models import DEFAULT_TARGET, Tier, load_model
from speckv.workers import SessionLM

SHAPES = [(1, 1), (1, 4), (1, 9), (4, 1), (4, 4), (8, 1), (8, 2), (8, 4)]
RAGGED = [[12, 1, 1, 1, 1, 1, 1, 1], [2] * 8, [4, 0, 1, 2, 0, 1, 3, 1],  # drafted runs of eight rows
          [4, 3, 2, 0, 0, 0, 0, 0], [6, 5, 4, 3, 2, 1, 1, 1]]  # the last: adaptive at 8 fp16 streams, AVX2 EPYC


def ragged_passes(lm: SessionLM, vocab_size: int, repeats: int = 2) -> list[dict]:
    """Each RAGGED pass timed packed and padded (the best of `repeats`), after 64-71-token contexts."""
    contexts = [synthetic_ids(64 + i, vocab_size) for i in range(8)]
    for i, context in enumerate(contexts):
        lm.logits(f"r{i}", context, 1)  # read whole (a prompt this short is fed in the next pass)
    rows, chooses = [], workers._packs
    try:
        for runs in RAGGED:
            calls = [workers.LogitsCall(f"r{i}", c + [5] * (r + 1), r + 1)
                     for i, (c, r) in enumerate(zip(contexts, runs))]
            times, argmax = {True: [], False: []}, {}
            for packed in [True, False] * repeats:
                workers._packs = lambda rows, packed=packed: packed
                start = time.perf_counter()
                out = lm.logits_batch(calls)
                times[packed].append((time.perf_counter() - start) * 1e3)
                argmax[packed] = [o.argmax(-1).tolist() for o in out]
            row = {"runs": runs, "packed_ms": min(times[True]), "padded_ms": min(times[False]),
                   "same_greedy_choices": argmax[True] == argmax[False]}
            rows.append(row)
            print(f"runs {runs}: packed {row['packed_ms']:.0f} ms, padded {row['padded_ms']:.0f} ms", flush=True)
    finally:
        workers._packs = chooses
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="nf4")
    parser.add_argument("--model", default=DEFAULT_TARGET)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--float32-from", type=int, default=None)
    parser.add_argument("--ragged-only", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, Tier.parse(args.tier), "auto", None)
    lm = SessionLM(model)
    if args.float32_from is not None:
        lm.compute_in_float32_from(args.float32_from)
    context = synthetic_ids(64, model.config.vocab_size)
    rows = []
    for sequences, tokens in [] if args.ragged_only else SHAPES:
        ms = time_call(lm, context, tokens, tokens, 2, session=f"s{sequences}x{tokens}", sequences=sequences)
        rows.append({"sequences": sequences, "tokens": tokens, "ms": ms})
        print(f"{sequences} sequences x {tokens} tokens: {ms:.0f} ms", flush=True)
    ragged = ragged_passes(lm, model.config.vocab_size)
    with open(args.out, "w") as f:
        json.dump({"tier": args.tier, "model": args.model, "hardware": hardware_id(lm.device),
                   "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                   "float32_from": args.float32_from,
                   "context_len": 64, "rows": rows, "ragged": ragged}, f, indent=1)


if __name__ == "__main__":
    main()

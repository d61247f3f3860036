"""Time target passes of S sequences x T tokens each (the live loop's verify call pattern, after a 64-token
context), in-process, to see how a batched pass's cost grows with sequences and tokens on this machine; and
passes of eight rows verifying runs of equal and of different lengths in each layout of a pass
(speckv.workers.batched_forward), timed in turn, with whether their greedy choices agree with the first's (in
half precision the layouts' different matrix shapes may round differently; in float32 they agree:
tests/test_workers.py): packed with each row's keys in its own cache (what runs with SpecKV's attention), packed
with the caches copied side by side (attention that takes no rows: flash kernels, sliding windows) and padded.

    python scripts/batched_pass_shape.py --tier nf4 --out docs/results/avx2/batched_shape_nf4.json
    python scripts/batched_pass_shape.py --tier fp16 --float32-from 8 --ragged-only --out ragged_fp16_float32.json
    python scripts/batched_pass_shape.py --tier fp16 --ragged-only --context 512 --out layouts_fp16_512.json

`--float32-from N` runs passes of N positions or more with the half-precision layers in float32, as a calibration
that chose N sets it (SessionLM.float32_from); `--ragged-only` skips the S x T grid; `--context` sets the eight
rows' context lengths (N to N+7 tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from speckv import workers
from speckv.calibration import hardware_id, synthetic_ids, time_call
from speckv.models import DEFAULT_TARGET, Tier, load_model
from speckv.workers import SessionLM

SHAPES = [(1, 1), (1, 4), (1, 9), (4, 1), (4, 4), (8, 1), (8, 2), (8, 4)]
RUNS = [[0] * 8, [2] * 8,  # drafted runs of eight rows: none (one token each, `none` under load), equal ones
        [12, 1, 1, 1, 1, 1, 1, 1], [4, 0, 1, 2, 0, 1, 3, 1],
        [4, 3, 2, 0, 0, 0, 0, 0], [6, 5, 4, 3, 2, 1, 1, 1]]  # the last: adaptive at 8 fp16 streams, AVX2 EPYC
LAYOUTS = {"own_caches": (True, True), "side_by_side": (True, False), "padded": (False, False)}  # packs, reads own


def layout_passes(lm: SessionLM, vocab_size: int, context_len: int = 64, repeats: int = 3) -> list[dict]:
    """Each RUNS pass timed in each LAYOUTS layout in turn (the median of `repeats` rounds, each begun by another
    layout), after contexts of `context_len` to `context_len` + 7 tokens; every pass feeds its rows' runs after
    those contexts (each cache cut back to its context first, as after a rejection)."""
    contexts = [synthetic_ids(context_len + i, vocab_size) for i in range(8)]
    for i, context in enumerate(contexts):
        lm.prefill(f"r{i}", context)
    rows, chooses, reads = [], workers._packs, workers.reads_own_caches
    try:
        for runs in RUNS:
            times, argmax = {name: [] for name in LAYOUTS}, {}
            names = list(LAYOUTS)
            for round_ in range(repeats + 1):  # the first round untimed (a new shape's first pass pays setup costs)
                for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # each layout first in turn
                    packs, own = LAYOUTS[name]
                    workers._packs = lambda model, rows, packs=packs: packs
                    workers.reads_own_caches = lambda model, own=own: own
                    calls = [workers.LogitsCall(f"r{i}", c + [5] * (r + 1), r + 1)
                             for i, (c, r) in enumerate(zip(contexts, runs))]
                    start = time.perf_counter()
                    out = lm.logits_batch(calls)
                    times[name].append((time.perf_counter() - start) * 1e3)
                    argmax[name] = [o.argmax(-1).tolist() for o in out]
            row = {"runs": runs, **{f"{name}_ms": statistics.median(t[1:]) for name, t in times.items()},
                   "same_greedy_choices_as_own_caches": {name: a == argmax["own_caches"] for name, a in argmax.items()}}
            rows.append(row)
            print(f"runs {runs}: " + ", ".join(f"{name} {row[f'{name}_ms']:.0f} ms" for name in LAYOUTS), flush=True)
    finally:
        workers._packs, workers.reads_own_caches = chooses, reads
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="nf4")
    parser.add_argument("--model", default=DEFAULT_TARGET)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--float32-from", type=int, default=None)
    parser.add_argument("--ragged-only", action="store_true")
    parser.add_argument("--context", type=int, default=64, help="context tokens of the layouts' eight rows")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the layouts' passes")
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
    layouts = layout_passes(lm, model.config.vocab_size, args.context, args.repeats)
    with open(args.out, "w") as f:
        json.dump({"tier": args.tier, "model": args.model, "hardware": hardware_id(lm.device),
                   "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                   "float32_from": args.float32_from,
                   "context_len": 64, "rows": rows, "layouts_context_len": args.context,
                   "layouts_repeats": args.repeats,
                   "layouts": layouts}, f, indent=1)


if __name__ == "__main__":
    main()

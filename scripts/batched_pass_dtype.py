"""Time batched decode passes of a half-precision model (the fp16 tier's bf16 target, or the bf16 draft) three
ways: as loaded (bf16), with its half-precision linear layers in float32 (speckv.workers.computing_in), and
with its output embedding in float32 too. Where a CPU has no bf16 hardware, bf16 matmuls are emulated and cost
in proportion to the rows; this shows from how many rows (sequences × tokens) a pass runs faster in float32,
which `speckv.calibration.probe_float32_from` measures on one sequence. In-process, median of 3 after one
untimed pass per shape, modes alternating; each session holds a 64-token context first.

    python scripts/batched_pass_dtype.py --role draft --out batched_pass_dtype_draft.json    # 1.5 min
    python scripts/batched_pass_dtype.py --role target --out batched_pass_dtype_target.json  # 4 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from speckv.calibration import hardware_id, synthetic_ids
from speckv.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_model
from speckv.workers import LogitsCall, SessionLM, computing_in, keep_float32_copies

SHAPES = ((1, 1, 1), (2, 1, 1), (4, 1, 1), (8, 1, 1), (16, 1, 1), (1, 8, 8), (4, 3, 3), (8, 3, 3), (8, 1, 1))
MODES = ("bf16", "f32", "f32+head")  # sequences, tokens fed each, logits kept each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["draft", "target"], default="target")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = load_model(DEFAULT_DRAFT if args.role == "draft" else DEFAULT_TARGET, "fp16")
    lm = SessionLM(model, max_sessions=64)
    if not lm.half_layers or lm.output_layer is None:
        raise SystemExit("this model has no half-precision layers on the CPU here: nothing to compare")
    keep_float32_copies(lm.half_layers + [lm.output_layer])
    vocab = int(model.config.vocab_size)
    for s in range(16):
        lm.logits_batch([LogitsCall(f"s{s}", synthetic_ids(64, vocab, salt=s), 1)])

    def computing(mode: str) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if mode != "bf16":
            stack.enter_context(computing_in(lm.half_layers, torch.float32))
        if mode == "f32+head":
            stack.enter_context(computing_in([lm.output_layer], torch.float32))
        return stack

    rows, call = [], 0
    for sequences, tokens, keep in SHAPES:
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for repeat in range(4):
            for mode in MODES:
                call += 1
                fed = synthetic_ids(tokens, vocab, 1000 + call)
                calls = [LogitsCall(f"s{s}", synthetic_ids(64, vocab, salt=s) + fed, keep) for s in range(sequences)]
                with computing(mode):
                    start = time.perf_counter()
                    lm.logits_batch(calls)
                    ms = (time.perf_counter() - start) * 1e3
                if repeat:  # the first of each shape and mode is untimed
                    times[mode].append(ms)
        row = {"sequences": sequences, "tokens": tokens, "keep": keep,
               **{m: round(statistics.median(v), 1) for m, v in times.items()}}
        print(row, flush=True)
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"role": args.role, "hardware": hardware_id(lm.device), "rows": rows}, f, indent=1)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

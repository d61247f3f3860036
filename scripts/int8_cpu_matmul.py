"""Time an int8 target's passes with bitsandbytes' CPU fallback for its int8 matmul and with speckv.kernels'
blocked one, in one process, alternating, and check that both give the same logits. Prints and saves the
medians; on a CPU where bitsandbytes has its own kernel (AVX-512) there is nothing to compare.

    python scripts/int8_cpu_matmul.py --out docs/results/milan/int8_cpu_matmul.json     # ~3 min on 2 cores

A pass feeds `tokens` tokens of one sequence, or one token of each of `sequences` sequences (a batched
decoding pass, padded as one [sequences, 1] batch), into an empty cache and keeps every logit it feeds; the
median of `--repeats` after one untimed pass of each shape and kernel.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from speckv import kernels
from speckv.calibration import hardware_id, synthetic_ids
from speckv.models import DEFAULT_TARGET, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_TARGET)
    parser.add_argument("--shapes", default="1x1,1x9,8x1,1x64", help="sequences x tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model = load_model(args.model, "int8", device="cpu")
    kernels.uninstall_int8_matmul()
    if kernels.bitsandbytes_has_cpu_int8_kernel():
        sys.exit("bitsandbytes has a CPU int8 kernel of its own on this CPU (AVX-512): nothing to compare")
    vocab = int(model.config.vocab_size)

    def run(ids: torch.Tensor, blocked: bool) -> tuple[float, torch.Tensor]:
        kernels.install_int8_matmul() if blocked else kernels.uninstall_int8_matmul()
        start = time.perf_counter()
        with torch.inference_mode():
            logits = model(ids, use_cache=False).logits
        return (time.perf_counter() - start) * 1e3, logits

    rows = []
    for shape in args.shapes.split(","):
        sequences, tokens = (int(v) for v in shape.split("x"))
        ids = torch.tensor([synthetic_ids(tokens, vocab, salt=s) for s in range(sequences)])
        times: dict[bool, list[float]] = {False: [], True: []}
        logits = {}
        for blocked in (False, True):  # untimed: a shape's first pass with each kernel
            logits[blocked] = run(ids, blocked)[1]
        for r in range(args.repeats):
            for blocked in ((False, True) if r % 2 == 0 else (True, False)):
                times[blocked].append(run(ids, blocked)[0])
        row = {"sequences": sequences, "tokens": tokens,
               "fallback_ms": statistics.median(times[False]), "blocked_ms": statistics.median(times[True]),
               "identical_logits": bool(torch.equal(logits[False], logits[True]))}
        row["speedup"] = row["fallback_ms"] / row["blocked_ms"]
        rows.append(row)
        print(f"{sequences} x {tokens}: bitsandbytes' fallback {row['fallback_ms']:.0f} ms, blocked "
              f"{row['blocked_ms']:.0f} ms ({row['speedup']:.2f}x), logits identical: {row['identical_logits']}",
              flush=True)
    kernels.install_int8_matmul()
    result = {"model": args.model, "hardware": hardware_id(torch.device("cpu")), "machine": platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "block_bytes": kernels.BLOCK_BYTES, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()

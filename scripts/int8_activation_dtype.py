"""Time the int8 tier's passes with its activations in float16 and in float32 (`load_model(..., dtype=...)`), both
models loaded in one process, alternating, and count where their greedy choices agree. On a CPU float16
arithmetic is emulated; this is what `speckv.models.INT8_CPU_ACTIVATIONS` was chosen from.

    python scripts/int8_activation_dtype.py --out docs/results/milan/int8_activation_dtype.json   # ~4 min, 2 cores

Each pass feeds `tokens` tokens to each of `sequences` sequences into an empty cache and keeps every logit; the
median of `--repeats` after one untimed pass of each shape and dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from speckv.calibration import hardware_id, synthetic_ids
from speckv.models import DEFAULT_TARGET, load_model

DTYPES = ("float16", "float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_TARGET)
    parser.add_argument("--shapes", default="1x1,1x9,8x1,16x1,8x4,1x64", help="sequences x tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    models = {dtype: load_model(args.model, "int8", dtype=dtype, device="cpu") for dtype in DTYPES}
    vocab = int(models["float16"].config.vocab_size)
    rows = []
    for shape in args.shapes.split(","):
        sequences, tokens = (int(v) for v in shape.split("x"))
        ids = torch.tensor([synthetic_ids(tokens, vocab, salt=s) for s in range(sequences)])
        times: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
        choices = {}
        with torch.inference_mode():
            for model in models.values():  # untimed: a shape's first pass
                model(ids, use_cache=False)
            for r in range(args.repeats):
                for dtype in (DTYPES if r % 2 == 0 else DTYPES[::-1]):
                    start = time.perf_counter()
                    logits = models[dtype](ids, use_cache=False).logits
                    times[dtype].append((time.perf_counter() - start) * 1e3)
                    choices[dtype] = logits.argmax(-1)
        row = {"sequences": sequences, "tokens": tokens,
               **{f"{dtype}_ms": statistics.median(times[dtype]) for dtype in DTYPES},
               "greedy_agreement": float((choices["float16"] == choices["float32"]).float().mean())}
        rows.append(row)
        print(f"{sequences} x {tokens}: float16 {row['float16_ms']:.0f} ms, float32 {row['float32_ms']:.0f} ms, "
              f"greedy choices agree at {row['greedy_agreement']:.0%} of positions", flush=True)
    result = {"model": args.model, "hardware": hardware_id(torch.device("cpu")), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()

"""Time a model's passes with its half-precision linear layers (speckv.workers.half_precision_layers) computing
in their loaded dtype and in float32, by tokens fed, in-process: where a CPU has no bf16 hardware, bf16 matmuls
are emulated (after bitsandbytes dequantizes a 4-bit layer, or on a bf16 layer's weights), and a pass that feeds
many tokens (a prompt's prefill, a batched verify pass) may run faster in float32, which moves twice the bytes
per weight (plain layers multiply float32 copies of their weights). Prints and saves the times and the greedy
choice of each pass (the same input in both dtypes).

    python scripts/compute_dtype_sweep.py --tier nf4 --out docs/results/milan/four_bit_compute_dtype.json  # ~3 min
    python scripts/compute_dtype_sweep.py --tier fp16 --out docs/results/milan/bf16_compute_dtype.json     # ~3 min

Each pass reads `tokens` tokens into an empty cache and keeps one logit (a prefill's pattern), the median of
`--repeats` after one untimed pass of each dtype.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from speckv.calibration import hardware_id, synthetic_ids
from speckv.models import DEFAULT_TARGET, load_model
from speckv.workers import computing_in, half_precision_layers, keep_float32_copies, multiplies_in


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_TARGET)
    parser.add_argument("--tier", default="nf4", choices=["fp16", "nf4"])
    parser.add_argument("--tokens", default="1,9,16,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model = load_model(args.model, args.tier)
    layers = half_precision_layers(model)
    if not layers:
        sys.exit("no linear layers multiplying in half precision on the CPU here (a GPU, a float32 model, or "
                 "bitsandbytes' own bf16 kernel on a CPU with bf16 hardware): nothing to compare")
    loaded = multiplies_in(layers[0])
    keep_float32_copies(layers)
    vocab = int(model.config.vocab_size)

    def run(ids: list[int], dtype: torch.dtype) -> tuple[float, int]:
        start = time.perf_counter()
        with computing_in(layers, None if dtype == loaded else dtype), torch.inference_mode():
            logits = model(torch.tensor([ids]), logits_to_keep=1).logits
        return (time.perf_counter() - start) * 1e3, int(logits[0, -1].argmax())

    for dtype in (loaded, torch.float32):  # untimed: a dtype's first pass
        run(synthetic_ids(4, vocab), dtype)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        ids = synthetic_ids(tokens, vocab, salt=tokens)
        for dtype in (loaded, torch.float32):
            times, choice = [], None
            for _ in range(args.repeats):
                ms, choice = run(ids, dtype)
                times.append(ms)
            rows.append({"tokens": tokens, "dtype": str(dtype), "ms": statistics.median(times), "times_ms": times,
                         "argmax": choice})
            print(f"{tokens:>4} tokens  {str(dtype):<15} {statistics.median(times):8.0f} ms  argmax {choice}",
                  flush=True)
    result = {"hardware": hardware_id(next(model.parameters()).device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "python": platform.python_version(), "model": args.model,
              "tier": args.tier, "loaded_compute_dtype": str(loaded), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

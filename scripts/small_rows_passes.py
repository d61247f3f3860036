"""Whole-model passes of 1..N tokens with the linear layers `load_model` chose (speckv.kernels.install_small_rows),
with every pass as plain `nn.Linear` and with every pass transposed, alternately in one process: what the
probe's choice is worth per pass, and whether it chose the faster.

Each pass scores `tokens` new tokens after a cached context (a decode, a verification, a catch-up), then the
cache is cropped back. Prints a table and saves JSON.

Usage: python scripts/small_rows_passes.py [--dtype float32] [--max-tokens 12 | --tokens 1,8,16,32] [--reps 5]
       [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from speckv import kernels
from speckv.calibration import hardware_id
from speckv.models import load_model

PAIR = {"draft": "embedded:qwen2.5-coder-0.5b-instruct", "target": "embedded:qwen2.5-coder-1.5b-instruct"}


def pass_ms(model: torch.nn.Module, cache: DynamicCache, tokens: int) -> float:
    ids = torch.randint(100, 5000, (1, tokens))
    start = time.perf_counter()
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=tokens)
    elapsed = (time.perf_counter() - start) * 1000
    cache.crop(-tokens)
    return elapsed


def measure(spec: str, dtype: str, counts: list[int], reps: int, context: int) -> dict:
    model = load_model(spec, "fp16", dtype, "cpu")
    chosen = kernels.small_rows_of(model)
    layers = kernels.plain_linears(model)
    for layer in layers:
        layer.__class__ = kernels.SmallRowsLinear  # each form below sets the rows it transposes
    every = frozenset(counts)
    print(f"{spec} {dtype}: transposed rows by weight shape "
          + (", ".join(f"{list(shape)}: {sorted(rows)}" for shape, rows in chosen.items()) or "none"), flush=True)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        cache = DynamicCache()
        model(torch.randint(100, 5000, (1, context)), past_key_values=cache, use_cache=True)
        for tokens in counts:
            times: dict[str, list[float]] = {"chosen": [], "linear": [], "transposed": []}
            rows_of = {"linear": frozenset(), "transposed": every}
            for _ in range(reps):
                for form in times:
                    for layer in layers:
                        layer.transposed_rows = rows_of.get(form, chosen.get(tuple(layer.weight.shape), frozenset()))
                    times[form].append(pass_ms(model, cache, tokens))
            row = {"tokens": tokens,
                   **{f"{form}_ms": statistics.median(ts) for form, ts in times.items()}}
            row["ratio"] = row["chosen_ms"] / row["linear_ms"]
            rows.append(row)
            print(f"{spec} {dtype} {tokens:2d} tokens: chosen {row['chosen_ms']:7.1f} ms, linear "
                  f"{row['linear_ms']:7.1f}, transposed {row['transposed_ms']:7.1f}: chosen/linear "
                  f"{row['ratio']:.2f}x", flush=True)
    return {"model": spec, "dtype": dtype, "rows": rows,
            "transposed_rows": [{"shape": list(shape), "rows": sorted(r)} for shape, r in chosen.items()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--tokens", help="comma-separated token counts to time instead of 1..--max-tokens")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    counts = [int(t) for t in args.tokens.split(",")] if args.tokens else list(range(1, args.max_tokens + 1))
    result = {"hardware": hardware_id(torch.device("cpu")), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "python": platform.python_version(),
              "models": [measure(spec, args.dtype, counts, args.reps, args.context)
                         for spec in PAIR.values()]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

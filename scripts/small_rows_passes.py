"""Whole-model passes of 1..N tokens with the linear layers `load_model` chose (speckv.kernels.install_small_rows),
with every pass as plain `nn.Linear` and with every pass transposed, alternately in one process: what the
probe's choice is worth per pass, and whether it chose the faster.

Each pass scores `tokens` new tokens after a cached context (a decode, a verification, a catch-up), then the
cache is cropped back. Prints a table and saves JSON.

Usage: python scripts/small_rows_passes.py [--dtype float32] [--max-tokens 12 | --tokens 1,8,16,32] [--reps 5]
       [--sequences 4] [--out F.json]

With `--sequences N`, each pass carries N sessions scoring the tokens each (the live loop's batched pass).
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
from speckv.calibration import hardware_id, synthetic_ids, time_call
from speckv.models import load_model
from speckv.workers import SessionLM

PAIR = {"draft": "embedded:qwen2.5-coder-0.5b-instruct", "target": "embedded:qwen2.5-coder-1.5b-instruct"}


def pass_ms(model: torch.nn.Module, cache: DynamicCache, tokens: int) -> float:
    ids = torch.randint(100, 5000, (1, tokens))
    start = time.perf_counter()
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=tokens)
    elapsed = (time.perf_counter() - start) * 1000
    cache.crop(-tokens)
    return elapsed


def ranges(rows: frozenset[int]) -> str:
    """1, 2, 3, 5, 10, 11 -> "1-3, 5, 10-11"."""
    runs: list[list[int]] = []
    for r in sorted(rows):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def batched_pass_ms(lm: SessionLM, context: list[int], sequences: int, tokens: int) -> float:
    """One pass of `sequences` sessions scoring `tokens` each after `context`, as the live loop batches them
    (SessionLM.logits_batch, packed or padded as it chooses), after one untimed pass of the shape."""
    return time_call(lm, context, tokens, tokens, 1, session=f"batch{sequences}x{tokens}", sequences=sequences)


def measure(spec: str, dtype: str, counts: list[int], reps: int, context: int, sequences: int = 1) -> dict:
    model = load_model(spec, "fp16", dtype, "cpu")
    start = time.perf_counter()
    chosen = kernels.install_small_rows(model)  # probed again, timed: what a load spends on it
    probe_s = time.perf_counter() - start
    layers = kernels.plain_linears(model)
    for layer in layers:
        layer.__class__ = kernels.SmallRowsLinear  # each form below sets the rows it transposes
    every = frozenset(sequences * t for t in counts)  # rows a pass multiplies
    print(f"{spec} {dtype}: probed in {probe_s:.2f} s; transposed rows by weight shape "
          + ("; ".join(f"{list(shape)}: {ranges(rows)}" for shape, rows in chosen.items()) or "none"), flush=True)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        if sequences == 1:  # a raw model call over a cache that holds the context
            cache = DynamicCache()
            model(torch.randint(100, 5000, (1, context)), past_key_values=cache, use_cache=True)
        else:  # the live loop's batched call, each session holding the context
            lm = SessionLM(model, max_sessions=4 * sequences)
            context_ids = synthetic_ids(context, model.config.vocab_size)
        for tokens in counts:
            times: dict[str, list[float]] = {"chosen": [], "linear": [], "transposed": []}
            rows_of = {"linear": frozenset(), "transposed": every}
            for _ in range(reps):
                for form in times:
                    for layer in layers:
                        layer.transposed_rows = rows_of.get(form, chosen.get(tuple(layer.weight.shape), frozenset()))
                    times[form].append(pass_ms(model, cache, tokens) if sequences == 1
                                       else batched_pass_ms(lm, context_ids, sequences, tokens))
            row = {"tokens": tokens, "sequences": sequences,
                   **{f"{form}_ms": statistics.median(ts) for form, ts in times.items()}}
            row["ratio"] = row["chosen_ms"] / row["linear_ms"]
            rows.append(row)
            print(f"{spec} {dtype} {sequences} x {tokens:2d} tokens: chosen {row['chosen_ms']:7.1f} ms, linear "
                  f"{row['linear_ms']:7.1f}, transposed {row['transposed_ms']:7.1f}: chosen/linear "
                  f"{row['ratio']:.2f}x", flush=True)
    return {"model": spec, "dtype": dtype, "rows": rows, "probe_s": probe_s,
            "transposed_rows": [{"shape": list(shape), "rows": sorted(r)} for shape, r in chosen.items()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--tokens", help="comma-separated token counts to time instead of 1..--max-tokens")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=1,
                        help="sessions a pass carries, each scoring the tokens (a batched pass of the live loop)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    counts = [int(t) for t in args.tokens.split(",")] if args.tokens else list(range(1, args.max_tokens + 1))
    result = {"hardware": hardware_id(torch.device("cpu")), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "python": platform.python_version(),
              "models": [measure(spec, args.dtype, counts, args.reps, args.context, args.sequences)
                         for spec in PAIR.values()]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

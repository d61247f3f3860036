"""What SpecKV's attention (speckv.attention) saves against transformers' sdpa, one layer's attention and whole
passes of the tier's target, on this machine.

    python scripts/attention_paths.py --tier fp16 --context 1000 --out docs/results/epyc17_bf16/attention_paths.json

1. One layer's attention in the target's head layout and dtype, transformers' `sdpa_attention_forward` against
   `speckv_attention`, for a decode query, a verify pass's nine, eight rows' decode queries and a prompt
   (random tensors; median of `--repeats` × 10 calls).
2. Whole passes (the tier's target, synthetic token ids, contexts of `--context` tokens): one sequence scoring
   one token and nine, eight sequences of equal and of different context lengths scoring one token each.
   Every call feeds the same tokens after the same cached prefix (the worker cuts its cache back to the common
   prefix), with the model's attention switched between "sdpa" and SpecKV's call by call, so the two are paired.
Prints and saves the medians (ms) and the paired ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from speckv.attention import ATTENTION, speckv_attention
from speckv.calibration import hardware_id
from speckv.models import DEFAULT_TARGET, load_model
from speckv.workers import LogitsCall, SessionLM


def layer_shapes(context: int) -> dict[str, tuple[int, int, int]]:
    """name -> (batch, queries, keys) of one layer's attention."""
    return {"decode_1": (1, 1, context), "verify_1x9": (1, 9, context), "decode_8": (8, 1, context),
            "prompt_256": (1, 256, 256)}


def time_layer(model: torch.nn.Module, repeats: int, context: int) -> dict[str, dict[str, float]]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = model.get_input_embeddings().weight.dtype
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    out = {}
    for name, (batch, queries, keys) in layer_shapes(context).items():
        q = torch.randn(batch, heads, queries, dim, dtype=dtype)
        k = torch.randn(batch, kv_heads, keys, dim, dtype=dtype)
        v = torch.randn(batch, kv_heads, keys, dim, dtype=dtype)
        mask = None if queries in (1, keys) else (
            torch.arange(queries)[:, None] + keys - queries >= torch.arange(keys)[None])[None, None]
        times: dict[str, list[float]] = {"sdpa": [], "speckv": []}
        for _ in range(repeats):
            for path, fn in (("sdpa", sdpa_attention_forward), ("speckv", speckv_attention)):
                start = time.perf_counter()
                for _ in range(10):
                    fn(module, q, k, v, mask, scaling=dim ** -0.5)
                times[path].append((time.perf_counter() - start) * 1e2)  # ms a call
        out[name] = {path: statistics.median(t) for path, t in times.items()}
    return out


def time_passes(lm: SessionLM, repeats: int, context: int) -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(100, 20000, (n,), generator=g).tolist()

    one = rand(context)
    equal = [rand(context) for _ in range(8)]
    ragged = [rand(context - 14 + 4 * i) for i in range(8)]
    for name, ids in [("one", one)] + [(f"e{i}", x) for i, x in enumerate(equal)] + [
            (f"g{i}", x) for i, x in enumerate(ragged)]:
        lm.logits(name, ids, 1)
    passes = {  # every call re-feeds the same tokens after the same prefix
        "decode_1": [LogitsCall("one", one + rand(1), 1)],
        "verify_1x9": [LogitsCall("one", one + rand(9), 9)],
        "decode_8_equal": [LogitsCall(f"e{i}", x + rand(1), 1) for i, x in enumerate(equal)],
        "decode_8_ragged": [LogitsCall(f"g{i}", x + rand(1), 1) for i, x in enumerate(ragged)],
    }
    out = {}
    for name, calls in passes.items():
        times: dict[str, list[float]] = {"sdpa": [], "speckv": []}
        for _ in range(repeats):
            for path, implementation in (("sdpa", "sdpa"), ("speckv", ATTENTION)):
                lm.model.set_attn_implementation(implementation)
                start = time.perf_counter()
                lm.logits_batch(calls)
                times[path].append((time.perf_counter() - start) * 1e3)
        out[name] = {"median_ms": {p: statistics.median(t) for p, t in times.items()},
                     "paired_ratio": statistics.median(s / n for s, n in zip(times["speckv"], times["sdpa"])),
                     "ms": times}
    lm.model.set_attn_implementation(ATTENTION)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="fp16")
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lm = SessionLM(load_model(DEFAULT_TARGET, args.tier))
    layer = time_layer(lm.model, args.repeats, args.context)
    for name, t in layer.items():
        print(f"one layer, {name}: sdpa {t['sdpa']:.2f} ms, speckv {t['speckv']:.2f} ms", flush=True)
    passes = time_passes(lm, args.repeats, args.context)
    for name, t in passes.items():
        m = t["median_ms"]
        print(f"pass, {name}: sdpa {m['sdpa']:.0f} ms, speckv {m['speckv']:.0f} ms, "
              f"paired speckv/sdpa {t['paired_ratio']:.2f}", flush=True)
    out = {"tier": args.tier, "context": args.context, "hardware": hardware_id(lm.device),
           "threads": torch.get_num_threads(), "layer_ms": layer, "passes": passes}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

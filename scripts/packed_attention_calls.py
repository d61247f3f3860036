"""A packed pass's attention a call per row (speckv.attention.packed_attention, the default) against one call for
the whole pass (padded_attention), in whole passes of 8 rows scoring 1, 2 and 9 tokens each
after contexts of about --context tokens, the two paired call by call.

    python scripts/packed_attention_calls.py --model narrow --out docs/results/amx_1206/packed_attention/narrow.json
    python scripts/packed_attention_calls.py --model target --repeats 7 \
        --out docs/results/amx_1206/packed_attention/target_bf16.json

--model target: the embedded target at fp16 (on a CPU its passes are bound by their matmuls: what padding every
  row's keys costs there).
--model narrow: the target's depth and attention heads at 8 dimensions a head, random weights: a pass is bound by
  its calls, as an eager GPU step is by its host's kernel launches. A stand-in for what calls cost there, not a
  measurement of a GPU (speckv.tools.arch_costs --attention both is, on a lent one). Run at two commits (a git
  worktree of the older), it measures a change to the per-row path too: docs/results/amx_1206/packed_attention/
  holds a1b4248 (masks built per row and layer) against 8afd730 (once a pass), two runs each.
Prints and saves the medians (ms) and the paired ratios (one call / per row).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from speckv import attention
from speckv.calibration import hardware_id
from speckv.models import DEFAULT_TARGET, load_model, resolve_model_dir
from speckv.workers import LogitsCall, SessionLM

ROWS = 8
FED = (1, 2, 9)


def narrow_target(head_dim: int = 8) -> torch.nn.Module:
    """The embedded target's architecture (layers, query and key/value heads) at `head_dim` a head, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model_dir(DEFAULT_TARGET))
    config.hidden_size = config.num_attention_heads * head_dim
    config.intermediate_size = 2 * config.hidden_size
    config.head_dim = head_dim
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def time_passes(lm: SessionLM, repeats: int, context: int) -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(100, 20000, (n,), generator=g).tolist()

    contexts = [rand(context - 14 + 4 * i) for i in range(ROWS)]  # ragged, as a server's requests are
    for i, ids in enumerate(contexts):
        lm.logits(f"r{i}", ids, 1)
    out = {}
    for fed in FED:
        calls = [LogitsCall(f"r{i}", ids + rand(fed), fed) for i, ids in enumerate(contexts)]  # re-fed each time
        times: dict[str, list[float]] = {"per_row": [], "one_call": []}
        for _ in range(repeats):
            for path, devices in (("per_row", frozenset()), ("one_call", frozenset({lm.device.type}))):
                with attention.one_call_on(devices):
                    start = time.perf_counter()
                    lm.logits_batch(calls)
                    times[path].append((time.perf_counter() - start) * 1e3)
        name = f"{ROWS}x{fed}"
        out[name] = {"median_ms": {p: statistics.median(t) for p, t in times.items()},
                     "paired_ratio": statistics.median(o / p for o, p in zip(times["one_call"], times["per_row"])),
                     "ms": times}
        m = out[name]["median_ms"]
        print(f"{name} tokens: per row {m['per_row']:.1f} ms, one call {m['one_call']:.1f} ms, "
              f"paired one call / per row {out[name]['paired_ratio']:.2f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["narrow", "target"], default="narrow")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = narrow_target() if args.model == "narrow" else load_model(DEFAULT_TARGET, "fp16")
    lm = SessionLM(model)
    with torch.inference_mode():
        passes = time_passes(lm, args.repeats, args.context)
    out = {"model": args.model, "context": args.context, "rows": ROWS, "hardware": hardware_id(lm.device),
           "threads": torch.get_num_threads(), "passes": passes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

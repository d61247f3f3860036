"""Time target passes of S sequences x T tokens each (the live loop's verify call pattern, after a 64-token
context), in-process, to see how a batched pass's cost grows with sequences and tokens on this machine.

    python scripts/batched_pass_shape.py --tier nf4 --out docs/results/avx2/batched_shape_nf4.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from speckv.calibration import hardware_id, synthetic_ids, time_call
from speckv.models import DEFAULT_TARGET, Tier, load_model
from speckv.workers import SessionLM

SHAPES = [(1, 1), (1, 4), (1, 9), (4, 1), (4, 4), (8, 1), (8, 2), (8, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="nf4")
    parser.add_argument("--model", default=DEFAULT_TARGET)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, Tier.parse(args.tier), "auto", None)
    lm = SessionLM(model)
    context = synthetic_ids(64, model.config.vocab_size)
    rows = []
    for sequences, tokens in SHAPES:
        ms = time_call(lm, context, tokens, tokens, 2, session=f"s{sequences}x{tokens}", sequences=sequences)
        rows.append({"sequences": sequences, "tokens": tokens, "ms": ms})
        print(f"{sequences} sequences x {tokens} tokens: {ms:.0f} ms", flush=True)
    with open(args.out, "w") as f:
        json.dump({"tier": args.tier, "model": args.model, "hardware": hardware_id(lm.device),
                   "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                   "context_len": 64, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

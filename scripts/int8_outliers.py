"""Do LLM.int8's pass-wide outlier columns make int8 greedy streams decoded together differ from each alone?

    python scripts/int8_outliers.py --out docs/results/epyc17_bf16/int8_outliers.json

bitsandbytes' LLM.int8 treats a column of a pass's activations as an outlier for every row (token) of the pass
where any row has a value of at least the threshold there: those columns are multiplied in floating point for
all rows, the rest in int8. So a token's product depends on the other tokens in its pass. Here each row keeps
only its own outliers (the values it would keep alone: its int8 values and scale are the same as alone), the
rest of the pass unchanged, registered in place of bitsandbytes' CPU kernels for that run only.

In-process, the int8 target, eight prompts greedy for `--tokens` tokens: each alone (one token a pass), then all
together with row i joining at step 4i (its prompt riding in the others' pass, as under load), once with
bitsandbytes' kernels and once with per-row outliers. Prints and saves, per variant, which streams differ from
their alone run and at which token.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from speckv.calibration import hardware_id
from speckv.models import DEFAULT_TARGET, load_model, load_tokenizer
from speckv.workers import LogitsCall, SessionLM

PROMPTS = ["def fibonacci(n):", "The capital of France is", "for i in range(10):", "import numpy as np\n",
           "Once upon a time", "SELECT name FROM", "class Stack:", "# quicksort in python\n"]
OUTLIER = -128  # an int8 value LLM.int8's rounding never produces: marks a row's own outliers in its int8 values
CALLS = {"per_row_quant": 0}  # that the replacement ran (saved with the results)


def per_row_quant(A: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """bitsandbytes' int8_vectorwise_quant without zeroing whole outlier columns: a row's own outliers only
    (left out of its scale as before), marked OUTLIER."""
    CALLS["per_row_quant"] += 1
    outliers = A.abs() >= threshold if threshold > 0.0 else None
    kept = A if outliers is None else A.masked_fill(outliers, 0)
    row_stats = kept.abs().amax(dim=1).float()
    out = torch.round(kept * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
    if outliers is None:
        return out, row_stats, None
    return out.masked_fill_(outliers, OUTLIER), row_stats, torch.argwhere(outliers.any(dim=0)).view(-1)


def per_row_mixed_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
    """bitsandbytes' int8_mixed_scaled_mm with each row's own outliers in floating point, its other values in int8."""
    sub_a = torch.empty(0, device=A.device, dtype=A.dtype)
    sub_b = None
    if outlier_cols is not None and outlier_cols.numel():
        marked = CA == OUTLIER
        sub_a = A[:, outlier_cols] * marked[:, outlier_cols]
        CA = CA.masked_fill(marked, 0)
        sub_b = torch.ops.bitsandbytes.int8_vectorwise_dequant.default(
            CB[:, outlier_cols].contiguous(), SCB).to(A.dtype).t()
    out = torch.ops.bitsandbytes.int8_scaled_mm.default(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
    return (out if sub_b is None else out.addmm(sub_a, sub_b)), sub_a


def greedy(lm: SessionLM, ids: list[list[int]], tokens: int, together: bool, tag: str) -> list[list[int]]:
    seqs = [list(x) for x in ids]
    if not together:
        for i, seq in enumerate(seqs):
            for _ in range(tokens):
                seq.append(int(lm.logits(f"{tag}{i}", seq, 1)[-1].argmax()))
    else:
        made, step = [0] * len(seqs), 0
        while any(m < tokens for m in made):
            live = [i for i in range(len(seqs)) if step >= 4 * i and made[i] < tokens]
            for i, logits in zip(live, lm.logits_batch([LogitsCall(f"{tag}{i}", seqs[i], 1) for i in live])):
                seqs[i].append(int(logits[-1].argmax()))
                made[i] += 1
            step += 1
    return [s[len(x):] for s, x in zip(seqs, ids)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lm = SessionLM(load_model(DEFAULT_TARGET, "int8"))
    tokenizer = load_tokenizer(DEFAULT_TARGET)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    results = {}
    for variant in ("bitsandbytes", "per_row_outliers"):
        library = None
        if variant == "per_row_outliers":
            library = torch.library.Library("bitsandbytes", "IMPL")
            library.impl("int8_vectorwise_quant", per_row_quant, "CPU")
            library.impl("int8_mixed_scaled_mm", per_row_mixed_mm, "CPU")
        start = time.perf_counter()
        alone = greedy(lm, ids, args.tokens, False, f"{variant}-alone")
        together = greedy(lm, ids, args.tokens, True, f"{variant}-together")
        first = [next((j for j, (a, b) in enumerate(zip(p, q)) if a != b), None) for p, q in zip(alone, together)]
        results[variant] = {"differ": sum(f is not None for f in first), "streams": len(first),
                            "first_differing_token": first, "seconds": time.perf_counter() - start}
        print(f"{variant}: {results[variant]['differ']} of {len(first)} streams differ; first differing token "
              f"{first}", flush=True)
        if library is not None:
            library._destroy()
            print(f"per-row quantization ran {CALLS['per_row_quant']} times", flush=True)
    out = {"tokens": args.tokens, "prompts": PROMPTS, "replacement_calls": CALLS, "hardware": hardware_id(lm.device),
           "threads": torch.get_num_threads(), "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

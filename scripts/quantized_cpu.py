"""Time the int8 or nf4 tier's passes on the CPU two ways, in one process, alternating, and compare what they
choose. Prints and saves the medians.

    python scripts/quantized_cpu.py --tier int8 --compare kernel --out int8_cpu_matmul.json         # ~3 min
    python scripts/quantized_cpu.py --tier int8 --compare activations --out int8_activation_dtype.json
    python scripts/quantized_cpu.py --tier nf4 --compare kernel --out nf4_cpu_matmul.json
    python scripts/quantized_cpu.py --tier nf4 --compare activations --out nf4_activation_dtype.json
    python scripts/quantized_cpu.py --tier int8 --compare activations --dtype bfloat16 --context 512 \
        --out int8_activations_bf16_512.json
    python scripts/quantized_cpu.py --tier nf4 --compare many-rows --shapes 1x1,8x1,8x3,1x64,8x64 \
        --out nf4_many_rows.json

(the saved runs are in docs/results/milan/).

`kernel`: bitsandbytes' own CPU path (where it has no kernel for the CPU: whole-matrix conversion) against
speckv.kernels' blocked one, with the half-precision activations the tier had before either (int8 float16,
nf4 bfloat16) or `--dtype`, and whether the logits are identical; on a CPU where bitsandbytes has a kernel of its own
(int8: AVX-512, nf4: AVX512-BF16) there is nothing to compare. `activations`: the tier loaded with those
half-precision activations (or `--dtype`) and with float32 (speckv.models.quantized_activations_on_cpu), both with
whatever kernels load_model installs, and the share of positions where their greedy choices agree. `many-rows` (nf4
where bitsandbytes packs the weights for its own CPU kernel, AVX512-BF16): every pass through that kernel against
passes of many rows dequantized into bfloat16 (speckv.kernels.install_many_rows, as load_model chose).

A pass feeds `tokens` tokens to each of `sequences` sequences and keeps every logit: into an empty cache, or with
`--context N` (activations only) after each sequence's own N-token context, through SessionLM as the live loop
calls the model (a batched pass over per-request caches, each cut back to its context first); the median of
`--repeats` after one untimed pass of each shape and variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from speckv import kernels
from speckv.calibration import hardware_id, own_contexts, synthetic_ids
from speckv.models import DEFAULT_TARGET, load_model
from speckv.workers import LogitsCall, SessionLM

Variant = Callable[[torch.Tensor], torch.Tensor]  # token ids [sequences, tokens] -> logits


HALF = {"int8": "float16", "nf4": "bfloat16"}  # each tier's activations on a CPU before float32


def kernel_variants(model_spec: str, tier: str, dtype: str | None = None) -> tuple[dict[str, Variant], int]:
    """The two variants and the model's vocabulary size; activations in `dtype` (default: HALF)."""
    name = kernels.TIER_KERNELS[tier]
    model = load_model(model_spec, tier, dtype=dtype or HALF[tier], device="cpu")
    kernels.uninstall(name)
    if kernels.bitsandbytes_has_cpu_kernel(name):
        sys.exit(f"bitsandbytes has a CPU {tier} kernel of its own on this CPU: nothing to compare")

    def run(blocked: bool) -> Variant:
        def forward(ids: torch.Tensor) -> torch.Tensor:
            kernels.install(name) if blocked else kernels.uninstall(name)
            return model(ids, use_cache=False).logits
        return forward
    return {"bitsandbytes": run(False), "blocked": run(True)}, int(model.config.vocab_size)


def many_rows_variants(model_spec: str, tier: str) -> tuple[dict[str, Variant], int]:
    """nf4 where bitsandbytes packs the 4-bit weights for its own CPU kernel: every pass through that kernel
    against passes of many rows dequantized from the counts `install_many_rows` chose at load."""
    if tier != "nf4":
        sys.exit("--compare many-rows is for the nf4 tier")
    model = load_model(model_spec, tier, device="cpu")
    chosen = kernels.many_rows_of(model)
    if not chosen:
        sys.exit("no 4-bit layer multiplies many rows dequantized here (no packed CPU kernel, or not faster)")
    print(f"dequantized from (rows, by weight shape): {chosen}", flush=True)
    layers = kernels.many_rows_layers(model)

    def run(dense: bool) -> Variant:
        def forward(ids: torch.Tensor) -> torch.Tensor:
            for layer in layers:
                layer.dense_from = chosen[layer.unpacked.shape] if dense else sys.maxsize
            return model(ids, use_cache=False).logits
        return forward
    return {"packed": run(False), "many-rows": run(True)}, int(model.config.vocab_size)


def activation_variants(model_spec: str, tier: str, dtype: str | None = None, context: int = 0,
                        sequences: int = 0) -> tuple[dict[str, Variant], int]:
    """The two variants (activations in `dtype`, default HALF, and in float32) and the model's vocabulary size;
    with a `context`, each of up to `sequences` sequences' passes runs after a context of its own
    (`_after_context`)."""
    names = (dtype or HALF[tier], "float32")
    models = {name: load_model(model_spec, tier, dtype=name, device="cpu") for name in names}
    if context:
        variants = {name: _after_context(model, context, sequences) for name, model in models.items()}
    else:
        variants = {name: (lambda ids, model=model: model(ids, use_cache=False).logits)
                    for name, model in models.items()}
    return variants, int(models["float32"].config.vocab_size)


def _after_context(model: torch.nn.Module, context: int, sequences: int) -> Variant:
    """Sequence s's tokens fed after its own context (`own_contexts`), all sequences in one batched pass of the
    live loop's (SessionLM.logits_batch: each cache cut back to its context first, as after a rejection)."""
    lm = SessionLM(model)
    sessions = own_contexts(lm, sequences, context, salt=100)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        calls = [LogitsCall(session, prefix + row.tolist(), ids.shape[1])
                 for (session, prefix), row in zip(sessions, ids)]
        return torch.stack(lm.logits_batch(calls))
    return forward


COMPARISONS = ("activations", "kernel", "many-rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=sorted(HALF), required=True)
    parser.add_argument("--compare", choices=COMPARISONS, required=True)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="kernel: the activations; activations: the half precision compared with float32 "
                        "(default: the tier's half precision before float32)")
    parser.add_argument("--context", type=int, default=0,
                        help="activations only: each sequence's context tokens before its pass (default: none)")
    parser.add_argument("--model", default=DEFAULT_TARGET)
    parser.add_argument("--shapes", default=None, help="sequences x tokens, comma-separated "
                        "(default: kernel 1x1,1x9,8x1,1x64; activations 1x1,1x9,8x1,16x1,8x4,1x64)")
    parser.add_argument("--repeats", type=int, default=None, help="default: kernel 3, activations 5")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shapes = args.shapes or ("1x1,1x9,8x1,1x64" if args.compare == "kernel" else "1x1,1x9,8x1,16x1,8x4,1x64")
    repeats = args.repeats or (3 if args.compare == "kernel" else 5)

    if args.context and args.compare != "activations":
        parser.error("--context is for --compare activations")
    if args.compare == "activations" and args.dtype == "float32":
        parser.error("--dtype for --compare activations is the half precision compared with float32")
    if args.compare == "activations":
        most = max(int(shape.split("x")[0]) for shape in shapes.split(","))
        variants, vocab = activation_variants(args.model, args.tier, args.dtype, args.context, most)
    elif args.compare == "many-rows":
        variants, vocab = many_rows_variants(args.model, args.tier)
    else:
        variants, vocab = kernel_variants(args.model, args.tier, args.dtype)
    names = list(variants)
    rows = []
    for shape in shapes.split(","):
        sequences, tokens = (int(v) for v in shape.split("x"))
        ids = torch.tensor([synthetic_ids(tokens, vocab, salt=s) for s in range(sequences)])
        times: dict[str, list[float]] = {name: [] for name in names}
        logits = {}
        with torch.inference_mode():
            for name in names:  # untimed: a shape's first pass
                logits[name] = variants[name](ids)
            for r in range(repeats):
                for name in (names if r % 2 == 0 else names[::-1]):
                    start = time.perf_counter()
                    variants[name](ids)
                    times[name].append((time.perf_counter() - start) * 1e3)
        a, b = (logits[name] for name in names)
        row = {"sequences": sequences, "tokens": tokens, **{f"{n}_ms": statistics.median(times[n]) for n in names},
               "identical_logits": bool(torch.equal(a, b)),
               "greedy_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
        rows.append(row)
        print(f"{sequences} x {tokens}: " + ", ".join(f"{n} {row[f'{n}_ms']:.0f} ms" for n in names)
              + f"; logits identical: {row['identical_logits']}, greedy choices agree at "
              f"{row['greedy_agreement']:.0%} of positions", flush=True)
    kernels.install(kernels.TIER_KERNELS[args.tier])
    result = {"tier": args.tier, "compare": args.compare, "dtype": args.dtype, "context": args.context,
              "model": args.model,
              "hardware": hardware_id(torch.device("cpu")),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats,
              "block_bytes": kernels.BLOCK_BYTES, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()

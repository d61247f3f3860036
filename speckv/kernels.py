"""bitsandbytes' int8 and nf4 tiers on a CPU without its own kernels for them: blocked kernels in their place.

Where bitsandbytes has no CPU kernel of its own for a quantized matmul, it converts every weight matrix to a
float matrix at every pass and multiplies that: LLM.int8 (the int8 tier) runs `A.float() @ B.float().t()`
where it lacks AVX-512 (`torch._int_mm`), and a 4-bit layer (the nf4 tier) dequantizes its whole weight to the
compute dtype and calls `linear` where it lacks AVX512-BF16 (its packed kernel). Writing out the whole matrix
and reading it back is most of a decoding pass: on an AVX2-only EPYC a one-token int8 pass of the 1.5B target
took 2.9 s with it and 0.7 s without (docs/serving_log.md, "int8 passes without bitsandbytes' whole-matrix
conversion"). The kernels here compute the same products blocked over the output features: each block of
weight rows (BLOCK_BYTES of float32) is converted while it is in cache and multiplied at once.

- int8 (`blocked_int8_matmul`): every output element is the same float32 dot product of the same int8 values as
  in the fallback (the blocks split the output features, never the sum): the 1.5B target's logits were
  bit-identical with and without it.
- nf4 (`blocked_gemm_4bit`): each block is dequantized by bitsandbytes' own kernel to the same values as the
  whole matrix; the sums are the same float products, up to the order the BLAS adds them in.

`install(name)` registers one for the CPU only where bitsandbytes has none of its own; `load_model` does so
for the int8 and nf4 tiers on a CPU.

A third concerns plain `nn.Linear` layers, whatever the tier: a pass of a few rows (a decoded token, a
verification of γ+1, a catch-up) multiplies `input @ weight^T`, and where the BLAS runs that shape as one
matrix-vector product per row (MKL in float32 on the AMD EPYC here), two rows cost twice one and one row
streams the weights at half the speed the same product reaches as `weight @ input^T`. The 1.5B target in
float32 on that CPU, as calibrated: 403 / 753 / 1080 ms for passes of 1 / 2 / 3 tokens, 230 / 266 / 451 ms
computed the other way (one row padded with a zero row). Whether that holds depends on the CPU, the BLAS, the
dtype and the shape (bfloat16 here is faster as it is; one row through the 1.5B's down-projection ties), so
`install_small_rows(model)` times both products on the model's own weights at load, one weight shape at a
time (`probe_small_rows`: each count of 1-9 rows, then one count for each range up to 256 rows, a batched pass's
or a prompt chunk's), and swaps its linear layers to `SmallRowsLinear` only for the shapes and row counts
where the other is faster (docs/RESULTS.md, "Few-row passes multiplied the faster way").

A fourth concerns the nf4 tier where bitsandbytes has its own CPU kernel (AVX512-BF16): that kernel packs each
4-bit weight for itself and runs every pass through it, each row beyond the first costing about a third of what
a one-row pass does (8960 x 1536 on the AMX Xeon here: 0.5 ms one row, 11 ms 64, 88 ms 512), where the same weight
dequantized into bfloat16 and multiplied on the CPU's matrix units costs 4-5 ms for up to 64 rows and 12 ms for
512. `install_many_rows(model)` keeps each 4-bit weight's unpacked form too (half a byte a parameter more) and
makes its layers `ManyRowsLinear4bit`, which multiply passes of at least `dense_from` rows (a prompt, a batched
verification) dequantized, only for the weight shapes where a probe at load finds that clearly faster. Each thread
dequantizes into one reused tensor per weight shape (`dequantized_scratch`): a fresh one at every pass cost 6720 page
faults whenever the allocator had given the last back.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

BLOCK_BYTES = 2 * 2**20  # float32 weight rows converted at a time: about an L2 cache (2 MiB measured best here)


def _block_rows(in_features: int, multiple: int = 1) -> int:
    """Weight rows per block: BLOCK_BYTES of float32, a multiple of `multiple`, at least one multiple."""
    rows = max(1, BLOCK_BYTES // (4 * in_features))
    return max(multiple, rows - rows % multiple)


def blocked_int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a` [..., K] int8 times `b` [N, K] int8 transposed, as int32 [..., N]: bitsandbytes' CPU fallback
    (float32 products and sums, truncated to int32), with `b` converted BLOCK_BYTES of rows at a time."""
    rows = a.reshape(-1, a.shape[-1]).float()
    out = torch.empty(rows.shape[0], b.shape[0], dtype=torch.float32)
    step = _block_rows(b.shape[1])
    for i in range(0, b.shape[0], step):
        torch.mm(rows, b[i:i + step].float().t(), out=out[:, i:i + step])
    return out.to(torch.int32).reshape(*a.shape[:-1], b.shape[0])


def _blocked_int8_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    if out.dtype != torch.int32:
        raise ValueError(f"out must be int32, got {out.dtype}")
    out.copy_(blocked_int8_matmul(a, b))


def blocked_gemm_4bit(A: torch.Tensor, B: torch.Tensor, shapeB: list[int], absmax: torch.Tensor, blocksize: int,
                      quant_type: str, bias: torch.Tensor | None = None, absmax_8bit: torch.Tensor | None = None,
                      absmax_code: torch.Tensor | None = None,
                      absmax_offset: torch.Tensor | None = None) -> torch.Tensor:
    """`A` [..., K] times the 4-bit weight `B` ([N, K] packed two values a byte, one `absmax` scale per
    `blocksize` values) transposed, plus `bias`, in A's dtype [..., N]: bitsandbytes' default `gemm_4bit`
    (dequantize the whole weight, then `linear`), with the weight dequantized a block of rows at a time.
    Nested scales (`absmax_8bit`, double quantization) are dequantized first, as bitsandbytes does."""
    if absmax_8bit is not None:
        absmax = _nested_scales(absmax_8bit, absmax, absmax_code, absmax_offset)
    n, k = shapeB
    packed = B.view(torch.uint8).reshape(-1)
    rows = A.reshape(-1, k)
    out = torch.empty(rows.shape[0], n, dtype=A.dtype, device=A.device)
    # a block starts on a scale's first value and a whole byte: its rows hold a multiple of blocksize values
    step = _block_rows(k, blocksize // math.gcd(k, blocksize))
    for i in range(0, n, step):
        j = min(n, i + step)
        weight = torch.ops.bitsandbytes.dequantize_4bit.default(
            packed[i * k // 2:(j * k + 1) // 2], absmax[i * k // blocksize:-(-j * k // blocksize)], blocksize,
            quant_type, [j - i, k], A.dtype)
        torch.mm(rows, weight.t(), out=out[:, i:j])
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*A.shape[:-1], n)


def _nested_scales(absmax_8bit: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, offset: torch.Tensor,
                   blocksize: int = 256) -> torch.Tensor:
    """A 4-bit weight's float32 scales from their 8-bit quantized form (double quantization), as bitsandbytes
    dequantizes them."""
    return torch.ops.bitsandbytes.dequantize_blockwise.default(absmax_8bit, absmax, code, blocksize,
                                                               torch.float32) + offset


@dataclass(frozen=True)
class _Kernel:
    """One of ours: the bitsandbytes ops it implements, and the op whose CPU kernel means bitsandbytes has
    its own (ours is then not installed)."""

    impls: dict[str, Callable]
    theirs: str
    layer: str  # the bitsandbytes.nn layer class that runs it


KERNELS = {
    "int8-blocked": _Kernel({"int8_linear_matmul": blocked_int8_matmul, "int8_linear_matmul.out": _blocked_int8_out},
                            "int8_linear_matmul", "Linear8bitLt"),
    "nf4-blocked": _Kernel({"gemm_4bit": blocked_gemm_4bit}, "gemv_4bit", "Linear4bit"),
}
TIER_KERNELS = {"int8": "int8-blocked", "nf4": "nf4-blocked"}

_installed: dict[str, torch.library.Library] = {}  # our registrations while installed, by name


def _bitsandbytes_loaded() -> bool:
    """Whether bitsandbytes imports (importing it defines the ops and registers its kernels)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def bitsandbytes_has_cpu_kernel(name: str) -> bool:
    """Whether bitsandbytes registered a CPU kernel of its own for what `name` does (ours is installed only
    where it has none): int8 with AVX-512, 4-bit with AVX512-BF16."""
    theirs = KERNELS[name].theirs
    if name in _installed and theirs in KERNELS[name].impls:
        return False  # the CPU kernel the dispatcher has is ours
    return _bitsandbytes_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"bitsandbytes::{theirs}", "CPU")


def install(name: str) -> bool:
    """Register kernel `name` ("int8-blocked", "nf4-blocked") as bitsandbytes' CPU kernel where it has none of
    its own (it would convert whole matrices); True while ours is installed. Idempotent; `uninstall` undoes it."""
    if name in _installed:
        return True
    if not _bitsandbytes_loaded() or bitsandbytes_has_cpu_kernel(name):
        return False
    library = torch.library.Library("bitsandbytes", "IMPL")
    for op, fn in KERNELS[name].impls.items():
        library.impl(op, fn, "CPU")
    _installed[name] = library
    return True


def uninstall(name: str) -> None:
    """Back to bitsandbytes' own dispatch (its whole-matrix fallback): for measuring the two side by side."""
    library = _installed.pop(name, None)
    if library is not None:
        library._destroy()


def installed(name: str) -> bool:
    return name in _installed


def kernels_for(model: torch.nn.Module) -> str:
    """What of ours `model`'s layers run, for keys of what its calls cost ("" for none): the names of the
    installed kernels whose bitsandbytes layers it has on the CPU (a 4-bit layer that bitsandbytes packed for
    its own kernel runs that instead), SMALL_ROWS where its linear layers are `SmallRowsLinear` and MANY_ROWS where
    its 4-bit ones are `ManyRowsLinear4bit`."""
    used = [SMALL_ROWS] if small_rows_of(model) else []
    if many_rows_of(model):
        used.append(MANY_ROWS)
    if not _installed:
        return ",".join(used)
    import bitsandbytes.nn

    for name in sorted(_installed):
        layer = getattr(bitsandbytes.nn, KERNELS[name].layer)
        if any(isinstance(m, layer) and m.weight.device.type == "cpu" and not _packed_for_cpu(m)
               for m in model.modules()):
            used.append(name)
    return ",".join(used)


INT8_INPUT_CAST = "MatMul8bitLt: inputs will be cast from"


class _DropInputCast(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(INT8_INPUT_CAST)


def quiet_int8_input_cast() -> None:
    """Silence bitsandbytes' warning that an LLM.int8 layer's input is cast to float16 for quantizing, logged at
    every layer of every pass where activations are not float16: the int8 tier on a CPU runs them in float32 or
    bfloat16 on purpose (speckv.models.quantized_activations_on_cpu), and casting is how LLM.int8 quantizes them.
    Idempotent."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInputCast) for f in logger.filters):
        logger.addFilter(_DropInputCast())


# ------------------------------------------------------------------------------------ few-row linear passes

SMALL_ROWS = "small-rows"  # its name in a calibration key (kernels_for)
SMALL_ROWS_MAX = 9  # row counts probed one by one: a decode, a verification of up to γmax+1, a catch-up
ROW_BUCKETS = (16, 32, 64, 128, 256)  # then one count for each range up to it (batched passes, prompts read in
# chunks of up to 256): whole float32 passes of the 1.5B here take 0.65-0.96x the time transposed from 10 to 256 rows
PROBE_BYTES = 64 * 2**20  # weights of a shape a probe multiplies per timing: twice the last-level cache of
# the EPYC here, so they stream from memory as in a pass (weights that fit the cache time the cache instead)
PROBE_ROUNDS = 5
PROBE_GATE = 0.8  # a shape is probed past two rows only where they cost at most this share transposed: a BLAS
# that runs few rows as matrix-vector products shows it there (float32 here: 0.3-0.6), and a tie there (the
# bfloat16 1.5B's down-projection here) would swap layers, and key calibrations, by the noise of each load


def transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear(x, weight, bias)` ([..., K] by [N, K] -> [..., N]) computed as `weight @ x^T`, a lone row
    padded with a zero row (a BLAS may run one column as a slower matrix-vector product). The same products
    and sums as `linear`, added in the order this product's kernel adds them."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1:
        out = torch.mm(weight, torch.cat([rows, torch.zeros_like(rows)]).t())[:, :1]
    else:
        out = torch.mm(weight, rows.t())
    out = out.t().contiguous()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class SmallRowsLinear(torch.nn.Linear):
    """An `nn.Linear` that multiplies passes of `transposed_rows` rows with `transposed_linear` (the faster
    product there, as `probe_small_rows` measured), every other pass as `nn.Linear` does."""

    transposed_rows: frozenset[int] = frozenset()  # set per layer by install_small_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features in self.transposed_rows:
            return transposed_linear(x, self.weight, self.bias)
        return super().forward(x)


def plain_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """`model`'s float linear layers on the CPU that are exactly `nn.Linear` (a bitsandbytes layer subclasses
    it and multiplies its own way), in module order."""
    return [m for m in model.modules() if type(m) in (torch.nn.Linear, SmallRowsLinear)
            and m.weight.device.type == "cpu" and m.weight.dtype.is_floating_point]


def probe_small_rows(weights: list[torch.Tensor], most: int = SMALL_ROWS_MAX,
                     buckets: tuple[int, ...] = ROW_BUCKETS, rounds: int = PROBE_ROUNDS,
                     clock: Callable[[], float] = time.perf_counter) -> frozenset[int]:
    """The row counts at which `transposed_linear` over `weights` (each [N, K]) costs less than `linear`: each
    count up to `most`, then each of `buckets` for the counts it ends (`_counts_decided_by`); by the median
    over `rounds` of the ratio of the two, timed back to back in each round so that a neighbour's load falls
    on both.
    Two rows first: where the BLAS has no matrix-vector path for few rows the transposed product does not win
    there by PROBE_GATE, and nothing else is timed (a bfloat16 model here, a tenth of a second). Past that no
    margin: where the two tie, either choice costs what noise does (a margin of 0.9 dropped the float32 1.5B's
    one-row win, 0.67x a whole pass, in one load of about ten). A bucket's count multiplies the weights' first
    rows only, as many as `most` rows of all of them take (`_bucket_weights`): compute, not the weights'
    streaming, bounds a product of that many rows, and timing all of them would take seconds a load."""
    chosen: set[int] = set()
    for m in [2, 1, *range(3, most + 1), *buckets]:
        ratio = _median_ratio(_bucket_weights(weights, m, most), m, rounds, clock)
        if m == 2 and ratio > PROBE_GATE:
            break
        if ratio < 1.0:
            chosen.update(_counts_decided_by(m, most, buckets))
    return frozenset(chosen)


def _counts_decided_by(rows: int, most: int, buckets: tuple[int, ...]) -> range:
    """The row counts a timing of `rows` rows decides: itself up to `most`; a bucket's, the counts past the
    bucket (or `most`) below it, through itself."""
    if rows <= most:
        return range(rows, rows + 1)
    return range(max([most, *(b for b in buckets if b < rows)]) + 1, rows + 1)


def _median_ratio(weights: list[torch.Tensor], rows: int, rounds: int, clock: Callable[[], float]) -> float:
    """Median over `rounds` of transposed / linear time for `rows` rows through `weights`."""
    inputs = [torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights]
    ratios = []
    for _ in range(rounds):
        took = []
        for product in (torch.nn.functional.linear, transposed_linear):
            start = clock()
            for x, w in zip(inputs, weights):
                product(x, w)
            took.append(clock() - start)
        ratios.append(took[1] / took[0])
    return statistics.median(ratios)


def _bucket_weights(weights: list[torch.Tensor], rows: int, most: int) -> list[torch.Tensor]:
    """`weights` for timing `rows` rows: all of them up to `most` rows, past that each cut to its first
    `most / rows` of its rows (at least one), so a timing multiplies what `most` rows through all of them do."""
    if rows <= most:
        return weights
    return [w[:max(1, w.shape[0] * most // rows)] for w in weights]


def _probe_weights(layers: list[torch.nn.Linear]) -> list[torch.Tensor]:
    """Weights of one shape to probe with: the layers' own, up to PROBE_BYTES; a single matrix larger than that
    (an output embedding) cut to its first rows, same width; none where all of them hold less than PROBE_BYTES
    (they stay in cache: such passes are cheap whichever way)."""
    weights, size = [], 0
    for layer in layers:
        weight = layer.weight.detach()
        row_bytes = weight.shape[1] * weight.element_size()
        weights.append(weight[:max(1, -(-(PROBE_BYTES - size) // row_bytes))])
        size += weights[-1].shape[0] * row_bytes
        if size >= PROBE_BYTES:
            return weights
    return []


def install_small_rows(model: torch.nn.Module) -> dict[tuple[int, int], frozenset[int]]:
    """Probe `model`'s plain linear layers on the CPU, one weight shape at a time (`probe_small_rows` over
    `_probe_weights`), and make the layers of each shape `SmallRowsLinear` for the row counts where the
    transposed product is faster for that shape; leave the rest as they are. Returns those row counts by
    shape ([N, K]), shapes with none left out.

    By shape because the BLAS's path depends on it: one row of the float32 1.5B here costs 0.5x transposed
    through its MLP's up-projections and 1.1x through its down-projection; probed over the first 128 MiB of
    all shapes together, the choice for one row rode on their mix (0.6-0.8x), and one load in ten took the
    slower."""
    by_shape: dict[tuple[int, int], list[torch.nn.Linear]] = {}
    for layer in plain_linears(model):
        by_shape.setdefault(tuple(layer.weight.shape), []).append(layer)
    chosen = {}
    for shape, layers in by_shape.items():
        weights = _probe_weights(layers)
        with torch.inference_mode():
            rows = probe_small_rows(weights) if weights else frozenset()
        for layer in layers:
            if rows:
                layer.__class__ = SmallRowsLinear
                layer.transposed_rows = rows
            elif type(layer) is SmallRowsLinear:
                layer.__class__ = torch.nn.Linear
                layer.__dict__.pop("transposed_rows", None)
        if rows:
            chosen[shape] = rows
    return chosen


def small_rows_of(model: torch.nn.Module) -> dict[tuple[int, int], frozenset[int]]:
    """The row counts `model`'s linear layers multiply transposed, by weight shape (empty where
    `install_small_rows` chose none)."""
    return {tuple(m.weight.shape): m.transposed_rows for m in model.modules() if type(m) is SmallRowsLinear}


# ------------------------------------------------------------------------------ 4-bit passes of many rows

MANY_ROWS = "nf4-many-rows"  # its name in a calibration key (kernels_for)
MANY_ROWS_PROBED = (16, 24, 32, 48, 64, 128)  # row counts timed both ways; past the last the dequantized product
# only gains (the packed kernel's cost grows with the rows, the dequantizing does not)
MANY_ROWS_GATE = 0.8  # a shape keeps the unpacked weights (half a byte a parameter) only where, at the last count
# probed, the dequantized product costs at most this share of the packed kernel's


@dataclass(frozen=True)
class Unpacked4bit:
    """A 4-bit weight as bitsandbytes quantized it, before its CPU kernel packs it: `qweight` [(N*K+1)//2]
    uint8, two values a byte, one float32 `absmax` scale per `blocksize` values (nested scales dequantized)."""

    qweight: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    quant_type: str
    shape: tuple[int, int]  # [N, K]

    def dequantized(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight [N, K] in `dtype`, by bitsandbytes' own dequantizing kernel; written into `out` (contiguous
        [N, K] of `dtype`) where given (`dequantize_4bit_into`), else into a fresh tensor."""
        if out is not None:
            dequantize_4bit_into(self, out)
            return out
        return torch.ops.bitsandbytes.dequantize_4bit.default(self.qweight, self.absmax, self.blocksize,
                                                              self.quant_type, list(self.shape), dtype)


_C_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dequantize_4bit_into(unpacked: Unpacked4bit, out: torch.Tensor) -> None:
    """`unpacked` dequantized into `out` ([N, K], contiguous, the compute dtype) by bitsandbytes' own CPU kernel.

    bitsandbytes' op allocates its result at every call, and a 27 MB tensor (the 1.5B's MLP weights in bf16) lands
    on pages the OS maps afresh whenever the allocator has handed the last one back: 6720 page faults, 2.2 -> 8 ms,
    in a fifth to a quarter of the passes, enough to flip the load-time probe's choice (docs/serving_log.md, "The
    dequantized weight in a reused buffer"). Written by `_writer_into` where bitsandbytes has a way to write into a
    given tensor; else by its allocating op and a copy (the same values either way)."""
    n, k = unpacked.shape
    if out.shape != (n, k) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {[n, k]} tensor, got {list(out.shape)} {out.stride()}")
    write = _writer_into(unpacked.quant_type, out.dtype)
    if write is None or not write(unpacked, out):
        out.copy_(unpacked.dequantized(out.dtype))


@functools.cache
def _writer_into(quant_type: str, dtype: torch.dtype) -> Callable[[Unpacked4bit, torch.Tensor], bool] | None:
    """How bitsandbytes writes a `quant_type` weight dequantized into a given `dtype` tensor on the CPU, resolved once
    (a pass dequantizes ~84 weights): its own `dequantize_4bit.out` where it has a CPU kernel for it (0.50 has none),
    else the C function its CPU `dequantize_4bit` kernel calls, with the same arguments; None where neither. The
    writer returns whether it wrote (the C function does not take every weight)."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::dequantize_4bit.out", "CPU"):
        def write_out(u: Unpacked4bit, out: torch.Tensor) -> bool:
            torch.ops.bitsandbytes.dequantize_4bit.out(u.qweight, u.absmax, u.blocksize, u.quant_type, list(u.shape),
                                                       out.dtype, out=out)
            return True

        return write_out
    from bitsandbytes.cextension import lib
    from bitsandbytes.functional import get_ptr

    name = _C_DTYPES.get(dtype)
    function = None if name is None else getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{name}", None)
    if function is None:
        return None

    def write(u: Unpacked4bit, out: torch.Tensor) -> bool:
        n, k = u.shape
        # bitsandbytes' CPU kernel leaves these to its Python fallback (an odd number of columns; its AVX-512 path's
        # accuracy at blocks of 2048 and more): so do we
        if k % 2 or u.blocksize >= 2048 or u.absmax.dtype != torch.float32:
            return False
        function(get_ptr(u.qweight), get_ptr(u.absmax), get_ptr(out), ctypes.c_longlong(u.blocksize),
                 ctypes.c_longlong(n), ctypes.c_longlong(k))
        return True

    return write


_scratch = threading.local()  # per thread: {(shape, dtype): the tensor ManyRowsLinear4bit dequantizes into}


def dequantized_scratch(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """This thread's tensor for a dequantized weight of `shape` in `dtype`, which every layer of that shape reuses:
    a thread runs one product at a time, and each is done before the next layer dequantizes."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get((shape, dtype))
    if buffer is None:
        buffer = buffers[shape, dtype] = torch.empty(shape, dtype=dtype)
    return buffer


def unpacked_4bit(layer: torch.nn.Module) -> Unpacked4bit | None:
    """`layer`'s 4-bit weight before bitsandbytes packs it for its CPU kernel (at its first pass); None once it is
    packed (nothing left to keep)."""
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return None
    absmax = state.absmax
    if state.nested:
        absmax = _nested_scales(absmax, state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize)
    return Unpacked4bit(layer.weight.data.view(torch.uint8).reshape(-1), absmax.float(), state.blocksize,
                        state.quant_type, tuple(state.shape))


@functools.cache
def many_rows_class() -> type:
    """`ManyRowsLinear4bit`, a subclass of bitsandbytes' Linear4bit (made at first use: bitsandbytes is imported
    only where a 4-bit model is loaded)."""
    import bitsandbytes.nn

    class ManyRowsLinear4bit(bitsandbytes.nn.Linear4bit):
        """A 4-bit layer that multiplies passes of at least `dense_from` rows by its weight dequantized into the
        compute dtype (`unpacked`), every other pass as Linear4bit does (bitsandbytes' packed CPU kernel)."""

        dense_from: int = sys.maxsize  # set per layer by install_many_rows
        unpacked: Unpacked4bit

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.numel() // x.shape[-1] < self.dense_from:
                return super().forward(x)
            dtype = self.compute_dtype or x.dtype
            bias = None if self.bias is None else self.bias.to(dtype)
            # a product that autograd keeps the weight of for later must have a weight of its own
            out = None if torch.is_grad_enabled() else dequantized_scratch(self.unpacked.shape, dtype)
            return torch.nn.functional.linear(x.to(dtype), self.unpacked.dequantized(dtype, out), bias).to(x.dtype)

    return ManyRowsLinear4bit


def _packed_for_cpu(layer: torch.nn.Module) -> bool:
    """Whether bitsandbytes runs `layer` (a Linear4bit on the CPU) through its own packed CPU kernel."""
    return layer.weight.device.type == "cpu" and bool(getattr(layer, "support_avx512bf16_for_cpu", False))


def probe_many_rows(layer: torch.nn.Module, counts: tuple[int, ...] = MANY_ROWS_PROBED, rounds: int = PROBE_ROUNDS,
                    clock: Callable[[], float] = time.perf_counter) -> int | None:
    """The row count from which passes through `layer` (a ManyRowsLinear4bit) are dequantized: the first of
    `counts` from which on the dequantized product is faster at every count (median over `rounds` of the ratio
    of the two, timed back to back), where at the last it costs at most MANY_ROWS_GATE of the packed kernel's;
    else None (the shape keeps the packed kernel and drops its unpacked weights)."""
    ratios = [statistics.median(dense / packed for packed, dense in time_many_rows(layer, rows, rounds, clock))
              for rows in counts]
    if ratios[-1] > MANY_ROWS_GATE:
        return None
    first = len(counts)
    while first and ratios[first - 1] < 1.0:
        first -= 1
    return counts[first]


def time_many_rows(layer: torch.nn.Module, rows: int, rounds: int = PROBE_ROUNDS,
                   clock: Callable[[], float] = time.perf_counter) -> list[tuple[float, float]]:
    """(packed kernel, dequantized) seconds of a pass of `rows` rows through `layer` (a ManyRowsLinear4bit), back to
    back, in each of `rounds` rounds, after an untimed pass of each (the layer's very first packs its weight)."""
    x = torch.randn(rows, layer.in_features, dtype=layer.compute_dtype or torch.bfloat16)
    for dense_from in (sys.maxsize, rows):
        layer.dense_from = dense_from
        layer(x)
    took = []
    for _ in range(rounds):
        times = []
        for dense_from in (sys.maxsize, rows):
            layer.dense_from = dense_from
            start = clock()
            layer(x)
            times.append(clock() - start)
        took.append((times[0], times[1]))
    return took


def install_many_rows(model: torch.nn.Module) -> dict[tuple[int, int], int]:
    """Where bitsandbytes runs `model`'s 4-bit layers through its packed CPU kernel, probe one layer of each weight
    shape (`probe_many_rows`) and make the layers of each shape where passes of many rows are clearly faster
    dequantized `ManyRowsLinear4bit` from the row count found; leave the rest as they are. Call it before the
    model's first pass (that packs the weights). Returns the count by shape ([N, K]), shapes with none left out."""
    import bitsandbytes.nn

    by_shape: dict[tuple[int, int], list[tuple[torch.nn.Module, Unpacked4bit]]] = {}
    for layer in model.modules():
        if isinstance(layer, bitsandbytes.nn.Linear4bit) and _packed_for_cpu(layer):
            unpacked = unpacked_4bit(layer)
            if unpacked is not None:
                by_shape.setdefault(unpacked.shape, []).append((layer, unpacked))
    chosen = {}
    for shape, layers in by_shape.items():
        for layer, unpacked in layers:
            layer.__class__ = many_rows_class()
            layer.unpacked = unpacked
        with torch.inference_mode():
            dense_from = probe_many_rows(layers[0][0])
        for layer, _ in layers:
            if dense_from is None:
                layer.__class__ = bitsandbytes.nn.Linear4bit
                del layer.unpacked
                layer.__dict__.pop("dense_from", None)
            else:
                layer.dense_from = dense_from
        if dense_from is not None:
            chosen[shape] = dense_from
    return chosen


def many_rows_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """`model`'s ManyRowsLinear4bit layers (none where bitsandbytes was never imported: no 4-bit model)."""
    if "bitsandbytes" not in sys.modules:
        return []
    return [m for m in model.modules() if type(m) is many_rows_class()]


def many_rows_bytes(model: torch.nn.Module) -> int:
    """Bytes the unpacked copies of `model`'s 4-bit weights hold (`install_many_rows`): not parameters or buffers,
    so `get_memory_footprint` leaves them out."""
    return sum(m.unpacked.qweight.nbytes + m.unpacked.absmax.nbytes for m in many_rows_layers(model))


def many_rows_scratch_bytes(model: torch.nn.Module) -> int:
    """Bytes each thread that runs `model`'s passes of many rows holds for their dequantized weights
    (`dequantized_scratch`: one per weight shape, in the compute dtype)."""
    shapes = {(m.unpacked.shape, m.compute_dtype or torch.bfloat16) for m in many_rows_layers(model)}
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes)


def many_rows_of(model: torch.nn.Module) -> dict[tuple[int, int], int]:
    """The row count from which `model`'s 4-bit layers multiply dequantized, by weight shape (empty where
    `install_many_rows` chose none)."""
    return {m.unpacked.shape: m.dense_from for m in many_rows_layers(model)}

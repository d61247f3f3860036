"""LLM.int8 (the int8 tier) on a CPU: a kernel bitsandbytes lacks without AVX-512, and quiet float32 inputs.

LLM.int8 (the int8 tier) quantizes a layer's input to int8 row by row and multiplies it with the int8 weights.
bitsandbytes gives the CPU a kernel of its own only with AVX-512 (`torch._int_mm`); elsewhere it falls back to
`A.float() @ B.float().t()`, which writes the whole weight matrix out as float32 at every pass: on an AVX2-only
EPYC a one-token pass of the 1.5B target took 2.9 s with it and 0.7 s without (`scripts/int8_cpu.py --compare kernel`;
docs/SERVING.md, "int8 passes without bitsandbytes' whole-matrix conversion"). `install_int8_matmul` registers
the same arithmetic blocked over the output features: each block of weight rows is converted while it is in
cache and multiplied at once. Every output element is the same float32 dot product of the same int8 values as
in the fallback (the blocks split the output features, never the sum), so the results are the fallback's: the
1.5B target's logits were bit-identical with and without it.
"""

from __future__ import annotations

import logging

import torch

OP = "bitsandbytes::int8_linear_matmul"
BLOCK_BYTES = 2 * 2**20  # float32 weight rows converted at a time: about an L2 cache (2 MiB measured best here)

_library: torch.library.Library | None = None  # our registration while installed


def blocked_int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a` [..., K] int8 times `b` [N, K] int8 transposed, as int32 [..., N]: bitsandbytes' CPU fallback
    (float32 products and sums, truncated to int32), with `b` converted BLOCK_BYTES of rows at a time."""
    rows = a.reshape(-1, a.shape[-1]).float()
    out = torch.empty(rows.shape[0], b.shape[0], dtype=torch.float32)
    step = max(1, BLOCK_BYTES // (4 * b.shape[1]))
    for i in range(0, b.shape[0], step):
        torch.mm(rows, b[i:i + step].float().t(), out=out[:, i:i + step])
    return out.to(torch.int32).reshape(*a.shape[:-1], b.shape[0])


def _blocked_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    if out.dtype != torch.int32:
        raise ValueError(f"out must be int32, got {out.dtype}")
    out.copy_(blocked_int8_matmul(a, b))


def _bitsandbytes_loaded() -> bool:
    """Whether bitsandbytes imports (importing it defines the op and registers its kernels)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def bitsandbytes_has_cpu_int8_kernel() -> bool:
    """Whether bitsandbytes registered a CPU kernel of its own for the int8 matmul (ours is installed only where
    it has none)."""
    return _library is None and _bitsandbytes_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")


def install_int8_matmul() -> bool:
    """Register `blocked_int8_matmul` as bitsandbytes' CPU int8 matmul where it has none of its own (it would use
    its whole-matrix fallback); True while ours is installed. Idempotent; `uninstall_int8_matmul` undoes it."""
    global _library
    if _library is not None:
        return True
    if not _bitsandbytes_loaded() or bitsandbytes_has_cpu_int8_kernel():
        return False
    library = torch.library.Library("bitsandbytes", "IMPL")
    library.impl("int8_linear_matmul", blocked_int8_matmul, "CPU")
    library.impl("int8_linear_matmul.out", _blocked_out, "CPU")
    _library = library
    return True


def uninstall_int8_matmul() -> None:
    """Back to bitsandbytes' own dispatch (its fallback): for measuring the two side by side."""
    global _library
    if _library is not None:
        _library._destroy()
        _library = None


def kernels_for(model: torch.nn.Module) -> str:
    """What of ours `model`'s layers run, for keys of what its calls cost ("" for none): "int8-blocked" where it
    has LLM.int8 layers on the CPU and our int8 matmul is installed."""
    if _library is None:
        return ""
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return ""
    on_cpu = (m.weight.device.type == "cpu" for m in model.modules() if isinstance(m, Linear8bitLt))
    return "int8-blocked" if any(on_cpu) else ""


INT8_INPUT_CAST = "MatMul8bitLt: inputs will be cast from"


class _DropInputCast(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(INT8_INPUT_CAST)


def quiet_int8_input_cast() -> None:
    """Silence bitsandbytes' warning that an LLM.int8 layer's input is cast to float16 for quantizing, logged at
    every layer of every pass where activations are not float16: the int8 tier on a CPU runs them in float32 on
    purpose (speckv.models.INT8_CPU_ACTIVATIONS), and casting is how LLM.int8 quantizes them. Idempotent."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInputCast) for f in logger.filters):
        logger.addFilter(_DropInputCast())

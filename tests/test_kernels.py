"""The blocked int8 and 4-bit matmuls (speckv.kernels): the same results as bitsandbytes' CPU fallbacks, and
installed for the int8 and nf4 tiers where bitsandbytes has no CPU kernel of its own."""

import pytest
import torch

from speckv import kernels
from tests.conftest import tiny_model

bnb = pytest.importorskip("bitsandbytes")


INT8, NF4 = "int8-blocked", "nf4-blocked"


@pytest.fixture
def fallback():
    """bitsandbytes' own dispatch while the test runs (its fallbacks where it has no CPU kernel), ours after."""
    was = [name for name in kernels.KERNELS if kernels.installed(name)]
    for name in kernels.KERNELS:
        kernels.uninstall(name)
    yield
    for name in kernels.KERNELS:
        kernels.uninstall(name)  # whatever the test installed (after monkeypatch has undone its patches)
    for name in was:
        kernels.install(name)


def _fallback_formula(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes' default CPU kernel computes (backends/default/ops.py, _int8_linear_matmul_impl)."""
    return torch.matmul(a.float(), b.float().t()).to(torch.int32)


@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96)])
def test_the_blocked_matmul_is_the_fallbacks_arithmetic_over_blocks_that_do_not_divide_the_rows(monkeypatch, shape):
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 4 * 96 * 7)  # 7 weight rows a block: 50 rows in 8 blocks, one short
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, shape, dtype=torch.int8, generator=generator)
    b = torch.randint(-127, 128, (50, 96), dtype=torch.int8, generator=generator)
    got = kernels.blocked_int8_matmul(a, b)
    assert got.shape == (*shape[:-1], 50) and got.dtype == torch.int32
    assert torch.equal(got, _fallback_formula(a, b))


def test_installed_it_is_what_bitsandbytes_dispatches_to_and_its_int8_layers_give_the_same_output(fallback,
                                                                                                  monkeypatch):
    if kernels.bitsandbytes_has_cpu_kernel(INT8):
        pytest.skip("bitsandbytes has a CPU int8 kernel of its own on this CPU (AVX-512): ours is not installed")
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 4 * 64 * 16)  # several blocks in the 96-row layer
    layer = bnb.nn.Linear8bitLt(64, 96, bias=True, has_fp16_weights=False, threshold=6.0)
    torch.manual_seed(0)
    layer.load_state_dict({"weight": torch.randn(96, 64) * 0.1, "bias": torch.randn(96) * 0.1})
    layer = layer.to("cpu").eval()  # quantizes the weights to int8; in training bitsandbytes takes another path
    x = torch.randn(3, 5, 64, dtype=torch.float16)
    x[..., 3] = 8.0  # an outlier column: the mixed decomposition's fp16 part runs too
    calls = []
    counted = _counting(kernels.blocked_int8_matmul, calls)
    monkeypatch.setitem(kernels.KERNELS[INT8].impls, "int8_linear_matmul", counted)
    with torch.inference_mode():
        before = layer(x)
        assert kernels.install(INT8)
        after = layer(x)
    assert calls, "bitsandbytes did not dispatch its int8 matmul to the installed kernel"
    assert torch.equal(before, after)


def _counting(function, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return counted


def test_loading_the_int8_tier_on_the_cpu_installs_it_where_bitsandbytes_has_no_cpu_kernel(fallback, tmp_path):
    from speckv.models import load_model

    tiny_model(0, torch.float16).save_pretrained(tmp_path / "tiny")
    load_model(str(tmp_path / "tiny"), "int8", device="cpu")
    assert kernels.installed(INT8) != kernels.bitsandbytes_has_cpu_kernel(INT8)


def test_an_int8_models_calibration_key_names_the_kernel_its_calls_ran_with(fallback, tmp_path):
    """A calibration measured with bitsandbytes' fallback must not price passes run with ours, nor the reverse."""
    from speckv.calibration import CalibrationKey
    from speckv.models import load_model

    if kernels.bitsandbytes_has_cpu_kernel(INT8):
        pytest.skip("bitsandbytes has a CPU int8 kernel of its own on this CPU (AVX-512): ours is not installed")
    tiny_model(0, torch.float16).save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), "int8", device="cpu")
    ours = CalibrationKey.of(model, "target", "int8")
    kernels.uninstall(INT8)
    theirs = CalibrationKey.of(model, "target", "int8")
    assert ours.kernels == "int8-blocked" and theirs.kernels == ""
    assert ours.digest() != theirs.digest()
    assert CalibrationKey.of(tiny_model(0), "target", "fp16").kernels == ""  # no int8 layers: nothing of ours runs


def test_the_int8_tier_on_a_cpu_runs_its_activations_in_float32_without_a_warning_at_every_layer(tmp_path, caplog):
    """A CPU emulates float16 arithmetic: `auto` gives the int8 tier float32 activations there, and bitsandbytes'
    warning that it casts them to float16 for quantizing (logged at every layer of every pass) is silenced."""
    import logging

    from speckv.models import CPU_QUANTIZED_ACTIVATIONS, load_model

    tiny_model(0, torch.float16).save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), "int8", device="cpu")
    assert model.dtype == CPU_QUANTIZED_ACTIVATIONS == torch.float32
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"), torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert not [r for r in caplog.records if kernels.INT8_INPUT_CAST in r.getMessage()]
    assert load_model(str(tmp_path / "tiny"), "int8", dtype="float16", device="cpu").dtype == torch.float16


# ------------------------------------------------------------------------------------------------- 4-bit (nf4)


def _four_bit_weight(n: int, k: int, blocksize: int = 64, nested: bool = False):
    import bitsandbytes.functional as F

    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    return F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)


def _default_gemm_4bit(A, packed, state, bias=None):
    """What bitsandbytes' default CPU path computes (backends/default/ops.py, _gemm_4bit_default_impl): the whole
    weight dequantized to A's dtype, then `linear`."""
    import bitsandbytes.functional as F

    return torch.nn.functional.linear(A, F.dequantize_4bit(packed, state).to(A.dtype), bias)


def _gemm_4bit_args(packed, state):
    """`packed` and `state` as bitsandbytes' gemm_4bit op takes them (nested scales as its matmul_4bit passes)."""
    if state.nested:
        return (packed, state.shape, state.state2.absmax, state.blocksize, state.quant_type), {
            "absmax_8bit": state.absmax, "absmax_code": state.state2.code, "absmax_offset": state.offset}
    return (packed, state.shape, state.absmax, state.blocksize, state.quant_type), {}


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96)])
def test_the_blocked_4bit_matmul_is_the_default_paths_arithmetic_over_blocks_that_do_not_divide_the_rows(
        monkeypatch, shape, nested):
    """Blocks of 7 rows hold 672 values, not a multiple of the 64 a scale covers: each block must start on a
    scale's first value (here 2 rows a unit: 8 rows a block, 50 rows in 7 blocks, the last one short)."""
    if kernels.bitsandbytes_has_cpu_kernel(NF4):
        # there its dequantize_4bit (which the blocks call) is its own CPU library's, and it reads a weight whose
        # rows are not a whole number of scales (96 values) as if every row began a scale: 0.08 from the
        # weight where the default path is 0.02 (AVX512-BF16 EPYC, bitsandbytes 0.50.2; identical to it for rows of 128)
        pytest.skip("bitsandbytes has a CPU 4-bit kernel of its own on this CPU (AVX512-BF16): ours is not installed")
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 4 * 96 * 7)
    packed, state = _four_bit_weight(50, 96, nested=nested)
    A = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(50, generator=torch.Generator().manual_seed(3))
    args, nested_args = _gemm_4bit_args(packed, state)
    got = kernels.blocked_gemm_4bit(A, *args, bias=bias, **nested_args)
    assert got.shape == (*shape[:-1], 50) and got.dtype == A.dtype
    torch.testing.assert_close(got, _default_gemm_4bit(A, packed, state, bias), rtol=1e-5, atol=1e-5)


def test_installed_it_is_what_a_4bit_layer_dispatches_to_where_bitsandbytes_has_no_cpu_kernel(fallback,
                                                                                               monkeypatch):
    if kernels.bitsandbytes_has_cpu_kernel(NF4):
        pytest.skip("bitsandbytes has a CPU 4-bit kernel of its own on this CPU (AVX512-BF16): ours is not installed")
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 4 * 64 * 16)  # several blocks in the 96-row layer
    layer = bnb.nn.Linear4bit(64, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    torch.manual_seed(0)
    layer.load_state_dict({"weight": torch.randn(96, 64) * 0.1, "bias": torch.randn(96) * 0.1})
    layer = layer.to("cpu").eval()  # quantizes the weights to 4 bits
    x = torch.randn(3, 5, 64)
    calls = []
    monkeypatch.setitem(kernels.KERNELS[NF4].impls, "gemm_4bit", _counting(kernels.blocked_gemm_4bit, calls))
    with torch.inference_mode():
        before = layer(x)
        assert kernels.install(NF4)
        after = layer(x)
    assert calls, "bitsandbytes did not dispatch its 4-bit matmul to the installed kernel"
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_loading_the_nf4_tier_on_a_cpu_without_bitsandbytes_own_kernel_installs_ours_and_computes_in_float32(
        fallback, tmp_path):
    """Where bitsandbytes has no 4-bit CPU kernel (no AVX512-BF16) ours runs, and float32 is not emulated:
    `auto` gives float32 there; where it has one, its kernel computes in bf16 and `auto` stays bf16."""
    from speckv.calibration import CalibrationKey
    from speckv.models import CPU_QUANTIZED_ACTIVATIONS, load_model

    tiny_model(0, torch.bfloat16).save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), "nf4", device="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    if kernels.bitsandbytes_has_cpu_kernel(NF4):
        assert not kernels.installed(NF4) and model.dtype == torch.bfloat16
        return
    assert kernels.installed(NF4) and model.dtype == CPU_QUANTIZED_ACTIVATIONS == torch.float32
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    ours = CalibrationKey.of(model, "target", "nf4")
    kernels.uninstall(NF4)
    assert ours.kernels == NF4 and CalibrationKey.of(model, "target", "nf4").kernels == ""

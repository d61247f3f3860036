"""The blocked int8 matmul (speckv.kernels): the same results as bitsandbytes' CPU fallback, and installed for
the int8 tier where bitsandbytes has no CPU kernel of its own."""

import pytest
import torch

from speckv import kernels
from tests.conftest import tiny_model

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture
def fallback():
    """bitsandbytes' own dispatch while the test runs (its fallback where it has no CPU kernel), ours after."""
    was = kernels._library is not None
    kernels.uninstall_int8_matmul()
    yield
    kernels.uninstall_int8_matmul()  # whatever the test installed (after monkeypatch has undone its patches)
    if was:
        kernels.install_int8_matmul()


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
    if kernels.bitsandbytes_has_cpu_int8_kernel():
        pytest.skip("bitsandbytes has a CPU int8 kernel of its own on this CPU (AVX-512): ours is not installed")
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 4 * 64 * 16)  # several blocks in the 96-row layer
    layer = bnb.nn.Linear8bitLt(64, 96, bias=True, has_fp16_weights=False, threshold=6.0)
    torch.manual_seed(0)
    layer.load_state_dict({"weight": torch.randn(96, 64) * 0.1, "bias": torch.randn(96) * 0.1})
    layer = layer.to("cpu").eval()  # quantizes the weights to int8; in training bitsandbytes takes another path
    x = torch.randn(3, 5, 64, dtype=torch.float16)
    x[..., 3] = 8.0  # an outlier column: the mixed decomposition's fp16 part runs too
    calls = []
    monkeypatch.setattr(kernels, "blocked_int8_matmul", _counting(kernels.blocked_int8_matmul, calls))
    with torch.inference_mode():
        before = layer(x)
        assert kernels.install_int8_matmul()
        after = layer(x)
    assert calls, "bitsandbytes did not dispatch its int8 matmul to the installed kernel"
    assert torch.equal(before, after)


def _counting(function, calls):
    def counted(*args):
        calls.append(1)
        return function(*args)
    return counted


def test_loading_the_int8_tier_on_the_cpu_installs_it_where_bitsandbytes_has_no_cpu_kernel(fallback, tmp_path):
    from speckv.models import load_model

    tiny_model(0, torch.float16).save_pretrained(tmp_path / "tiny")
    load_model(str(tmp_path / "tiny"), "int8", device="cpu")
    assert (kernels._library is not None) != kernels.bitsandbytes_has_cpu_int8_kernel()


def test_an_int8_models_calibration_key_names_the_kernel_its_calls_ran_with(fallback, tmp_path):
    """A calibration measured with bitsandbytes' fallback must not price passes run with ours, nor the reverse."""
    from speckv.calibration import CalibrationKey
    from speckv.models import load_model

    if kernels.bitsandbytes_has_cpu_int8_kernel():
        pytest.skip("bitsandbytes has a CPU int8 kernel of its own on this CPU (AVX-512): ours is not installed")
    tiny_model(0, torch.float16).save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), "int8", device="cpu")
    ours = CalibrationKey.of(model, "target", "int8")
    kernels.uninstall_int8_matmul()
    theirs = CalibrationKey.of(model, "target", "int8")
    assert ours.kernels == "int8-blocked" and theirs.kernels == ""
    assert ours.digest() != theirs.digest()
    assert CalibrationKey.of(tiny_model(0), "target", "fp16").kernels == ""  # no int8 layers: nothing of ours runs


def test_the_int8_tier_on_a_cpu_runs_its_activations_in_float32_without_a_warning_at_every_layer(tmp_path, caplog):
    """A CPU emulates float16 arithmetic: `auto` gives the int8 tier float32 activations there, and bitsandbytes'
    warning that it casts them to float16 for quantizing (logged at every layer of every pass) is silenced."""
    import logging

    from speckv.models import INT8_CPU_ACTIVATIONS, load_model

    tiny_model(0, torch.float16).save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), "int8", device="cpu")
    assert model.dtype == INT8_CPU_ACTIVATIONS == torch.float32
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"), torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert not [r for r in caplog.records if kernels.INT8_INPUT_CAST in r.getMessage()]
    assert load_model(str(tmp_path / "tiny"), "int8", dtype="float16", device="cpu").dtype == torch.float16

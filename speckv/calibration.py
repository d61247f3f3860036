"""Step costs of a draft/target pair measured on the machine at hand, with the calls the live loop makes,
cached by what changes them.

The live loop makes three kinds of model calls: the target scores γ+1 tokens after its cache was cut back
to the context (verification after a rejection); the draft catches up on the tokens the last step added
and keeps one logit; then it drafts single tokens. `calibrate` times exactly those, within a time budget
(the most informative measurements first, so a run the budget cuts short still fits a cost model), and
fits a `CostModel`. `load_or_calibrate` caches the result under `$SPECKV_HOME/calibration/`, keyed by the
hardware, the torch version and threads, the models' weights, tier, dtype and device: the same setting
reuses it, anything that changes the costs gets its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .models import MANIFEST, cache_root
from .replay import CostModel
from .workers import SessionLM

CALIBRATION_FORMAT = 1
DEFAULT_BUDGET_S = 30.0
DEFAULT_MAX_GAMMA = 8
DEFAULT_CONTEXT_LENS = (64, 512)
MIN_MEASUREMENTS = 3  # the draft's single token, verification at γ = 0 and at γmax: a cost model's least
# CPU features that change which kernels torch runs (and so the shape of a step's cost)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8", "avx_vnni", "asimd", "sve", "bf16")


def hardware_id(device: torch.device) -> str:
    """The processor a model runs on: the GPU's name, or the CPU's model and its kernel-relevant flags."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("model name", "Model") and not model:
                model = value.strip()
            elif name.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return f"cpu:{model} [{' '.join(f for f in CPU_FLAGS if f in flags)}]"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """What identifies a model's weights: the per-file sha256 of a prepared embedded model's manifest, else
    the weight files' names, sizes and modification times (cheap: no multi-GB hash at every start), else
    (a hub id without a local directory) its name."""
    source = str(getattr(model.config, "_name_or_path", "") or "")
    directory = Path(source)
    digest = hashlib.sha256(source.encode())
    if (directory / MANIFEST).is_file():
        digest.update((directory / MANIFEST).read_bytes())
    elif directory.is_dir():
        for path in sorted(directory.glob("*.safetensors")):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CalibrationKey:
    """Everything that changes what a step costs; a calibration is reused only for an equal key."""

    hardware: str
    torch: str  # version and intra-op threads
    draft: str  # weights fingerprints
    target: str
    tier: str
    dtype: str  # the target's compute dtype
    device: str

    @classmethod
    def of(cls, draft: torch.nn.Module, target: torch.nn.Module, tier: str) -> CalibrationKey:
        parameter = next(target.parameters())
        return cls(hardware_id(parameter.device), f"{torch.__version__} threads={torch.get_num_threads()}",
                   weights_fingerprint(draft), weights_fingerprint(target), tier, str(target.dtype),
                   str(parameter.device))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Calibration:
    key: CalibrationKey
    cost_model: CostModel
    rows: list[dict] = field(default_factory=list)  # {kind: verify|draft, context_len, tokens, ms}
    seconds: float = 0.0  # how long measuring took
    complete: bool = True  # False when the budget left planned measurements out

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "key": asdict(self.key), "cost_model": self.cost_model.to_dict(),
                "rows": self.rows, "seconds": self.seconds, "complete": self.complete}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        if d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"calibration format {d.get('format')!r}, expected {CALIBRATION_FORMAT}")
        try:
            return cls(CalibrationKey(**d["key"]), CostModel.from_dict(d["cost_model"]), list(d["rows"]),
                       float(d["seconds"]), bool(d["complete"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a calibration: {e}") from None


def synthetic_ids(count: int, vocab: int, salt: int = 0) -> list[int]:
    """`count` token ids inside the vocabulary, spread over it, different for each `salt`."""
    return [(salt * 101 + i * 37 + 11) % (vocab - 1) for i in range(count)]


def time_call(lm: SessionLM, context: list[int], tokens: int, keep: int, repeats: int,
              deadline: float | None = None) -> float:
    """Median ms of the live loop's call pattern: `tokens` new tokens fed after a cached `context` (the
    cache is cut back to it before each repeat, as after a rejection), `keep` logits kept. Repeats stop
    at `deadline` (a perf_counter time) once one is timed. Uses the session id "calibration"."""
    vocab = int(lm.model.config.vocab_size)
    lm.logits("calibration", context, 1)
    times: list[float] = []
    for r in range(repeats):
        if times and deadline is not None and time.perf_counter() > deadline:
            break
        fed = context + synthetic_ids(tokens, vocab, salt=r + 1)
        start = time.perf_counter()
        lm.logits("calibration", fed, keep)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _plan(max_gamma: int, context_lens: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """(kind, context_len, tokens) in the order they are measured: what a cost model needs most first (the
    draft's single token, verification at γ = 0 and γmax on the first context), then the rest of the curve,
    the draft's catch-up, and the other contexts."""
    first, *others = context_lens
    gammas = [0, max_gamma] + [g for g in range(1, max_gamma) if g not in (0, max_gamma)]
    plan = [("draft", first, 1), *(("verify", first, g + 1) for g in gammas), ("draft", first, 2)]
    for ctx in others:
        plan += [("draft", ctx, 1), ("verify", ctx, 1), ("verify", ctx, max_gamma + 1)]
    return plan


def calibrate(
    draft_lm: SessionLM,
    target_lm: SessionLM,
    tier: str,
    max_gamma: int = DEFAULT_MAX_GAMMA,
    context_lens: tuple[int, ...] = DEFAULT_CONTEXT_LENS,
    repeats: int = 3,
    budget_s: float = DEFAULT_BUDGET_S,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Time the live loop's calls (module docstring) and fit a cost model, within `budget_s`: the first
    MIN_MEASUREMENTS are always made; after them a measurement is made only if its estimated time (its
    repeats, and reading a longer context into the cache first) fits in what is left of the budget, and
    repeats stop at the deadline. `progress(done, planned)` is called after each measurement."""
    start = time.perf_counter()
    deadline = start + budget_s
    vocab = int(target_lm.model.config.vocab_size)
    plan = _plan(max_gamma, context_lens)
    rows: list[dict] = []
    cached = {id(draft_lm): 0, id(target_lm): 0}  # context length each model's calibration session holds

    def ms_per_token(kind: str) -> float:
        """The dearest measured ms per fed token of a model: what reading more context will cost at most."""
        return max((r["ms"] / r["tokens"] for r in rows if r["kind"] == kind), default=0.0)

    for n, (kind, ctx, tokens) in enumerate(plan):
        lm = draft_lm if kind == "draft" else target_lm
        if n >= MIN_MEASUREMENTS:
            same = [r["ms"] for r in rows if r["kind"] == kind and r["tokens"] >= tokens]
            estimate_ms = (max(ctx - cached[id(lm)], 0) * ms_per_token(kind)
                           + repeats * (min(same) if same else tokens * ms_per_token(kind)))
            if time.perf_counter() + estimate_ms / 1e3 > deadline:
                if progress:
                    progress(n + 1, len(plan))
                continue  # does not fit: later, cheaper measurements still may
        # the verify pattern keeps every fed row; the draft's (catch-up, single token) keeps one
        ms = time_call(lm, synthetic_ids(ctx, vocab), tokens, tokens if kind == "verify" else 1, repeats, deadline)
        cached[id(lm)] = ctx
        rows.append({"kind": kind, "context_len": ctx, "tokens": tokens, "ms": ms})
        if progress:
            progress(n + 1, len(plan))
    draft_lm.release("calibration")
    target_lm.release("calibration")
    verify = [r for r in rows if r["kind"] == "verify"]
    single = [r["ms"] for r in rows if r["kind"] == "draft" and r["tokens"] == 1]
    cost = CostModel.fit([r["tokens"] - 1 for r in verify], [0.0] * len(verify), [r["ms"] for r in verify],
                         [r["context_len"] for r in verify])
    cost = dataclasses.replace(cost, draft_ms_per_token=statistics.median(single))
    key = CalibrationKey.of(draft_lm.model, target_lm.model, tier)
    return Calibration(key, cost, rows, time.perf_counter() - start, complete=len(rows) == len(plan))


def calibration_path(key: CalibrationKey) -> Path:
    return cache_root() / "calibration" / f"{key.digest()}.json"


def load_or_calibrate(draft_lm: SessionLM, target_lm: SessionLM, tier: str, force: bool = False,
                      **kwargs) -> tuple[Calibration, bool]:
    """The cached calibration for this setting, or a new one (then cached); returns (it, whether cached).
    A cache file that cannot be read, or was written for another key, is measured anew and replaced."""
    key = CalibrationKey.of(draft_lm.model, target_lm.model, tier)
    path = calibration_path(key)
    if not force and path.is_file():
        try:
            cached = Calibration.from_dict(json.loads(path.read_text()))
            if cached.key == key:
                return cached, True
        except ValueError:
            pass
    result = calibrate(draft_lm, target_lm, tier, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result.to_dict(), indent=1))
    os.replace(tmp, path)  # atomic: replicas starting together never read half a file
    return result, False

"""Step costs measured on the machine at hand, with the calls the live loop makes, cached by what changes
them.

The live loop makes three kinds of model calls: the target scores γ+1 tokens after its cache was cut back
to the context (verification after a rejection); the draft catches up on the tokens the last step added
and keeps one logit; then it drafts single tokens. A draft that has not read the context yet (a new
prompt, or target-only steps since it last drafted) first reads it: its prefill, timed too. `calibrate`
times exactly those for one model (its role: "target" or "draft"), within a time budget (the most
informative measurements first, so a run the budget cuts short still gives a cost model), so each
replica calibrates what it holds when it loads, and
`cost_model` joins a draft's and a target's calibration into the `CostModel` policies price γ with.
A model whose linear layers multiply in half precision on the CPU (4-bit layers dequantizing to bf16, or plain
bf16 ones) may run faster with them in float32 where the CPU has no bf16 hardware,
from some number of rows a pass (`probe_float32_from`): measured first, and what its passes use after.
`load_or_calibrate` caches a calibration under `$SPECKV_HOME/calibration/`, keyed by the hardware, the
torch version and threads, the model's weights, role, tier, dtype and device: the same setting reuses it,
anything that changes the costs gets its own. What the key cannot see, the load the machine was under when it
was measured, a spot check at each load does (`spot_check`): a cache far dearer than now is measured anew.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cost_model import CostModel, measured_curve
from .kernels import kernels_for
from .models import DRAFT_TIER, MANIFEST, cache_root
from .workers import LogitsCall, SessionLM, multiplies_in

CALIBRATION_FORMAT = 12  # 2: one model (role) per calibration; 3: batched passes measured too; 4: the draft's prefill;
# 5: the compute dtype of a 4-bit model's prefill passes; 6: and of a plain half-precision one;
# 7: the kernels a model's layers run (`CalibrationKey.kernels`); 8: from which pass size half-precision layers compute
# in float32, every pass's, not only prefill's (`probe_float32_from`); 9: a batched pass scoring BATCH_PROBE_TOKENS a
# sequence measured right after the one-token one (before, the budget reached no such pass on an AVX2 EPYC at any tier);
# 10: attention through speckv.attention (on CPU a pass's attention reads the grouped keys as they are: its cost
# with the context changed); 11: passes of 10-256 rows multiplied transposed where a probe at load found that faster
# (speckv.kernels.ROW_BUCKETS: prompts and batched passes in float32 cost less than a calibration of format 10 says);
# 12: batched passes packed with each row's keys left in its own cache (speckv.sessions_cache: no cache copied per pass)
ROLES = ("target", "draft")
DEFAULT_BUDGET_S = {"target": 22.0, "draft": 8.0}  # 30 s for a pair on this CPU; a GPU takes seconds
DEFAULT_MAX_GAMMA = 8
DEFAULT_CONTEXT_LENS = (64, 512)
BATCH_PROBE = 4  # sequences in the batched passes measured (what more sequences in a pass cost)
BATCH_PROBE_TOKENS = 3  # tokens a sequence the first batched pass that scores several measures: γ = 2, where
#                         decisions under load fall (what drafting costs a shared pass); γmax + 1 follows if it fits
# a measurement's repeats stop once this much was timed: a pass this long varies little between repeats, and at
# three repeats of a 1.4-2.3 s pass (nf4, int8 on an AVX2 EPYC) the budget held two measurements and never the
# batched passes load is priced with
ENOUGH_TIMED_MS = 1000.0
# tokens of the timed passes `probe_float32_from` makes, one per compute dtype a size, largest first (bf16's cost
# grows with the rows where it is emulated; float32's much less): they read 2 × 31 tokens of the first context
FLOAT32_PROBE_TOKENS = (16, 8, 4, 2, 1)
MIN_MEASUREMENTS = {"target": 2, "draft": 2}  # verification at γ = 0 and γmax; the draft's single token, its prefill
LOCK_NAME = ".measuring.lock"  # in the calibration directory: one replica measures or spot-checks at a time
SPOT_TOLERANCE = 2.0  # a cached calibration its spot check at load finds this much dearer than now is measured anew
SPOT_SLACK_MS = 5.0  # ... by this many ms more too (a tiny model's sub-ms passes jitter by more than 2x)
# CPU features that change which kernels torch runs (and so the shape of a step's cost)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8", "avx_vnni", "asimd", "sve", "bf16")


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and every flag /proc/cpuinfo lists ("" and none where it cannot be read)."""
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
    return model, flags


def cpu_flags() -> set[str]:
    """Every flag /proc/cpuinfo lists for this CPU (empty where it cannot be read)."""
    return _cpuinfo()[1]


def hardware_id(device: torch.device) -> str:
    """The processor a model runs on: the GPU's name, or the CPU's model and its kernel-relevant flags."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model, flags = _cpuinfo()
    model = model or platform.processor() or platform.machine()
    return f"cpu:{model} [{' '.join(f for f in CPU_FLAGS if f in flags)}]"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """What identifies a model's weights: the per-file sha256 of a prepared embedded model's manifest, else
    the weight files' names, sizes and modification times (cheap: no multi-GB hash at every start), else
    (a model built in memory, or a hub id without a local directory) its name, parameter shapes and a
    sample of each parameter's values."""
    source = str(getattr(model.config, "_name_or_path", "") or "")
    directory = Path(source)
    digest = hashlib.sha256(source.encode())
    if (directory / MANIFEST).is_file():
        digest.update((directory / MANIFEST).read_bytes())
    elif source and directory.is_dir():
        for path in sorted(directory.glob("*.safetensors")):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        for name, parameter in model.named_parameters():
            sample = parameter.detach().reshape(-1)[:64].float().cpu().numpy().tobytes()
            digest.update(f"{name}:{tuple(parameter.shape)}".encode() + sample)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CalibrationKey:
    """Everything that changes what a model's calls cost; a calibration is reused only for an equal key."""

    hardware: str
    torch: str  # version and intra-op threads
    model: str  # weights fingerprint
    role: str  # target | draft
    tier: str
    dtype: str  # compute dtype
    device: str
    added_ms_per_call: float = 0.0  # a deliberately slowed model (SessionLM.added_ms_per_call) costs more
    kernels: str = ""  # kernels SpecKV puts in a library's place for this model's layers (speckv.kernels)

    @classmethod
    def of(cls, model: torch.nn.Module, role: str, tier: str, added_ms_per_call: float = 0.0) -> CalibrationKey:
        if role not in ROLES:
            raise ValueError(f"calibration role must be one of {ROLES}, got {role!r}")
        parameter = next(model.parameters())
        tier = DRAFT_TIER.value if role == "draft" else tier  # the draft is the same model whatever the target's tier
        return cls(hardware_id(parameter.device), f"{torch.__version__} threads={torch.get_num_threads()}",
                   weights_fingerprint(model), role, tier, str(model.dtype), str(parameter.device),
                   float(added_ms_per_call), kernels_for(model))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Calibration:
    """One model's measured calls: rows of {kind: verify|draft, context_len, tokens, ms, sequences} (tokens
    per sequence; rows without `sequences` have one)."""

    key: CalibrationKey
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # how long measuring took
    complete: bool = True  # False when the budget left planned measurements out
    float32_probe: dict | None = None  # `probe_float32_from`'s times and choice (None: no half-precision layers)
    spot_check: dict | None = field(default=None, compare=False)  # `spot_check` at this load (not cached)

    @property
    def float32_from(self) -> int | None:
        """From how many token positions a pass's half-precision layers compute in float32 (None: never)."""
        return self.float32_probe["float32_from"] if self.float32_probe else None

    def configure(self, lm: SessionLM) -> None:
        """Set on the worker what this calibration chose for it (from which pass size it computes in float32)."""
        lm.compute_in_float32_from(self.float32_from)

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "key": asdict(self.key), "rows": self.rows, "seconds": self.seconds,
                "complete": self.complete, "float32_probe": self.float32_probe}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        if d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"calibration format {d.get('format')!r}, expected {CALIBRATION_FORMAT}")
        try:
            return cls(CalibrationKey(**d["key"]), list(d["rows"]), float(d["seconds"]), bool(d["complete"]),
                       d.get("float32_probe"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a calibration: {e}") from None


def cost_model(draft: Calibration, target: Calibration) -> CostModel:
    """The step cost model of a draft and a target calibration: the verify line fitted over every context
    measured, the verify curve as measured at the first context (points the budget left out interpolated),
    and the draft's median single-token time."""
    if draft.key.role != "draft" or target.key.role != "target":
        raise ValueError(f"need a draft and a target calibration, got {draft.key.role} and {target.key.role}")
    batched = [r for r in target.rows + draft.rows if r.get("sequences", 1) > 1]
    verify = [r for r in target.rows if r["kind"] == "verify" and r.get("sequences", 1) == 1]
    single = [r["ms"] for r in draft.rows if r["kind"] == "draft" and r["tokens"] == 1 and r.get("sequences", 1) == 1]
    if not verify or not single:
        raise ValueError("a calibration without its first measurements cannot price a step")
    line = CostModel.fit([r["tokens"] - 1 for r in verify], [0.0] * len(verify), [r["ms"] for r in verify],
                         [r["context_len"] for r in verify])
    first = verify[0]["context_len"]
    curve = measured_curve([(r["tokens"] - 1, r["ms"]) for r in verify if r["context_len"] == first])
    # feeding more tokens never costs less, so a catch-up of two tokens bounds one token's cost from above: a
    # noisy single-token measurement (224 ms beside a 132 ms catch-up, seen in CI under load) is capped by it
    fed = [r["ms"] for r in draft.rows if r["kind"] == "draft" and r.get("sequences", 1) == 1]
    prefill = [r["ms"] / r["tokens"] for r in draft.rows if r["kind"] == "prefill"]
    model = dataclasses.replace(line, draft_ms_per_token=min(statistics.median(single), min(fed)),
                                verify_curve=curve, curve_context_len=first,
                                draft_prefill_ms_per_token=prefill[0] if prefill else 0.0)
    if target.float32_from is not None:
        model = dataclasses.replace(model, float32_from=target.float32_from,
                                    float32_ms_per_token=_float32_line(target.float32_probe)[1])
    if draft.float32_from is not None:
        model = dataclasses.replace(model, draft_float32_from=draft.float32_from,
                                    draft_float32_ms=_float32_line(draft.float32_probe))
    return _with_batched(model, batched, first)


def _float32_line(probe: dict) -> tuple[float, float]:
    """(ms fixed, ms per token) of a model's passes in float32: the non-negative least-squares line through the
    probe's float32 passes (`probe_float32_from`, every size it timed)."""
    from scipy.optimize import nnls

    tokens = np.asarray([r["tokens"] for r in probe["sizes"]], dtype=float)
    ms = np.asarray([r["float32_ms"] for r in probe["sizes"]], dtype=float)
    if len(tokens) < 2:
        return float(ms[0]), 0.0
    base, per_token = nnls(np.stack([np.ones_like(tokens), tokens], 1), ms)[0]
    return float(base), float(per_token)


def _with_batched(model: CostModel, rows: list[dict], context_len: int) -> CostModel:
    """What more sequences in a pass cost, from the batched rows (a model without them prices a batched pass
    as its sequences' tokens on the single line)."""
    def ms(kind: str, tokens: int) -> tuple[float, int] | None:
        found = [(r["ms"], r["sequences"]) for r in rows if (r["kind"], r["tokens"]) == (kind, tokens)
                 and r["context_len"] == context_len]
        return found[0] if found else None

    out = model
    one = ms("verify", 1)
    if one:
        out = dataclasses.replace(out, verify_ms_per_sequence=max(
            (one[0] - float(model.verify_ms(0, context_len))) / (one[1] - 1), 0.0))
        wide = [r for r in rows if r["kind"] == "verify" and r["tokens"] > 1 and r["context_len"] == context_len]
        if wide:  # the least-squares slope through the one-token pass and every wider one (exact with one)
            beyond = np.asarray([r["sequences"] * (r["tokens"] - 1) for r in wide], dtype=float)
            extra = np.asarray([r["ms"] - one[0] for r in wide])
            out = dataclasses.replace(out, batched_ms_per_token=max(float(beyond @ extra / (beyond @ beyond)), 0.0))
    draft = ms("draft", 1)
    if draft:
        out = dataclasses.replace(out, draft_ms_per_sequence=max(
            (draft[0] - model.draft_ms_per_token) / (draft[1] - 1), 0.0))
    return out


def synthetic_ids(count: int, vocab: int, salt: int = 0) -> list[int]:
    """`count` token ids inside the vocabulary, spread over it, different for each `salt`."""
    return [(salt * 101 + i * 37 + 11) % (vocab - 1) for i in range(count)]


def own_contexts(lm: SessionLM, count: int, context_len: int, salt: int = 0) -> list[tuple[str, list[int]]]:
    """`count` sessions ("s0", "s1", ...) holding contexts of their own, `context_len` + i tokens of salt `salt` + i,
    read in as a replica reads a prompt: (session id, context) for each, for passes of the live loop's shape
    after them (a script's `LogitsCall(session, context + fed, kept)`)."""
    vocab = int(lm.model.config.vocab_size)
    sessions = [(f"s{i}", synthetic_ids(context_len + i, vocab, salt=salt + i)) for i in range(count)]
    for session, context in sessions:
        lm.prefill(session, context)
    return sessions


def time_prefill(lm: SessionLM, tokens: int, session: str) -> float:
    """Ms of reading `tokens` tokens into an empty cache, keeping one logit (the draft's catch-up on a
    context it has not read), as a replica reads a prompt (`SessionLM.prefill`: its chunk passes, in float32
    where they are long enough): one call on a fresh session, after the calls before it warmed the model up
    (a prefill costs as much as many single tokens, and its first call is no dearer than the next)."""
    ids = synthetic_ids(tokens, int(lm.model.config.vocab_size), salt=7)
    start = time.perf_counter()
    lm.prefill(session, ids)  # the chunk passes a replica reads a prompt in
    if lm.missing(session, ids):  # the few tokens prefill leaves are fed in the drafting pass itself
        lm.logits_batch([LogitsCall(session, ids, 1)])
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    ms = (time.perf_counter() - start) * 1e3
    lm.close(session)
    return ms


def _timed_ms(lm: SessionLM, call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)  # kernels run asynchronously: time them, not their launch
    return (time.perf_counter() - start) * 1e3


def probe_float32_from(lm: SessionLM, context: list[int], session: str) -> dict:
    """From how many token positions a pass of a model with half-precision layers on the CPU
    (SessionLM.half_layers) runs faster with them in float32; sets it on `lm` (`compute_in_float32_from`) and
    returns the times and the choice. Passes of FLOAT32_PROBE_TOKENS, then fewer, tokens of `context` are read
    into `session` (the calibration's own session: reading its context was needed anyway), each size once in
    float32 and once as loaded, after an untimed one-token pass apart (a model's first pass pays one-time
    costs), until float32 loses: the smallest size it won at, and every larger one, is where passes switch (a
    prompt's or a batch's: the linear layers, most of a pass, see rows either way). Float32 goes first, so its
    own first use counts against it. Making the plain layers' float32 copies is timed apart (`copy_ms`): once
    per replica, not per pass."""
    lm.logits_batch([LogitsCall(f"{session}-warm", context[:1], 1)])
    lm.close(f"{session}-warm")
    loaded = str(multiplies_in(lm.half_layers[0])).removeprefix("torch.")
    start = time.perf_counter()
    copy_bytes = lm.compute_in_float32_from(1)
    copy_ms = (time.perf_counter() - start) * 1e3
    sizes, read, chosen = [], 0, None
    for n in FLOAT32_PROBE_TOKENS:
        if read + 2 * n > len(context):
            break
        times = {}
        for name, upto in (("float32", read + n), ("loaded", read + 2 * n)):
            lm.float32_from = 1 if name == "float32" else None  # the copies stay made meanwhile
            times[name] = _timed_ms(lm, lambda upto=upto: lm.logits_batch([LogitsCall(session, context[:upto], 1)]))
        read += 2 * n
        sizes.append({"tokens": n, "float32_ms": times["float32"], "loaded_ms": times["loaded"]})
        if times["float32"] >= times["loaded"]:
            break
        chosen = n
    lm.compute_in_float32_from(chosen)
    return {"sizes": sizes, "loaded": loaded, "copy_ms": copy_ms, "float32_copy_mib": round(copy_bytes / 2**20, 1),
            "float32_from": chosen, "tokens_read": read}


def time_call(lm: SessionLM, context: list[int], tokens: int, keep: int, repeats: int,
              deadline: float | None = None, session: str = "calibration", sequences: int = 1) -> float:
    """Median ms of the live loop's call pattern: `tokens` new tokens fed after a cached `context` (the
    cache is cut back to it before each repeat, as after a rejection), `keep` logits kept, after one
    untimed call of the same pattern; with `sequences` > 1, that many sessions in one batched pass.
    Repeats stop at `deadline` (a perf_counter time) or once ENOUGH_TIMED_MS were timed, once one is.
    Uses (and leaves open) the session `session` (and `session`-1.. for the batch's others)."""
    vocab = int(lm.model.config.vocab_size)
    sessions = [session] + [f"{session}-{j}" for j in range(1, sequences)]

    def call(fed: list[int], num_logits: int) -> None:
        lm.logits_batch([LogitsCall(s, fed, num_logits) for s in sessions])

    if lm.missing(session, context):  # a context the session holds already is not read again (a 1.6 s pass at nf4)
        lm.logits_batch([LogitsCall(session, context, 1)])
    for other in sessions[1:]:  # the batch's other sessions start from the same cached context
        lm.fork(session, other)
    call(context + synthetic_ids(tokens, vocab), keep)  # untimed: a new shape's first call
    times: list[float] = []                             # pays one-time setup costs
    for r in range(repeats):
        if times and (sum(times) >= ENOUGH_TIMED_MS
                      or deadline is not None and time.perf_counter() > deadline):
            break
        fed = context + synthetic_ids(tokens, vocab, salt=r + 1)
        times.append(_timed_ms(lm, lambda fed=fed: call(fed, keep)))
    return statistics.median(times)


def _plan(role: str, max_gamma: int, context_lens: tuple[int, ...]) -> list[tuple[str, int, int, int]]:
    """(kind, context_len, tokens, sequences) in the order they are measured: what a cost model needs most
    first (verification at γ = 0 and γmax on the first context; the draft's single token and its prefill),
    then the target's batched passes (BATCH_PROBE sequences, scoring one token and BATCH_PROBE_TOKENS) or the
    draft's catch-up, then the rest of the curve, then the other contexts."""
    first, *others = context_lens
    if role == "draft":  # a prefill row reads `first` tokens into an empty cache (what a catch-up costs)
        return [("draft", first, 1, 1), ("prefill", 0, first, 1), ("draft", first, 2, 1),
                ("draft", first, 1, BATCH_PROBE), *(("draft", ctx, 1, 1) for ctx in others)]
    # the curve's ends, what one more sequence costs (what load costs: without it a batched pass is priced as
    # free sequences on the single line), what more tokens cost in a batched pass (what drafting costs under
    # load: without it, priced on the single line; docs/serving_log.md, twenty-fourth session), the curve's
    # small-γ points (where CPU decisions fall), the rest of the curve, the batched pass at γmax
    ends = [("verify", first, g + 1, 1) for g in dict.fromkeys([0, max_gamma])]
    small = [("verify", first, g + 1, 1) for g in (1, 2) if g < max_gamma]
    wide_tokens = dict.fromkeys(t for t in (min(BATCH_PROBE_TOKENS, max_gamma + 1), max_gamma + 1) if t > 1)
    wide = [("verify", first, t, BATCH_PROBE) for t in wide_tokens]
    plan = [*ends, ("verify", first, 1, BATCH_PROBE), *wide[:1], *small]
    plan += [("verify", first, g + 1, 1) for g in range(3, max_gamma)] + wide[1:]
    for ctx in others:
        plan += [("verify", ctx, 1, 1), ("verify", ctx, max_gamma + 1, 1)]
    return plan


def estimate_measurement_ms(rows: list[dict], read: int, tokens: int, sequences: int, repeats: int) -> float:
    """What one planned measurement will take, from the rows measured so far: reading `read` more context
    tokens into the cache first, then its untimed first pass and its timed ones (`repeats`, fewer where
    ENOUGH_TIMED_MS is reached first) of `tokens` tokens for `sequences` sequences."""
    # reading: at the cheapest per-token rate measured (the draft's prefill where timed), about what a long read
    # costs a token or more (a pass's fixed part amortises over more tokens); the dearest (a 1-token pass) made
    # a 512-token read look like a minute on a CPU where it takes seconds, so the longer context went unmeasured
    per_token = min(r["ms"] / r["tokens"] for r in rows)
    one = _pass_ms(rows, tokens, sequences, per_token)
    return max(read, 0) * per_token + (1 + _timed_repeats(one, repeats)) * one


def _pass_ms(rows: list[dict], tokens: int, sequences: int, per_token: float) -> float:
    """A pass of `tokens` tokens for each of `sequences` sequences, priced as that many tokens for one sequence
    on the line through the single-sequence passes measured (a pass's fixed part is paid once, whatever it
    carries); with one such pass measured, each more sequence as half of it (pessimistic where a pass is
    flat, and repeats stop at the deadline where it costs more)."""
    single = sorted({(r["tokens"], r["ms"]) for r in rows if r["kind"] != "prefill" and r.get("sequences", 1) == 1})
    if len({t for t, _ in single}) >= 2:
        slope, base = np.polyfit([t for t, _ in single], [ms for _, ms in single], 1)
        return float(max(base + max(slope, 0.0) * tokens * sequences, min(ms for _, ms in single)))
    same = [ms for t, ms in single if t >= tokens]
    return (min(same) if same else tokens * per_token) * (1 + (sequences - 1) / 2)


def _timed_repeats(pass_ms: float, repeats: int) -> int:
    """How many timed repeats `time_call` makes of a pass this long: `repeats`, fewer once ENOUGH_TIMED_MS."""
    return min(repeats, max(1, math.ceil(ENOUGH_TIMED_MS / max(pass_ms, 1e-3))))


def calibrate(
    lm: SessionLM,
    role: str,
    tier: str,
    max_gamma: int = DEFAULT_MAX_GAMMA,
    context_lens: tuple[int, ...] = DEFAULT_CONTEXT_LENS,
    repeats: int = 3,
    budget_s: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Time one model's live-loop calls (module docstring) within `budget_s` (default: DEFAULT_BUDGET_S of
    the role): the first MIN_MEASUREMENTS are always made; after them a measurement is made only if its
    estimated time (its repeats, and reading a longer context into the cache first) fits in what is left,
    and repeats stop at the deadline. The budget starts after `probe_float32_from` (a model with
    half-precision layers on the CPU: a few seconds, bounded by FLOAT32_PROBE_TOKENS), which decides what the
    measured passes compute in: counted in it, the probe left the fp16 target's budget (AVX2 EPYC) room for
    its first two measurements only, none of them batched. `progress(done, planned)` is called after each
    measurement."""
    key = CalibrationKey.of(lm.model, role, tier, lm.added_ms_per_call)
    start = time.perf_counter()
    vocab = int(lm.model.config.vocab_size)
    plan = _plan(role, max_gamma, context_lens)
    rows: list[dict] = []
    session = f"calibration-{uuid.uuid4().hex}"
    cached = 0  # context length the calibration session holds
    probe = None
    if lm.half_layers:  # before the plan: its passes then run as the live ones will
        probe = probe_float32_from(lm, synthetic_ids(context_lens[0], vocab), session)
        cached = probe["tokens_read"]
    deadline = time.perf_counter() + (DEFAULT_BUDGET_S[role] if budget_s is None else budget_s)
    for n, (kind, ctx, tokens, sequences) in enumerate(plan):
        if n >= MIN_MEASUREMENTS[role]:
            estimate_ms = estimate_measurement_ms(rows, ctx - cached, tokens, sequences, repeats)
            if time.perf_counter() + estimate_ms / 1e3 > deadline:
                if progress:
                    progress(n + 1, len(plan))
                continue  # does not fit: later, cheaper measurements still may
        if kind == "prefill":  # its own session: the calibration session keeps its context cached
            rows.append({"kind": kind, "context_len": 0, "tokens": tokens, "sequences": 1,
                         "ms": time_prefill(lm, tokens, f"{session}-prefill")})
            if progress:
                progress(n + 1, len(plan))
            continue
        # the verify pattern keeps every fed row; the draft's (catch-up, single token) keeps one
        ms = time_call(lm, synthetic_ids(ctx, vocab), tokens, tokens if kind == "verify" else 1, repeats, deadline,
                       session, sequences)
        cached = ctx
        rows.append({"kind": kind, "context_len": ctx, "tokens": tokens, "ms": ms, "sequences": sequences})
        if progress:
            progress(n + 1, len(plan))
    _close_probe_sessions(lm, session)
    return Calibration(key, rows, time.perf_counter() - start, complete=len(rows) == len(plan), float32_probe=probe)


def _close_probe_sessions(lm: SessionLM, session: str) -> None:
    """Close `session` and the batch's others that `time_call` opened beside it."""
    for s in [session] + [f"{session}-{j}" for j in range(1, BATCH_PROBE)]:
        lm.close(s)


def calibration_dir() -> Path:
    """Where calibrations are cached, and measured under LOCK_NAME: `$SPECKV_HOME/calibration`, or where that
    cannot be written, the system's temp directory's `speckv-calibration` (cluster/ mounts SPECKV_HOME, the models'
    volume, read-only: a replica there could not take the lock, and failed to load). Checked once per pair of
    roots in a process (every path printed or loaded asks)."""
    return _writable_dir(cache_root() / "calibration", Path(tempfile.gettempdir()) / "speckv-calibration")


@functools.cache
def _writable_dir(*candidates: Path) -> Path:
    """The first of `candidates` that can be made and holds a writable LOCK_NAME."""
    for directory in candidates:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / LOCK_NAME).touch()
            return directory
        except OSError:
            continue
    raise OSError(f"no writable directory for calibrations: {', '.join(map(str, candidates))}")


def calibration_path(key: CalibrationKey) -> Path:
    return calibration_dir() / f"{key.digest()}.json"


@contextlib.contextmanager
def _unbounded(lm: SessionLM) -> Iterator[None]:
    """The replica's KV bound lifted while it measures or warms up, before it serves: those passes' sessions
    are closed afterwards, and a small bound (an operator's, or a test's) must not stop the replica loading."""
    bound, lm.max_kv_bytes = lm.max_kv_bytes, None
    try:
        yield
    finally:
        lm.max_kv_bytes = bound


def warm_up(lm: SessionLM, role: str, max_gamma: int = DEFAULT_MAX_GAMMA) -> float:
    """Run the live loop's call shapes once each, untimed, and return the seconds it took: a model's first
    passes of a shape are slow (allocation, kernels chosen on first use: an nf4 replica's first 16 tokens took
    16 s on an AVX512-BF16 EPYC, the next 16 1.3 s). Calibrating does this on the way; a replica whose
    calibration was cached does it instead, so the first requests it serves do not pay for it."""
    start = time.perf_counter()
    session = f"warm-up-{uuid.uuid4().hex}"
    context = synthetic_ids(DEFAULT_CONTEXT_LENS[0], int(lm.model.config.vocab_size))
    shapes = [(1, 1, 1), (2, 1, 1), (1, 1, BATCH_PROBE)] if role == "draft" else \
        [(1, 1, 1), (max_gamma + 1, max_gamma + 1, 1), (max_gamma + 1, max_gamma + 1, BATCH_PROBE)]
    with _unbounded(lm):
        for tokens, keep, sequences in shapes:
            time_call(lm, context, tokens, keep, 1, session=session, sequences=sequences)
    _close_probe_sessions(lm, session)
    return time.perf_counter() - start


def load_or_calibrate(lm: SessionLM, role: str, tier: str, force: bool = False,
                      **kwargs) -> tuple[Calibration, bool]:
    """The cached calibration for this setting, or a new one (then cached); returns (it, whether cached), and
    sets on `lm` what it chose (`Calibration.configure`). A cache file that cannot be read, or was written for
    another key, is measured anew and replaced; so is one its spot check finds stale (`spot_check`).

    Measuring and spot checks hold a machine-wide lock under the cache root: replicas that load together (a
    target and the draft on one node) measure one after another, each alone, instead of timing each other's
    load; a replica that waited finds what another measured for the same key and reuses it."""
    key = CalibrationKey.of(lm.model, role, tier, lm.added_ms_per_call)
    path = calibration_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)  # again: removed since `calibration_dir` made it, it comes back
    with open(path.parent / LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        cached = None if force else _read_cached(path, key)
        if cached is not None:
            cached.configure(lm)
            with _unbounded(lm):
                cached.spot_check = spot_check(lm, cached)
            if not cached.spot_check or not cached.spot_check["stale"]:
                return cached, True
        with _unbounded(lm):
            result = calibrate(lm, role, tier, **kwargs)
        result.spot_check = cached.spot_check if cached is not None else None  # why it was measured anew
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result.to_dict(), indent=1))
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    return result, False


def spot_check(lm: SessionLM, cached: Calibration) -> dict | None:
    """Time a cached calibration's first measurement once more (the target's one-token verification, the
    draft's one drafted token, at the first context; `time_call`: 1.5 s and 0.6 s at bf16 on an AVX512-BF16
    EPYC, a few passes where a pass takes seconds), and call the cache stale where it is more than
    SPOT_TOLERANCE times dearer than now (and SPOT_SLACK_MS): measured while something else held the machine, a
    neighbour or replicas loading beside it, it stays cached until its key changes, and priced drafting out (a
    bf16 calibration 4x dear on the AVX512-BF16 EPYC: `adaptive` 0.95x `fixed:2` live, docs/RESULTS.md). A cache
    cheaper than now is kept: the machine is busy now, the load is the online estimates' to follow, and measured
    now the cache would keep the load. None where it has no such row."""
    kind = "verify" if cached.key.role == "target" else "draft"
    row = next((r for r in cached.rows if r["kind"] == kind and r["tokens"] == 1 and r.get("sequences", 1) == 1),
               None)
    if row is None:
        return None
    session, start = f"spot-check-{uuid.uuid4().hex}", time.perf_counter()
    now = time_call(lm, synthetic_ids(row["context_len"], int(lm.model.config.vocab_size)), 1, 1, 3,
                    session=session)
    _close_probe_sessions(lm, session)
    return {"kind": kind, "context_len": row["context_len"], "cached_ms": row["ms"], "now_ms": now,
            "stale": row["ms"] > SPOT_TOLERANCE * now + SPOT_SLACK_MS, "seconds": time.perf_counter() - start}


def _read_cached(path: Path, key: CalibrationKey) -> Calibration | None:
    try:
        cached = Calibration.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
    return cached if cached.key == key else None


@dataclass
class PairCalibration:
    """A draft's and a target's calibration, and the step cost model they make."""

    draft: Calibration
    target: Calibration
    cached: bool  # both came from the cache

    @property
    def cost_model(self) -> CostModel:
        return cost_model(self.draft, self.target)

    @property
    def seconds(self) -> float:
        return self.draft.seconds + self.target.seconds

    def to_dict(self) -> dict:
        return {"cost_model": self.cost_model.to_dict(), "cached": self.cached, "seconds": self.seconds,
                **{c.key.role: {**c.to_dict(), "path": str(calibration_path(c.key)), "spot_check": c.spot_check}
                   for c in (self.target, self.draft)}}

    def describe(self) -> str:
        """What `speckv calibrate` prints: where it was measured, the measured curve, the cost model."""
        key, cost = self.target.key, self.cost_model
        lines = [f"tier {key.tier} ({key.dtype}) on {key.hardware}, torch {key.torch}, {key.device}"]
        for c in (self.target, self.draft):
            cut = "" if c.complete else " (the budget ran out before every planned measurement)"
            ours = f", with {c.key.kernels}" if c.key.kernels else ""  # speckv.kernels in its layers
            lines.append(f"{c.key.role}{ours}: {'cached' if self.cached else 'measured'} in {c.seconds:.1f} s{cut}: "
                         f"{calibration_path(c.key)}")
            if c.spot_check:
                spot, verdict = c.spot_check, "stale, measured anew" if c.spot_check["stale"] else "kept"
                lines.append(f"  spot check at load ({spot['seconds']:.1f} s): {spot['kind']} of one token "
                             f"{spot['now_ms']:.0f} ms now, {spot['cached_ms']:.0f} cached: {verdict}")
        rows = [r for r in self.target.rows + self.draft.rows if r.get("sequences", 1) == 1 and r["kind"] != "prefill"]
        for ctx in sorted({r["context_len"] for r in rows}):
            verify = "  ".join(f"{r['tokens']}: {r['ms']:.0f}" for r in sorted(rows, key=lambda r: r["tokens"])
                               if r["kind"] == "verify" and r["context_len"] == ctx)
            draft = "  ".join(f"{r['tokens']}: {r['ms']:.0f}" for r in rows
                              if r["kind"] == "draft" and r["context_len"] == ctx)
            lines.append(f"context {ctx}: verify ms by tokens scored {verify}; draft ms by tokens fed {draft}")
        lines.append(f"cost model: verify {cost.verify_ms_base:.0f} + {cost.verify_ms_per_token:.1f}·γ "
                     f"+ {cost.verify_ms_per_context_token:.3f}·context ms; "
                     f"draft {cost.draft_ms_per_token:.0f} ms/token; "
                     f"draft catch-up {cost.draft_prefill_ms_per_token:.1f} ms per token it lacks")
        for c in (self.target, self.draft):
            if c.float32_probe:
                p = c.float32_probe
                times = ", ".join(f"{r['tokens']} tokens {r['float32_ms']:.0f} / {r['loaded_ms']:.0f} ms"
                                  for r in p["sizes"])
                where = (f"passes of {p['float32_from']}+ tokens run in float32" if p["float32_from"]
                         else f"every pass runs in {p['loaded']}")
                lines.append(f"{c.key.role} passes in float32 / {p['loaded']}: {times}: {where}")
        batched = [r for r in self.target.rows + self.draft.rows if r.get("sequences", 1) > 1]
        if batched:
            per_token = cost.verify_ms_per_token if cost.batched_ms_per_token is None else cost.batched_ms_per_token
            lines.append("batched passes: " + "; ".join(
                f"{r['kind']} {r['sequences']} sequences x {r['tokens']} tokens {r['ms']:.0f} ms" for r in batched)
                + f"; priced as +{cost.verify_ms_per_sequence:.1f} ms per sequence, {per_token:.1f} ms per token "
                f"beyond one a sequence, draft +{cost.draft_ms_per_sequence:.1f} ms per sequence")
        return "\n".join(lines)


def budget_share(role: str, pair_budget_s: float | None) -> float | None:
    """A role's part of a pair's calibration budget, split as DEFAULT_BUDGET_S is (None: the default)."""
    return None if pair_budget_s is None else pair_budget_s * DEFAULT_BUDGET_S[role] / sum(DEFAULT_BUDGET_S.values())


def calibrate_pair(draft_lm: SessionLM, target_lm: SessionLM, tier: str, budget_s: float | None = None,
                   force: bool = False, **kwargs) -> PairCalibration:
    """Calibrate (or load) both models of an in-process pair within `budget_s` for both."""
    target, cached_t = load_or_calibrate(target_lm, "target", tier, force, budget_s=budget_share("target", budget_s),
                                         **kwargs)
    draft, cached_d = load_or_calibrate(draft_lm, "draft", tier, force, budget_s=budget_share("draft", budget_s),
                                        **kwargs)
    return PairCalibration(draft, target, cached_t and cached_d)

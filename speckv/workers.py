"""Draft and target workers: KV-cached models with one cache per request session.

A worker never trusts its cache: every call carries the request's full token ids, the cache is cut back to
the longest common prefix and the rest is fed. So a worker that lost a session (restart, reroute, eviction)
rebuilds it from the token ids and returns the same result; the loop never has to tell a worker to roll
back after a rejection. The same classes run in-process (CLI, benchmarks) and inside Ray Serve replicas.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from .attention import ATTENTION, PackedRows, use_in
from .sampling import SamplingParams, logits_to_probs, sample, step_generator
from .signals import NO_STOP, DraftSignals, DraftStop

if TYPE_CHECKING:  # transformers is imported lazily: the router imports this module and never loads it
    from transformers import DynamicCache

DEFAULT_MAX_SESSIONS = 64
DEFAULT_IDLE_TIMEOUT_S = 600.0
DEFAULT_ACTIVE_S = 5.0  # a session used this recently belongs to a running request (SessionLM's byte bound)
# prompt tokens per forward pass in a chunked prefill (SessionLM.prefill), and what a cache may lack and still be
# fed in the shared pass itself (a verify or drafting pass, packed beside the others' rows: `packed_forward`),
# as vLLM's chunked prefill mixes a prompt's chunk into the decode passes. A pass of its own cost a 64-token
# prompt ~570 ms where riding in a verify pass of eight added ~490 ms (fp16, AVX512-BF16 EPYC), and the running
# requests waited through both either way; read alone, each prompt paid a pass's fixed cost
DEFAULT_PREFILL_CHUNK = 256
PADDING_WASTE = 0.25  # a pass whose rows cannot keep their own caches (`_packs`) runs padded while it pads (or
# needlessly scores) at most this share of its real tokens
CLOSED_SESSIONS_REMEMBERED = 4096  # ids `SessionLM.close` refuses to reopen (oldest forgotten first)


class SessionClosedError(RuntimeError):
    """A call for a session whose request has ended: it was still in flight when the request was cancelled."""


T = TypeVar("T")


def raise_failed(result: T | Exception) -> T:
    """A batched call's entry for one request: its result, or the error it alone failed with, raised."""
    if isinstance(result, Exception):
        raise result
    return result


class KVCapacityError(RuntimeError):
    """The KV caches would outgrow the replica's bound in bytes while the running requests hold them: a new
    request must wait (the router answers 503 + Retry-After), a running one never loses its cache to it."""


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one token's keys and values take in a DynamicCache: layers × 2 × KV heads × head dim × the
    activations' element size (the embedding's dtype: quantized tiers keep activations in half precision)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = model.get_input_embeddings().weight.element_size()
    return int(config.num_hidden_layers * 2 * kv_heads * head_dim * element)


@dataclass
class _Session:
    cache: object  # transformers DynamicCache
    token_ids: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class LogitsCall:
    """One session's part of a forward pass: bring its cache to cover `token_ids`, return the logits after
    each of the last `num_logits` positions (0: none, a prefill chunk's pass: `SessionLM.prefill_step`)."""

    session_id: str
    token_ids: list[int]
    num_logits: int


@dataclass
class CacheStats:
    sessions: int
    hits: int  # calls that reused a cached prefix
    rebuilds: int  # calls that found no usable cache and prefilled from scratch
    evictions: int
    kv_bytes: int = 0  # what the caches hold now


def half_precision_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The linear layers that multiply in half precision (bf16/fp16) on the CPU, which a pass may run in float32
    instead (`computing_in`): bitsandbytes' 4-bit layers that dequantize to half precision (on a CPU bitsandbytes
    finds without bf16 hardware; on one with it, it packs the weights for its own kernel), and plain half-precision
    linear layers (the fp16 tier, a bf16 draft) apart from the output embedding (a prompt's pass applies it to
    one row; `output_half_layer`). On a CPU without bf16 hardware their matmuls are emulated. Empty on a GPU and
    for float32 models."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        Linear4bit = ()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    half = (torch.bfloat16, torch.float16)
    layers = []
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear) or m.weight.device.type != "cpu" or m is output:
            continue
        if isinstance(m, Linear4bit):
            if m.compute_dtype in half and not getattr(m, "support_avx512bf16_for_cpu", False):
                layers.append(m)
        elif type(m) is torch.nn.Linear and m.weight.dtype in half:
            layers.append(m)
    return layers


def output_half_layer(model: torch.nn.Module, half_layers: list[torch.nn.Module]) -> torch.nn.Module | None:
    """The output embedding where it is a plain half-precision linear layer on the CPU beside `half_layers`
    (a bf16 model's, or a 4-bit one's, which bitsandbytes leaves unquantized): a pass that scores many rows
    may run it in float32 too (SessionLM.float32_from). None elsewhere."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (not half_layers or type(output) is not torch.nn.Linear or output.weight.device.type != "cpu"
            or output.weight.dtype not in (torch.bfloat16, torch.float16)):
        return None
    return output


def _is_four_bit(layer: torch.nn.Module) -> bool:
    return hasattr(layer, "compute_dtype")  # bitsandbytes' Linear4bit; plain layers multiply in their weights' dtype


def multiplies_in(layer: torch.nn.Module) -> torch.dtype:
    """What a half-precision layer multiplies in now: as loaded, or float32 inside `computing_in`."""
    if _is_four_bit(layer):
        return layer.compute_dtype
    return torch.float32 if "forward" in vars(layer) else layer.weight.dtype


def keep_float32_copies(layers: list[torch.nn.Module]) -> None:
    """Give the plain half-precision `layers` a float32 copy of their weights, which `computing_in(.., float32)`
    multiplies with (converting them at every pass cost more than it saved: 2-3 s for the 1.5B target on the
    AVX2 EPYC). 4-bit layers dequantize at every pass anyway and need none."""
    for layer in layers:
        if _is_four_bit(layer) or hasattr(layer, "speckv_float32"):
            continue
        bias = None if layer.bias is None else layer.bias.detach().float()
        layer.speckv_float32 = (layer.weight.detach().float(), bias)


def drop_float32_copies(layers: list[torch.nn.Module]) -> None:
    for layer in layers:
        if hasattr(layer, "speckv_float32"):
            del layer.speckv_float32


def _linear_in_float32(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight, bias = layer.speckv_float32
    return torch.nn.functional.linear(x.to(torch.float32), weight, bias).to(x.dtype)


@contextlib.contextmanager
def computing_in(layers: list[torch.nn.Module], dtype: torch.dtype | None) -> Iterator[None]:
    """The half-precision `layers` multiply in `dtype` (float32) inside the block: their inputs cast to it,
    their outputs back to the activations' dtype, so the rest of the model, the KV cache included, is unchanged.
    4-bit layers dequantize to it; plain layers multiply with their float32 copies (`keep_float32_copies`,
    which must have been made). None: as loaded."""
    if dtype is None:
        yield
        return
    if dtype != torch.float32:
        raise ValueError(f"half-precision layers switch to float32 only, not {dtype}")
    plain = [layer for layer in layers if not _is_four_bit(layer)]
    if any(not hasattr(layer, "speckv_float32") for layer in plain):
        raise ValueError("computing_in(float32) needs keep_float32_copies(layers) first")
    four_bit = [layer for layer in layers if _is_four_bit(layer)]
    before = [layer.compute_dtype for layer in four_bit]
    for layer in four_bit:
        layer.compute_dtype = dtype
    for layer in plain:
        layer.forward = functools.partial(_linear_in_float32, layer)
    try:
        yield
    finally:
        for layer, loaded in zip(four_bit, before):
            layer.compute_dtype = loaded
        for layer in plain:
            del layer.forward


def logit_rows(fed: int, num_logits: int, device: torch.device) -> int | torch.Tensor:
    """`logits_to_keep` for a forward pass that feeds `fed` tokens and needs the last `num_logits` logits.

    An int smaller than `fed` makes transformers apply the output layer to a strided [1, k, H] view of the
    hidden states, on which torch 2.13's CPU bf16 `linear` runs about 25x slower (the 0.5B draft's lm_head:
    ~35 ms on a fresh tensor, ~830 ms on that view, measured on an AVX512 Xeon without BF16; the AVX512-BF16
    EPYC of issue 13 showed 20 vs 600 ms). An index tensor makes transformers gather those rows into a fresh
    tensor instead. Where every fed token is scored (verification) the int selects the whole, contiguous
    sequence, and it stays an int."""
    if num_logits >= fed:
        return num_logits
    return torch.arange(fed - num_logits, fed, device=device)


def common_prefix_len(a: list[int], b: list[int], chunk: int = 256) -> int:
    """How many leading tokens `a` and `b` share. Runs on every call (admission, prefill, the pass itself), so
    whole chunks are compared as slices (C speed) and only the chunk that differs token by token."""
    n = min(len(a), len(b))
    i = 0
    while i < n:
        j = min(i + chunk, n)
        if a[i:j] != b[i:j]:
            while a[i] == b[i]:
                i += 1
            return i
        i = j
    return n


class SessionLM:
    """A causal LM plus a bounded LRU of per-session KV caches (size bound and idle timeout)."""

    def __init__(
        self,
        model: torch.nn.Module,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        added_ms_per_call: float = 0.0,
        max_kv_bytes: int | None = None,
        active_s: float = DEFAULT_ACTIVE_S,
    ) -> None:
        """`added_ms_per_call` adds that much time to every forward call (0 = none): a slower model, for
        tests that need a call to be in flight when something happens (a replica killed mid-call).
        `max_kv_bytes` bounds the caches in bytes (None: only by session count): to make room, sessions not
        used for `active_s` are dropped first (least recently used first; a request that comes back rebuilds
        its cache from its token ids), then other requests' sessions for a running request's growth; a new
        session that would not fit beside the active ones raises KVCapacityError."""
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.model = model
        use_in(model)  # CPU attention without copied keys; packed rows attending to their own (speckv.attention)
        self.max_kv_bytes = max_kv_bytes
        self.active_s = active_s
        self.bytes_per_token = kv_bytes_per_token(model)
        self.added_ms_per_call = added_ms_per_call
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._closed: OrderedDict[str, None] = OrderedDict()  # ids of ended requests (see close)
        self._lock = threading.Lock()  # one forward at a time: replicas may serve calls from several threads
        self.hits = self.rebuilds = self.evictions = 0
        self.half_layers = half_precision_layers(model)
        self.output_layer = output_half_layer(model, self.half_layers)
        # the layers that keep float32 copies while float32 is chosen (4-bit ones need none: keep_float32_copies)
        self._float32_able = self.half_layers + ([self.output_layer] if self.output_layer is not None else [])
        # passes of at least this many token positions run the half-precision layers in float32 (None: none
        # does), and passes that score at least this many rows their output embedding too; set through
        # `compute_in_float32_from`. Where a CPU has no bf16 hardware, bf16 matmuls are emulated and their cost
        # grows with the rows: on an AVX2 EPYC float32 was 1.3x faster from 8 rows and 2-5x from 16-64, while
        # one- and two-row passes ran twice as fast in bf16; the calibration measures where the two cross
        # (speckv.calibration.probe_float32_from), and a prompt's pass and a batched one are alike to it
        self.float32_from: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def compute_in_float32_from(self, positions: int | None) -> int:
        """Run the half-precision layers of passes with at least `positions` token positions in float32 (and
        the output embedding of passes scoring at least that many rows); None: every pass as loaded. Plain
        layers keep a float32 copy of their weights for it, only while it is chosen; returns the bytes the
        copies take."""
        if positions is not None and positions < 1:
            raise ValueError(f"float32 from {positions} positions: must be at least 1 (None: never)")
        if positions is None or not self.half_layers:
            drop_float32_copies(self._float32_able)
            self.float32_from = None
            return 0
        keep_float32_copies(self._float32_able)
        self.float32_from = positions
        return self.float32_copy_bytes()

    def float32_copy_bytes(self) -> int:
        """Bytes the float32 copies of the plain half-precision layers take now (compute_in_float32_from)."""
        return sum(layer.speckv_float32[0].numel() * 4 for layer in self._float32_able
                   if hasattr(layer, "speckv_float32"))

    def _computing_for(self, positions: int, scored: int) -> contextlib.ExitStack:
        """What a pass of `positions` token positions scoring `scored` rows multiplies in (`float32_from`)."""
        stack = contextlib.ExitStack()
        if self.float32_from is not None and positions >= self.float32_from:
            stack.enter_context(computing_in(self.half_layers, torch.float32))
        if self.float32_from is not None and self.output_layer is not None and scored >= self.float32_from:
            stack.enter_context(computing_in([self.output_layer], torch.float32))
        return stack

    def stats(self) -> CacheStats:
        return CacheStats(len(self._sessions), self.hits, self.rebuilds, self.evictions, self.kv_bytes())

    def _active(self, session: _Session, now: float) -> bool:
        """Used in the last `active_s`: it belongs to a running request."""
        return now - session.last_used <= self.active_s

    def active_sessions(self) -> int:
        """Sessions of running requests (`_active`): this model's load, as its replica reports it."""
        now = time.monotonic()  # not under the lock, which a forward holds: a snapshot of the sessions will do
        return sum(self._active(s, now) for s in list(self._sessions.values()))

    def kv_bytes(self) -> int:
        """Bytes the sessions' caches hold now."""
        return self.bytes_per_token * sum(len(s.token_ids) for s in self._sessions.values())

    def _token_limit(self) -> int | None:
        return None if self.max_kv_bytes is None else self.max_kv_bytes // self.bytes_per_token

    def admit(self, session_id: str, token_ids: list[int]) -> None:
        """Before a request's first pass here: raise KVCapacityError if its cache would not fit beside the
        sessions in use (those idle for `active_s` are dropped to make room). A session that holds a cache
        is admitted already."""
        limit = self._token_limit()
        with self._lock:
            session = self._sessions.get(session_id)
            if limit is None or (session is not None and session.token_ids):
                return
            used = sum(len(s.token_ids) for s in self._sessions.values())
            self._drop(self._idle_first(set()), used + len(token_ids) - limit, active_too=False)
            used = sum(len(s.token_ids) for s in self._sessions.values())
            if used + len(token_ids) > limit:
                mib = self.bytes_per_token / 2**20
                raise KVCapacityError(
                    f"a new request of {len(token_ids)} tokens needs {len(token_ids) * mib:.1f} MiB of KV cache; the "
                    f"running requests hold {used * mib:.0f} of this replica's {self.max_kv_bytes / 2**20:.0f} MiB; "
                    "retry later")

    def _make_room(self, rows: list[_Row]) -> None:
        """Keep the caches within the byte bound once this pass has run: drop idle sessions, then other
        requests' (least recently used first; they rebuild from token ids when they come back)."""
        limit = self._token_limit()
        if limit is None:
            return
        mine = {id(row.session) for row in rows}
        after = sum(len(s.token_ids) for s in self._sessions.values() if id(s) not in mine)
        after += sum(len(row.call.token_ids) for row in rows)
        self._drop(self._idle_first(mine), after - limit, active_too=True)
        if sum(len(row.call.token_ids) for row in rows) > limit:
            raise KVCapacityError(f"this pass alone needs more KV cache than this replica's bound of "
                                  f"{self.max_kv_bytes / 2**20:.0f} MiB")

    def _idle_first(self, exclude: set[int]) -> list[tuple[str, _Session, bool]]:
        """(id, session, active) of the sessions not in `exclude`, idle ones first, least recently used first."""
        now = time.monotonic()
        others = [(sid, s, self._active(s, now)) for sid, s in self._sessions.items()
                  if id(s) not in exclude]
        return [o for o in others if not o[2]] + [o for o in others if o[2]]

    def _drop(self, candidates: list[tuple[str, _Session, bool]], excess: int, active_too: bool) -> None:
        for sid, session, active in candidates:
            if excess <= 0 or (active and not active_too):
                return
            excess -= len(session.token_ids)
            del self._sessions[sid]
            self.evictions += 1

    def close(self, session_id: str) -> bool:
        """End a session: drop its cache for good. A call for it that arrives afterwards (one
        in flight when a client went away and the request was cancelled) raises SessionClosedError instead of
        building a cache that nobody would close."""
        with self._lock:
            self._closed[session_id] = None
            self._closed.move_to_end(session_id)
            while len(self._closed) > CLOSED_SESSIONS_REMEMBERED:
                self._closed.popitem(last=False)
            return self._sessions.pop(session_id, None) is not None

    def fork(self, source: str, target: str) -> None:
        """Give session `target` a copy of `source`'s cache and tokens (calibration's batched passes: several
        sessions on one context, without reading it once per session)."""
        with self._lock:
            cache, token_ids = copy.deepcopy(self._sessions[source].cache), list(self._sessions[source].token_ids)
            session = self._open(target)
            session.cache, session.token_ids = cache, token_ids

    def is_closed(self, session_id: str) -> bool:
        return session_id in self._closed

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def _evict(self, now: float) -> None:
        for sid in [s for s, v in self._sessions.items() if now - v.last_used > self.idle_timeout_s]:
            del self._sessions[sid]
            self.evictions += 1
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
            self.evictions += 1

    def _session(self, session_id: str) -> _Session:
        from transformers import DynamicCache

        now = time.monotonic()
        session = self._sessions.get(session_id)
        if session is None:
            session = _Session(cache=DynamicCache(config=self.model.config))
            self._sessions[session_id] = session
        self._sessions.move_to_end(session_id)
        session.last_used = now
        self._evict(now)
        return session

    @torch.inference_mode()
    def missing(self, session_id: str, token_ids: list[int]) -> int:
        """How many of `token_ids` the session's cache lacks (all of them for a session it does not hold)."""
        session = self._sessions.get(session_id)
        return len(token_ids) - (common_prefix_len(session.token_ids, token_ids) if session else 0)

    def prefill(self, session_id: str, token_ids: list[int], chunk_tokens: int = DEFAULT_PREFILL_CHUNK) -> int:
        """Admit a session (KVCapacityError where it does not fit) and prefill it as `prefill_step` would,
        until its cache lacks at most `chunk_tokens` of `token_ids` (the next call feeds those in its own pass);
        returns the passes made."""
        self.admit(session_id, token_ids)
        passes = 0
        while self.missing(session_id, token_ids) > chunk_tokens:
            self._refuse_closed(session_id)
            self.prefill_step([(session_id, token_ids)], chunk_tokens)
            passes += 1
        return passes

    @torch.inference_mode()
    def prefill_step(self, items: list[tuple[str, list[int]]], chunk_tokens: int = DEFAULT_PREFILL_CHUNK) -> int:
        """One pass of chunked prefill: the sessions whose caches lack more than `chunk_tokens` of their tokens
        (long prompts, rebuilt caches) are fed a chunk each, all in one pass (the chunks are as long: nothing is
        padded). One pass per call: the running requests' passes run between a long prompt's chunks, and its
        last chunk rides in its own call's pass. Returns the sessions fed."""
        with self._lock:
            rows = []
            for session_id, token_ids in dict(items).items():
                if session_id in self._closed:
                    continue  # its request has ended; its next call fails alone (logits_batch)
                session = self._open(session_id)
                done = common_prefix_len(session.token_ids, token_ids)
                if len(token_ids) - done > chunk_tokens:
                    # no logits: nobody reads a chunk's, and a padded pass scored every row from the shortest
                    # row's end on (eight drafts' prompts: 254 rows through the 151936-wide output layer)
                    rows.append(_Row(session, LogitsCall(session_id, token_ids[:done + chunk_tokens], 0)))
            if rows:
                self._forward_rows(rows)
            return len(rows)

    @torch.inference_mode()
    def logits(self, session_id: str, token_ids: list[int], num_logits: int) -> torch.Tensor:
        """Bring the session's cache to cover `token_ids`; return [num_logits, vocab] logits predicting the
        tokens after each of the last `num_logits` positions."""
        return raise_failed(self.logits_batch([LogitsCall(session_id, token_ids, num_logits)])[0])

    def logits_batch(self, calls: list[LogitsCall]) -> list[torch.Tensor | SessionClosedError]:
        """`logits` for several sessions in one forward pass (one per call; a session twice runs apart). A
        call for a closed session fails alone: its entry is the SessionClosedError, the others are served."""
        return self.logits_pass(calls)[0]

    @torch.inference_mode()
    def logits_pass(self, calls: list[LogitsCall]) -> tuple[list[torch.Tensor | SessionClosedError], int, list[int]]:
        """`logits_batch`, with the token positions its forward passes ran (padding included where they padded:
        `pass_positions`), which a verification reports, and the tokens each call fed (0 for one that failed):
        beyond the ones it scores, context its cache lacked (a prompt riding in the pass)."""
        for call in calls:
            assert 1 <= call.num_logits <= len(call.token_ids), (call.num_logits, len(call.token_ids))
        out: list = [None] * len(calls)
        with self._lock:
            rows, where = [], []
            for i, call in enumerate(calls):
                try:
                    rows.append(_Row(self._open(call.session_id), call))
                    where.append(i)
                except SessionClosedError as e:
                    out[i] = e
            if len({row.call.session_id for row in rows}) < len(rows):
                passes = [self._forward_rows([row]) for row in rows]
                results, positions = [out[0] for out, _ in passes], sum(n for _, n in passes)
            else:
                results, positions = self._forward_rows(rows) if rows else ([], 0)
        fed = [0] * len(calls)
        for i, result, row in zip(where, results, rows):
            out[i], fed[i] = result, len(row.call.token_ids) - row.keep
        return out, positions, fed

    def _refuse_closed(self, session_id: str) -> None:
        if session_id in self._closed:
            raise SessionClosedError(f"session {session_id!r} was closed: its request has ended")

    def _open(self, session_id: str) -> _Session:
        self._refuse_closed(session_id)
        return self._session(session_id)

    def _forward_rows(self, rows: list[_Row]) -> tuple[list[torch.Tensor], int]:
        """One forward pass over the rows (model lock held): each session's cache is cut back to the longest
        prefix it shares with its call's tokens (keeping at least `num_logits` to feed), the rest is fed. Returns
        the logits and the token positions the pass ran (`pass_positions`)."""
        self._make_room(rows)
        for row in rows:
            cached = len(row.session.token_ids)
            row.keep = min(common_prefix_len(row.session.token_ids, row.call.token_ids),
                           len(row.call.token_ids) - max(row.call.num_logits, 1))
            if row.keep == 0 and cached:
                row.session.cache = type(row.session.cache)(config=self.model.config)
            elif row.keep < cached:
                row.session.cache.crop(-(cached - row.keep))  # transformers 5: a negative length removes tokens
            if row.keep > 0:
                self.hits += 1
            else:
                self.rebuilds += 1
        positions = pass_positions(self.model, rows)
        try:
            with self._computing_for(positions, sum(row.call.num_logits for row in rows)):
                out = self._forward_one(rows[0]) if len(rows) == 1 else batched_forward(self.model, rows)
        except BaseException:  # a pass cut short has appended to some layers of its rows' caches and not to others
            for row in rows:
                row.session.cache = type(row.session.cache)(config=self.model.config)
                row.session.token_ids = []  # rebuilt from the next call's tokens
            raise
        if self.added_ms_per_call:
            time.sleep(self.added_ms_per_call / 1e3)
        for row in rows:
            row.session.token_ids = list(row.call.token_ids)
        return out, positions

    def _forward_one(self, row: _Row) -> list[torch.Tensor]:
        feed = torch.tensor([row.call.token_ids[row.keep:]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=feed, past_key_values=row.session.cache, use_cache=True,
                         logits_to_keep=logit_rows(feed.shape[1], row.call.num_logits, self.device))
        return [out.logits[0, out.logits.shape[1] - row.call.num_logits:]]


@dataclass
class _Row:
    """A call in a pass, with its session and how many of its cached tokens it keeps."""

    session: _Session
    call: LogitsCall
    keep: int = 0


def _fed_lengths(rows: list[_Row]) -> list[int]:
    return [len(row.call.token_ids) - row.keep for row in rows]


def pass_positions(model: torch.nn.Module, rows: list[_Row]) -> int:
    """Token positions a pass over `rows` runs: the fed tokens, plus the padding where it pads (`batched_forward`)."""
    fed = _fed_lengths(rows)
    return sum(fed) if len(rows) == 1 or _packs(model, rows) else len(fed) * max(fed)


def _packs(model: torch.nn.Module, rows: list[_Row]) -> bool:
    """Whether a pass over `rows` runs packed: always where its rows keep their own caches through it
    (`reads_own_caches`: no copying, and no padding to run or score); elsewhere where padding wastes too much
    (`_pads_too_much`), for packing costs copying every row's cache into one and back."""
    return reads_own_caches(model) or _pads_too_much(rows)


def _pads_too_much(rows: list[_Row]) -> bool:
    """Where padded, the positions a pass over `rows` would pad or the rows it would score beyond those wanted
    come to more than PADDING_WASTE of the real tokens fed (padded, every row is scored from the earliest wanted
    position on, through the whole vocabulary: a verify pass whose requests drafted runs of different lengths
    pads; a few prompts keeping one logit beside verify rows keeping all theirs score)."""
    fed = _fed_lengths(rows)
    wanted = [row.call.num_logits for row in rows]
    scored_from = min((f - n for f, n in zip(fed, wanted) if n), default=max(fed))  # padded_forward's `first`
    waste = max(len(fed) * max(fed) - sum(fed), len(fed) * (max(fed) - scored_from) - sum(wanted))
    return waste > PADDING_WASTE * sum(fed)


def batched_forward(model: torch.nn.Module, rows: list[_Row]) -> list[torch.Tensor]:
    """One forward pass over several sessions with different cached and fed lengths (a ragged batch): packed
    into one sequence (`packed_forward`) where `_packs`, else padded (`padded_forward`: the model's batched
    layout, no cross-row attention to mask)."""
    return packed_forward(model, rows) if _packs(model, rows) else padded_forward(model, rows)


def packed_forward(model: torch.nn.Module, rows: list[_Row]) -> list[torch.Tensor]:
    """One forward pass over several sessions as one sequence: their fed tokens side by side, each query
    attending to its own row's cache and its own earlier fed tokens only (`speckv.attention.packed_attention`,
    one attention call per row); position ids restart per row. The linear layers, most of a pass, run on the
    real tokens only: padded, a row drafting 12 among rows drafting 1-2 made every row 13 wide (nf4, 8 requests,
    AVX2 EPYC: passes cost 119 ms a position, padding included). Each row's attention is its own, so a riding
    prompt's queries (up to DEFAULT_PREFILL_CHUNK) see only its own keys however long the others' contexts are.

    Where the model's attention is SpecKV's and no layer slides a window (`reads_own_caches`), each row's keys
    stay in its own cache, which the pass appends to (`speckv.sessions_cache.SessionsCache`); elsewhere the kept
    caches are copied side by side into one cache before the fed tokens (with a 4-D mask where the attention is
    not SpecKV's), and each session's columns copied back after.
    Returns each row's last `num_logits` logits."""
    device = next(model.parameters()).device
    kept = [row.keep for row in rows]
    fed = [row.call.token_ids[row.keep:] for row in rows]
    own = reads_own_caches(model)
    layout = PackedRows(tuple(kept), tuple(len(x) for x in fed),
                        caches=tuple(row.session.cache for row in rows) if own else None)
    if own:
        from .sessions_cache import SessionsCache

        batch = SessionsCache(model.config, layout)
    else:
        batch = _side_by_side(model, rows, kept)
    if model.config._attn_implementation == ATTENTION:  # each row attends to its own keys (speckv.attention)
        where = {"packed_rows": layout, "attention_mask": None}
    else:
        where = {"attention_mask": layout.mask(model.get_input_embeddings().weight.dtype, device)}
    fed_at = layout.fed_at
    positions = torch.cat([torch.arange(k, k + len(tokens)) for k, tokens in zip(kept, fed)])[None]
    keep_rows = torch.cat([torch.arange(fed_at[i] + len(tokens) - row.call.num_logits, fed_at[i] + len(tokens))
                           for i, (row, tokens) in enumerate(zip(rows, fed))])
    input_ids = torch.tensor([[t for tokens in fed for t in tokens]], dtype=torch.long)
    out = model(input_ids=input_ids.to(device), position_ids=positions.to(device), past_key_values=batch,
                use_cache=True, logits_to_keep=keep_rows.to(device), **where)
    if layout.caches is None:
        _take_back(model, rows, layout, batch)
    logits, start = [], 0
    for row in rows:
        logits.append(out.logits[0, start:start + row.call.num_logits])
        start += row.call.num_logits
    return logits


def reads_own_caches(model: torch.nn.Module) -> bool:
    """Whether a packed pass of `model` can leave each row's keys in its own cache: its attention is SpecKV's
    (which reads them there) and no layer slides a window (a sliding layer's cache keeps only its window)."""
    config = model.config
    return (config._attn_implementation == ATTENTION
            and "sliding_attention" not in (getattr(config, "layer_types", None) or ()))


def _side_by_side(model: torch.nn.Module, rows: list[_Row], kept: list[int]) -> DynamicCache:
    """One cache holding the rows' kept caches side by side (a packed pass of attention that takes no rows)."""
    from transformers import DynamicCache

    batch = DynamicCache(config=model.config)
    if sum(kept):
        for layer, parts in enumerate(zip(*(row.session.cache.layers for row in rows))):
            live = [p for k, p in zip(kept, parts) if k]
            batch.update(torch.cat([p.keys for p in live], dim=-2), torch.cat([p.values for p in live], dim=-2), layer)
    return batch


def _take_back(model: torch.nn.Module, rows: list[_Row], layout: PackedRows, batch: DynamicCache) -> None:
    """After a pass over `_side_by_side` caches, each session takes its own columns back: its kept cache, then
    its fed tokens."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    total_kept = sum(layout.cached)
    for i, (row, k, f) in enumerate(zip(rows, layout.cached, layout.fed)):
        cache = DynamicCache(config=model.config)
        own = list(range(layout.cache_at[i], layout.cache_at[i] + k)) + list(
            range(total_kept + layout.fed_at[i], total_kept + layout.fed_at[i] + f))
        index = torch.tensor(own, device=device)
        for layer, part in enumerate(batch.layers):
            cache.update(part.keys.index_select(-2, index), part.values.index_select(-2, index), layer)
        row.session.cache = cache


def padded_forward(model: torch.nn.Module, rows: list[_Row]) -> list[torch.Tensor]:
    """One forward pass over several sessions with different cached and fed lengths, padded.

    Row i is laid out as [pad, its kept cache (k_i), its fed tokens (f_i), pad]: the caches are copied
    left-padded into one batched cache of C = max k_i columns, the fed tokens right-padded to F = max f_i,
    with position ids k_i.. and an attention mask that hides every pad. Right padding of the fed tokens
    means no real query ever sits after a masked gap it must skip, and every pad query still sees real keys
    (no fully masked row). After the pass each session takes back its own columns: its kept cache then its
    fed tokens, contiguous. Returns each row's last `num_logits` logits ([num_logits, vocab])."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    kept = [row.keep for row in rows]
    fed = [row.call.token_ids[row.keep:] for row in rows]
    c, f = max(kept), max(len(x) for x in fed)
    batch = DynamicCache(config=model.config)
    if c:
        for layer, parts in enumerate(zip(*(row.session.cache.layers for row in rows))):
            template = next(p for p in parts if p.is_initialized and p.keys.numel())
            keys = [_left_pad(p.keys if p.is_initialized and p.keys.numel() else None, template.keys, c) for p in parts]
            values = [_left_pad(p.values if p.is_initialized and p.values.numel() else None, template.values, c)
                      for p in parts]
            batch.update(torch.cat(keys), torch.cat(values), layer)
    input_ids = torch.zeros(len(rows), f, dtype=torch.long)
    positions = torch.zeros(len(rows), f, dtype=torch.long)
    mask = torch.zeros(len(rows), c + f, dtype=torch.long)
    for i, (k, tokens) in enumerate(zip(kept, fed)):
        input_ids[i, :len(tokens)] = torch.tensor(tokens)
        positions[i] = torch.arange(k, k + f)
        mask[i, c - k:c + len(tokens)] = 1
    starts = [len(tokens) - row.call.num_logits for tokens, row in zip(fed, rows)]
    first = min((s for s, row in zip(starts, rows) if row.call.num_logits), default=f)  # f: no row wants any
    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                past_key_values=batch, use_cache=True, logits_to_keep=torch.arange(first, f, device=device))
    for i, (row, k, tokens) in enumerate(zip(rows, kept, fed)):
        cache = DynamicCache(config=model.config)
        for layer, part in enumerate(batch.layers):
            cache.update(part.keys[i:i + 1, :, c - k:c + len(tokens)].clone(),
                         part.values[i:i + 1, :, c - k:c + len(tokens)].clone(), layer)
        row.session.cache = cache
    return [out.logits[i, s - first:s - first + row.call.num_logits] for i, (row, s) in enumerate(zip(rows, starts))]


def _left_pad(x: torch.Tensor | None, like: torch.Tensor, length: int) -> torch.Tensor:
    """[1, heads, n, dim] -> [1, heads, length, dim] with zeros in front (masked out)."""
    n = 0 if x is None else x.shape[-2]
    pad = like.new_zeros((1, like.shape[1], length - n, like.shape[-1]))
    return pad if x is None else torch.cat([pad, x], dim=-2)


@dataclass
class Proposal:
    """What the draft proposes for one step."""

    token_ids: list[int]
    draft_probs: torch.Tensor | None  # [G, V] sampling distribution of each token; None when greedy
    signals: DraftSignals
    compute_ms: float
    batch_size: int = 1  # requests drafted in the same passes
    waited_ms: float = 0.0  # in the replica before its pass began, for the cores or the batch (speckv.batching)
    passes: int = 0  # drafting passes the batch ran (its longest run), which `compute_ms` timed
    rows: int = 0  # sequence-positions those passes carried (the sum of the batch's runs)
    most_read: int = 0  # the most context tokens one sequence of the batch read in its first pass before drafting
    # (a catch-up: 1-2 after a verification; a whole prompt or stretch of target-only steps riding in it)


@dataclass
class Verification:
    """What the target says about a proposal: its choice (greedy) or its distribution at G+1 positions."""

    target_token_ids: list[int] | None  # greedy: argmax at each of the G+1 positions
    target_probs: torch.Tensor | None  # sampling: [G+1, V]
    compute_ms: float = 0.0  # the pass's time
    batch_size: int = 1  # requests (sequences) in the pass
    batch_tokens: int = 0  # token positions the pass ran, over all its sequences (padding included where it padded)
    waited_ms: float = 0.0  # in the replica before its pass began, for the cores or the batch (speckv.batching)
    others_deepest: int = 0  # the longest draft run among the other sequences in the pass
    read_tokens: int = 0  # of `batch_tokens`, context its sequences read beyond what they score (prompts riding in it)


@dataclass(frozen=True)
class StepInputs:
    """One request's step as the model side needs it: built once by the loop, handed whole to executors and
    workers, in-process or through deployment handles."""

    session_id: str  # the request's KV-cache sessions (and its replica affinity)
    context_ids: list[int]  # prompt + tokens generated so far
    gamma: int  # draft tokens to propose, at most
    params: SamplingParams
    seed: int  # with `step`, fixes every random draw of the step (speckv.sampling.step_generator)
    step: int
    stop: DraftStop = NO_STOP  # when the draft ends its run early


class ModelWorker:
    """A SessionLM in a role (draft or target)."""

    def __init__(self, lm: SessionLM) -> None:
        self.lm = lm

    def admit(self, inputs: StepInputs) -> None:
        """Before a request's call joins a batch: KVCapacityError where its cache would not fit."""
        self.lm.admit(inputs.session_id, inputs.context_ids[:-1])

    def needs_prefill(self, inputs: StepInputs) -> bool:
        """Whether the cache lacks more of the context than a chunk (DEFAULT_PREFILL_CHUNK), which chunk passes
        read first (SessionLM.prefill_step; up to a chunk, the call's own pass feeds it); not for a closed session
        (its call then fails alone in the pass)."""
        return (not self.lm.is_closed(inputs.session_id)
                and self.lm.missing(inputs.session_id, inputs.context_ids[:-1]) > DEFAULT_PREFILL_CHUNK)

    def prefill(self, inputs: StepInputs) -> None:
        """`admit`, then the chunk passes `needs_prefill` asks for, alone: a single request's calls make the
        same passes as in a batch (so its numerics do not depend on how it is served)."""
        self.lm.prefill(inputs.session_id, inputs.context_ids[:-1])

    def prefill_step(self, batch: list[StepInputs]) -> list[int]:
        """One chunk pass of prefill for the requests of `batch` that need it, together; returns the sessions fed
        (for each)."""
        fed = self.lm.prefill_step([(inputs.session_id, inputs.context_ids[:-1]) for inputs in batch])
        return [fed] * len(batch)


class DraftWorker(ModelWorker):
    """Proposes γ tokens autoregressively with their signals."""

    def propose(self, inputs: StepInputs) -> Proposal:
        """One request's proposal, with the same passes it makes in a batch (prefill, then drafting)."""
        self.prefill(inputs)
        return raise_failed(self.propose_batch([inputs])[0])

    def propose_batch(self, batch: list[StepInputs]) -> list[Proposal | SessionClosedError]:
        """Draft up to γ tokens after each context, one forward pass per drafted position for all requests
        still drafting, each ending its run early where its `stop` rule says the tokens after this one would
        rarely be accepted. Each proposal's `compute_ms` is the batch's time (what its request waited); a
        request whose session was closed gets its error, the others their proposals."""
        start = time.perf_counter()
        runs = [_DraftRun(inputs) for inputs in batch]
        active = [run for run in runs if run.inputs.gamma > 0]
        calls = [LogitsCall(run.inputs.session_id, run.inputs.context_ids, 1) for run in active]
        most_read = 0  # the first pass's largest feed: later passes feed one token a sequence
        while active:
            all_logits, _, fed = self.lm.logits_pass(calls)
            most_read = max(most_read, *fed)
            for run, logits in zip(active, all_logits):
                if isinstance(logits, Exception):
                    run.failed, run.done = logits, True
                else:
                    run.take(logits[-1])
            active = [run for run in active if not run.done]
            calls = [LogitsCall(run.inputs.session_id, run.inputs.context_ids + run.tokens, 1) for run in active]
        ms = (time.perf_counter() - start) * 1e3
        drafted = [len(run.tokens) for run in runs]
        return [run.failed or run.proposal(ms, len(batch), max(drafted, default=0), sum(drafted), most_read)
                for run in runs]


class _DraftRun:
    """One request's draft run in a (batched) proposal."""

    def __init__(self, inputs: StepInputs) -> None:
        self.inputs = inputs
        params = inputs.params
        self.generator = None if params.greedy else step_generator(inputs.seed, inputs.step, stream=0)
        self.tokens: list[int] = []
        self.probs_rows: list[torch.Tensor] = []
        self.signals = DraftSignals()
        self.stopper = inputs.stop.stopper()
        self.done = inputs.gamma == 0
        self.failed: SessionClosedError | None = None

    def take(self, logits: torch.Tensor) -> None:
        """Draw the next token from the draft's logits after the run so far."""
        params = self.inputs.params
        probs = logits_to_probs(logits, params)
        token = int(probs.argmax()) if params.greedy else int(sample(probs, self.generator))
        self.signals.append(logits, token)
        self.tokens.append(token)
        if not params.greedy:
            self.probs_rows.append(probs.cpu())
        self.done = len(self.tokens) == self.inputs.gamma or self.stopper.stop_after(
            self.signals.confidence[-1], self.signals.entropy[-1])

    def proposal(self, ms: float, batch_size: int, passes: int, rows: int, most_read: int) -> Proposal:
        draft_probs = torch.stack(self.probs_rows) if self.probs_rows else None
        return Proposal(self.tokens, draft_probs, self.signals, ms, batch_size, passes=passes, rows=rows,
                        most_read=most_read)


def draft_session(inputs: StepInputs) -> str:
    """The session of a `DraftWorker.propose_batch` call (a Batcher regroups a pass's sessions by it)."""
    return inputs.session_id


def verify_session(call: tuple[StepInputs, list[int]]) -> str:
    """The session of a `TargetWorker.verify_batch` call (a Batcher regroups a pass's sessions by it)."""
    return call[0].session_id


class TargetWorker(ModelWorker):
    """Scores proposals, all of a batch in one forward pass."""

    def verify(self, inputs: StepInputs, draft_token_ids: list[int]) -> Verification:
        """Score the context's next token and each drafted one, in one pass (after the prefill passes a new
        request makes in a batch too)."""
        self.prefill(inputs)
        return raise_failed(self.verify_batch([(inputs, draft_token_ids)])[0])

    def verify_batch(self, batch: list[tuple[StepInputs, list[int]]]) -> list[Verification | SessionClosedError]:
        """`verify` for several requests in one forward pass; each result reports that pass (a request whose
        session was closed gets its error, the others their verifications)."""
        start = time.perf_counter()
        calls = [LogitsCall(inputs.session_id, inputs.context_ids + drafted, len(drafted) + 1)
                 for inputs, drafted in batch]
        # scored: positions run, padding included where it padded; read: context fed beyond the scored tokens
        all_logits, scored, fed = self.lm.logits_pass(calls)
        read = sum(max(n - call.num_logits, 0) for n, call in zip(fed, calls))
        results = [logits if isinstance(logits, Exception)
                   else Verification(logits.argmax(-1).tolist(), None) if inputs.params.greedy
                   else Verification(None, logits_to_probs(logits, inputs.params).cpu())
                   for (inputs, _), logits in zip(batch, all_logits)]
        ms = (time.perf_counter() - start) * 1e3
        runs = [len(drafted) for _, drafted in batch]
        for i, result in enumerate(results):
            if isinstance(result, Verification):
                result.compute_ms, result.batch_size, result.batch_tokens = ms, len(batch), scored
                result.read_tokens = read
                result.others_deepest = max(runs[:i] + runs[i + 1:], default=0)
        return results

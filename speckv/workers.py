"""Draft and target workers: KV-cached models with one cache per request session.

A worker never trusts its cache: every call carries the request's full token ids, the cache is cut back to
the longest common prefix and the rest is fed. So a worker that lost a session (restart, reroute, eviction)
rebuilds it from the token ids and returns the same result; the loop never has to tell a worker to roll
back after a rejection. The same classes run in-process (CLI, benchmarks) and inside Ray Serve replicas.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, logits_to_probs, sample, step_generator
from .signals import NO_STOP, DraftSignals, DraftStop

DEFAULT_MAX_SESSIONS = 64
DEFAULT_IDLE_TIMEOUT_S = 600.0
CLOSED_SESSIONS_REMEMBERED = 4096  # ids `SessionLM.close` refuses to reopen (oldest forgotten first)


class SessionClosedError(RuntimeError):
    """A call for a session whose request has ended: it was still in flight when the request was cancelled."""


@dataclass
class _Session:
    cache: object  # transformers DynamicCache
    token_ids: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class CacheStats:
    sessions: int
    hits: int  # calls that reused a cached prefix
    rebuilds: int  # calls that found no usable cache and prefilled from scratch
    evictions: int


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


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SessionLM:
    """A causal LM plus a bounded LRU of per-session KV caches (size bound and idle timeout)."""

    def __init__(
        self,
        model: torch.nn.Module,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        added_ms_per_call: float = 0.0,
    ) -> None:
        """`added_ms_per_call` adds that much time to every forward call (0 = none): a slower model, for
        tests that need a call to be in flight when something happens (a replica killed mid-call)."""
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.model = model
        self.added_ms_per_call = added_ms_per_call
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._closed: OrderedDict[str, None] = OrderedDict()  # ids of ended requests (see close)
        self._lock = threading.Lock()  # one forward at a time: replicas may serve calls from several threads
        self.hits = self.rebuilds = self.evictions = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stats(self) -> CacheStats:
        return CacheStats(len(self._sessions), self.hits, self.rebuilds, self.evictions)

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
    def logits(self, session_id: str, token_ids: list[int], num_logits: int) -> torch.Tensor:
        """Bring the session's cache to cover `token_ids`; return [num_logits, vocab] logits predicting the
        tokens after each of the last `num_logits` positions."""
        assert 1 <= num_logits <= len(token_ids), (num_logits, len(token_ids))
        with self._lock:
            if session_id in self._closed:
                raise SessionClosedError(f"session {session_id!r} was closed: its request has ended")
            session = self._session(session_id)
            keep = min(common_prefix_len(session.token_ids, token_ids), len(token_ids) - num_logits)
            cached = len(session.token_ids)
            if keep == 0 and cached:
                session.cache = type(session.cache)(config=self.model.config)
            elif keep < cached:
                session.cache.crop(-(cached - keep))  # transformers 5: a negative length removes tokens
            if keep > 0:
                self.hits += 1
            else:
                self.rebuilds += 1
            feed = torch.tensor([token_ids[keep:]], dtype=torch.long, device=self.device)
            out = self.model(input_ids=feed, past_key_values=session.cache, use_cache=True,
                             logits_to_keep=logit_rows(feed.shape[1], num_logits, self.device))
            if self.added_ms_per_call:
                time.sleep(self.added_ms_per_call / 1e3)
            session.token_ids = list(token_ids)
            return out.logits[0, -num_logits:]


@dataclass
class Proposal:
    """What the draft proposes for one step."""

    token_ids: list[int]
    draft_probs: torch.Tensor | None  # [G, V] sampling distribution of each token; None when greedy
    signals: DraftSignals
    compute_ms: float


@dataclass
class Verification:
    """What the target says about a proposal: its choice (greedy) or its distribution at G+1 positions."""

    target_token_ids: list[int] | None  # greedy: argmax at each of the G+1 positions
    target_probs: torch.Tensor | None  # sampling: [G+1, V]
    compute_ms: float


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


class DraftWorker:
    """Proposes γ tokens autoregressively with their signals."""

    def __init__(self, lm: SessionLM) -> None:
        self.lm = lm

    def propose(self, inputs: StepInputs) -> Proposal:
        """Draft up to γ tokens after the context, ending the run early where the `stop` rule says the
        tokens after this one would rarely be accepted."""
        start = time.perf_counter()
        session_id, context_ids, gamma, params = inputs.session_id, inputs.context_ids, inputs.gamma, inputs.params
        generator = None if params.greedy else step_generator(inputs.seed, inputs.step, stream=0)
        tokens: list[int] = []
        probs_rows: list[torch.Tensor] = []
        signals = DraftSignals()
        stopper = inputs.stop.stopper()
        logits = self.lm.logits(session_id, context_ids, 1)[-1]
        for i in range(gamma):
            probs = logits_to_probs(logits, params)
            token = int(probs.argmax()) if params.greedy else int(sample(probs, generator))
            signals.append(logits, token)
            tokens.append(token)
            if not params.greedy:
                probs_rows.append(probs.cpu())
            if i == gamma - 1 or stopper.stop_after(signals.confidence[-1], signals.entropy[-1]):
                break
            logits = self.lm.logits(session_id, context_ids + tokens, 1)[-1]
        draft_probs = torch.stack(probs_rows) if probs_rows else None
        return Proposal(tokens, draft_probs, signals, (time.perf_counter() - start) * 1e3)


class TargetWorker:
    """Scores a proposal in one forward pass."""

    def __init__(self, lm: SessionLM) -> None:
        self.lm = lm

    def verify(self, inputs: StepInputs, draft_token_ids: list[int]) -> Verification:
        """Score the context's next token and each drafted one, in one pass."""
        start = time.perf_counter()
        logits = self.lm.logits(inputs.session_id, inputs.context_ids + draft_token_ids, len(draft_token_ids) + 1)
        if inputs.params.greedy:
            result = Verification(logits.argmax(-1).tolist(), None, 0.0)
        else:
            result = Verification(None, logits_to_probs(logits, inputs.params).cpu(), 0.0)
        result.compute_ms = (time.perf_counter() - start) * 1e3
        return result

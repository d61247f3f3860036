"""The speculation loop: the policy picks γ, the draft proposes, the target verifies, the rule accepts.

`speculate` is the one loop in SpecKV. It reaches the models through a `StepExecutor` with awaitable calls,
so the same code runs in-process (CLI, benchmarks) and in the Ray Serve router (deployment handles, split
or colocated). Workers keep the KV caches; the loop only sends token ids.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .acceptance import greedy_accept, speculative_accept
from .policy import GammaPolicy, RequestProgress, StepTiming
from .records import RequestStats, StepRecord
from .sampling import SamplingParams, step_generator
from .signals import DraftSignals
from .workers import Proposal, StepInputs, Verification

MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 128
# the work overlapped with a verification waits this share of the request's last verification (at least
# OVERLAP_DEFER_S), or until the verification is back, so that the other requests on this event loop whose
# results came with this one send their next calls first (SplitExecutor). Each request's work on its result
# (accepting, streaming, deciding) holds the loop for a few ms, so a fixed 5 ms ran out while the last of eight
# had yet to send theirs and the pass, which waits for them, began later: served fp16 at 8 streams on the AMX
# Xeon, 4-7 ms more between passes than `none`'s (docs/serving_log.md, "fp16 at 8 streams traced pass by pass")
OVERLAP_DEFER_S = 0.005
OVERLAP_SHARE = 0.25


@dataclass
class StepCall:
    """What one step's model calls returned, with the wall time the loop saw for each part."""

    proposal: Proposal
    verification: Verification
    draft_wall_ms: float
    verify_wall_ms: float


WhileVerifying = Callable[[Proposal], None]  # runs while the proposal is being verified (see run_step)


class StepExecutor(Protocol):
    """Runs the model side of one step (draft γ tokens, then verify them) for a session."""

    async def run_step(self, inputs: StepInputs, while_verifying: WhileVerifying | None = None) -> StepCall:
        """`while_verifying(proposal)`, when given, is called once the verification has been sent (and the calls
        of the other requests on the loop whose results came with it) and before its result is awaited, so the
        caller's work overlaps a verification that runs elsewhere (a replica);
        where the verify pass runs on this thread (in-process) it has run by then, and the work follows it.
        An executor that cannot split the step may not call it."""
        ...

    async def close(self, session_id: str) -> None:
        """The request has ended: end its sessions on every worker (a late call for it is refused)."""
        ...


ProposeFn = Callable[[StepInputs], Awaitable[Proposal]]
VerifyFn = Callable[[StepInputs, list[int]], Awaitable[Verification]]
CloseFn = Callable[[str], Awaitable[None]]


class SplitExecutor:
    """Draft and target reached separately (in-process workers, or two deployment handles)."""

    def __init__(self, propose: ProposeFn, verify: VerifyFn, close: CloseFn) -> None:
        self._propose, self._verify, self._close = propose, verify, close
        # the wall time of the last verification it saw: served, of its request (the router makes one a request);
        # in-process, of any of the engine's requests, whose passes they share
        self._last_verify_s = 0.0

    async def run_step(self, inputs: StepInputs, while_verifying: WhileVerifying | None = None) -> StepCall:
        t0 = time.perf_counter()
        proposal = await self._propose(inputs) if inputs.gamma > 0 else Proposal([], None, DraftSignals(), 0.0)
        t1 = time.perf_counter()
        if while_verifying is None:
            verification = await self._verify(inputs, proposal.token_ids)
        else:  # a task, so the verify call goes out before the overlapped work
            verifying = asyncio.ensure_future(self._verify(inputs, proposal.token_ids))
            await asyncio.sleep(0)
            # and the other requests' calls too: their results came with this one (a batched pass), and a pass
            # waits for the calls of the last one (speckv.batching regroups). Run at once, each request's
            # overlapped work held the loop before the next request could send its call: 8 streams served at
            # fp16 on an AVX512-BF16 EPYC, 21 ms more wait a step than `none`'s, whose steps overlap nothing
            try:
                await asyncio.wait({verifying}, timeout=max(OVERLAP_DEFER_S, OVERLAP_SHARE * self._last_verify_s))
                while_verifying(proposal)
            except BaseException:
                verifying.cancel()
                raise
            verification = await verifying
        t2 = time.perf_counter()
        self._last_verify_s = t2 - t1
        return StepCall(proposal, verification, (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    async def close(self, session_id: str) -> None:
        await self._close(session_id)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    tier: str = "fp16"
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt_id: str = ""
    category: str = ""
    min_confidence: float = 0.0  # the caller's own draft early-exit threshold, 0 = off (see DraftStop)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings of 1 to {MAX_STOP_STRING_CHARS} characters")


class TextAssembler:
    """Turns new token ids into text deltas, honouring stop strings.

    Holds back text that could still become a stop string or is an incomplete UTF-8 sequence, so streamed
    deltas concatenate to exactly the final text.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.emitted = 0  # characters already handed out
        self.text = ""  # final text once stopped

    def push(self, token_ids: list[int], final: bool = False) -> tuple[str, bool]:
        """Add tokens; return (new text safe to emit, whether a stop string ended the text)."""
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            delta = self.text[self.emitted:]
            self.emitted = len(self.text)
            return delta, True
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):  # a multi-byte character split across tokens
                safe = len(text.rstrip("\ufffd"))
            for s in self.stop:  # the longest tail of the text that begins a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[safe - k: safe] == s[:k]:
                        safe -= k
                        break
        safe = max(safe, self.emitted)
        delta = text[self.emitted: safe]
        self.emitted = safe
        self.text = text
        return delta, False


@dataclass
class StepEvent:
    """One verified step, as the loop hands it to its caller (CLI, benchmark, HTTP stream)."""

    token_ids: list[int]  # tokens added this step
    text: str  # text safe to show now
    record: StepRecord
    finish_reason: str | None  # "stop" (EOS or stop string), "length", or None while running


def accept_step(proposal: Proposal, verification: Verification, params: SamplingParams, seed: int, step: int):
    """Apply the acceptance rule to one request's step (a batch of one row)."""
    draft_ids = torch.tensor([proposal.token_ids], dtype=torch.long)
    if params.greedy:
        return greedy_accept(draft_ids, torch.tensor([verification.target_token_ids]))
    target_probs = verification.target_probs[None]
    draft_probs = proposal.draft_probs if proposal.draft_probs is not None else \
        target_probs.new_zeros((0, target_probs.shape[-1]))
    return speculative_accept(draft_ids, draft_probs[None], target_probs, step_generator(seed, step, stream=1))


def _preparer(policy: GammaPolicy, progress: RequestProgress, step: int, position: int,
               context_len: int) -> WhileVerifying | None:
    """What the policy may prepare while the step is verified: the next step's context for each accepted
    count (RequestProgress.previews). None for policies with nothing to prepare."""
    prepare = getattr(policy, "prepare", None)
    if prepare is None:
        return None
    return lambda proposal: prepare(progress.previews(proposal.signals, step, position, context_len))


async def speculate(
    request: GenerationRequest,
    executor: StepExecutor,
    policy: GammaPolicy,
    assembler: TextAssembler,
) -> AsyncIterator[StepEvent]:
    """Run one request to completion, one StepEvent per step. Releases the workers' sessions at the end."""
    params, sid = request.sampling, request.request_id
    seed = params.seed if params.seed is not None else secrets.randbits(62)
    eos = set(request.eos_token_ids)
    generated: list[int] = []
    progress = RequestProgress(max_new_tokens=request.max_new_tokens)
    last_end = time.perf_counter()
    try:
        for step in range(request.max_new_tokens):  # every step emits at least one token
            context = request.prompt_ids + generated
            remaining = request.max_new_tokens - len(generated)
            t0 = time.perf_counter()
            step_context = progress.context(step, len(generated), len(context))
            gamma_chosen = policy.choose(step_context)
            policy_us = (time.perf_counter() - t0) * 1e6
            gamma = max(0, min(gamma_chosen, remaining - 1))  # never draft past the token budget
            stop = policy.draft_stop.with_min_confidence(request.min_confidence)
            call = await executor.run_step(StepInputs(sid, context, gamma, params, seed, step, stop),
                                           _preparer(policy, progress, step, len(generated), len(context)))
            proposal, verification = call.proposal, call.verification
            end = time.perf_counter()
            wall_ms, last_end = (end - last_end) * 1e3, end

            result = accept_step(proposal, verification, params, seed, step)
            accepted = int(result.num_accepted[0])
            new = result.row_tokens(0)

            finish = None
            for i, token in enumerate(new):
                if token in eos:
                    new, finish = new[:i], "stop"
                    break
            new = new[:remaining]
            generated.extend(new)
            text, stopped = assembler.push(new, final=finish is not None or len(generated) >= request.max_new_tokens)
            if stopped:
                finish = "stop"
            elif finish is None and len(generated) >= request.max_new_tokens:
                finish = "length"

            timing = StepTiming(call.draft_wall_ms, call.verify_wall_ms, len(context), len(new), proposal.compute_ms,
                                verification.compute_ms, verification.batch_size, verification.batch_tokens,
                                max(step_context.draft_behind, proposal.most_read) if gamma else 0,
                                proposal.waited_ms, verification.waited_ms, verification.others_deepest,
                                proposal.passes, proposal.rows, verification.read_tokens, wall_ms) if step else None
            outcome = progress.advance(proposal.signals, accepted, timing)
            policy.observe(outcome)
            record = StepRecord(
                request_id=sid, tier=request.tier, policy=policy.name, step=step, position=len(generated) - len(new),
                context_len=len(context), gamma_chosen=gamma_chosen, gamma=outcome.gamma, accepted=accepted,
                emitted=len(new), draft_ms=call.draft_wall_ms, verify_ms=call.verify_wall_ms,
                draft_compute_ms=proposal.compute_ms, verify_compute_ms=verification.compute_ms, policy_us=policy_us,
                prompt_id=request.prompt_id, category=request.category, batch_size=verification.batch_size,
                batch_tokens=verification.batch_tokens, **proposal.signals.to_dict(),
            )
            yield StepEvent(new, text, record, finish)
            if finish:
                return
    finally:
        await executor.close(sid)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    seconds: float
    time_to_first_token_s: float
    stats: RequestStats  # steps, acceptance, γ and timing totals, finish reason
    records: list[StepRecord]  # empty for runs outside the SpecKV loop (hf-assisted)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self, with_records: bool = True) -> dict:
        out = {"text": self.text, "token_ids": self.token_ids, "new_tokens": self.new_tokens,
               "finish_reason": self.stats.finish_reason, "seconds": self.seconds, "tokens_per_s": self.tokens_per_s,
               "time_to_first_token_s": self.time_to_first_token_s, "tokens_per_step": self.stats.tokens_per_step,
               "speculation": self.stats.speculation()}
        if with_records:
            out["records"] = [r.to_dict() for r in self.records]
        return out


async def run_to_completion(
    request: GenerationRequest, executor: StepExecutor, policy: GammaPolicy, tokenizer
) -> GenerationResult:
    """Drive `speculate` to the end and collect the result."""
    assembler = TextAssembler(tokenizer, request.stop)
    records: list[StepRecord] = []
    stats = RequestStats(policy.name)
    tokens: list[int] = []
    start = time.perf_counter()
    ttft = 0.0
    async for event in speculate(request, executor, policy, assembler):
        if not records:
            ttft = time.perf_counter() - start
        records.append(event.record)
        stats.add(event.record, event.finish_reason)
        tokens.extend(event.token_ids)
    report = getattr(policy, "report", None)
    stats.estimates = report() if report else None
    return GenerationResult(assembler.text, tokens, time.perf_counter() - start, ttft, stats, records)

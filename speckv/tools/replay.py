"""Exact replay of greedy speculation from one trace per prompt, under a per-tier cost model.

Under greedy decoding the output does not depend on the policy, so one trace per prompt holds everything
any γ policy would see: at each output position p, the draft's run of γmax tokens from that context (with
its signals) and how many of them the target accepts. Replaying a policy over the trace, with step costs
from a measured cost model, gives its tokens/s without running the models again; dynamic programming over
the same trace gives the oracle, the best possible sequence of γ choices.

Approximation, stated once: the draft's cost is charged per drafted token; the extra token the draft
must read after a fully accepted step (its cache lacks the bonus token) is folded into that per-token cost.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..cost_model import CostModel
from ..policy import FixedGamma, GammaPolicy, NoSpeculation, RequestProgress, StepContext, StepTiming, draft_read_after
from ..signals import DraftSignals


@dataclass
class Trace:
    """One prompt's greedy trace. Arrays are indexed by output position p (0 .. n-1)."""

    prompt_id: str
    category: str
    prompt_len: int
    accept_len: np.ndarray  # [n] int: accepted tokens of the γmax-token draft run started at p (0..γmax)
    confidence: np.ndarray  # [n, γmax] float: draft max-probability of each run token
    entropy: np.ndarray  # [n, γmax] float
    chosen_prob: np.ndarray  # [n, γmax] float
    draft_ms: np.ndarray | None = None  # [n] drafting time at each position while collecting (diagnostic)

    @property
    def n(self) -> int:
        return int(self.accept_len.shape[0])

    @property
    def gamma_max(self) -> int:
        return int(self.confidence.shape[1])


@dataclass(frozen=True)
class ReplayResult:
    tokens: int
    steps: int
    ms: float
    gammas: list[int]
    decision_us: list[float] = field(default_factory=list)  # wall time of each policy.choose call
    step_ms: list[float] = field(default_factory=list)  # each step's cost

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.ms * 1e3 if self.ms > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


def replay(trace: Trace, policy: GammaPolicy, cost: CostModel | Callable[[int], CostModel],
           first_step: int = 0) -> ReplayResult:
    """Run an engine policy (the same GammaPolicy objects the engine uses, seeing the same StepContext) over
    a trace: each step drafts γ (≤ γmax; fewer where the policy's DraftStop ends the run, token by token as
    DraftWorker.propose does), accepts min(accept_len, γ) and emits one more token, and the policy is told
    what the step took, as the live loop tells it (a drafting step pays the draft's catch-up on what it has
    not read, CostModel.catch_up_ms, as live). `cost` may change with time: a function of the step's
    index counted from `first_step` (steps of earlier requests), returning the cost model then in force."""
    n, position, step = trace.n, 0, 0
    progress = RequestProgress(max_new_tokens=n)
    ms, gammas, decision_us, step_ms = 0.0, [], [], []
    while position < n:
        p = position
        t0 = time.perf_counter()
        context = progress.context(step, p, trace.prompt_len + p)
        chosen = policy.choose(context)
        decision_us.append((time.perf_counter() - t0) * 1e6)
        now = cost(first_step + step) if callable(cost) else cost
        gamma, accepted, took = play_step(policy, progress, context, chosen, n - p, int(trace.accept_len[p]),
                                          trace.confidence[p].tolist(), trace.entropy[p].tolist(),
                                          trace.chosen_prob[p].tolist(), now)
        ms += took
        step_ms.append(took)
        gammas.append(gamma)
        position, step = p + accepted + 1, step + 1
    return ReplayResult(tokens=n, steps=len(gammas), ms=ms, gammas=gammas, decision_us=decision_us,
                        step_ms=step_ms)


def play_step(policy: GammaPolicy, progress: RequestProgress, context: StepContext, chosen: int, tokens_left: int,
              accept_len: int, confidence: list[float], entropy: list[float], chosen_prob: list[float],
              cost: CostModel) -> tuple[int, int, float]:
    """One recorded step as a policy that chose `chosen` would have run it: the draft proposes up to `chosen` of the
    recorded run's tokens (fewer where the policy's DraftStop ends the run, token by token as DraftWorker.propose
    does, or the request's tokens run out), min(accept_len, drafted) are accepted, the step is priced by `cost`
    (the draft's catch-up on what it has not read included, as live) and the policy is told. Returns (drafted,
    accepted, the step's ms)."""
    limit = int(min(max(chosen, 0), len(confidence), tokens_left - 1))
    stopper, gamma = policy.draft_stop.stopper(), 0
    while gamma < limit:
        gamma += 1
        if stopper.stop_after(float(confidence[gamma - 1]), float(entropy[gamma - 1])):
            break
    accepted = min(accept_len, gamma)
    draft_ms = float(cost.draft_ms(gamma)) + (cost.catch_up_ms(context.draft_behind) if gamma else 0.0)
    verify_ms = float(cost.verify_ms(gamma, context.context_len))
    emitted = min(accepted + 1, tokens_left)
    timing = StepTiming(draft_ms, verify_ms, context.context_len, emitted,
                        draft_behind=context.draft_behind if gamma else 0) if context.step else None
    signals = DraftSignals(chosen_prob[:gamma], confidence[:gamma], entropy[:gamma])
    policy.observe(progress.advance(signals, accepted, timing))
    return gamma, accepted, draft_ms + verify_ms


def oracle(trace: Trace, cost: CostModel) -> ReplayResult:
    """The fastest sequence of γ choices for this trace, priced as `replay` prices any policy's: dynamic
    programming over the position and how much of the context the draft has read, so a drafting step pays the
    draft's catch-up on what it has not read (CostModel.catch_up_ms; the prompt, at the first drafting step).
    Its time is one its own choices replay to (a policy could reach it), not a bound below what replay
    charges: priced without the catch-up, it counted a long prompt's reading by the draft as free (int8 on an
    AVX512-BF16 EPYC, 32 tokens: 39% ahead of `none` where paying it leaves less, docs/RESULTS.md)."""
    n, gmax, start = trace.n, trace.gamma_max, trace.prompt_len
    # what the draft has read when the step at p starts: nothing (0), or start + q for q < p (draft_read_after)
    best: dict[tuple[int, int], float] = {}
    choice: dict[tuple[int, int], int] = {}

    def rest(p: int, read: int) -> float:
        return 0.0 if p >= n else best[(p, read)]

    for p in range(n - 1, -1, -1):
        context_len = start + p
        step = [float(cost.step_ms(g, context_len)) for g in range(min(gmax, n - p - 1) + 1)]
        for read in (0, *range(start, start + p)):
            catch_up = cost.catch_up_ms(context_len - read)
            best[(p, read)], choice[(p, read)] = step[0] + rest(p + 1, read), 0
            for g in range(1, len(step)):
                accepted = int(min(trace.accept_len[p], g))
                total = step[g] + catch_up + rest(p + accepted + 1, draft_read_after(read, context_len, g, accepted))
                if total < best[(p, read)]:
                    best[(p, read)], choice[(p, read)] = total, g
    gammas, p, read = [], 0, 0
    while p < n:
        g = choice[(p, read)]
        gammas.append(g)
        accepted = int(min(trace.accept_len[p], g))
        read = draft_read_after(read, start + p, g, accepted)
        p += accepted + 1
    return ReplayResult(tokens=n, steps=len(gammas), ms=rest(0, 0), gammas=gammas)


def stop_oracle(trace: Trace, cost: CostModel) -> ReplayResult:
    """Always draft, and stop the run exactly at its first rejected token (which is drafted and verified,
    as any stop rule must draft a token to see its signals): the bound for stop rules, as `oracle` is
    for all policies. Priced as `replay` prices it: its first step pays the draft's reading of the prompt."""
    gammas, ms, p, read = [], 0.0, 0, 0
    while p < trace.n:
        g = int(min(trace.accept_len[p] + 1, trace.gamma_max, trace.n - p - 1))
        gammas.append(g)
        context_len = trace.prompt_len + p
        ms += float(cost.step_ms(g, context_len)) + (cost.catch_up_ms(context_len - read) if g else 0.0)
        accepted = int(min(trace.accept_len[p], g))
        read = draft_read_after(read, context_len, g, accepted)
        p += accepted + 1
    return ReplayResult(tokens=trace.n, steps=len(gammas), ms=ms, gammas=gammas)


def fixed(gamma: int) -> GammaPolicy:
    """The fixed-γ engine policy (γ = 0: target-only)."""
    return NoSpeculation() if gamma == 0 else FixedGamma(gamma)


def resize(trace: Trace, gamma_max: int) -> Trace:
    """The same trace with runs of `gamma_max` tokens: cut when smaller, chained when larger.

    Chaining is exact under greedy decoding: when the whole γmax-token run from p is accepted, the context at
    p + γmax is the context at p plus that run, so the draft's run from p + γmax is the continuation of the
    run from p (numerically it is the same draft on the same tokens; only the cache path differs, as with the
    run reuse in `collect_trace`). Past the end of the output a run's extra tokens are unknown; they are
    recorded as confidence 0 and are never accepted (no step can use them: γ ≤ n − p − 1)."""
    g, n = trace.gamma_max, trace.n
    if gamma_max <= g:
        return Trace(trace.prompt_id, trace.category, trace.prompt_len, np.minimum(trace.accept_len, gamma_max),
                     trace.confidence[:, :gamma_max], trace.entropy[:, :gamma_max], trace.chosen_prob[:, :gamma_max])
    accept = np.zeros(n, dtype=int)
    conf, ent, chosen = (np.zeros((n, gamma_max)) for _ in range(3))
    for p in range(n):
        q, k, total = p, 0, 0
        while k < gamma_max and q < n:
            take = min(g, gamma_max - k)
            conf[p, k:k + take] = trace.confidence[q, :take]
            ent[p, k:k + take] = trace.entropy[q, :take]
            chosen[p, k:k + take] = trace.chosen_prob[q, :take]
            total += int(min(trace.accept_len[q], take))
            if trace.accept_len[q] < g:
                break
            k, q = k + g, q + g
        accept[p] = total
    return Trace(trace.prompt_id, trace.category, trace.prompt_len, accept, conf, ent, chosen)


def collect_trace(
    drafter, target_token_ids: list[int], prompt_ids: list[int], gamma_max: int, prompt_id: str = "",
    category: str = "",
) -> Trace:
    """Build a trace from the target's greedy output: at every position, the draft's greedy run of γmax
    tokens from that context (with the in-process `drafter`, a speckv.workers.DraftWorker) and how many of
    them match the target's tokens.

    Runs are reused: when the run from p starts with the target's token at p, the run from p+1 is the same
    greedy continuation minus its first token (same context), so only one more token is drafted; a fresh
    run is drafted only after a first-token miss. Per-position drafting time is kept in `draft_ms`."""
    from ..sampling import SamplingParams
    from ..workers import StepInputs

    greedy = SamplingParams()
    n = len(target_token_ids)
    accept = np.zeros(n, dtype=int)
    conf, ent, chosen = (np.zeros((n, gamma_max)) for _ in range(3))
    draft_ms = np.zeros(n)
    session = f"trace-{prompt_id}-{uuid.uuid4().hex}"
    run: list[int] = []
    signals = DraftSignals()
    for p in range(n):
        context = prompt_ids + target_token_ids[:p]
        if p > 0 and run and run[0] == target_token_ids[p - 1]:
            run = run[1:]
            signals = DraftSignals(signals.chosen_prob[1:], signals.confidence[1:], signals.entropy[1:])
        else:
            run, signals = [], DraftSignals()
        missing = gamma_max - len(run)
        if missing > 0:
            more = drafter.propose(StepInputs(session, context + run, missing, greedy, 0, p))
            run = run + more.token_ids
            signals = DraftSignals(signals.chosen_prob + more.signals.chosen_prob,
                                   signals.confidence + more.signals.confidence, signals.entropy + more.signals.entropy)
            draft_ms[p] = more.compute_ms
        truth = target_token_ids[p: p + gamma_max]
        k = 0
        while k < min(len(truth), len(run)) and run[k] == truth[k]:
            k += 1
        accept[p] = k
        conf[p], ent[p], chosen[p] = signals.confidence, signals.entropy, signals.chosen_prob
    drafter.lm.close(session)
    return Trace(prompt_id, category, len(prompt_ids), accept, conf, ent, chosen, draft_ms)


TRACE_POLICY_PREFIX = "trace:"


def trace_to_records(trace: Trace, tier: str, request_id: str) -> list:
    """A trace as step records (one per output position, policy "trace:γmax"): the engine's one schema.

    gamma = γmax drafted from that position, accepted = how many the target's greedy output agrees with,
    emitted = what a step there would add (accepted + 1, capped at the end); verify_ms is 0 (the target's
    tokens come from one greedy generation, not per-position verification)."""
    from ..records import StepRecord

    ms = trace.draft_ms if trace.draft_ms is not None else np.zeros(trace.n)
    return [
        StepRecord(
            request_id=request_id, tier=tier, policy=f"{TRACE_POLICY_PREFIX}{trace.gamma_max}", step=p, position=p,
            context_len=trace.prompt_len + p, gamma_chosen=trace.gamma_max, gamma=trace.gamma_max,
            accepted=int(trace.accept_len[p]), emitted=int(min(trace.accept_len[p] + 1, trace.n - p)),
            draft_ms=float(ms[p]), verify_ms=0.0, draft_compute_ms=float(ms[p]), verify_compute_ms=0.0, policy_us=0.0,
            prompt_id=trace.prompt_id, category=trace.category, chosen_prob=[float(x) for x in trace.chosen_prob[p]],
            confidence=[float(x) for x in trace.confidence[p]], entropy=[float(x) for x in trace.entropy[p]],
        )
        for p in range(trace.n)
    ]


def traces_from_records(records) -> dict[tuple[str, str], Trace]:
    """Rebuild traces from step records: {(tier, prompt_id or request_id): Trace}; other records are skipped.
    Raises ValueError when a trace's positions are not exactly 0..n-1."""
    groups: dict[tuple[str, str], list] = {}
    for r in records:
        if r.policy.startswith(TRACE_POLICY_PREFIX):
            groups.setdefault((r.tier, r.request_id), []).append(r)
    traces = {}
    for (tier, rid), rows in groups.items():
        rows.sort(key=lambda r: r.position)
        if [r.position for r in rows] != list(range(len(rows))):
            raise ValueError(f"trace {rid!r} ({tier}) does not cover positions 0..{len(rows) - 1} exactly")
        gmax = rows[0].gamma
        trace = Trace(
            rows[0].prompt_id or rid, rows[0].category, rows[0].context_len, np.array([r.accepted for r in rows]),
            np.array([r.confidence for r in rows]).reshape(len(rows), gmax),
            np.array([r.entropy for r in rows]).reshape(len(rows), gmax),
            np.array([r.chosen_prob for r in rows]).reshape(len(rows), gmax),
        )
        traces[(tier, trace.prompt_id)] = trace
    return traces

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

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


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

    @property
    def n(self) -> int:
        return int(self.accept_len.shape[0])

    @property
    def gamma_max(self) -> int:
        return int(self.confidence.shape[1])


@dataclass(frozen=True)
class CostModel:
    """Milliseconds per step at one tier: draft = draft_ms_per_token·γ; verify = verify_ms_base + verify_ms_per_token·γ
    (γ+1 tokens scored). Fitted from measured step times (`fit`)."""

    draft_ms_per_token: float
    verify_ms_base: float
    verify_ms_per_token: float

    def step_ms(self, gamma: int | np.ndarray) -> float | np.ndarray:
        return self.draft_ms_per_token * gamma + self.verify_ms_base + self.verify_ms_per_token * gamma

    @classmethod
    def fit(cls, gammas: list[int], draft_ms: list[float], verify_ms: list[float]) -> "CostModel":
        """Least-squares fit of measured per-step draft and verify milliseconds against γ."""
        g = np.asarray(gammas, dtype=float)
        d, v = np.asarray(draft_ms, dtype=float), np.asarray(verify_ms, dtype=float)
        drafted = g > 0
        per_token = float((d[drafted] / g[drafted]).mean()) if drafted.any() else 0.0
        slope, intercept = np.polyfit(g, v, 1) if len(set(gammas)) > 1 else (0.0, float(v.mean()))
        return cls(per_token, float(intercept), float(max(slope, 0.0)))

    def to_dict(self) -> dict:
        return {"draft_ms_per_token": self.draft_ms_per_token, "verify_ms_base": self.verify_ms_base,
                "verify_ms_per_token": self.verify_ms_per_token}


@dataclass
class ReplayState:
    """What a replayed policy may look at before choosing γ at position `position` (mirrors StepContext)."""

    position: int
    prev_gamma: int = 0
    prev_accepted: int = 0
    prev_confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))
    prev_entropy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    drafted_total: int = 0
    accepted_total: int = 0


@dataclass(frozen=True)
class ReplayResult:
    tokens: int
    steps: int
    ms: float
    gammas: list[int]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.ms * 1e3 if self.ms > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


def replay(trace: Trace, choose: Callable[[ReplayState], int], cost: CostModel) -> ReplayResult:
    """Run a policy over a trace: each step drafts γ (≤ γmax), accepts min(accept_len, γ), emits one more."""
    state = ReplayState(position=0)
    ms, steps, gammas = 0.0, 0, []
    n = trace.n
    while state.position < n:
        p = state.position
        gamma = int(min(max(choose(state), 0), trace.gamma_max, n - p - 1))
        accepted = int(min(trace.accept_len[p], gamma))
        ms += float(cost.step_ms(gamma))
        steps += 1
        gammas.append(gamma)
        state = ReplayState(
            position=p + accepted + 1, prev_gamma=gamma, prev_accepted=accepted,
            prev_confidence=trace.confidence[p, :gamma], prev_entropy=trace.entropy[p, :gamma],
            drafted_total=state.drafted_total + gamma, accepted_total=state.accepted_total + accepted,
        )
    return ReplayResult(tokens=n, steps=steps, ms=ms, gammas=gammas)


def oracle(trace: Trace, cost: CostModel) -> ReplayResult:
    """The fastest sequence of γ choices for this trace (dynamic programming over positions)."""
    n, gmax = trace.n, trace.gamma_max
    best = np.full(n + 1, np.inf)
    choice = np.zeros(n + 1, dtype=int)
    best[n] = 0.0
    step_cost = [float(cost.step_ms(g)) for g in range(gmax + 1)]
    for p in range(n - 1, -1, -1):
        for g in range(0, min(gmax, n - p - 1) + 1):
            nxt = p + int(min(trace.accept_len[p], g)) + 1
            total = step_cost[g] + best[nxt]
            if total < best[p]:
                best[p], choice[p] = total, g
    gammas, p = [], 0
    while p < n:
        g = int(choice[p])
        gammas.append(g)
        p += int(min(trace.accept_len[p], g)) + 1
    return ReplayResult(tokens=n, steps=len(gammas), ms=float(best[0]), gammas=gammas)


def fixed(gamma: int) -> Callable[[ReplayState], int]:
    return lambda state: gamma


def collect_trace(
    drafter, target_token_ids: list[int], prompt_ids: list[int], gamma_max: int, prompt_id: str = "",
    category: str = "",
) -> Trace:
    """Build a trace from the target's greedy output: at every position, draft γmax tokens with the
    in-process `drafter` (a speckv.workers.DraftWorker) and count how many match the target's tokens."""
    from .sampling import SamplingParams

    n = len(target_token_ids)
    accept = np.zeros(n, dtype=int)
    conf, ent, chosen = (np.zeros((n, gamma_max)) for _ in range(3))
    session = f"trace-{prompt_id}"
    for p in range(n):
        context = prompt_ids + target_token_ids[:p]
        proposal = drafter.propose(session, context, gamma_max, SamplingParams(), 0, p)
        truth = target_token_ids[p: p + gamma_max]
        k = 0
        while k < min(len(truth), len(proposal.token_ids)) and proposal.token_ids[k] == truth[k]:
            k += 1
        accept[p] = k
        conf[p], ent[p], chosen[p] = proposal.signals.confidence, proposal.signals.entropy, proposal.signals.chosen_prob
    drafter.lm.release(session)
    return Trace(prompt_id, category, len(prompt_ids), accept, conf, ent, chosen)

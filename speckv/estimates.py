"""What `adaptive` learns while it runs: step costs, acceptance and the decode rate, per tier and per request.

Terms, defined once:
- *cost*: a tier's LiveCost (speckv.cost_model), the calibrated step costs scaled by the live steps' times;
- *acceptance bias*: an additive log-odds correction to the trained acceptance predictor (the prior), so
  acceptance follows what the text at hand and the sampling mode really give;
- *rate*: tokens per millisecond the decode reaches over recent steps: the price of a millisecond
  (a step pays if it yields more tokens than its time would at that rate).

A tier's estimates (`TierEstimates`) are shared by every request of that tier in a process (a router, a
CLI engine); each request starts from them and keeps its own acceptance bias and rate (`RequestEstimates`),
feeding what it sees back into the tier's. Everything is O(1) in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .cost_model import CostModel, LiveCost, PassLoad
from .policy import StepTiming

BIAS_LIMIT = 4.0  # the prior is never overruled by more than this many log-odds


@dataclass
class LogitBias:
    """An online log-odds correction c to predicted probabilities p of binary events: the corrected
    probability is sigmoid(logit(p) + c); each update is a gradient step on the log loss, clipped."""

    rate: float
    value: float = 0.0
    events: int = 0

    def corrected(self, p: float) -> float:
        return _sigmoid(_logit(p) + self.value)

    def observe(self, predicted: list[float], outcomes: list[bool]) -> None:
        """Events of one step: the prior's probability of each, and whether it happened."""
        if not predicted:
            return
        grad = sum(float(y) - self.corrected(p) for p, y in zip(predicted, outcomes))
        self.value = max(-BIAS_LIMIT, min(BIAS_LIMIT, self.value + self.rate * grad))
        self.events += len(predicted)


@dataclass
class RunningRate:
    """Tokens per ms over recent steps: exponentially decayed sums of tokens and of milliseconds."""

    decay: float = 0.9
    tokens: float = 0.0
    ms: float = 0.0

    @property
    def value(self) -> float | None:
        return self.tokens / self.ms if self.ms > 0 else None

    def observe(self, tokens: int, ms: float) -> None:
        if ms > 0 and math.isfinite(ms):
            self.tokens = self.decay * self.tokens + tokens
            self.ms = self.decay * self.ms + ms


@dataclass
class ModeEstimates:
    """Acceptance bias and rate of one tier in one sampling mode (greedy or sampled), across requests."""

    bias: LogitBias = field(default_factory=lambda: LogitBias(rate=0.02))
    rate: RunningRate = field(default_factory=lambda: RunningRate(decay=0.98))


@dataclass
class TierEstimates:
    """A tier's shared estimates: its live cost, and acceptance and rate per sampling mode."""

    cost: LiveCost
    greedy: ModeEstimates = field(default_factory=ModeEstimates)
    sampled: ModeEstimates = field(default_factory=ModeEstimates)
    learn_acceptance: bool = True
    load: PassLoad = field(default_factory=PassLoad)  # what the tier's verify passes carry now
    target_only_steps: int = 0  # since the tier last drafted, over all its requests (adaptive probes from it)
    # requests in flight on the cores this tier's passes run on, where the replicas share them (one machine: the
    # server sets it); each waits for every pass, including those it is not in. 1: only a pass's own wait for it
    sharing: int = 1

    @classmethod
    def calibrated(cls, cost: CostModel, learning: bool = True) -> TierEstimates:
        """Fresh estimates from a calibration; `learning` False freezes costs and acceptance (ablations)."""
        return cls(LiveCost(cost, learning=learning), learn_acceptance=learning)

    def load_dict(self) -> dict:
        """What its passes carry now, and the generations in flight its drafting is priced for."""
        return {**self.load.to_dict(), "sharing": self.sharing}

    def mode(self, greedy: bool) -> ModeEstimates:
        return self.greedy if greedy else self.sampled

    def to_dict(self) -> dict:
        """Current estimates, for /metrics and the response's `speculation` object."""
        return {"cost": self.cost.to_dict(), "load": self.load_dict(),
                **{name: {"acceptance_bias": m.bias.value, "tokens_per_s": (m.rate.value or 0.0) * 1e3}
                   for name, m in (("greedy", self.greedy), ("sampled", self.sampled))}}


@dataclass
class RequestEstimates:
    """One request's acceptance bias and rate, started from its tier's and feeding them back."""

    tier: TierEstimates
    greedy: bool
    bias: LogitBias = field(init=False)
    rate: RunningRate = field(init=False)

    def __post_init__(self) -> None:
        shared = self.tier.mode(self.greedy)
        self.bias = LogitBias(rate=0.3, value=shared.bias.value)
        self.rate = RunningRate(decay=0.85, tokens=shared.rate.tokens * 0.1, ms=shared.rate.ms * 0.1)

    def observe_acceptance(self, predicted: list[float], outcomes: list[bool]) -> None:
        if self.tier.learn_acceptance:
            self.bias.observe(predicted, outcomes)
            self.tier.mode(self.greedy).bias.observe(predicted, outcomes)

    def observe_step(self, gamma: int, t: StepTiming) -> None:
        """A verified step that drafted `gamma` tokens: its times teach the costs, its pass the load, and its
        tokens over its wall time the rate."""
        self.tier.cost.observe(gamma, t.draft_ms, t.verify_ms, t.context_len, t.draft_compute_ms, t.verify_compute_ms,
                               t.batch_size, t.batch_tokens, t.draft_behind, t.draft_waited_ms, t.verify_waited_ms)
        self.tier.load.observe(t.batch_size, t.batch_tokens or gamma + 1, t.others_deepest)
        ms = t.draft_ms + t.verify_ms - t.draft_waited_ms - t.verify_waited_ms  # its passes, not waits for others'
        self.rate.observe(t.emitted, ms)
        self.tier.mode(self.greedy).rate.observe(t.emitted, ms)

    def to_dict(self) -> dict:
        return {"acceptance_bias": self.bias.value, "tokens_per_s": (self.rate.value or 0.0) * 1e3,
                "cost": self.tier.cost.to_dict(), "load": self.tier.load_dict()}


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z > -30 else 0.0

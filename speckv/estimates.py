"""What `adaptive` learns while it runs: step costs, acceptance and the decode rate, per tier and per request.

Terms, defined once:
- *cost*: a tier's LiveCost (speckv.cost_model), the calibrated step costs scaled by the live steps' times;
- *acceptance calibration*: a log-odds slope and intercept (the *bias*) on each trained acceptance model (the
  prior): the step predictor's (speckv.predictor) and the within-run token model's (speckv.signals.DraftStop),
  so acceptance follows what the text at hand, the tier and the sampling mode really give;
- *rate*: tokens per millisecond the decode reaches over recent steps: the price of a millisecond
  (a step pays if it yields more tokens than its time would at that rate).

A tier's estimates (`TierEstimates`) are shared by every request of that tier in a process (a router, a
CLI engine); each request starts from them and keeps its own acceptance calibrations and rate (`RequestEstimates`),
feeding what it sees back into the tier's. Everything is O(1) in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .cost_model import CAUGHT_UP, CostModel, LiveCost, PassLoad
from .policy import StepTiming

if TYPE_CHECKING:
    from .predictor import AcceptancePredictor

BIAS_LIMIT = 4.0  # the prior is never overruled by more than this many log-odds
SLOPE_RANGE = (0.02, 2.0)  # the predictor may be found nearly uninformative, never inverted
Z_LIMIT = 8.0  # predicted log-odds beyond this are taken as this (a probability 1 - 3e-4)
# prior precisions (slope, intercept) and memories in events: a tier's, across requests, and a request's own, which
# starts from its tier's estimate and follows its text (nf4 at t = 0.7 drafts ~200 tokens in 8 requests of 32)
TIER_PRIOR, TIER_MEMORY = (10.0, 5.0), 500.0
REQUEST_PRIOR, REQUEST_MEMORY = (30.0, 3.0), 50.0
PASS_ROW_WEIGHT = 0.05  # a request's row in its tier's running mean (`ModeEstimates.pass_row`): ~20 rows, 2-3 passes
# `LoadedRates`: steps over which its wall-rate evidence fades; rounds of a load level's steps (a round: one step of
# each sequence on the cores) a verdict forms on, and rounds a verdict holds drafting before it is tried again
LOADED_MEMORY, VERDICT_ROUNDS, HOLD_ROUNDS = 200.0, 2, 250
VERDICT_MARGIN = 0.05  # drafting is held where it delivered less than (1 - this) of target-only decoding
_LOADED_KEEP = 1.0 - 1.0 / LOADED_MEMORY  # what a step leaves of the evidence before it


@dataclass
class LogitCalibration:
    """Online Platt scaling of a predictor's probabilities p of binary events: the corrected probability is
    sigmoid(slope·logit(p) + intercept). A Bayesian logistic regression over [logit(p), 1] with a Gaussian prior
    at (1, 0), the predictor as trained: each event is one Laplace (Newton) step, and the precision decays toward
    the prior's so that evidence older than about `memory` events fades. O(1) in memory.

    Why a slope and not only a shift: where the predictor's log-odds spread wider than acceptance does, a shift
    fitted on the events a policy chose (those the predictor rated high, where it is optimistic) lowers what it
    expects where it is pessimistic too. nf4 sampled at t = 0.7 on an AVX2 EPYC: fitted on every policy's events,
    the step predictor's slope was 0.03-0.15 (tokens it rated 0.36 were accepted 0.67-0.80 of the time), and
    `adaptive`, shift only, drafted runs of 3.3 tokens where fixed γ = 8 gained (docs/RESULTS.md)."""

    prior_precision: tuple[float, float]  # of (slope, intercept): how many events' worth the prior weighs
    memory: float  # events over which old evidence fades
    slope: float = 1.0
    intercept: float = 0.0
    events: int = 0
    _precision: list[float] = field(default_factory=list)  # [ss, sc, cc] of the symmetric 2x2 precision

    def __post_init__(self) -> None:
        if not self._precision:
            self._precision = [self.prior_precision[0], 0.0, self.prior_precision[1]]

    def logit(self, z: float) -> float:
        """A predicted log-odds, corrected."""
        return self.slope * max(-Z_LIMIT, min(Z_LIMIT, z)) + self.intercept

    def corrected(self, p: float) -> float:
        return _sigmoid(self.logit(_logit(p)))

    def fork(self, prior_precision: tuple[float, float], memory: float) -> LogitCalibration:
        """A calibration starting where this one stands, with its own (weaker) prior and memory."""
        return LogitCalibration(prior_precision, memory, self.slope, self.intercept)

    def observe(self, predicted: list[float], outcomes: list[bool]) -> None:
        """Events of one step: the predictor's probability of each, and whether it happened."""
        keep = 1.0 - 1.0 / self.memory
        ps, pc = self.prior_precision
        for p, y in zip(predicted, outcomes):
            z = max(-Z_LIMIT, min(Z_LIMIT, _logit(p)))
            q = _sigmoid(self.slope * z + self.intercept)
            w, r = q * (1.0 - q), float(y) - q
            ss, sc, cc = self._precision
            ss = keep * ss + (1.0 - keep) * ps + w * z * z
            sc = keep * sc + w * z
            cc = keep * cc + (1.0 - keep) * pc + w
            self._precision = [ss, sc, cc]
            det = ss * cc - sc * sc
            # Newton step: precision⁻¹ · gradient, the gradient being r·[z, 1]
            self.slope = max(SLOPE_RANGE[0], min(SLOPE_RANGE[1], self.slope + r * (cc * z - sc) / det))
            self.intercept = max(-BIAS_LIMIT, min(BIAS_LIMIT, self.intercept + r * (ss - sc * z) / det))
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
    """Acceptance calibrations and rate of one tier in one sampling mode (greedy or sampled), across requests."""

    acceptance: LogitCalibration = field(default_factory=lambda: LogitCalibration(TIER_PRIOR, TIER_MEMORY))
    token_acceptance: LogitCalibration = field(default_factory=lambda: LogitCalibration(TIER_PRIOR, TIER_MEMORY))
    rate: RunningRate = field(default_factory=lambda: RunningRate(decay=0.98))
    # the acceptance predictor's log-odds by position ([γmax]) for the tier's requests' recent steps, a running mean
    # of the rows their decisions used: under load the requests of a pass decide from it (speckv.adaptive, "One
    # run for the pass"), so they agree; None until a row is seen
    pass_row: list[float] | None = None

    def observe_row(self, logits: list[float]) -> None:
        """A decision's row (the predictor's log-odds, uncalibrated) into the running mean."""
        if self.pass_row is None or len(self.pass_row) != len(logits):
            self.pass_row = list(logits)
        else:
            self.pass_row = [m + PASS_ROW_WEIGHT * (z - m) for m, z in zip(self.pass_row, logits)]

    def pass_acceptance(self) -> list[float]:
        """What a pass decides from: each drafted position's acceptance given the ones before it ([γmax]; [] before
        any row), the running row under the tier's calibration."""
        return [_sigmoid(self.acceptance.logit(z)) for z in self.pass_row or []]


@dataclass
class _Regime:
    """Decayed sums over one load level's steps in one regime: tokens × the target-only step's price, and wall ms."""

    priced: float = 0.0
    wall: float = 0.0
    steps: float = 0.0

    def efficiency(self) -> float | None:
        """Tokens per wall ms over what target-only passes would give at the steps' loads, as priced; None where
        nothing is left of its evidence."""
        return self.priced / self.wall if self.wall > 0 else None


@dataclass
class _Level:
    drafting: _Regime = field(default_factory=_Regime)
    target_only: _Regime = field(default_factory=_Regime)
    tick: int = 0  # the tier's step count when its sums were last decayed
    held: bool = False  # the verdict: drafting under this load loses to target-only decoding
    held_since: int = 0  # the tier's step count when it was taken


@dataclass
class LoadedRates:
    """Whether drafting pays under load, measured with every wait in: per load level (the sequences on the cores,
    by powers of two), the tier's tokens over its requests' whole step times (StepTiming.wall_ms) in stretches where
    it drafted and where it did not, each step's tokens weighed by the calibrated price of a target-only pass at its
    load (so levels' steps compare). A stretch is drafting where a run (not a probe) was chosen within the last round
    of decisions (one per sequence on the cores) and target-only where none was for two rounds.

    Why: the step costs are learned from each call's own compute and the rate from a request's own passes, waits
    left out (on purpose: waiting for another request's pass must not make a millisecond look cheap), so the waits
    that drafting under load imposes where the requests fall out of step (passes that mix drafting and target-only
    requests, runs ending at different positions, a drafting pass of few while the rest wait) reach no price.
    Served fp16 at 8 streams on the AMX Xeon (avx512_bf16, amx_bf16): priced ~1.6 s a round, such rounds took
    ~2.8 s and `adaptive` ran at 0.85-0.87x `none` in half its rounds (docs/serving_log.md). Requests' whole step
    times tile their time, so these rates are what the load delivers, however it waited.

    Drafting is held where it delivered less than 1 - VERDICT_MARGIN of what target-only decoding did: within that,
    the priced decisions stand (a request's first drafting rounds are its estimates' learning; judged on them alone,
    drafting that paid was held in simulation).
    Until the level has seen VERDICT_ROUNDS rounds of target-only steps, target-only decoding is taken to reach its
    price exactly (efficiency 1: no hop, no wait), a bar drafting must clear; where hops make it unreachable,
    drafting stops until target-only steps are measured, and resumes if it did at least as well as they did (not
    merely within the margin: between the two, served int8 at 8 streams on the AMX Xeon flipped between held and
    not every few windows, each start paying the drafts' reading again). A verdict forms on
    VERDICT_ROUNDS rounds of drafting steps (evidence fading over LOADED_MEMORY steps, so a stretch that turns
    ragged is seen within a few rounds) and holds drafting for HOLD_ROUNDS rounds, after which drafting is tried
    again (the load or the text may have changed): a try costs about VERDICT_ROUNDS rounds in the losing regime,
    under 1% of the held stretch. O(levels) in memory."""

    since_run: int = 1 << 30  # the tier's decisions since one chose a run (not a probe)
    tick: int = 0
    levels: dict[int, _Level] = field(default_factory=dict)

    def decided(self, run: bool) -> None:
        """A decision of the tier: a run (True) or target-only / a probe (False)."""
        self.since_run = 0 if run else self.since_run + 1

    def observe(self, everyone: int, emitted: int, wall_ms: float, target_only_ms: float, read: bool = False) -> None:
        """A step under load: `everyone` sequences on the cores, `emitted` tokens in `wall_ms`, a target-only pass
        of them priced `target_only_ms` (calibrated, not live-scaled: only the load level is normalised away).
        `read`: its passes also read what they did not score (a prompt riding in its verify pass; a draft reading
        what it lacked), and the step is left out of both regimes: a prompt costs either regime alike, and a
        draft's catch-up is priced by the decision (speckv.adaptive). Counted, they fell on whichever regime was
        running when they came: eight int8 requests started together on the AMX Xeon took their tier's first look
        at drafting while the burst's last prompts were read, and drafting, judged at 0.49 of its price on those
        rounds (its later rounds ran near target-only decoding's 0.83), was held for the rest of the run at 0.86x
        `none` where `fixed:2` ran 1.15x (docs/serving_log.md, "Drafting judged without the prompts")."""
        if everyone <= 1 or not (wall_ms > 0 and math.isfinite(wall_ms)):
            return
        self.tick += 1
        level = self._level(everyone)
        if read:
            return
        if self.since_run < everyone:  # a run within the last round
            regime = level.drafting
        elif self.since_run >= 2 * everyone:  # none for two
            regime = level.target_only
        else:
            return
        regime.priced += emitted * target_only_ms
        regime.wall += wall_ms
        regime.steps += 1

    def holds(self, everyone: int) -> bool:
        """Whether drafting is held at this load: it delivered less, waits included, than target-only decoding."""
        if everyone <= 1:
            return False
        level = self._level(everyone)
        # VERDICT_ROUNDS rounds of steps, as faded
        form = (1.0 - _LOADED_KEEP ** (VERDICT_ROUNDS * everyone)) / (1.0 - _LOADED_KEEP) - 1e-9
        drafted, target_only = level.drafting.efficiency(), level.target_only
        target_only_level = target_only.efficiency() if target_only.steps >= form else 1.0
        if level.held:
            if self.tick - level.held_since >= HOLD_ROUNDS * everyone or drafted is None:
                level.held = False  # tried again (or its evidence has faded to nothing: a level long unvisited)
            else:  # its drafting evidence stands; lifted where target-only decoding, measured since, did no better
                level.held = drafted < target_only_level
                return level.held
        if level.drafting.steps >= form and drafted < (1.0 - VERDICT_MARGIN) * target_only_level:
            level.held, level.held_since = True, self.tick
        return level.held

    def _level(self, everyone: int) -> _Level:
        """Its load level, its sums decayed to now."""
        level = self.levels.setdefault((everyone - 1).bit_length(), _Level(tick=self.tick))
        keep = _LOADED_KEEP ** (self.tick - level.tick)  # each step fades the evidence
        level.tick = self.tick
        for r in (level.drafting, level.target_only):
            r.priced, r.wall, r.steps = keep * r.priced, keep * r.wall, keep * r.steps
        return level

    def to_dict(self) -> dict:
        """Per load level (its most sequences): each regime's efficiency and steps, and whether drafting is held."""
        return {str(1 << k): {"drafting_efficiency": lv.drafting.efficiency(), "drafting_steps": lv.drafting.steps,
                              "target_only_efficiency": lv.target_only.efficiency(),
                              "target_only_steps": lv.target_only.steps, "drafting_held": lv.held}
                for k, lv in sorted(self.levels.items())}


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
    # requests in flight on this tier (the server counts them): before any verification has reported its pass,
    # a pass is priced as carrying them all. Priced as alone, the first steps of a burst drafted where drafting
    # together would not pay, and did not draft together where it would (PassLoad.now)
    in_flight: int = 0
    loaded: LoadedRates = field(default_factory=LoadedRates)  # whether drafting pays under load, waits included

    predictor_version: str | None = None  # the predictor whose outputs the acceptance calibrations map
    _predictor: object = field(default=None, repr=False)  # the last one seen (a version is a hash: taken once each)

    def calibrate_for(self, predictor: AcceptancePredictor) -> None:
        """The acceptance calibrations map one predictor's outputs: where another is loaded (the controller's
        `load`), they start again from it as trained. Kept across the swap, the calibration learned for the
        configured predictor made one sure that nothing is accepted draft (tests/deployments/test_serve.py)."""
        if predictor is self._predictor:
            return
        self._predictor, version = predictor, predictor.version()
        if version != self.predictor_version:
            self.predictor_version = version
            for m in (self.greedy, self.sampled):
                m.acceptance = LogitCalibration(TIER_PRIOR, TIER_MEMORY)
                m.token_acceptance = LogitCalibration(TIER_PRIOR, TIER_MEMORY)

    @classmethod
    def calibrated(cls, cost: CostModel, learning: bool = True) -> TierEstimates:
        """Fresh estimates from a calibration; `learning` False freezes costs and acceptance (ablations)."""
        return cls(LiveCost(cost, learning=learning), learn_acceptance=learning)

    def load_dict(self) -> dict:
        """What its passes carry now, and the generations in flight its drafting is priced for."""
        return {**self.load.to_dict(), "sharing": self.sharing, "in_flight": self.in_flight,
                "drafting_under_load": self.loaded.to_dict()}

    def mode(self, greedy: bool) -> ModeEstimates:
        return self.greedy if greedy else self.sampled

    def to_dict(self) -> dict:
        """Current estimates, for /metrics and the response's `speculation` object."""
        return {"cost": self.cost.to_dict(), "load": self.load_dict(),
                **{name: {**_calibrations(m.acceptance, m.token_acceptance),
                          "tokens_per_s": (m.rate.value or 0.0) * 1e3, "pass_acceptance": m.pass_acceptance()}
                   for name, m in (("greedy", self.greedy), ("sampled", self.sampled))}}


@dataclass
class RequestEstimates:
    """One request's acceptance calibrations and rate, started from its tier's and feeding them back."""

    tier: TierEstimates
    greedy: bool
    acceptance: LogitCalibration = field(init=False)
    token_acceptance: LogitCalibration = field(init=False)
    rate: RunningRate = field(init=False)
    shared: ModeEstimates = field(init=False, repr=False)  # its tier's, in its sampling mode

    def __post_init__(self) -> None:
        self.shared = shared = self.tier.mode(self.greedy)
        self.acceptance = shared.acceptance.fork(REQUEST_PRIOR, REQUEST_MEMORY)
        self.token_acceptance = shared.token_acceptance.fork(REQUEST_PRIOR, REQUEST_MEMORY)
        self.rate = RunningRate(decay=0.85, tokens=shared.rate.tokens * 0.1, ms=shared.rate.ms * 0.1)

    def observe_acceptance(self, predicted: list[float], outcomes: list[bool],
                           token_predicted: list[float] | None = None) -> None:
        """A step's drafted tokens up to the first rejection: what the step predictor gave each (`predicted`), what
        the token model did (`token_predicted`; None where there is none), and whether it was accepted."""
        if not self.tier.learn_acceptance:
            return
        shared = self.shared
        self.acceptance.observe(predicted, outcomes)
        shared.acceptance.observe(predicted, outcomes)
        if token_predicted:
            self.token_acceptance.observe(token_predicted, outcomes)
            shared.token_acceptance.observe(token_predicted, outcomes)

    def observe_step(self, gamma: int, t: StepTiming) -> None:
        """A verified step that drafted `gamma` tokens: its times teach the costs, its pass the load, and its
        tokens over its wall time the rate."""
        self.tier.cost.observe(gamma, t.draft_ms, t.verify_ms, t.context_len, t.draft_compute_ms, t.verify_compute_ms,
                               t.batch_size, t.batch_tokens, t.draft_behind, t.draft_waited_ms, t.verify_waited_ms,
                               t.draft_passes, t.draft_rows, t.verify_read)
        self.tier.load.observe(t.batch_size, t.batch_tokens - t.verify_read if t.batch_tokens else gamma + 1,
                               t.others_deepest)
        ms = t.draft_ms + t.verify_ms - t.draft_waited_ms - t.verify_waited_ms  # its passes, not waits for others'
        self.rate.observe(t.emitted, ms)
        self.shared.rate.observe(t.emitted, ms)
        everyone = max(t.batch_size, self.tier.sharing)
        if everyone > 1:  # the load's delivery, every wait in (LoadedRates)
            self.tier.loaded.observe(everyone, t.emitted, t.draft_ms + t.verify_ms if t.wall_ms is None else t.wall_ms,
                                     float(self.tier.cost.base.verify_ms(0, 0, everyone, everyone - 1)),
                                     read=t.verify_read > 0 or t.draft_behind > CAUGHT_UP)

    def to_dict(self) -> dict:
        return {**_calibrations(self.acceptance, self.token_acceptance), "tokens_per_s": (self.rate.value or 0.0) * 1e3,
                "cost": self.tier.cost.to_dict(), "load": self.tier.load_dict()}


def _calibrations(step: LogitCalibration, token: LogitCalibration) -> dict:
    return {"acceptance_bias": step.intercept, "acceptance_slope": step.slope,
            "token_acceptance_bias": token.intercept, "token_acceptance_slope": token.slope}


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z > -30 else 0.0

"""Drafting policies: how many tokens (γ) the draft proposes at each step.

A policy is asked `choose(context)` before drafting, with only what is known then, and told
`observe(outcome)` after verification. Policies are per request (they may keep state), so fixed γ, the
+2/−1 heuristic and the learned controller are interchangeable in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .signals import NO_STOP, DraftSignals, DraftStop, SignalSummary

MAX_GAMMA = 24  # longest draft run any policy may ask for (transformers' assisted default is 20)
HF_ASSISTED_TOKENS, HF_ASSISTED_CONFIDENCE = 20, 0.4  # transformers' GenerationConfig defaults


@dataclass(frozen=True)
class StepContext:
    """What a policy may use to choose γ: nothing from the draft run it is about to start."""

    step: int  # steps done so far in this request
    position: int  # new tokens generated so far
    context_len: int  # prompt + generated tokens
    prev_gamma: int  # γ of the previous step (0 on the first step)
    prev_accepted: int  # accepted draft tokens of the previous step
    prev_signals: SignalSummary  # summary of the previous step's draft signals
    prev_last_confidence: float  # confidence of the previous step's last draft token (0 if none)
    drafted_total: int  # draft tokens proposed so far in this request
    accepted_total: int  # of those, accepted
    draft_behind: int = 0  # tokens of the context the draft has not read (all of it before the first draft)
    remaining: int | None = None  # tokens the request may still generate (None: not known)


@dataclass(frozen=True)
class StepTiming:
    """What a verified step took, as the loop saw it (wall time: hops and queueing included)."""

    draft_ms: float  # 0 when nothing was drafted
    verify_ms: float
    context_len: int  # tokens before the step
    emitted: int  # tokens the step added
    draft_compute_ms: float | None = None  # of those, inside the models (None: not known, as in replay)
    verify_compute_ms: float | None = None
    batch_size: int = 1  # requests in the verify pass
    batch_tokens: int = 0  # token positions the verify pass ran, padding included (0: not reported)
    # the most tokens a sequence of its drafting passes read before drafting: its own catch-up
    # (StepContext.draft_behind), or another's riding in the same pass (Proposal.most_read)
    draft_behind: int = 0
    draft_waited_ms: float = 0.0  # of the wall times, waiting in the replica for a pass to begin (the load's,
    verify_waited_ms: float = 0.0  # not a hop's: a hop is paid again on every call, waiting only under load)
    others_deepest: int = 0  # the longest draft run among the other sequences of the verify pass
    draft_passes: int = 0  # the drafting passes the draft call ran (its batch's longest run; 0: not reported)
    draft_rows: int = 0  # the sequence-positions they carried (the sum of its batch's runs)
    verify_read: int = 0  # of `batch_tokens`, context read beyond what is scored (Verification.read_tokens)
    # the request's whole step, from the end of its previous one: its decision, calls, hops and every wait, however
    # it waited (None: draft_ms + verify_ms). A request's steps tile its time, so its tokens over these are its rate
    wall_ms: float | None = None


@dataclass(frozen=True)
class StepOutcome:
    gamma: int  # draft tokens proposed (may be below the chosen γ if the draft stopped early)
    accepted: int  # accepted draft tokens (bonus/recovered excluded)
    signals: SignalSummary
    timing: StepTiming | None = None  # None for a request's first step (it also reads the prompt)
    tokens: DraftSignals | None = None  # each drafted token's signals (what `adaptive`'s token model learns from)


def draft_read_after(read: int, context_len: int, drafted: int, accepted: int) -> int:
    """What the draft's cache covers after a step at `context_len` that drafted `drafted` tokens and had `accepted`
    of them accepted, having covered `read` before: the context and its accepted run (a run's last token is drafted,
    never fed); unchanged by a step that did not draft."""
    return context_len + min(accepted, drafted - 1) if drafted else read


@dataclass
class RequestProgress:
    """A request's history as policies see it: the one place that turns step outcomes into the next
    StepContext (used by the engine loop, exact replay, and training from live records). `advance` records
    the step whose context was asked for last.

    It also follows how much of the context the draft has read (its cache, as the workers keep it): the
    context and the accepted part of its run when it drafted; nothing new when a step did not draft."""

    max_new_tokens: int | None = None  # the request's budget (StepContext.remaining); None: not known
    prev: StepOutcome = field(default_factory=lambda: StepOutcome(0, 0, SignalSummary()))
    prev_last_confidence: float = 0.0
    drafted_total: int = 0
    accepted_total: int = 0
    draft_read: int = 0  # tokens of the context the draft's cache covers
    context_len: int = 0  # of the step asked for last
    # (the signals they were made for, the next step's contexts by accepted count): the last `previews`
    _ahead: tuple[DraftSignals, list[StepContext]] | None = field(default=None, repr=False, compare=False)

    def context(self, step: int, position: int, context_len: int) -> StepContext:
        """The context of step `step`. Where `previews` made it while the step before was verified, that one:
        asked between a verification's result and the next draft call, nothing is built then."""
        self.context_len = context_len
        ahead, self._ahead = self._ahead, None
        if ahead is not None and self.prev.tokens is ahead[0]:
            made = ahead[1][self.prev.accepted]
            if made.step == step and made.position == position and made.context_len == context_len:
                return made
        return self._build(step, position, context_len)

    def _build(self, step: int, position: int, context_len: int) -> StepContext:
        return StepContext(
            step=step, position=position, context_len=context_len, prev_gamma=self.prev.gamma,
            prev_accepted=self.prev.accepted, prev_signals=self.prev.signals,
            prev_last_confidence=self.prev_last_confidence, drafted_total=self.drafted_total,
            accepted_total=self.accepted_total, draft_behind=context_len - self.draft_read,
            remaining=self._remaining(position),
        )

    def _remaining(self, position: int) -> int | None:
        return None if self.max_new_tokens is None else max(self.max_new_tokens - position, 0)

    def previews(self, signals: DraftSignals, step: int, position: int, context_len: int) -> list[StepContext]:
        """The next step's context for each accepted count 0..len(signals), without advancing: what a policy
        may prepare for while step `step` (at `position`, `context_len`) is verified. A step that goes on
        emits accepted + 1 tokens. Once the step is advanced with these signals, `context` hands out the one
        it leads to."""
        drafted, summary, read = len(signals), signals.summary(), self.draft_read
        last = signals.confidence[-1] if drafted else 0.0
        made = [StepContext(step=step + 1, position=position + a + 1, context_len=context_len + a + 1,
                            prev_gamma=drafted, prev_accepted=a, prev_signals=summary, prev_last_confidence=last,
                            drafted_total=self.drafted_total + drafted, accepted_total=self.accepted_total + a,
                            draft_behind=context_len + a + 1 - draft_read_after(read, context_len, drafted, a),
                            remaining=self._remaining(position + a + 1))
                for a in range(drafted + 1)]
        self._ahead = (signals, made)
        return made

    def advance(self, signals: DraftSignals, accepted: int, timing: StepTiming | None = None) -> StepOutcome:
        """Record a verified step (its drafted tokens' signals, how many were accepted, what it took);
        returns its outcome."""
        drafted, ahead = len(signals), self._ahead
        summary = ahead[1][0].prev_signals if ahead is not None and ahead[0] is signals else signals.summary()
        self.draft_read = draft_read_after(self.draft_read, self.context_len, drafted, accepted)
        self.prev = StepOutcome(drafted, accepted, summary, timing, signals)
        self.prev_last_confidence = signals.confidence[-1] if drafted else 0.0
        self.drafted_total += drafted
        self.accepted_total += accepted
        return self.prev


class GammaPolicy(Protocol):
    name: str
    draft_stop: DraftStop  # when the draft ends the next run early (γ is then an upper bound); read after choose

    def choose(self, context: StepContext) -> int:
        """γ for the next step, >= 0 (0 = plain target decoding for this step)."""
        ...

    def observe(self, outcome: StepOutcome) -> None:
        """Learn from the step just verified."""
        ...

    # Optional: `prepare(contexts: list[StepContext]) -> None`, called while a step's verification is in
    # flight with the next step's context for each accepted count it may return (speckv.adaptive).


@dataclass
class NoSpeculation:
    """Target-only decoding with its KV cache: the baseline every speedup is measured against."""

    name: str = "none"
    draft_stop: DraftStop = NO_STOP

    def choose(self, context: StepContext) -> int:
        return 0

    def observe(self, outcome: StepOutcome) -> None:
        pass


@dataclass
class FixedGamma:
    gamma: int
    name: str = ""
    draft_stop: DraftStop = NO_STOP

    def __post_init__(self) -> None:
        if not 1 <= self.gamma <= MAX_GAMMA:
            raise ValueError(f"fixed γ must be in [1, {MAX_GAMMA}], got {self.gamma}")
        self.name = self.name or f"fixed:{self.gamma}"

    def choose(self, context: StepContext) -> int:
        return self.gamma

    def observe(self, outcome: StepOutcome) -> None:
        pass


@dataclass
class HeuristicGamma:
    """transformers' `heuristic` schedule: +2 after a fully accepted step, −1 (floor 1) otherwise."""

    initial: int = 4
    name: str = "heuristic"
    draft_stop: DraftStop = NO_STOP
    gamma: int = field(init=False)

    def __post_init__(self) -> None:
        self.gamma = self.initial

    def choose(self, context: StepContext) -> int:
        return self.gamma

    def observe(self, outcome: StepOutcome) -> None:
        if outcome.gamma == 0:
            return
        if outcome.accepted == outcome.gamma:
            self.gamma = min(self.gamma + 2, MAX_GAMMA)
        else:
            self.gamma = max(1, self.gamma - 1)


def hf_assisted_defaults() -> FixedGamma:
    """transformers' assisted generation with its default settings, as an engine policy for exact replay:
    num_assistant_tokens=20 with the "constant" schedule, and the run ends after a token whose probability
    is below assistant_confidence_threshold=0.4 (transformers adapts that threshold only when scikit-learn
    is installed; speckv does not install it, so live `hf-assisted` runs use 0.4 too). Live, `hf-assisted`
    runs transformers' own loop (speckv.local); this is its drafting policy, for replay."""
    return FixedGamma(HF_ASSISTED_TOKENS, name="hf-assisted",
                      draft_stop=DraftStop(min_confidence=HF_ASSISTED_CONFIDENCE))


@dataclass(frozen=True)
class PolicyKind:
    """One policy name as users write it: in `speckv generate --policy`, `speculation.policy`, bench lists."""

    name: str
    help: str
    takes_gamma: bool = False  # written `name:N` (fixed:4)
    in_engine: bool = True  # False: run by transformers' own loop, in-process only (not by SpecKV's engine)


# The one registry of policy names: argparse help, the API's `speculation.policy`, the app config and
# make_policy all read it.
POLICIES: dict[str, PolicyKind] = {k.name: k for k in (
    PolicyKind("none", "target only, no drafting: the baseline"),
    PolicyKind("fixed", "always draft N tokens (fixed:N)", takes_gamma=True),
    PolicyKind("heuristic", "transformers' +2/-1 schedule"),
    PolicyKind("adaptive", "γ per step from the learned acceptance predictor and this machine's step costs"),
    PolicyKind("hf-assisted", "transformers' own assisted generation (in-process only)", in_engine=False),
)}
SERVED_POLICIES = tuple(k.name for k in POLICIES.values() if k.in_engine)  # what the HTTP API offers


def policy_help() -> str:
    """'none | fixed:N | ...' for help texts and error messages."""
    return " | ".join(f"{k.name}:N" if k.takes_gamma else k.name for k in POLICIES.values())


def policy_kind(spec: str) -> PolicyKind:
    """The registry entry of a validated spec."""
    return POLICIES[spec.split(":", 1)[0]]


def validate_policy_spec(spec: str) -> str:
    """Check a policy spec without building it; returns it normalised. Raises ValueError naming the problem."""
    spec = spec.strip()
    name, _, arg = spec.partition(":")
    kind = POLICIES.get(name)
    if kind is None or (arg and not kind.takes_gamma):
        raise ValueError(f"unknown policy {spec!r}; choose one of {policy_help()}")
    if not kind.takes_gamma:
        return name
    try:
        gamma = int(arg)
    except ValueError:
        raise ValueError(f"bad policy {spec!r}: {name}:N needs an integer N") from None
    FixedGamma(gamma)
    return f"{name}:{gamma}"


def make_policy(spec: str, tier: str = "fp16", predictor=None, estimates=None, greedy: bool = True) -> GammaPolicy:
    """Build a fresh per-request policy from its spec ('none', 'fixed:N', 'heuristic', 'adaptive').

    `adaptive` needs the tier's run-time estimates (speckv.estimates.TierEstimates, from this machine's
    calibration) and the acceptance `predictor` (speckv.predictor; default: the one shipped with speckv); `greedy` says
    which acceptance estimates it learns."""
    spec = validate_policy_spec(spec)
    if spec == "none":
        return NoSpeculation()
    if spec == "heuristic":
        return HeuristicGamma()
    if spec == "adaptive":
        if estimates is None:
            raise ValueError("adaptive needs the step costs of the machine it runs on: calibrate first "
                             "(speckv.calibration; the engine and the replicas do it when they load)")
        from .adaptive import make_adaptive_policy

        return make_adaptive_policy(tier, estimates, predictor, greedy)
    if not policy_kind(spec).in_engine:
        raise ValueError(f"policy {spec!r} runs transformers' own generation loop, not the SpecKV engine")
    return FixedGamma(int(spec.split(":", 1)[1]))

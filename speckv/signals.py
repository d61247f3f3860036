"""Draft-side signals: how sure the draft was of each token it proposed.

Signals come from the draft's own distribution at temperature 1 (softmax of its raw logits), not from the
sampling distribution: under greedy decoding the latter is one-hot and says nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class DraftSignals:
    """Per proposed token: probability of the chosen token, max probability (confidence), entropy (nats)."""

    chosen_prob: list[float] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)

    def append(self, logits: torch.Tensor, token_id: int) -> None:
        """Add the signals of one token drawn from a [vocab] logits row."""
        log_probs = logits.float().log_softmax(-1)
        probs = log_probs.exp()
        self.chosen_prob.append(float(probs[token_id]))
        self.confidence.append(float(probs.max()))
        self.entropy.append(float(-(probs * log_probs).nan_to_num().sum()))

    def __len__(self) -> int:
        return len(self.confidence)

    def summary(self) -> SignalSummary:
        return SignalSummary.of(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SignalSummary:
    """Per-step summary of DraftSignals; zeros when nothing was drafted."""

    mean_confidence: float = 0.0
    min_confidence: float = 0.0
    max_confidence: float = 0.0
    mean_entropy: float = 0.0
    min_entropy: float = 0.0
    max_entropy: float = 0.0
    mean_chosen_prob: float = 0.0
    min_chosen_prob: float = 0.0

    @classmethod
    def of(cls, s: DraftSignals) -> SignalSummary:
        if not len(s):
            return cls()
        c, e, p = s.confidence, s.entropy, s.chosen_prob
        return cls(
            mean_confidence=sum(c) / len(c),
            min_confidence=min(c),
            max_confidence=max(c),
            mean_entropy=sum(e) / len(e),
            min_entropy=min(e),
            max_entropy=max(e),
            mean_chosen_prob=sum(p) / len(p),
            min_chosen_prob=min(p),
        )


TOKEN_ACCEPTANCE_FEATURES = ("confidence_logit", "entropy", "log_index")  # + a bias: DraftStop.token_weights


def token_acceptance_features(confidence: float, entropy: float, index: int) -> tuple[float, float, float]:
    """One drafted token's TOKEN_ACCEPTANCE_FEATURES (index: 0-based place in its run)."""
    c = min(max(confidence, 1e-6), 1 - 1e-6)
    return math.log(c / (1 - c)), entropy, math.log1p(index)


def token_acceptance(weights: tuple[float, ...], confidence: float, entropy: float, index: int) -> float:
    """P(the token at 0-based `index` of a run is accepted | the tokens before it were): the logistic model over
    TOKEN_ACCEPTANCE_FEATURES with `weights` (one weight each, then the bias)."""
    *w, bias = weights
    z = bias + sum(wi * x for wi, x in zip(w, token_acceptance_features(confidence, entropy, index)))
    return 1.0 / (1.0 + math.exp(-z)) if z > -30 else 1e-13


@dataclass(frozen=True)
class DraftStop:
    """When the draft ends its run early within a step (the chosen γ is then an upper bound).

    Either rule ends the run after the token just drafted:
    - `min_confidence`: that token's confidence is below it (0 = off);
    - `min_run_acceptance`: the predicted probability that every token drafted so far is accepted is below
      it (0 = off). Each token's probability of acceptance, given that the ones before it were accepted, is
      a logistic model over TOKEN_ACCEPTANCE_FEATURES with `token_weights` (one weight each, then the bias),
      fitted on traces (speckv.tools.training). Past that point another token costs more draft and verify time
      than the tokens it is expected to add; `adaptive` sets the threshold at every step from its current
      estimates (speckv.adaptive).
    """

    min_confidence: float = 0.0
    min_run_acceptance: float = 0.0
    token_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not (0.0 <= self.min_confidence <= 1.0 and 0.0 <= self.min_run_acceptance <= 1.0):
            raise ValueError(f"draft stop thresholds must lie in [0, 1], got {self.min_confidence}, "
                             f"{self.min_run_acceptance}")
        if self.min_run_acceptance > 0 and len(self.token_weights) != len(TOKEN_ACCEPTANCE_FEATURES) + 1:
            raise ValueError(f"min_run_acceptance needs {len(TOKEN_ACCEPTANCE_FEATURES) + 1} token weights, "
                             f"got {len(self.token_weights)}")

    def token_acceptance(self, confidence: float, entropy: float, index: int) -> float:
        """P(the token at 0-based `index` of a run is accepted | the tokens before it were)."""
        return token_acceptance(self.token_weights, confidence, entropy, index)

    def with_min_confidence(self, min_confidence: float) -> DraftStop:
        """This rule, with the confidence floor raised to `min_confidence` if that is stricter."""
        if min_confidence <= self.min_confidence:
            return self
        return DraftStop(min_confidence, self.min_run_acceptance, self.token_weights)

    def stopper(self) -> RunStopper:
        return RunStopper(self)

    def to_dict(self) -> dict:
        return {"min_confidence": self.min_confidence, "min_run_acceptance": self.min_run_acceptance,
                "token_weights": list(self.token_weights)}

    @classmethod
    def from_dict(cls, d: dict) -> DraftStop:
        try:
            return cls(float(d.get("min_confidence", 0.0)), float(d.get("min_run_acceptance", 0.0)),
                       tuple(float(w) for w in d.get("token_weights", ())))
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a draft stop rule: {d!r} ({e})") from None


NO_STOP = DraftStop()


class RunStopper:
    """Applies a DraftStop to one run, token by token (the draft worker live, replay over a trace)."""

    def __init__(self, rule: DraftStop) -> None:
        self.rule = rule
        self.index = 0
        self.run_acceptance = 1.0

    def stop_after(self, confidence: float, entropy: float) -> bool:
        """Called once per drafted token, in order; True if the run should end with this token."""
        rule, index = self.rule, self.index
        self.index += 1
        if confidence < rule.min_confidence:
            return True
        if rule.min_run_acceptance > 0:
            self.run_acceptance *= rule.token_acceptance(confidence, entropy, index)
            return self.run_acceptance < rule.min_run_acceptance
        return False

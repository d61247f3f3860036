"""Draft-side signals: how sure the draft was of each token it proposed.

Signals come from the draft's own distribution at temperature 1 (softmax of its raw logits), not from the
sampling distribution: under greedy decoding the latter is one-hot and says nothing.
"""

from __future__ import annotations

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

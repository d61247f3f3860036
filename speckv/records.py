"""Step records: one row per speculation step, the single schema shared by the engine, profiling,
training, benchmarks and the served path. Stored as JSON Lines (one object per line).

Fields
- request_id, prompt_id, category: which request and which benchmark prompt (prompt_id/category may be "").
- tier, policy: the target's compression tier and the policy name that chose γ.
- step: 0-based step index in the request; position: new tokens generated before this step;
  context_len: prompt + generated tokens before this step.
- gamma_chosen: what the policy asked for; gamma: draft tokens actually proposed (lower when capped by the
  remaining budget or stopped early on confidence).
- accepted: accepted draft tokens (recovered/bonus excluded); emitted: tokens added to the output this step
  (accepted + 1, less when EOS, max_new_tokens or a stop string ended the request).
- draft_ms, verify_ms: wall time of the draft and verify calls seen by the loop (hop time included when
  served); draft_compute_ms, verify_compute_ms: time inside the models; policy_us: time to choose γ.
- chosen_prob, confidence, entropy: per proposed draft token (see signals.py).
- mean/min/max_confidence, mean/min/max_entropy, mean/min_chosen_prob: per-step summaries of those
  (signals.SignalSummary), derived from the lists; written to JSON alongside them, ignored on reading.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .signals import DraftSignals, SignalSummary

SCHEMA_VERSION = 1


@dataclass
class StepRecord:
    request_id: str
    tier: str
    policy: str
    step: int
    position: int
    context_len: int
    gamma_chosen: int
    gamma: int
    accepted: int
    emitted: int
    draft_ms: float
    verify_ms: float
    draft_compute_ms: float
    verify_compute_ms: float
    policy_us: float
    prompt_id: str = ""
    category: str = ""
    batch_size: int = 1  # requests in the verify pass (batched serving)
    batch_tokens: int = 0  # token positions that pass ran over all its requests, padding included (0: not reported)
    chosen_prob: list[float] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def hop_ms(self) -> float:
        """Time the step spent outside the models: handle hops, serialization, queueing (0 in-process)."""
        return max(0.0, self.draft_ms - self.draft_compute_ms) + max(0.0, self.verify_ms - self.verify_compute_ms)

    def summary(self) -> SignalSummary:
        """Per-step summaries of the per-token signals (derived, never stored separately)."""
        return DraftSignals(self.chosen_prob, self.confidence, self.entropy).summary()

    def to_dict(self) -> dict:
        """The record as one flat JSON object, with the signal summaries alongside (for training tools)."""
        return {**asdict(self), **asdict(self.summary())}

    @classmethod
    def from_dict(cls, data: dict) -> StepRecord:
        names = {f.name for f in fields(cls)}
        derived = {f.name for f in fields(SignalSummary)}
        unknown = set(data) - names - derived
        if unknown:
            raise ValueError(f"unknown step record fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RequestStats:
    """One request's totals, built from its step records: the one shape the router's `speculation` object,
    `speckv generate` and the bench report. Steps are target passes (the first also reads the prompt);
    accepted tokens exclude the bonus/recovered token each step adds."""

    policy: str
    steps: int = 0
    draft_tokens: int = 0  # draft tokens proposed
    accepted_tokens: int = 0
    completion_tokens: int = 0  # tokens emitted (accepted + bonus/recovered, cut by stops)
    gammas: Counter = field(default_factory=Counter)  # draft tokens proposed per step -> steps
    draft_ms: float = 0.0  # wall time of the draft calls as the loop saw them (hops included when served)
    verify_ms: float = 0.0
    hop_ms: float = 0.0  # of draft_ms + verify_ms, the part outside the models
    policy_us: float = 0.0  # time spent choosing γ
    sequences_per_pass: Counter = field(default_factory=Counter)  # requests in a step's verify pass -> steps
    finish_reason: str | None = None
    retries: int = 0  # model calls re-sent because a replica went away mid-request (served only)
    predictor_version: str | None = None  # adaptive: the acceptance predictor its decisions came from
    estimates: dict | None = None  # adaptive: its step costs, acceptance bias and rate at the end

    def add(self, record: StepRecord, finish_reason: str | None = None) -> None:
        self.steps += 1
        self.draft_tokens += record.gamma
        self.accepted_tokens += record.accepted
        self.completion_tokens += record.emitted
        self.gammas[record.gamma] += 1
        self.draft_ms += record.draft_ms
        self.verify_ms += record.verify_ms
        self.hop_ms += record.hop_ms
        self.policy_us += record.policy_us
        self.sequences_per_pass[record.batch_size] += 1
        self.finish_reason = finish_reason or self.finish_reason

    @classmethod
    def of(cls, policy: str, records: Iterable[StepRecord], finish_reason: str | None = None) -> RequestStats:
        stats = cls(policy)
        for record in records:
            stats.add(record)
        stats.finish_reason = finish_reason
        return stats

    @property
    def mean_accepted(self) -> float:
        """Accepted draft tokens per step."""
        return self.accepted_tokens / self.steps if self.steps else 0.0

    @property
    def mean_gamma(self) -> float:
        """Draft tokens proposed per step."""
        return self.draft_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per step (bonus/recovered included): the SpecKV paper's metric."""
        return self.completion_tokens / self.steps if self.steps else 0.0

    def speculation(self) -> dict:
        """The response's `speculation` object."""
        out = {"policy": self.policy, "steps": self.steps, "draft_tokens": self.draft_tokens,
               "accepted_tokens": self.accepted_tokens, "mean_accepted": self.mean_accepted,
               "gamma_histogram": {str(g): n for g, n in sorted(self.gammas.items())},
               "batch_histogram": {str(b): n for b, n in sorted(self.sequences_per_pass.items())},
               "timing": {"draft_ms": self.draft_ms, "verify_ms": self.verify_ms, "hop_ms": self.hop_ms,
                          "policy_us": self.policy_us},
               "retries": self.retries}
        if self.predictor_version:
            out["predictor_version"] = self.predictor_version
        if self.estimates:
            out["estimates"] = self.estimates
        return out


def write_jsonl(records: Iterable[StepRecord], path: str | Path, append: bool = False) -> None:
    with open(path, "a" if append else "w") as f:
        f.writelines(json.dumps(r.to_dict()) + "\n" for r in records)


def read_jsonl(path: str | Path) -> Iterator[StepRecord]:
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield StepRecord.from_dict(json.loads(line))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a step record: {e}") from None

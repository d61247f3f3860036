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
    chosen_prob: list[float] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

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

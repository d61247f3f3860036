"""Sampling parameters and the one place where logits become the distribution tokens are drawn from.

Draft and target distributions go through the same `logits_to_probs`, so speculative sampling compares like
with like: temperature, then top-k, then top-p, then softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_K = 1_000_000
# Temperatures below this are greedy (as in vLLM): dividing logits by a tiny positive temperature overflows
# to inf, and the distribution it tends to is the argmax anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 (or below GREEDY_BELOW_TEMPERATURE) means greedy (argmax), which
    makes speculation exact."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.top_k <= MAX_TOP_K):
            raise ValueError(f"top_k must be in [0, {MAX_TOP_K}], got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., vocab] logits -> [..., vocab] float32 probabilities after temperature, top-k and top-p.

    For greedy params this is the one-hot distribution of the argmax, so greedy decoding is the
    zero-temperature limit of the same rule.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p; the top token always stays
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row of [..., vocab] probabilities -> [...] int64."""
    flat = probs.reshape(-1, probs.shape[-1]).cpu()  # generators are CPU-side so draws match across devices
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1]).to(probs.device)


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A generator for one (request seed, step, stream) triple.

    Deriving randomness from the step instead of carrying generator state lets a request move between
    replicas (or be rebuilt after a fault) and still draw the same tokens. stream 0 drafts, 1 accepts.
    """
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 2 + stream) % (2**63 - 1))
    return g

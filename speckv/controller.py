"""The learned γ controller. Until a trained artifact is available, `adaptive` falls back to a documented
default (the +2/−1 heuristic), and says so in its name so outputs and records show it."""

from __future__ import annotations

from .policy import GammaPolicy, HeuristicGamma

FALLBACK_NAME = "adaptive(fallback=heuristic)"


def make_adaptive_policy(tier: str) -> GammaPolicy:
    """The adaptive policy for a tier; the heuristic schedule while no controller artifact is shipped."""
    return HeuristicGamma(name=FALLBACK_NAME)

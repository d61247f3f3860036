"""The learned γ controller: its snapshot (what a router caches) and the `adaptive` policy built from it.

Until a trained artifact is available, `adaptive` falls back to a documented default (the +2/−1
heuristic) and says so in its name, so outputs and step records show it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .policy import GammaPolicy, HeuristicGamma

FALLBACK_NAME = "adaptive(fallback=heuristic)"
FALLBACK_VERSION = "fallback-heuristic"


@dataclass(frozen=True)
class ControllerSnapshot:
    """An immutable, versioned controller: cheap to ship to routers and to rebuild policies from."""

    version: str
    artifact: dict | None = None  # weights and metadata as plain data; None = fallback


def load_snapshot(path: str | None = None) -> ControllerSnapshot:
    """Load a controller artifact; with no path, the built-in fallback snapshot.

    No trained artifact format exists yet (the learned controller is still to be built), so any path is
    refused with a message saying so rather than silently ignored."""
    if path is None:
        return ControllerSnapshot(FALLBACK_VERSION)
    raise ValueError(f"cannot load controller artifact {path!r}: trained controller artifacts are not "
                     "implemented yet; leave controller_artifact unset to use the built-in fallback")


def make_adaptive_policy(tier: str, snapshot: ControllerSnapshot | None = None) -> GammaPolicy:
    """A fresh per-request adaptive policy for a tier from a controller snapshot."""
    snapshot = snapshot or load_snapshot()
    return HeuristicGamma(name=FALLBACK_NAME)

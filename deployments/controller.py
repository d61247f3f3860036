"""Controller deployment: owns the controller artifact and its version.

Routers do not ask it for every γ (that would add a hop per step); they fetch its snapshot once, evaluate
the policy locally and refetch when `version()` changes. `choose` exists to measure the per-step-hop
alternative, and `load` rolls a new artifact without restarting anything.
"""

from __future__ import annotations

from ray import serve

from speckv.controller import ControllerSnapshot, load_snapshot
from speckv.cost_model import CostModel
from speckv.estimates import TierEstimates
from speckv.policy import StepContext, make_policy


@serve.deployment(name="controller", num_replicas=1, max_ongoing_requests=256)
class ControllerDeployment:
    def __init__(self, artifact: str | None = None) -> None:
        self._snapshot = load_snapshot(artifact)

    def version(self) -> str:
        return self._snapshot.version

    def snapshot(self) -> ControllerSnapshot:
        return self._snapshot

    def load(self, artifact: str | None) -> str:
        """Switch to another artifact; routers pick it up at their next version check."""
        self._snapshot = load_snapshot(artifact)
        return self._snapshot.version

    def choose(self, tier: str, context: StepContext, cost: CostModel) -> int:
        """One γ decision through a hop (for measuring that design against the cached snapshot)."""
        return make_policy("adaptive", tier, self._snapshot, TierEstimates.calibrated(cost)).choose(context)

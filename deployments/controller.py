"""The controller deployment: distributes the acceptance predictor (speckv.predictor) to the routers and
rolls a new one without restarting anything.

Routers do not ask it for every γ (that would add a hop per step); they fetch its predictor once, run the
`adaptive` policy locally and fetch again when `version()` changes. `choose` exists to measure the
per-step-hop alternative.
"""

from __future__ import annotations

from ray import serve

from speckv.cost_model import CostModel
from speckv.estimates import TierEstimates
from speckv.policy import StepContext, make_policy
from speckv.predictor import AcceptancePredictor, load_predictor


@serve.deployment(name="controller", num_replicas=1, max_ongoing_requests=256)
class ControllerDeployment:
    def __init__(self, predictor_path: str | None = None) -> None:
        self._predictor = load_predictor(predictor_path)
        self._version = self._predictor.version()

    def version(self) -> str:
        return self._version

    def predictor(self) -> AcceptancePredictor:
        return self._predictor

    def load(self, predictor_path: str | None) -> str:
        """Switch to another predictor artifact (None: the shipped one); routers pick it up at their next
        version check. Returns its version."""
        self._predictor = load_predictor(predictor_path)
        self._version = self._predictor.version()
        return self._version

    def choose(self, tier: str, context: StepContext, cost: CostModel) -> int:
        """One γ decision through a hop (for measuring that design against the cached predictor)."""
        return make_policy("adaptive", tier, self._predictor, TierEstimates.calibrated(cost)).choose(context)

"""The learned γ controller: its artifact, its snapshot (what a router caches) and the `adaptive` policy.

Model: a small MLP maps features known before drafting (the previous step's draft signals and outcome,
the request's running acceptance, position, tier) to acceptance_probs[k-1] = P(the draft's first k tokens
are all accepted), k = 1..γmax. The policy turns that into the γ that maximises expected tokens per second
under the tier's measured cost model:

    expected_tokens(γ) = 1 + Σ_{k ≤ γ} acceptance_probs[k-1]        (accepted tokens + the bonus/recovered one)
    γ* = argmax_γ expected_tokens(γ) − rate · step_ms(γ, context_len),   γ ∈ 0..γmax  (0 = no speculation)

`rate` (tokens per ms, per tier) prices a millisecond at the decode rate the tier reaches over a whole
request: a step pays if it yields more tokens than that time would yield on average. This is the
long-run-rate (renewal-reward) criterion; maximising each step's own tokens/ms instead under-drafts in easy
stretches.

Within a step the draft's own per-token signals say more than anything known before it (speckv.signals
.DraftStop: the run ends once the predicted probability that all its tokens are accepted falls below a
per-tier threshold). Where that pays (the slow int8/nf4 tiers, whose verify pass costs far more than a draft
token), the policy uses γ* only to decide *whether* to draft, or drafts at every step (rate 0), and lets the
run go up to `max_gamma` tokens, ending it on the stop rule. `rate`, the stop rule and `max_gamma` are tuned
per tier by replay on the training traces (speckv.training.tune_decision); docs/RESULTS.md says which way
of deciding won per tier on this machine, and by how much.

Inference is plain numpy (a 15x32x8 MLP; torch's per-call overhead would dominate at this size).
Artifact on disk: `controller.safetensors` (weights and feature normalisation) + `controller.json`
(features, tiers, per-tier cost models, draft stop rules and γ caps, training summary, version). No pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .policy import MAX_GAMMA, GammaPolicy, StepContext, StepOutcome
from .replay import CostModel
from .signals import NO_STOP, DraftStop

ARTIFACT_KIND = "speckv-gamma-controller"
ARTIFACT_FORMAT_VERSION = 2  # 2: per-tier DraftStop rules and max_gamma
TIERS = ("fp16", "int8", "nf4")
FEATURES = (
    "prev_drafted",  # 1 if the previous step drafted anything, else 0 (its signals below are then 0)
    "prev_accept_rate",  # accepted / drafted in the previous step
    "prev_all_accepted",  # 1 if every drafted token of the previous step was accepted
    "prev_mean_confidence", "prev_min_confidence", "prev_last_confidence",
    "prev_mean_entropy", "prev_max_entropy",
    "run_accept_rate",  # accepted / drafted over the request so far (0.5 before any drafting)
    "log_drafted_total",  # log(1 + tokens drafted so far)
    "log_position",  # log(1 + tokens generated so far)
    "log_context_len",
    *(f"tier_{t}" for t in TIERS),
)
SHIPPED_DIR = Path(__file__).parent / "data"
SHIPPED = SHIPPED_DIR / "controller.json"


def features(context: StepContext, tier: str) -> list[float]:
    """The controller's input for one decision, in FEATURES order (one home for training and inference)."""
    s = context.prev_signals
    drafted = context.prev_gamma > 0
    return [
        float(drafted),
        context.prev_accepted / context.prev_gamma if drafted else 0.0,
        float(drafted and context.prev_accepted == context.prev_gamma),
        s.mean_confidence, s.min_confidence, context.prev_last_confidence,
        s.mean_entropy, s.max_entropy,
        context.accepted_total / context.drafted_total if context.drafted_total else 0.5,
        math.log1p(context.drafted_total),
        math.log1p(context.position),
        math.log1p(context.context_len),
        *(float(tier == t) for t in TIERS),
    ]


@dataclass
class ControllerArtifact:
    """A trained controller as plain data: MLP weights, feature normalisation and per-tier decision inputs."""

    w1: np.ndarray  # [F, H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H, γmax]
    b2: np.ndarray  # [γmax]
    feature_mean: np.ndarray  # [F]
    feature_std: np.ndarray  # [F]
    cost_models: dict[str, CostModel]
    draft_stop: dict[str, DraftStop]  # per tier: when the draft ends a run early
    rate: dict[str, float]  # per tier: tokens per ms a step must beat (module docstring)
    max_gamma: dict[str, int] = field(default_factory=dict)  # per tier: run cap when drafting; 0 = γ* itself
    metadata: dict = field(default_factory=dict)

    @property
    def gamma_max(self) -> int:
        return int(self.w2.shape[1])

    def acceptance_probs(self, x: np.ndarray) -> np.ndarray:
        """[N, F] features -> [N, γmax] P(first k draft tokens all accepted), non-increasing in k."""
        z = (x - self.feature_mean) / self.feature_std
        h = np.maximum(z @ self.w1 + self.b1, 0.0)
        probs = 1.0 / (1.0 + np.exp(-(h @ self.w2 + self.b2)))
        return np.minimum.accumulate(probs, axis=-1)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2, "feature_mean": self.feature_mean,
                "feature_std": self.feature_std}

    def version(self) -> str:
        digest = hashlib.sha256()
        for name, t in sorted(self.tensors().items()):
            digest.update(name.encode() + np.ascontiguousarray(t, dtype=np.float32).tobytes())
        digest.update(json.dumps({t: c.to_dict() for t, c in sorted(self.cost_models.items())}, sort_keys=True).encode())
        digest.update(json.dumps([{t: r.to_dict() for t, r in self.draft_stop.items()}, self.rate, self.max_gamma],
                                 sort_keys=True).encode())
        return digest.hexdigest()[:12]

    def save(self, out_dir: Path) -> Path:
        """Write controller.safetensors + controller.json into `out_dir`; returns the JSON path."""
        from safetensors.numpy import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.tensors().items()},
                  str(out_dir / "controller.safetensors"))
        meta = {
            "kind": ARTIFACT_KIND, "format_version": ARTIFACT_FORMAT_VERSION, "version": self.version(),
            "features": list(FEATURES), "tiers": sorted(self.cost_models), "gamma_max": self.gamma_max,
            "hidden": int(self.w1.shape[1]), "weights": "controller.safetensors",
            "cost_models": {t: c.to_dict() for t, c in self.cost_models.items()},
            "draft_stop": {t: r.to_dict() for t, r in self.draft_stop.items()}, "rate_tokens_per_ms": self.rate,
            "max_gamma": self.max_gamma, **self.metadata,
        }
        path = out_dir / "controller.json"
        path.write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ControllerArtifact:
        """Load from controller.json (or the directory holding it). Raises ValueError naming the problem."""
        from safetensors.numpy import load_file

        path = Path(path)
        if path.is_dir():
            path = path / "controller.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read controller artifact {path}: {e}") from None
        if not isinstance(meta, dict) or meta.get("kind") != ARTIFACT_KIND:
            raise ValueError(f"{path} is not a SpecKV γ controller artifact (kind {meta.get('kind')!r})"
                             if isinstance(meta, dict) else f"{path} is not a JSON object")
        if meta.get("format_version") != ARTIFACT_FORMAT_VERSION or meta.get("features") != list(FEATURES):
            raise ValueError(f"{path}: artifact format {meta.get('format_version')} with features "
                             f"{meta.get('features')} does not match this speckv (format {ARTIFACT_FORMAT_VERSION})")
        try:
            t = load_file(str(path.parent / meta["weights"]))
            artifact = cls(
                t["w1"], t["b1"], t["w2"], t["b2"], t["feature_mean"], t["feature_std"],
                {tier: CostModel.from_dict(c) for tier, c in meta["cost_models"].items()},
                {tier: DraftStop.from_dict(v) for tier, v in meta["draft_stop"].items()},
                {tier: float(v) for tier, v in meta["rate_tokens_per_ms"].items()},
                {tier: int(v) for tier, v in meta.get("max_gamma", {}).items()},
                {k: v for k, v in meta.items() if k in ("training", "trained_at", "records")},
            )
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: incomplete controller artifact: {e}") from None
        f, h = artifact.w1.shape
        if any(not 0 <= g <= MAX_GAMMA for g in artifact.max_gamma.values()):
            raise ValueError(f"{path}: max_gamma must lie in 0..{MAX_GAMMA}, got {artifact.max_gamma}")
        if (f != len(FEATURES) or artifact.b1.shape != (h,) or artifact.w2.shape[0] != h
                or artifact.b2.shape != (artifact.gamma_max,)):
            raise ValueError(f"{path}: weight shapes do not match the feature list")
        if artifact.version() != meta.get("version"):
            raise ValueError(f"{path}: weights do not match the recorded version {meta.get('version')!r}")
        return artifact


@dataclass(frozen=True)
class ControllerSnapshot:
    """An immutable, versioned controller: cheap to ship to routers and to rebuild policies from."""

    version: str
    artifact: ControllerArtifact | None = None


def load_snapshot(path: str | None = None) -> ControllerSnapshot:
    """Load a controller artifact; with no path, the one shipped with speckv (trained on the default pair)."""
    artifact = ControllerArtifact.load(path or SHIPPED)
    return ControllerSnapshot(artifact.version(), artifact)


class AdaptivePolicy:
    """γ per step from the learned acceptance model and the tier's cost model (module docstring)."""

    def __init__(self, artifact: ControllerArtifact, tier: str) -> None:
        if tier not in artifact.cost_models:
            raise ValueError(f"the controller has no cost model for tier {tier!r} (it has "
                             f"{', '.join(sorted(artifact.cost_models))}); collect and train for that tier")
        self.name = "adaptive"
        self.tier = tier
        self.artifact = artifact
        self.draft_stop = artifact.draft_stop.get(tier, NO_STOP)
        self.max_gamma = artifact.max_gamma.get(tier, 0)
        cost = artifact.cost_models[tier]
        self.rate = artifact.rate[tier]
        gammas = np.arange(artifact.gamma_max + 1)
        price = self.rate * np.asarray(cost.step_ms(gammas, 0), dtype=np.float64)  # [γmax+1]
        # A decision is a handful of numpy calls on tiny arrays, so it is arranged to need as few as possible:
        # the normalisation and first bias fold into one matrix over [features, 1]; with
        # sigmoid(z) = (1 + tanh(z/2)) / 2 the second layer is pre-halved, and twice the value of γ ≥ 1 is
        #   2·value(γ) = 2 + γ + Σ_{k≤γ} tanh_k − 2·price(γ)      (tanh_k made non-increasing in k)
        w1, b1, mean, std = (np.asarray(x, dtype=np.float64) for x in
                             (artifact.w1, artifact.b1, artifact.feature_mean, artifact.feature_std))
        self._w1 = np.ascontiguousarray(np.vstack([w1 / std[:, None], b1 - (mean / std) @ w1]))  # [F+1, H]
        self._w2 = np.ascontiguousarray(np.asarray(artifact.w2, dtype=np.float64) / 2)
        self._b2 = np.asarray(artifact.b2, dtype=np.float64) / 2
        self._offset = 2.0 + gammas[1:] - 2 * price[1:]  # [γmax]
        self._value0 = 2.0 - 2 * price[0]  # 2·value(0): one token for the price of a target-only step
        # Decisions the MLP cannot change, settled here once (exact; tanh_k lies in (−1, 1)):
        # - a drafted token costs at least a token's worth of time even if always accepted,
        #   rate·(draft_ms_per_token + verify_ms_per_token) ≥ 1: no γ ≥ 1 beats γ = 0;
        # - time is free (rate 0): every γ ≥ 1 beats γ = 0, and with a run cap the cap is the answer.
        marginal = self.rate * (cost.draft_ms_per_token + cost.verify_ms_per_token)
        self._settled: int | None = None
        if marginal >= 1.0:
            self._settled = 0
        elif self.rate == 0 and self.max_gamma:
            self._settled = self.max_gamma
        # how this policy decides, for reports: never / always (up to the cap) / the MLP gates runs up to the
        # cap / the MLP picks γ*
        self.mode = ("never" if self._settled == 0 else "always" if self._settled else
                     "mlp-gate" if self.max_gamma else "mlp-gamma")

    def expected_tokens(self, context: StepContext) -> np.ndarray:
        """[γmax+1] expected tokens emitted by a step with γ = 0..γmax (for analysis; `choose` inlines it)."""
        probs = self.artifact.acceptance_probs(np.asarray([features(context, self.tier)]))[0]
        return np.concatenate(([1.0], 1.0 + np.cumsum(probs)))

    def choose(self, context: StepContext) -> int:
        if self._settled is not None:
            return self._settled
        x = features(context, self.tier)
        x.append(1.0)
        h = np.dot(x, self._w1)
        np.maximum(h, 0.0, out=h)
        z = np.dot(h, self._w2)
        z += self._b2
        np.tanh(z, out=z)
        np.minimum.accumulate(z, out=z)
        value = np.cumsum(z)
        value += self._offset
        best = int(value.argmax())
        # the cost model's context-length term is the same for every γ, so it cannot change the choice
        if value[best] <= self._value0:
            return 0
        return self.max_gamma or best + 1

    def observe(self, outcome: StepOutcome) -> None:
        pass  # stateless: the StepContext carries the request's running state


def make_adaptive_policy(tier: str, snapshot: ControllerSnapshot | None = None) -> GammaPolicy:
    """A fresh per-request adaptive policy for a tier from a controller snapshot (default: the shipped one)."""
    snapshot = snapshot or shipped_snapshot()
    return AdaptivePolicy(snapshot.artifact, tier)


_shipped: ControllerSnapshot | None = None


def shipped_snapshot() -> ControllerSnapshot:
    """The shipped controller, loaded once per process."""
    global _shipped
    if _shipped is None:
        _shipped = load_snapshot()
    return _shipped

"""The learned γ controller: its artifact (the acceptance predictors), its snapshot (what a router caches)
and the `adaptive` policy.

Model: a small MLP maps features known before drafting (the previous step's draft signals and outcome,
the request's running acceptance, position, tier) to acceptance_probs[k-1] = P(the draft's first k tokens
are all accepted), k = 1..γmax; a per-token logistic model (speckv.signals.DraftStop.token_weights) says,
while the draft runs, how likely each token is to be accepted given the ones before it. Both are about
text and models, not hardware: they are all the artifact holds.

Everything that depends on the machine and the moment is estimated at run time (speckv.estimates): the
step costs (calibrated when the models load, then followed online), an acceptance bias on the predictors
(per request and per tier, greedy and sampled apart) and the decode rate R (tokens per ms) that prices a
millisecond. With them:

    expected_tokens(γ) = 1 + Σ_{k ≤ γ} acceptance_probs[k-1]        (accepted tokens + the bonus/recovered one)
    γ* = argmax_γ expected_tokens(γ) − R · step_ms(γ),   γ ∈ 0..γmax  (0 = no speculation)

This is the long-run-rate (renewal-reward) criterion, with R the rate the request is reaching (Dinkelbach's
iteration toward the best achievable one); maximising each step's own tokens/ms instead under-drafts in
easy stretches. Within the run the draft stops after a token once P(every token so far is accepted) falls
below R · (the marginal ms of one more token): past it, a token costs more time than it is expected to
give. When γ* = γmax the run may go on to 2·γmax, ended by that rule. γ = 0 is never absorbing: after a
stretch of target-only steps a one-token probe drafts again, spaced so probes cost at most 2% of
throughput where drafting never pays, and what it shows updates the estimates.

Inference is plain numpy (a 15x32x8 MLP; torch's per-call overhead would dominate at this size).
Artifact on disk: `controller.safetensors` (weights and feature normalisation) + `controller.json`
(features, token acceptance weights, training summary, version). No pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .estimates import RequestEstimates, TierEstimates
from .models import Tier
from .policy import MAX_GAMMA, GammaPolicy, StepContext, StepOutcome
from .signals import NO_STOP, TOKEN_ACCEPTANCE_FEATURES, DraftStop

ARTIFACT_KIND = "speckv-gamma-controller"
ARTIFACT_FORMAT_VERSION = 3  # 3: acceptance predictors only; costs and decision settings are run-time estimates
READABLE_FORMATS = (2, 3)  # 2 also held one machine's cost models and tuned settings, now ignored
TIERS = tuple(t.value for t in Tier)  # the one tier registry, in its order (FEATURES depend on it)
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
PROBE_SHARE = 0.02  # where drafting never pays, probes cost at most this share of throughput
MIN_PROBE_EVERY = 8  # target-only steps between probes, at least
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
    """A trained controller as plain data: MLP weights, feature normalisation, token acceptance weights."""

    w1: np.ndarray  # [F, H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H, γmax]
    b2: np.ndarray  # [γmax]
    feature_mean: np.ndarray  # [F]
    feature_std: np.ndarray  # [F]
    token_weights: tuple[float, ...] = ()  # DraftStop.token_weights; () = no within-run stop rule
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
        digest.update(json.dumps(list(self.token_weights)).encode())
        return digest.hexdigest()[:12]

    def save(self, out_dir: Path) -> Path:
        """Write controller.safetensors + controller.json into `out_dir`; returns the JSON path."""
        from safetensors.numpy import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.tensors().items()},
                  str(out_dir / "controller.safetensors"))
        meta = {
            "kind": ARTIFACT_KIND, "format_version": ARTIFACT_FORMAT_VERSION, "version": self.version(),
            "features": list(FEATURES), "tiers": list(TIERS), "gamma_max": self.gamma_max,
            "hidden": int(self.w1.shape[1]), "weights": "controller.safetensors",
            "token_weights": list(self.token_weights), **self.metadata,
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
        if meta.get("format_version") not in READABLE_FORMATS or meta.get("features") != list(FEATURES):
            raise ValueError(f"{path}: artifact format {meta.get('format_version')} with features "
                             f"{meta.get('features')} does not match this speckv (formats {READABLE_FORMATS})")
        try:
            t = load_file(str(path.parent / meta["weights"]))
            artifact = cls(t["w1"], t["b1"], t["w2"], t["b2"], t["feature_mean"], t["feature_std"],
                           _token_weights(meta), {k: v for k, v in meta.items() if k in ("training", "trained_at")})
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: incomplete controller artifact: {e}") from None
        f, h = artifact.w1.shape
        if (f != len(FEATURES) or artifact.b1.shape != (h,) or artifact.w2.shape[0] != h
                or artifact.b2.shape != (artifact.gamma_max,)):
            raise ValueError(f"{path}: weight shapes do not match the feature list")
        if artifact.token_weights and len(artifact.token_weights) != len(TOKEN_ACCEPTANCE_FEATURES) + 1:
            raise ValueError(f"{path}: token_weights needs {len(TOKEN_ACCEPTANCE_FEATURES) + 1} values")
        if meta["format_version"] == ARTIFACT_FORMAT_VERSION and artifact.version() != meta.get("version"):
            raise ValueError(f"{path}: weights do not match the recorded version {meta.get('version')!r}")
        return artifact


def _token_weights(meta: dict) -> tuple[float, ...]:
    """The token acceptance weights of an artifact (format 2 kept them in its per-tier stop rules)."""
    if meta["format_version"] >= 3:
        return tuple(float(w) for w in meta.get("token_weights", ()))
    found = [r.get("token_weights") for r in meta.get("draft_stop", {}).values() if r.get("token_weights")]
    return tuple(float(w) for w in found[0]) if found else ()


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
    """γ per step from the learned acceptance predictors and the run-time estimates (module docstring).

    Per request. `choose` is a handful of numpy calls on tiny arrays; whatever depends only on the
    estimates (step prices, the stop rule, the probe spacing) is recomputed in `observe`, once per step."""

    def __init__(self, artifact: ControllerArtifact, tier: str, estimates: TierEstimates, greedy: bool = True) -> None:
        if tier not in TIERS:
            raise ValueError(f"the controller knows tiers {', '.join(TIERS)}, not {tier!r}")
        self.name = "adaptive"
        self.tier = tier
        self.artifact = artifact
        self.estimates = RequestEstimates(estimates, greedy)
        gmax = artifact.gamma_max
        self.run_cap = min(2 * gmax, MAX_GAMMA) if artifact.token_weights else gmax
        w1, b1, mean, std = (np.asarray(x, dtype=np.float64) for x in
                             (artifact.w1, artifact.b1, artifact.feature_mean, artifact.feature_std))
        # the normalisation and the first bias fold into one matrix over [features, 1]
        self._w1 = np.ascontiguousarray(np.vstack([w1 / std[:, None], b1 - (mean / std) @ w1]))  # [F+1, H]
        self._w2 = np.ascontiguousarray(np.asarray(artifact.w2, dtype=np.float64))
        self._b2 = np.asarray(artifact.b2, dtype=np.float64)
        self._gammas = np.arange(gmax + 1)
        self._prior: np.ndarray | None = None  # the MLP's acceptance_probs at the last choice
        self._prior_rate: float | None = None  # before anything is measured (set by the first choice)
        self.draft_stop = NO_STOP
        self._refresh()

    def _refresh(self) -> None:
        """Step prices, the rate, the stop rule and the probe spacing from the current estimates."""
        cost = self.estimates.tier.cost
        price = np.asarray(cost.step_ms(self._gammas, 0), dtype=np.float64)  # [γmax+1]
        self._extra_ms = price[1:] - price[0]  # [γmax] what drafting γ adds to a step
        self._rate = (self.estimates.rate.value or self.estimates.tier.mode(self.estimates.greedy).rate.value
                      or self._prior_rate)
        self._probe_every = max(MIN_PROBE_EVERY, math.ceil(float(self._extra_ms[0]) / (PROBE_SHARE * price[0])))
        self._stop = NO_STOP
        if self.artifact.token_weights and self._rate:
            *w, b = self.artifact.token_weights
            marginal = float(self._extra_ms[-1]) / len(self._extra_ms)  # ms of one more drafted token
            self._stop = DraftStop(0.0, min(1.0, self._rate * marginal), (*w, b + self.estimates.bias.value))

    def _acceptance(self, x: list[float]) -> np.ndarray:
        """[γmax] P(first k tokens accepted): the MLP's prior (kept for `observe`), this request's bias applied
        to each token's conditional acceptance."""
        x = [*x, 1.0]
        h = np.dot(x, self._w1)
        np.maximum(h, 0.0, out=h)
        z = np.dot(h, self._w2)
        z += self._b2
        probs = np.minimum.accumulate(1.0 / (1.0 + np.exp(-z)))
        self._prior = probs
        bias = self.estimates.bias.value
        if bias == 0.0:
            return probs
        odds = _conditional(probs) / np.maximum(1.0 - _conditional(probs), 1e-9) * math.exp(bias)
        return np.cumprod(odds / (1.0 + odds))

    def choose(self, context: StepContext) -> int:
        accepted = self._acceptance(features(context, self.tier))
        if self._rate is None:  # nothing measured yet: the best one-step rate under the prior
            price0 = float(self.estimates.tier.cost.step_ms(0))
            self._prior_rate = float(max(1.0 / price0, ((1.0 + np.cumsum(accepted)) / (price0 + self._extra_ms)).max()))
            self._refresh()
        gain = np.cumsum(accepted)
        gain -= self._rate * self._extra_ms
        best = int(gain.argmax())
        tier = self.estimates.tier
        if gain[best] > 0.0:
            tier.target_only_steps = 0
            self.draft_stop = self._stop
            return self.run_cap if best + 1 == len(gain) else best + 1
        tier.target_only_steps += 1
        if tier.target_only_steps >= self._probe_every:  # γ = 0 is never absorbing
            tier.target_only_steps = 0
            self.draft_stop = NO_STOP
            return 1
        return 0

    def observe(self, outcome: StepOutcome) -> None:
        if outcome.gamma and self._prior is not None:  # each drafted token's acceptance event, until a rejection
            seen = min(outcome.accepted + 1, outcome.gamma, len(self._prior))
            self.estimates.observe_acceptance(_conditional(self._prior)[:seen].tolist(),
                                              [k < outcome.accepted for k in range(seen)])
        if outcome.timing is not None:
            t = outcome.timing
            self.estimates.observe_step(outcome.gamma, t.emitted, t.draft_ms, t.verify_ms, t.context_len)
        self._refresh()

    def report(self) -> dict:
        """This request's current estimates (the response's `speculation.estimates`)."""
        return self.estimates.to_dict()


def _conditional(probs: np.ndarray) -> np.ndarray:
    """[γmax] P(token k accepted | tokens 1..k-1 were) from P(first k all accepted)."""
    return probs / np.concatenate(([1.0], probs[:-1]))


def make_adaptive_policy(tier: str, estimates: TierEstimates, snapshot: ControllerSnapshot | None = None,
                         greedy: bool = True) -> GammaPolicy:
    """A fresh per-request adaptive policy for a tier from its estimates and a controller snapshot
    (default: the shipped one)."""
    snapshot = snapshot or shipped_snapshot()
    return AdaptivePolicy(snapshot.artifact, tier, estimates, greedy)


_shipped: ControllerSnapshot | None = None


def shipped_snapshot() -> ControllerSnapshot:
    """The shipped controller, loaded once per process."""
    global _shipped
    if _shipped is None:
        _shipped = load_snapshot()
    return _shipped

"""The learned acceptance predictor: what `adaptive` knows of text and models, trained offline and shipped
as an artifact (speckv.adaptive turns it into decisions with this machine's run-time estimates).

Model: a small MLP maps features known before drafting (the previous step's draft signals and outcome,
the request's running acceptance, position, tier) to acceptance_probs[k-1] = P(the draft's first k tokens
are all accepted), k = 1..γmax; a per-token logistic model (speckv.signals.DraftStop.token_weights) says,
while the draft runs, how likely each token is to be accepted given the ones before it. Both are about
text and models, not hardware: they are all the artifact holds.

Artifact on disk: `predictor.safetensors` (weights and feature normalisation) + `predictor.json` (features,
token acceptance weights, training summary, version); artifacts written as `controller.*` before the rename
load too. No pickle. Inference is plain numpy (a 15x32x8 MLP; torch's per-call overhead would dominate).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .models import Tier
from .policy import StepContext
from .signals import TOKEN_ACCEPTANCE_FEATURES

ARTIFACT_KIND = "speckv-gamma-controller"  # the file format's name, unchanged since format 1
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
SHIPPED_DIR = Path(__file__).parent / "data"
SHIPPED = SHIPPED_DIR / "predictor.json"
LEGACY_NAME = "controller.json"  # what artifacts were called before the predictor had its own name


def features(context: StepContext, tier: str) -> list[float]:
    """The predictor's input for one decision, in FEATURES order (one home for training and inference)."""
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
class AcceptancePredictor:
    """The trained predictor as plain data: MLP weights, feature normalisation, token acceptance weights."""

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
        """Write predictor.safetensors + predictor.json into `out_dir`; returns the JSON path."""
        from safetensors.numpy import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.tensors().items()},
                  str(out_dir / "predictor.safetensors"))
        meta = {
            "kind": ARTIFACT_KIND, "format_version": ARTIFACT_FORMAT_VERSION, "version": self.version(),
            "features": list(FEATURES), "tiers": list(TIERS), "gamma_max": self.gamma_max,
            "hidden": int(self.w1.shape[1]), "weights": "predictor.safetensors",
            "token_weights": list(self.token_weights), **self.metadata,
        }
        path = out_dir / SHIPPED.name
        path.write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> AcceptancePredictor:
        """Load from predictor.json (or the directory holding it, or a legacy controller.json). Raises ValueError
        naming the problem."""
        from safetensors.numpy import load_file

        path = Path(path)
        if path.is_dir():
            path = path / SHIPPED.name if (path / SHIPPED.name).exists() else path / LEGACY_NAME
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read predictor artifact {path}: {e}") from None
        if not isinstance(meta, dict) or meta.get("kind") != ARTIFACT_KIND:
            raise ValueError(f"{path} is not a SpecKV acceptance predictor artifact (kind {meta.get('kind')!r})"
                             if isinstance(meta, dict) else f"{path} is not a JSON object")
        if meta.get("format_version") not in READABLE_FORMATS or meta.get("features") != list(FEATURES):
            raise ValueError(f"{path}: artifact format {meta.get('format_version')} with features "
                             f"{meta.get('features')} does not match this speckv (formats {READABLE_FORMATS})")
        try:
            t = load_file(str(path.parent / meta["weights"]))
            artifact = cls(t["w1"], t["b1"], t["w2"], t["b2"], t["feature_mean"], t["feature_std"],
                           _token_weights(meta), {k: v for k, v in meta.items() if k in ("training", "trained_at")})
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: incomplete predictor artifact: {e}") from None
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


def load_predictor(path: str | Path | None = None) -> AcceptancePredictor:
    """Load a predictor artifact; with no path, the one shipped with speckv (trained on the default pair)."""
    return AcceptancePredictor.load(path or SHIPPED)


_shipped: AcceptancePredictor | None = None


def shipped_predictor() -> AcceptancePredictor:
    """The shipped predictor, loaded once per process."""
    global _shipped
    if _shipped is None:
        _shipped = load_predictor()
    return _shipped

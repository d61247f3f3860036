"""Build the SpecKV Serve application from its config (never at import).

`serve run serve_config.yaml` calls `build_app(args)`; tests call it with a config dict and `serve.run`.
Per-deployment Serve settings (replicas, autoscaling, resources) live in serve_config.yaml under the
deployment names: `router`, `controller`, `draft`, `target-<tier>`.
"""

from __future__ import annotations

from ray.serve import Application

from .config import AppConfig, target_deployment_name
from .controller import ControllerDeployment
from .router import RouterDeployment
from .workers import DraftDeployment, TargetDeployment, WorkerSpec


def build_app(args: dict | None = None) -> Application:
    config = AppConfig.model_validate(args or {})
    common = dict(device=config.device, max_sessions=config.max_sessions_per_replica,
                  max_kv_bytes=None if config.kv_cache_mib is None else int(config.kv_cache_mib * 2**20),
                  max_batch_size=config.max_batch_size,
                  idle_timeout_s=config.session_idle_timeout_s, torch_threads=config.torch_threads,
                  calibration_budget_s=config.calibration_budget_s)
    delay = config.added_ms_per_call.get
    draft_spec = WorkerSpec(model=config.draft_model, dtype=config.draft_dtype, added_ms_per_call=delay("draft", 0.0),
                            **common)
    colocated = config.topology == "colocated"
    opts = lambda name: config.deployment_options.get(name, {})  # noqa: E731
    targets = {
        tier.value: TargetDeployment.options(
            name=target_deployment_name(tier), **opts(target_deployment_name(tier))
        ).bind(
            WorkerSpec(model=config.target_model, tier=tier.value, dtype=config.dtype,
                       added_ms_per_call=delay(target_deployment_name(tier), 0.0), **common),
            draft_spec if colocated else None,
        )
        for tier in config.tiers
    }
    draft = None if colocated else DraftDeployment.options(**opts("draft")).bind(draft_spec)
    controller = ControllerDeployment.options(**opts("controller")).bind(config.predictor)
    return RouterDeployment.options(**opts("router")).bind(config.model_dump(mode="json"), targets, controller, draft)

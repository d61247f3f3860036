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
                  calibration_budget_s=config.calibration_budget_s, share_cores=config.share_cores)
    delay = config.added_ms_per_call.get
    draft_spec = WorkerSpec(model=config.draft_model, dtype=config.draft_dtype, added_ms_per_call=delay("draft", 0.0),
                            **common)
    colocated = config.topology == "colocated"
    opts = lambda name: config.deployment_options.get(name, {})  # noqa: E731
    model_opts = lambda name: model_replica_options(config, opts(name))  # noqa: E731
    targets = {
        tier.value: TargetDeployment.options(
            name=target_deployment_name(tier), **model_opts(target_deployment_name(tier))
        ).bind(
            WorkerSpec(model=config.target_model, tier=tier.value, dtype=config.dtype,
                       added_ms_per_call=delay(target_deployment_name(tier), 0.0), **common),
            draft_spec if colocated else None,
        )
        for tier in config.tiers
    }
    draft = None if colocated else DraftDeployment.options(**model_opts("draft")).bind(draft_spec)
    controller = ControllerDeployment.options(**opts("controller")).bind(config.predictor)
    return RouterDeployment.options(**opts("router")).bind(config.model_dump(mode="json"), targets, controller, draft)


def model_replica_options(config: AppConfig, options: dict) -> dict:
    """Serve options of a model replica: what the config gives, with two rules filled in or checked.
    Resources are honest: on CPU a replica asks Ray for the cores its torch threads use (`torch_threads`),
    so Ray never places more model replicas on a node than its cores run at once. And a replica takes at
    least a whole batch of calls at once (`@serve.batch` gathers only the calls in flight)."""
    out = dict(options)
    actor = dict(out.get("ray_actor_options") or {})
    if "num_cpus" not in actor and config.torch_threads and (config.device or "cpu").startswith("cpu"):
        actor["num_cpus"] = config.torch_threads
    if actor:
        out["ray_actor_options"] = actor
    ongoing = out.get("max_ongoing_requests")
    if ongoing is not None and ongoing < config.max_batch_size:
        raise ValueError(f"max_ongoing_requests {ongoing} is below max_batch_size {config.max_batch_size}: a "
                         "replica would never gather a whole batch")
    return out

"""Build the SpecKV Serve application from its config (never at import).

`serve run serve_config.yaml` calls `build_app(args)`; tests call it with a config dict and `serve.run`.
Per-deployment Serve settings (replicas, autoscaling, resources) live in serve_config.yaml under the
deployment names: `router`, `controller`, `draft`, `target-<tier>`.
"""

from __future__ import annotations

import logging

from ray.serve import Application

from .autoscaling import POLICY as AUTOSCALING_POLICY
from .config import AppConfig, target_deployment_name
from .controller import ControllerDeployment
from .router import RouterDeployment
from .workers import DraftDeployment, TargetDeployment, WorkerSpec

logger = logging.getLogger("ray.serve")


def build_app(args: dict | None = None) -> Application:
    config = AppConfig.model_validate(args or {})
    cluster_gpus = _cluster_gpus()
    if config.share_cores and _on_cuda(config, cluster_gpus):
        logger.info("share_cores is off: the model replicas run on CUDA, and the turns it takes are for CPU cores")
        config = config.model_copy(update={"share_cores": False})
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
    gpu_share = _gpu_share(config, len(config.tiers) + (0 if colocated else 1), cluster_gpus)
    if gpu_share and not cluster_gpus:
        logger.warning("device %s, but the Ray cluster has no GPU now: the model replicas wait for one (an "
                       "autoscaler may add it)", config.device)
    model_opts = lambda name: model_replica_options(config, opts(name), gpu_share)  # noqa: E731
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


def _cluster_gpus() -> float:
    """GPUs in the Ray cluster the app is being built for (0 where Ray is not running here)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def _on_cuda(config: AppConfig, cluster_gpus: float) -> bool:
    """Whether the model replicas are to run on CUDA: `device: cuda`, or no device named and the cluster has GPUs."""
    return config.device.startswith("cuda") if config.device else cluster_gpus > 0


def _gpu_share(config: AppConfig, model_deployments: int, cluster_gpus: float) -> float | None:
    """The GPU share each model replica asks Ray for where the operator named none: where the replicas are to run on
    CUDA (`device: cuda`, or no device named and the cluster has GPUs), one GPU split evenly between the model
    deployments; None on CPU. A replica that asks for no GPU is placed by its CPUs alone: on a cluster whose GPUs
    are on some nodes it may land on one without and load its model on the CPU without a word, and where it does
    reach a GPU, Ray does not count it. (Ray 2.60 leaves an actor that asks for no GPU its CUDA_VISIBLE_DEVICES;
    earlier Rays, and RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1, hide every GPU from it.)"""
    return round(1.0 / model_deployments, 4) if _on_cuda(config, cluster_gpus) else None


def model_replica_options(config: AppConfig, options: dict, gpu_share: float | None = None) -> dict:
    """Serve options of a model replica: what the config gives, with three rules filled in or checked.
    Resources are honest: on CPU a replica asks Ray for the cores its torch threads use (`torch_threads`),
    so Ray never places more model replicas on a node than its cores run at once; on CUDA it asks for
    `gpu_share` of a GPU (`_gpu_share`) unless the options name a `num_gpus`. A replica takes at least a
    whole batch of calls at once (`@serve.batch` gathers only the calls in flight). And it scales by the
    requests it serves, not by the handle calls that carry them (deployments.autoscaling), unless the
    options name a policy."""
    out = dict(options)
    scaling = out.get("autoscaling_config")
    if isinstance(scaling, dict) and "policy" not in scaling:
        out["autoscaling_config"] = {**scaling, "policy": {"policy_function": AUTOSCALING_POLICY}}
    actor = dict(out.get("ray_actor_options") or {})
    if "num_cpus" not in actor and config.torch_threads and (config.device or "cpu").startswith("cpu"):
        actor["num_cpus"] = config.torch_threads
    if "num_gpus" not in actor and gpu_share:
        actor["num_gpus"] = gpu_share
    if actor:
        out["ray_actor_options"] = actor
    ongoing = out.get("max_ongoing_requests")
    if ongoing is not None and ongoing < config.max_batch_size:
        raise ValueError(f"max_ongoing_requests {ongoing} is below max_batch_size {config.max_batch_size}: a "
                         "replica would never gather a whole batch")
    return out

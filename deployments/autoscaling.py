"""How a model deployment scales: by the requests its replicas serve, as they report them.

Serve's default policy counts the calls in flight per replica. The router sends a replica one handle call for
all its requests' calls of a step (deployments.grouping), so that count is no longer the load: eight requests in
one call would read as one, and a tier would never scale out. Each model replica reports the requests it serves
instead (`record_autoscaling_stats`: sessions whose caches it used in the last few seconds,
speckv.workers.SessionLM.active_sessions), and `sessions_policy` asks for as many replicas as they need at
`target_ongoing_requests` each (a replica is full at a whole batch). Serve applies the config's bounds, delays and
scaling factors around it, and brings a tier up from zero on the first calls queued for it.

build_app sets it on every model deployment whose autoscaling config names no policy; a Serve config file that
gives a deployment an `autoscaling_config` replaces the app's, so it names it there (serve_config.yaml).
"""

from __future__ import annotations

from typing import Any

SESSIONS_METRIC = "sessions"
POLICY = f"{__name__}:sessions_policy"


def sessions_policy(ctx: Any) -> tuple[float, dict]:
    """Replicas wanted: the sessions the replicas report over `target_ongoing_requests`. Before any replica has
    reported (starting), Serve's own count of calls in flight stands in. `ctx`: ray.serve.config.AutoscalingContext."""
    if ctx.current_num_replicas == 0:  # Serve's cold start brings it up on the first queued call
        return ctx.target_num_replicas, {}
    reported = (ctx.aggregated_metrics or {}).get(SESSIONS_METRIC) or {}
    load = sum(reported.values()) if reported else ctx.total_num_requests
    return load / ctx.config.get_target_ongoing_requests(), {}

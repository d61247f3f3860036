"""deployments.autoscaling: a model deployment's replicas wanted, from the sessions its replicas report."""

from __future__ import annotations

from types import SimpleNamespace

from deployments.autoscaling import SESSIONS_METRIC, sessions_policy


def _ctx(replicas: int, reported: dict | None, calls: float = 0.0, target: float = 8.0, wanted: int = 1):
    config = SimpleNamespace(get_target_ongoing_requests=lambda: target)
    metrics = None if reported is None else {SESSIONS_METRIC: reported, "other": {"r1": 100.0}}
    return SimpleNamespace(current_num_replicas=replicas, target_num_replicas=wanted, aggregated_metrics=metrics,
                           total_num_requests=calls, config=config)


def test_replicas_wanted_are_the_sessions_reported_over_the_target():
    # eight requests' calls in one grouped handle call: Serve counts 1 in flight; the replicas report 20 sessions
    assert sessions_policy(_ctx(2, {"r1": 12.0, "r2": 8.0}, calls=1.0))[0] == 20 / 8
    assert sessions_policy(_ctx(2, {"r1": 0.0, "r2": 0.0}, calls=0.0))[0] == 0


def test_before_any_replica_reports_the_calls_in_flight_stand_in_and_zero_replicas_are_left_to_cold_start():
    assert sessions_policy(_ctx(1, None, calls=4.0))[0] == 0.5
    assert sessions_policy(_ctx(1, {}, calls=16.0))[0] == 2
    assert sessions_policy(_ctx(0, None, calls=3.0, wanted=1))[0] == 1

"""The application builder's rules for model replicas (deployments/app.py)."""

import pytest

from deployments.app import model_replica_options
from deployments.config import AppConfig


def test_a_cpu_replica_asks_for_the_cores_its_threads_use():
    config = AppConfig(torch_threads=2)
    assert model_replica_options(config, {})["ray_actor_options"] == {"num_cpus": 2}
    given = {"ray_actor_options": {"num_cpus": 0.5, "resources": {"x": 1}}}
    assert model_replica_options(config, given) == given  # what the operator wrote stands
    assert "ray_actor_options" not in model_replica_options(AppConfig(torch_threads=2, device="cuda"), {})


def test_a_replica_must_take_a_whole_batch_of_calls():
    with pytest.raises(ValueError, match="below max_batch_size"):
        model_replica_options(AppConfig(max_batch_size=8), {"max_ongoing_requests": 4})
    assert model_replica_options(AppConfig(max_batch_size=4), {"max_ongoing_requests": 4})

"""The application across several Ray nodes on this machine: each tier's replicas on the node that
advertises its resource, a request served, then that node killed and the request path recovering."""

from __future__ import annotations

import time

import httpx
import pytest

from speckv.models import DEFAULT_TARGET, resolve_model_dir

from .serve_helpers import apply_ray_env, free_port, ray_temp_root, save_tiny_pair

pytestmark = pytest.mark.serve


def test_tiers_on_their_nodes_and_node_loss(tmp_path):
    apply_ray_env()
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import build_app

    target, draft = save_tiny_pair(tmp_path, resolve_model_dir(DEFAULT_TARGET))
    port = free_port()
    with ray_temp_root():
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 4, "resources": {"speckv_cpu": 100}, "include_dashboard": False})
            fp16_nodes = [cluster.add_node(num_cpus=2, resources={"speckv_fp16": 100}) for _ in range(2)]
            quant_node = cluster.add_node(num_cpus=2, resources={"speckv_quant": 100})
            ray.init(address=cluster.address)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            place = lambda resource: {"ray_actor_options": {"num_cpus": 0.1, "resources": {resource: 1}}}  # noqa: E731
            config = {
                "draft_model": draft, "target_model": target, "tiers": ["fp16", "int8"], "dtype": "float32",
                "draft_dtype": "float32", "torch_threads": 1,
                "deployment_options": {"router": place("speckv_cpu"), "controller": place("speckv_cpu"),
                                       "draft": place("speckv_cpu"), "target-fp16": place("speckv_fp16"),
                                       "target-int8": place("speckv_quant")},
            }
            serve.run(build_app(config), name="speckv", route_prefix="/")

            def node_of(deployment: str) -> str:
                return serve.get_deployment_handle(deployment, "speckv").stats.remote().result()["node"]

            fp16_ids = {n.node_id for n in fp16_nodes}
            first = node_of("target-fp16")
            assert first in fp16_ids
            assert node_of("target-int8") == quant_node.node_id
            assert node_of("draft") == cluster.head_node.node_id

            body = {"model": "speckv-fp16", "prompt": "def add(a, b):", "max_tokens": 20, "temperature": 0,
                    "speculation": {"policy": "fixed", "gamma": 2}}
            url = f"http://127.0.0.1:{port}/v1/completions"
            answer = httpx.post(url, json=body, timeout=120)
            assert answer.status_code == 200, answer.text
            assert answer.json()["speculation"]["draft_tokens"] > 0
            expected = answer.json()["choices"][0]["text"]
            int8 = httpx.post(url, json={**body, "model": "speckv-int8"}, timeout=120)
            assert int8.status_code == 200, int8.text

            # lose the node that holds the fp16 target: Serve reschedules the replica on the other fp16 node
            cluster.remove_node(next(n for n in fp16_nodes if n.node_id == first))
            start = time.time()
            again = httpx.post(url, json=body, timeout=300)
            assert again.status_code == 200, again.text
            assert again.json()["choices"][0]["text"] == expected
            assert node_of("target-fp16") == ({*fp16_ids} - {first}).pop()
            assert time.time() - start < 240
        finally:
            serve.shutdown()
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()

"""Offline validation of the KubeRay manifests: CRD schema (closed), Serve schema (strict), placement."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml

from cluster.render import REPO, render, strict_serve_schema

from ..conftest import SHARED

CRDS = SHARED / "k8s"


def closed(schema):
    """Copy of an OpenAPI v3 schema with additionalProperties: false wherever properties are listed, and
    Kubernetes' int-or-string extension spelled in JSON Schema, so misspelled fields fail validation."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    open_ended = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not open_ended:
        out["additionalProperties"] = False
    return out


def crd_validator(kind_file: str):
    import jsonschema

    crd = yaml.safe_load((CRDS / kind_file).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(closed(version["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load((REPO / "cluster" / "rayservice.yaml").read_text())


def test_rayservice_is_rendered_from_serve_config():
    """rayservice.yaml is exactly what render.py makes from serve_config.yaml: the two cannot drift."""
    assert (REPO / "cluster" / "rayservice.yaml").read_text() == render()
    proc = subprocess.run([sys.executable, "cluster/render.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_rayservice_matches_kuberay_crd(manifest):
    validator = crd_validator("ray.io_rayservices.yaml")
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, errors


def test_crd_validation_catches_misspelled_fields(manifest):
    validator = crd_validator("ray.io_rayservices.yaml")
    bad = copy.deepcopy(manifest)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert any("minReplica" in e.message for e in validator.iter_errors(bad))
    bad = copy.deepcopy(manifest)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicey"] = "x"
    assert list(validator.iter_errors(bad))


def test_serve_config_v2_parses_strictly(manifest):
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    strict_serve_schema(config)
    bad = copy.deepcopy(config)
    bad["applications"][0]["deployments"][0]["max_ongoing_request"] = 3
    with pytest.raises(ValueError, match="max_ongoing_request"):
        strict_serve_schema(bad)
    bad = copy.deepcopy(config)
    bad["applications"][0]["args"]["tierz"] = ["fp16"]
    with pytest.raises(Exception, match="tierz"):
        strict_serve_schema(bad)
    strict_serve_schema(yaml.safe_load((REPO / "serve_config.yaml").read_text()))


def test_each_tier_lands_on_its_worker_group(manifest):
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    groups = {}
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        groups[group["groupName"]] = json.loads(json.loads(group["rayStartParams"]["resources"]))
    advertised = {r: g for g, res in groups.items() for r in res}
    expected = {"router": "cpu", "controller": "cpu", "draft": "gpu-shared", "target-fp16": "gpu-fp16",
                "target-int8": "gpu-shared", "target-nf4": "gpu-shared"}
    for name, group in expected.items():
        resources = deployments[name]["ray_actor_options"]["resources"]
        assert [advertised[r] for r in resources] == [group], name
    assert deployments["target-fp16"]["ray_actor_options"]["num_gpus"] == 1
    for tier in ("int8", "nf4"):  # rarely used tiers scale to zero
        assert deployments[f"target-{tier}"]["autoscaling_config"]["min_replicas"] == 0
    assert manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_security_defaults(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for t in templates:
        assert t["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in t["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["resources"]["limits"] and c["resources"]["requests"]
            assert c["readinessProbe"] and c["livenessProbe"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert manifest["spec"]["serveService"]["spec"]["type"] == "ClusterIP"

"""The application builder's rules for model replicas (deployments/app.py)."""

from types import SimpleNamespace

import pytest

from deployments.app import build_app, model_replica_options
from deployments.config import AppConfig
from deployments.workers import DraftDeployment, TargetDeployment, WorkerSpec
from speckv.batching import Batcher, BatchSettings
from speckv.workers import draft_session, verify_session


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


def _model_specs(app) -> dict:
    """deployment name -> the WorkerSpec(s) its replicas are built from."""
    router = app._bound_deployment
    _, targets, _, draft = router.init_args
    specs = {d._bound_deployment.name: d._bound_deployment.init_args for d in [*targets.values(), draft] if d}
    return {name: [a for a in args if isinstance(a, WorkerSpec)] for name, args in specs.items()}


@pytest.mark.parametrize("topology", ["disaggregated", "colocated"])
def test_share_cores_reaches_every_model_replica(topology):
    for share in (True, False):
        specs = _model_specs(build_app({"share_cores": share, "tiers": ["fp16", "nf4"], "topology": topology}))
        assert set(specs) == {"target-fp16", "target-nf4"} | ({"draft"} if topology == "disaggregated" else set())
        assert all(s.share_cores is share for group in specs.values() for s in group)


def test_share_cores_is_off_where_the_models_run_on_cuda(monkeypatch):
    """`share_cores` makes the model replicas take turns for a machine's CPU cores; on a GPU machine
    serve_config.yaml as shipped (share_cores: true, no device named) must not serialise the GPU's passes: off for
    every model replica and the router where the replicas run on CUDA, on where the CPU is asked for."""
    import deployments.app as app_module

    def shares(args: dict) -> set[bool]:
        app = build_app({"share_cores": True, "tiers": ["fp16"], **args})
        router_config = app._bound_deployment.init_args[0]
        return {s.share_cores for group in _model_specs(app).values() for s in group} | {router_config["share_cores"]}

    assert shares({"device": "cuda"}) == {False}
    monkeypatch.setattr(app_module, "_cluster_gpus", lambda: 1.0)
    assert shares({}) == {False}  # no device named, a cluster with a GPU
    assert shares({"device": "cpu"}) == {True}  # the CPU asked for on a GPU machine


def test_a_replica_on_shared_cores_regroups_its_verify_passes_for_up_to_one_pass():
    """Where the replicas share the cores, a verify pass waits for the last pass's sessions still drafting
    for up to one calibrated single pass (what a split pass would cost); where they do not, Serve's batching
    gathers the calls and nothing regroups."""
    calibration = {"rows": [{"tokens": 1, "sequences": 1, "ms": 1600.0}, {"tokens": 2, "sequences": 1, "ms": 1700.0}]}
    shared = WorkerSpec("m", share_cores=True).batching(calibration)
    assert shared.regroup_s == pytest.approx(1.6) and shared.handover_s == pytest.approx(0.08)
    assert WorkerSpec("m").batching(calibration).regroup_s == 0


def test_a_draft_on_shared_cores_regroups_for_the_spread_of_a_pass_through_the_router_only():
    """The draft waits for the sessions of its last drafting pass only as long as a whole pass's calls take to come
    through the router a handover apart: a session that did not come back waits at the target, which waits for
    the drafting ones, so a pass's fixed cost as the bound made both wait it out."""
    calibration = {"rows": [{"tokens": 1, "sequences": 1, "ms": 1600.0}]}
    draft = WorkerSpec("m", share_cores=True).draft_batching(calibration)
    assert draft.regroup_s == pytest.approx(8 * 0.08) and draft.handover_s == pytest.approx(0.08)
    cheap = {"rows": [{"tokens": 1, "sequences": 1, "ms": 20.0}]}  # a GPU-like pass: the pass is the bound
    assert WorkerSpec("m", share_cores=True).draft_batching(cheap).regroup_s == pytest.approx(0.02)
    assert WorkerSpec("m").draft_batching(calibration).regroup_s == 0


def test_closing_a_session_stops_the_target_waiting_for_it():
    replica = TargetDeployment.func_or_class.__new__(TargetDeployment.func_or_class)
    replica.worker, replica.draft = SimpleNamespace(lm=SimpleNamespace(close=lambda sid: None)), None
    replica._verify = Batcher(lambda calls: calls, BatchSettings(regroup_s=1.0), session=verify_session)
    replica._verify._expected = {"ended", "running"}
    replica.close("ended")
    assert replica._verify._expected == {"running"}


def test_closing_a_session_stops_the_draft_waiting_for_it():
    """A served draft on shared cores regroups its drafting passes by session: a request that ended is forgotten,
    so the next drafting pass does not wait for it."""
    replica = DraftDeployment.func_or_class.__new__(DraftDeployment.func_or_class)
    replica.worker = SimpleNamespace(lm=SimpleNamespace(close=lambda sid: None))
    replica._propose = Batcher(lambda calls: calls, BatchSettings(regroup_s=1.0), session=draft_session)
    replica._propose._expected = {"ended", "running"}
    replica.close("ended")
    assert replica._propose._expected == {"running"}



def test_a_cuda_replica_asks_for_a_share_of_a_gpu_where_the_operator_named_none():
    """Ray hides the GPUs from an actor that asks for none, so a model replica meant for CUDA must ask: one GPU split
    between the model deployments, where the device is cuda or unnamed on a cluster with GPUs; never on CPU, and
    never over what the operator wrote."""
    from deployments.app import _gpu_share

    four = 4  # draft + three tiers
    assert _gpu_share(AppConfig(device="cuda"), four, cluster_gpus=0) == 0.25
    assert _gpu_share(AppConfig(), four, cluster_gpus=1) == 0.25
    assert _gpu_share(AppConfig(), four, cluster_gpus=0) is None  # a CPU machine
    assert _gpu_share(AppConfig(device="cpu"), four, cluster_gpus=8) is None  # CPU asked for on a GPU machine
    config = AppConfig(device="cuda:0", torch_threads=2)
    assert model_replica_options(config, {}, 0.25)["ray_actor_options"] == {"num_gpus": 0.25}
    given = {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}
    assert model_replica_options(config, given, 0.25) == given
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        AppConfig(device="gpu")


def test_serve_run_on_a_gpu_machine_puts_every_model_replica_on_the_gpu(monkeypatch):
    """build_app where the Ray cluster has a GPU and the config names no device (serve_config.yaml as shipped): every
    model deployment asks for its share, the router and controller for none."""
    import deployments.app as app_module

    monkeypatch.setattr(app_module, "_cluster_gpus", lambda: 1.0)
    router = build_app({"tiers": ["fp16", "nf4"]})._bound_deployment
    _, targets, controller, draft = router.init_args
    shares = {d._bound_deployment.name: d._bound_deployment.ray_actor_options.get("num_gpus")
              for d in [*targets.values(), draft]}
    assert set(shares) == {"target-fp16", "target-nf4", "draft"}
    assert all(v == pytest.approx(1 / 3, abs=1e-3) for v in shares.values()), shares
    assert not (router.ray_actor_options or {}).get("num_gpus")
    assert not (controller._bound_deployment.ray_actor_options or {}).get("num_gpus")


def test_model_replicas_scale_by_the_sessions_they_report():
    """The router groups its requests' calls into one handle call per replica (deployments.grouping), so Serve's
    count of calls in flight is not the load: every model replica that autoscales does so by the sessions it
    reports (deployments.autoscaling), in the app's options, in serve_config.yaml (whose autoscaling config
    replaces the app's) and in the cluster's config rendered from it; a policy the operator names stands."""
    import yaml

    from cluster.render import REPO, render
    from deployments.autoscaling import POLICY

    given = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}
    assert model_replica_options(AppConfig(), given)["autoscaling_config"]["policy"] == {"policy_function": POLICY}
    named = {"autoscaling_config": {"max_replicas": 2, "policy": {"policy_function": "mine:policy"}}}
    assert model_replica_options(AppConfig(), named) == named
    assert "autoscaling_config" not in model_replica_options(AppConfig(), {})

    rendered = yaml.safe_load(yaml.safe_load(render())["spec"]["serveConfigV2"])
    for config in (yaml.safe_load((REPO / "serve_config.yaml").read_text()), rendered):
        models = [d for d in config["applications"][0]["deployments"] if d["name"] not in ("router", "controller")]
        assert models and all(d["autoscaling_config"]["policy"]["policy_function"] == POLICY for d in models), models

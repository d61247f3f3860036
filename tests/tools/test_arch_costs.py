"""The architecture cost tool (run on a lent GPU, where weights cannot travel) on a tiny pair, on CPU."""

import json

import torch

from speckv import attention
from speckv.models import DEFAULT_TARGET, prepare_device, resolve_model_dir
from speckv.tools.arch_costs import main

from ..deployments.serve_helpers import save_tiny_pair


def test_measures_a_pair_from_its_configs_and_checks_exactness(tmp_path, monkeypatch):
    target, draft = save_tiny_pair(tmp_path, resolve_model_dir(DEFAULT_TARGET))
    monkeypatch.setenv("SPECKV_HOME", str(tmp_path / "home"))  # calibrations of this test's own
    out = tmp_path / "costs.json"
    common = [f"{draft}/config.json", f"{target}/config.json", target]
    ran = set()
    for name in ("packed_attention", "padded_attention"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _real=real, _name=name, **k: ran.add(_name) or _real(*a, **k))
    assert main([*common, str(out), "--device", "cpu", "--dtype", "float32", "--budget-s", "2", "--tokens", "12",
                 "--loads", "1,3", "--load-policies", "none,fixed:2", "--attention", "both"]) == 0
    assert attention.ONE_CALL_DEVICES == frozenset()  # put back after the runs in one call
    assert ran == {"packed_attention", "padded_attention"}
    doc = json.loads(out.read_text())
    assert doc["cost_model"]["verify_ms_base"] > 0 and doc["cost_model"]["draft_ms_per_token"] > 0
    live = {r["policy"]: r for r in doc["live"]}
    assert set(live) == {"none", "fixed:1", "fixed:4", "fixed:8", "adaptive"}
    assert set(live["none"]["by_gamma"]) == {"0"} and "4" in live["fixed:4"]["by_gamma"]
    assert {(r["load"], r["policy"], r["attention"]) for r in doc["loads"]} == {
        (n, p, a) for n in (1, 3) for p in ("none", "fixed:2") for a in ("one call", "per row")}
    loads = {(r["load"], r["policy"]): r for r in doc["loads"] if r["attention"] == "per row"}
    assert loads[(3, "none")]["sequences_per_pass"] > 2  # the three requests shared their passes
    assert {(p["sequences"], p["gamma"]) for p in loads[(3, "fixed:2")]["verify_passes"]} >= {(3, 2)}
    assert all(p["predicted_ms"] > 0 for r in doc["loads"] for p in r["verify_passes"])
    assert main([*common, str(tmp_path / "exact.json"), "--device", "cpu", "--tokens", "16", "--exactness"]) == 0
    exact = json.loads((tmp_path / "exact.json").read_text())
    assert exact["identical"] and set(exact["drafts"]) == {"own", "target's"}
    assert all(len(d["batched"]["fixed:3"]) == 4 for d in exact["drafts"].values())


def test_cuda_loses_cudnn_attention_and_nothing_else_changes(monkeypatch):
    """cuDNN's attention plans per key length cost 35 ms a decode step on an H200 (docs/results/gpu)."""
    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda on: calls.append(on))
    prepare_device("cpu")
    assert calls == []
    prepare_device("cuda:0")
    assert calls == [False]

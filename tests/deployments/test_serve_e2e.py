"""End to end: `serve run` of serve_config.yaml on the default pair, called with the official openai client.

The config is the shipped one with three test settings: a free HTTP port, an API key (so the server that
answers is surely the one started here: a developer's `make serve` has no such key) and, for `adaptive`,
a predictor certain of acceptance. Certain acceptance alone does not make drafting pay: on an AVX2 EPYC a
drafted token costs 66 ms of the draft and 117 ms more of the fp16 verify pass, more than the 166 ms pass it
would save, so `adaptive` there rightly never drafts. The server and the CLI therefore run with their own
SPECKV_HOME (the prepared models linked into it, the other calibrations copied) holding an fp16
calibration in which drafting pays, so adaptive drafts whatever this CPU's costs."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from .serve_helpers import RAY_ENV, free_port

pytestmark = [pytest.mark.serve, pytest.mark.real_model]
REPO = Path(__file__).resolve().parents[2]
PROMPT = "# Python function that returns the n-th Fibonacci number\ndef fib(n):"
KEY = secrets.token_hex(8)


def drafting_home(home: Path) -> Path:
    """A SPECKV_HOME for the server and the CLI: the prepared models linked in, this machine's calibrations
    copied, and the default pair's fp16 calibration replaced by one where drafting pays (a flat verify curve,
    5 ms a draft token), for every torch thread count the replicas or the CLI may run with. Planted cheaper
    than any CPU runs the 1.5B and 0.5B (159+ ms a verification, 68+ a draft token), so the spot check at load
    (speckv.calibration.spot_check) keeps them."""
    from speckv.calibration import Calibration, CalibrationKey, calibration_path
    from speckv.models import DEFAULT_DRAFT, DEFAULT_TARGET, cache_root, draft_dtype_for, load_model

    real = cache_root()
    home.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(real / "models", target_is_directory=True)
    if (real / "calibration").is_dir():
        shutil.copytree(real / "calibration", home / "calibration")
    rows = {"target": [{"kind": "verify", "context_len": 64, "tokens": t, "ms": 100.0 + t, "sequences": 1}
                       for t in (1, 9)],
            "draft": [{"kind": "draft", "context_len": 64, "tokens": 1, "ms": 5.0, "sequences": 1},
                      {"kind": "prefill", "context_len": 0, "tokens": 64, "ms": 32.0, "sequences": 1}]}
    before = os.environ.get("SPECKV_HOME")
    os.environ["SPECKV_HOME"] = str(home)  # the models' paths (part of the key) as the server will see them
    try:
        pair = (("target", DEFAULT_TARGET, "auto"), ("draft", DEFAULT_DRAFT, draft_dtype_for("auto")))
        for role, spec, dtype in pair:
            key = CalibrationKey.of(load_model(spec, tier="fp16", dtype=dtype), role, "fp16")
            for threads in {1, 2, torch.get_num_threads(), os.cpu_count() or 1}:
                planted = dataclasses.replace(key, torch=f"{torch.__version__} threads={threads}")
                path = calibration_path(planted)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(Calibration(planted, rows[role]).to_dict()))
    finally:
        if before is None:
            del os.environ["SPECKV_HOME"]
        else:
            os.environ["SPECKV_HOME"] = before
    return home


@pytest.fixture(scope="module")
def served(tmp_path_factory, drafting_predictor):
    work = tmp_path_factory.mktemp("serve")
    home = drafting_home(work / "home")
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["predictor"] = str(drafting_predictor)
    args["api_keys_env"] = "SPECKV_E2E_KEYS"
    (work / "serve_config.yaml").write_text(yaml.safe_dump(config))
    log = work / "serve.log"
    ray_tmp = tempfile.mkdtemp(prefix="rays", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": ray_tmp, "SPECKV_E2E_KEYS": KEY, "SPECKV_HOME": str(home)}
    serve_bin = str(Path(sys.executable).parent / "serve")
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen([serve_bin, "run", str(work / "serve_config.yaml")], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve run exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                auth = {"Authorization": f"Bearer {KEY}"}
                if httpx.get(base + "/v1/models", headers=auth, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"serve run did not come up in 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        assert httpx.get(base + "/v1/models").status_code == 401  # ours: it wants the key only it knows
        yield {"base": base, "env": env, "predictor": drafting_predictor}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def client(served, **kw):
    from openai import OpenAI

    return OpenAI(base_url=served["base"] + "/v1", api_key=KEY, **kw)


def cli_generate(env: dict, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "speckv.cli", "generate", "--prompt", PROMPT, "--max-new-tokens", "16",
                           "--json", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("policy", ["fixed:3", "adaptive"])
def test_openai_client_greedy_completion_equals_cli(served, policy):
    """The served path and the CLI, both speculating (bf16: the same passes give the same numerics)."""
    speculation = {"policy": "fixed", "gamma": 3} if policy == "fixed:3" else {"policy": "adaptive"}
    c = client(served)
    assert {m.id for m in c.models.list().data} >= {"speckv-fp16", "speckv-int8", "speckv-nf4"}
    out = c.completions.create(model="speckv-fp16", prompt=PROMPT, max_tokens=16, temperature=0,
                               extra_body={"speculation": speculation})
    spec = out.model_extra["speculation"]
    assert spec["draft_tokens"] > 0 and spec["policy"] == policy
    extra = ["--predictor", str(served["predictor"] / "predictor.json")] if policy == "adaptive" else []
    cli = cli_generate(served["env"], "--policy", policy, *extra)
    assert sum(r["gamma"] for r in cli["records"]) > 0
    assert out.choices[0].text == cli["text"] and out.choices[0].text.strip()


def test_openai_client_streamed_chat(served):
    c = client(served)
    messages = [{"role": "user", "content": "Write a one-line Python expression that squares x."}]
    full = c.chat.completions.create(model="speckv-fp16", messages=messages, max_tokens=12, temperature=0)
    stream = c.chat.completions.create(model="speckv-fp16", messages=messages, max_tokens=12, temperature=0,
                                       stream=True)
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) == full.choices[0].message.content


def _replicas(served, deployment: str) -> dict:
    """Replica states of a deployment, read from the running cluster by a separate driver."""
    code = ("import json, ray; from ray import serve; ray.init(address='auto', logging_level='ERROR'); "
            f"d = serve.status().applications['speckv'].deployments[{deployment!r}]; "
            "print(json.dumps({str(getattr(k, 'value', k)): v for k, v in (d.replica_states or {}).items()}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=served["env"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_scaled_to_zero_tier_comes_back_on_demand(served):
    """serve_config.yaml starts target-nf4 with 0 replicas; the first request for it brings one up."""
    assert _replicas(served, "target-nf4").get("RUNNING", 0) == 0
    out = client(served, timeout=600).completions.create(
        model="speckv-nf4", prompt=PROMPT, max_tokens=4, temperature=0,
        extra_body={"speculation": {"policy": "fixed", "gamma": 2}})
    assert out.usage.completion_tokens == 4 and out.choices[0].text
    assert out.model_extra["speculation"]["draft_tokens"] > 0
    assert _replicas(served, "target-nf4").get("RUNNING", 0) == 1

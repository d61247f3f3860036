"""End to end: `serve run` of serve_config.yaml on the default pair, called with the official openai client.

The config is the shipped one with three test settings: a free HTTP port, an API key (so the server that
answers is surely the one started here: a developer's `make serve` has no such key) and, for `adaptive`,
a predictor certain of acceptance, so adaptive drafts whatever the costs measured here."""

from __future__ import annotations

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
import yaml

from .serve_helpers import RAY_ENV, free_port

pytestmark = [pytest.mark.serve, pytest.mark.real_model]
REPO = Path(__file__).resolve().parents[2]
PROMPT = "# Python function that returns the n-th Fibonacci number\ndef fib(n):"
KEY = secrets.token_hex(8)


@pytest.fixture(scope="module")
def served(tmp_path_factory, drafting_predictor):
    work = tmp_path_factory.mktemp("serve")
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["predictor"] = str(drafting_predictor)
    args["api_keys_env"] = "SPECKV_E2E_KEYS"
    (work / "serve_config.yaml").write_text(yaml.safe_dump(config))
    log = work / "serve.log"
    ray_tmp = tempfile.mkdtemp(prefix="rays", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": ray_tmp, "SPECKV_E2E_KEYS": KEY}
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


def cli_generate(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "speckv.cli", "generate", "--prompt", PROMPT, "--max-new-tokens", "16",
                           "--json", *args], capture_output=True, text=True, cwd=REPO, timeout=600)
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
    cli = cli_generate("--policy", policy, *extra)
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

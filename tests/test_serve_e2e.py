"""End to end: `serve run serve_config.yaml` on the default pair, called with the official openai client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from .serve_helpers import RAY_ENV

pytestmark = [pytest.mark.serve, pytest.mark.real_model]
REPO = Path(__file__).resolve().parents[1]
BASE = "http://127.0.0.1:8000"
PROMPT = "# Python function that returns the n-th Fibonacci number\ndef fib(n):"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    ray_tmp = tempfile.mkdtemp(prefix="rays", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": ray_tmp}
    serve_bin = str(Path(sys.executable).parent / "serve")
    with open(log, "w") as out:
        proc = subprocess.Popen([serve_bin, "run", "serve_config.yaml"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve run exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(BASE + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"serve run did not come up in 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_openai_client_greedy_completion_equals_cli(served):
    from openai import OpenAI

    client = OpenAI(base_url=BASE + "/v1", api_key="unused")
    assert {m.id for m in client.models.list().data} >= {"speckv-fp16", "speckv-int8", "speckv-nf4"}
    served_text = client.completions.create(model="speckv-fp16", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    cli = subprocess.run([sys.executable, "-m", "speckv.cli", "generate", "--prompt", PROMPT, "--max-new-tokens", "16",
                          "--policy", "adaptive", "--json"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert cli.returncode == 0, cli.stderr
    assert served_text == json.loads(cli.stdout)["text"]
    assert served_text.strip()


def test_openai_client_streamed_chat(served):
    from openai import OpenAI

    client = OpenAI(base_url=BASE + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Write a one-line Python expression that squares x."}]
    full = client.chat.completions.create(model="speckv-fp16", messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="speckv-fp16", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) == full.choices[0].message.content


def test_scaled_to_zero_tier_comes_back_on_demand(served):
    """serve_config.yaml starts target-nf4 with 0 replicas; the first request for it brings one up."""
    from openai import OpenAI

    client = OpenAI(base_url=BASE + "/v1", api_key="unused", timeout=600)
    out = client.completions.create(model="speckv-nf4", prompt=PROMPT, max_tokens=4, temperature=0,
                                    extra_body={"speculation": {"policy": "fixed", "gamma": 2}})
    assert out.usage.completion_tokens == 4 and out.choices[0].text

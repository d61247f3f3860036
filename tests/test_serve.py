"""The Serve application in-process (serve.run) on tiny random models: API, streaming, extension fields,
errors and fuzzed input, overload answers, client disconnects, affinity loss (replica killed mid-request)
and a tier scaling up under load."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from speckv.local import LocalEngine, encode_prompt
from speckv.models import DEFAULT_TARGET, load_model, load_tokenizer, resolve_model_dir

from .serve_helpers import apply_ray_env, save_tiny_pair

pytestmark = pytest.mark.serve
BASE = "http://127.0.0.1:8123"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    apply_ray_env()
    import ray
    from ray import serve

    from deployments.app import build_app

    models = tmp_path_factory.mktemp("models")
    target, draft = save_tiny_pair(models, resolve_model_dir(DEFAULT_TARGET))
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rayt", dir="/tmp"))
    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    config = {
        "draft_model": draft, "target_model": target, "tiers": ["fp16"], "dtype": "float32",
        "draft_dtype": "float32", "torch_threads": 1, "max_tokens_limit": 256,
        "deployment_options": {
            "target-fp16": {"max_ongoing_requests": 2, "autoscaling_config": {
                "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
                "downscale_delay_s": 600, "look_back_period_s": 2}},
        },
    }
    serve.run(build_app(config), name="speckv", route_prefix="/")
    colocated = {**config, "topology": "colocated", "api_keys_env": "SPECKV_TEST_KEYS",
                 "max_concurrent_generations": 2, "retry_after_s": 3, "deployment_options": {
        "router": {"ray_actor_options": {"runtime_env": {"env_vars": {"SPECKV_TEST_KEYS": "key-one,key-two"}}}}}}
    serve.run(build_app(colocated), name="speckv-colocated", route_prefix="/colocated")
    engine = LocalEngine(load_model(draft, dtype="float32"), load_model(target, dtype="float32"), load_tokenizer(target))
    yield {"engine": engine, "config": config}
    serve.shutdown()
    ray.shutdown()


def post(path: str, body: dict | bytes, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(BASE + path, content=body, headers={"content-type": "application/json"}, timeout=120, **kw)
    return httpx.post(BASE + path, json=body, timeout=120, **kw)


def sse_events(response_text: str) -> list:
    lines = [l[len("data: "):] for l in response_text.splitlines() if l.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(l) for l in lines[:-1]]


def test_health_and_models(app):
    assert httpx.get(BASE + "/healthz").json() == {"status": "ok"}
    ids = [m["id"] for m in httpx.get(BASE + "/v1/models").json()["data"]]
    assert ids == ["speckv-fp16", "speckv"]


def test_greedy_completion_equals_library_engine(app):
    engine: LocalEngine = app["engine"]
    prompt = "def fibonacci(n):"
    expected = engine.generate(encode_prompt(engine.tokenizer, prompt, chat=False), "fixed:3", 24)
    r = post("/v1/completions", {"model": "speckv-fp16", "prompt": prompt, "max_tokens": 24, "temperature": 0,
                                 "speculation": {"policy": "fixed", "gamma": 3}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected.text
    assert body["usage"]["completion_tokens"] == expected.new_tokens
    spec = body["speculation"]
    assert spec["policy"] == "fixed:3" and spec["steps"] == expected.steps
    assert spec["accepted_tokens"] == expected.accepted > 0
    assert set(spec["gamma_histogram"]) <= {"0", "1", "2", "3"} and spec["gamma_histogram"]["3"] >= 1
    assert spec["mean_accepted"] == pytest.approx(expected.mean_accepted)


def test_colocated_topology_gives_the_same_output(app):
    body = {"model": "speckv-fp16", "prompt": "def is_even(n):", "max_tokens": 20, "temperature": 0,
            "speculation": {"policy": "fixed", "gamma": 3}}
    split = post("/v1/completions", body).json()
    colocated = post("/colocated/v1/completions", body, headers={"Authorization": "Bearer key-two"}).json()
    assert colocated["choices"][0]["text"] == split["choices"][0]["text"]
    assert colocated["speculation"]["accepted_tokens"] == split["speculation"]["accepted_tokens"]
    assert colocated["speculation"]["timing"]["hop_ms"] >= 0


def test_api_keys_when_configured(app):
    """The colocated app reads keys from SPECKV_TEST_KEYS: calls need one; /healthz stays open."""
    body = {"model": "speckv", "prompt": "a", "max_tokens": 2, "temperature": 0}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
        r = post("/colocated/v1/completions", body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert httpx.get(BASE + "/colocated/v1/models").status_code == 401
    assert httpx.get(BASE + "/colocated/healthz").status_code == 200
    assert post("/colocated/v1/completions", body, headers={"Authorization": "Bearer key-one"}).status_code == 200
    assert post("/v1/completions", body).status_code == 200  # the app without keys stays open


def test_policy_none_drafts_nothing_and_matches(app):
    base = {"model": "speckv", "prompt": "import numpy as", "max_tokens": 16, "temperature": 0}
    spec = post("/v1/completions", {**base, "speculation": {"policy": "fixed", "gamma": 4}}).json()
    plain = post("/v1/completions", {**base, "speculation": {"policy": "none"}}).json()
    assert plain["speculation"]["draft_tokens"] == 0 and plain["speculation"]["gamma_histogram"] == {"0": plain["speculation"]["steps"]}
    assert plain["choices"][0]["text"] == spec["choices"][0]["text"]
    adaptive = post("/v1/completions", base).json()
    assert adaptive["speculation"]["policy"].startswith("adaptive")
    assert adaptive["choices"][0]["text"] == plain["choices"][0]["text"]


def test_chat_stream_equals_non_stream(app):
    body = {"model": "speckv-fp16", "messages": [{"role": "user", "content": "Write a loop in Python."}],
            "max_tokens": 20, "temperature": 0}
    full = post("/v1/chat/completions", body).json()
    assert full["object"] == "chat.completion" and full["choices"][0]["message"]["role"] == "assistant"
    r = post("/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == full["choices"][0]["message"]["content"]
    final = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["speculation"]["steps"] == full["speculation"]["steps"]
    assert events[-1]["usage"] == full["usage"]


def test_completion_stream_with_stop_string(app):
    base = {"model": "speckv-fp16", "prompt": "class Stack:", "max_tokens": 30, "temperature": 0}
    full = post("/v1/completions", base).json()["choices"][0]["text"]
    stop = full[5:8]
    assert stop
    r = post("/v1/completions", {**base, "stop": [stop], "stream": True})
    events = sse_events(r.text)
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == full[: full.find(stop)]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(app):
    body = {"model": "speckv-fp16", "prompt": "x =", "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 3}
    a, b = post("/v1/completions", body).json(), post("/v1/completions", body).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "prompt": "a"}, 404, "model"),
    ({"model": "speckv", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "speckv", "prompt": "a", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "speckv", "prompt": "a " * 400, "max_tokens": 200}, 400, "max_tokens"),  # context window 512
    ({"model": "speckv", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"model": "speckv", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"model": "speckv", "prompt": "a", "n": 2}, 400, "n"),
    ({"model": "speckv", "prompt": "a", "stop": ["x"] * 20}, 400, "stop"),
    ({"model": "speckv", "prompt": "a", "stop": ["x" * 300]}, 400, "stop"),
    ({"model": "speckv", "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"model": "speckv", "prompt": "a", "speculation": {"policy": "fixed"}}, 400, "speculation"),
    ({"model": "speckv", "prompt": "a", "speculation": {"policy": "magic"}}, 400, "speculation.policy"),
    ({"model": "speckv", "prompt": "a", "speculation": {"policy": "fixed", "gamma": 3, "x": 1}}, 400, "speculation.x"),
    ({"model": "speckv"}, 400, "prompt"),
    ({"model": "speckv", "prompt": 5}, 400, "prompt"),
    ({"model": "speckv", "prompt": "a", "bogus": 1}, 400, "bogus"),
])
def test_bad_requests_get_openai_errors(app, body, status, param):
    r = post("/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"] or "").startswith(param), err


def test_malformed_and_oversized_bodies(app):
    assert post("/v1/completions", b"{not json").status_code == 400
    assert post("/v1/completions", b"\xff\xfe\x00bad").status_code == 400
    big = json.dumps({"model": "speckv", "prompt": "a" * 2_000_000}).encode()
    r = post("/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def _replica_actor_names(deployment: str) -> list[str]:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    found = [n for n in names if n.startswith("SERVE_REPLICA::") and f"#{deployment}#" in n]
    assert found, names
    return found


@pytest.mark.parametrize("deployment", ["target-fp16", "draft"])
def test_replica_killed_mid_request_same_output(app, deployment):
    """Kill the replica holding the request's cache mid-stream: the step is retried, the new (or other)
    replica rebuilds the cache from token ids, and the output is unchanged."""
    import ray

    body = {"model": "speckv-fp16", "prompt": "def quicksort(items):", "max_tokens": 120, "temperature": 0,
            "speculation": {"policy": "fixed", "gamma": 2}}
    expected = post("/v1/completions", body).json()["choices"][0]["text"]
    pieces = []
    killed = False
    with httpx.stream("POST", BASE + "/v1/completions", json={**body, "stream": True}, timeout=180) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            pieces.append(event["choices"][0]["text"])
            if not killed and len(pieces) >= 3:
                for name in _replica_actor_names(deployment):
                    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                killed = True
    assert killed
    assert "".join(pieces) == expected
    # the deployment recovers and serves the next request
    assert post("/v1/completions", {**body, "max_tokens": 8}).status_code == 200


def test_tier_scales_up_under_load(app):
    from ray import serve

    def replicas() -> int:
        status = serve.status().applications["speckv"].deployments["target-fp16"]
        return sum(status.replica_states.values()) if status.replica_states else 0

    async def load() -> list[int]:
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"model": "speckv-fp16", "prompt": "for i in range(", "max_tokens": 200, "temperature": 0,
                    "speculation": {"policy": "fixed", "gamma": 1}}
            tasks = [client.post(BASE + "/v1/completions", json=body) for _ in range(6)]
            return [r.status_code for r in await asyncio.gather(*tasks)]

    async def run() -> tuple[list[int], int]:
        task = asyncio.create_task(load())
        peak = replicas()
        while not task.done():
            peak = max(peak, replicas())
            await asyncio.sleep(0.5)
        return await task, peak

    codes, peak = asyncio.run(run())
    assert codes == [200] * 6
    deadline = time.time() + 60
    while peak < 2 and time.time() < deadline:
        peak = max(peak, replicas())
        time.sleep(1)
    assert peak == 2


# ---------------------------------------------------------------- reliability: fuzz, overload, disconnects

def _json_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=30))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                        max_leaves=6)


def _request_bodies():
    """Mostly-plausible OpenAI bodies with any field wrong in any way, plus unknown keys."""
    from hypothesis import strategies as st

    anything = _json_values()
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | anything,
                                     "content": st.text(max_size=40) | anything})
    fields = {
        "model": st.sampled_from(["speckv", "speckv-fp16", "speckv-int8", "nope", ""]) | anything,
        "prompt": st.text(max_size=60) | st.lists(st.text(max_size=10), max_size=3) | anything,
        "messages": st.lists(message, max_size=3) | anything,
        "max_tokens": st.integers(-3, 24) | anything,
        "max_completion_tokens": st.integers(-3, 24) | anything,
        "temperature": st.floats(-1, 3) | anything,
        "top_p": st.floats(-0.5, 1.5) | anything,
        "seed": st.integers(-5, 2**64) | anything,
        "n": st.integers(-1, 3) | anything,
        "stop": st.text(max_size=200) | st.lists(st.text(max_size=200), max_size=12) | anything,
        "stream": st.booleans() | anything,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | anything}) | anything,
        "speculation": st.fixed_dictionaries({}, optional={
            "policy": st.sampled_from(["adaptive", "fixed", "none", "heuristic", "magic"]) | anything,
            "gamma": st.integers(-2, 20) | anything, "extra": anything}) | anything,
    }
    body = st.fixed_dictionaries({}, optional=fields)
    extra = st.dictionaries(st.text(min_size=1, max_size=10), anything, max_size=2)
    return st.tuples(body, extra).map(lambda t: {**t[1], **t[0]})


def _check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code == 200:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
            assert '"error"' not in r.text, r.text[-500:]
        else:
            assert r.json()["choices"], r.text
    else:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text


def test_fuzzed_requests_never_get_5xx(app):
    """Property-based fuzz (hypothesis, derandomized so CI sees the same cases): any body, to either
    endpoint, gets 200 or an OpenAI-shaped 4xx; never a 5xx or a hang. The server stays healthy."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    with httpx.Client(timeout=60) as client:
        @settings(max_examples=160, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=_request_bodies())
        def json_bodies(path, body):
            try:
                content = json.dumps(body, allow_nan=True).encode()
            except (ValueError, OverflowError):
                return
            _check_answer(client.post(BASE + path, content=content, headers={"content-type": "application/json"}))

        @settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), raw=st.binary(max_size=120),
               content_type=st.sampled_from(["application/json", "text/plain", ""]))
        def raw_bodies(path, raw, content_type):
            r = client.post(BASE + path, content=raw, headers={"content-type": content_type} if content_type else {})
            _check_answer(r)
            assert r.status_code != 200

        json_bodies()
        raw_bodies()
    assert httpx.get(BASE + "/healthz").status_code == 200
    assert post("/v1/completions", {"model": "speckv", "prompt": "ok", "max_tokens": 3}).status_code == 200


def test_overload_answers_429_with_retry_after(app):
    """The colocated app admits 2 generations per router: the rest are refused at once with 429, a JSON
    error and Retry-After, not queued; once the load is gone requests are admitted again."""
    headers = {"Authorization": "Bearer key-one"}
    body = {"model": "speckv", "prompt": "def busy():", "max_tokens": 150, "temperature": 0,
            "speculation": {"policy": "fixed", "gamma": 1}}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*[client.post(BASE + "/colocated/v1/completions", json=body, headers=headers)
                                          for _ in range(8)])

    answers = asyncio.run(burst())
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
    for r in answers:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "3"
            assert r.json()["error"]["code"] == "server_busy"
    assert post("/colocated/v1/completions", {**body, "max_tokens": 4}, headers=headers).status_code == 200


def test_backend_overload_maps_to_503():
    from ray.serve.exceptions import BackPressureError

    from deployments.router import backend_error

    err = backend_error(BackPressureError(num_queued_requests=65, max_queued_requests=64), retry_after_s=2)
    assert err.status == 503 and err.headers == {"Retry-After": "2"} and err.code == "overloaded"
    assert backend_error(ValueError("bug"), 2) is None


def _cache_stats(deployment: str) -> dict[str, dict]:
    """Cache stats per replica of a deployment (sticky routing spreads these calls over the replicas)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name="speckv")
    stats = [handle.options(session_id=f"probe-{i}").stats.remote() for i in range(24)]
    return {s["replica"]: s for s in (r.result() for r in stats)}


def test_client_disconnect_frees_sessions_at_once(app):
    """A client that goes away mid-stream stops its generation and frees its cache at once: the target's
    forward-pass count stops growing well before max_tokens, and no session is left behind."""
    def passes() -> int:
        return sum(s["hits"] + s["rebuilds"] for s in _cache_stats("target-fp16").values())

    body = {"model": "speckv-fp16", "prompt": "while True:", "max_tokens": 250, "temperature": 0, "stream": True,
            "speculation": {"policy": "none"}}  # one target pass per token: 250 passes if it ran to the end
    def sessions() -> int:
        return sum(s["sessions"] for s in _cache_stats("target-fp16").values())

    # earlier tests may leave sessions orphaned by a replica-set change (the scale-up test): those wait for
    # LRU or the idle timeout; this request's own session must go at once
    held_before = sessions()
    before = passes()
    with httpx.stream("POST", BASE + "/v1/completions", json=body, timeout=120) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    time.sleep(1.0)
    after = passes()
    time.sleep(1.0)
    assert passes() == after, "the generation kept running after the client left"
    assert after - before < 200, after - before
    assert sessions() == held_before


def test_bounded_load_run_loses_nothing(app):
    """A short bounded load run (deployments/load_run.py) on the split app: every answer, streamed or not,
    equals the greedy reference; the only non-200 answers allowed are overload answers."""
    from deployments.load_run import main

    out = Path(tempfile.mkdtemp()) / "load.json"
    rc = main(["--url", BASE, "--clients", "4", "--duration", "15", "--max-tokens", "24", "--policy", "fixed:2",
               "--sample-rss", "--rss-interval", "3", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 0 and doc["mismatches"] == 0, doc["mismatch_examples"]
    assert doc["answers_by_kind"].get("ok", 0) >= 8, doc["answers_by_kind"]
    assert set(doc["answers_by_kind"]) <= {"ok", "http_429", "http_503"}, doc["answers_by_kind"]
    assert doc["rss_bytes"], "no Serve replica processes were sampled"

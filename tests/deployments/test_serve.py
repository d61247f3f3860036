"""The Serve application in-process (serve.run) on tiny random models: API, streaming, extension fields,
errors and fuzzed input, overload answers, client disconnects, affinity loss (replica killed mid-request)
and a tier scaling up under load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from speckv.local import LocalEngine
from speckv.models import DEFAULT_TARGET, load_model, load_tokenizer, resolve_model_dir
from speckv.sampling import SamplingParams
from speckv.text import encode_prompt

from .serve_helpers import apply_ray_env, free_port, ray_temp_root, save_tiny_pair

pytestmark = pytest.mark.serve
BASE = ""  # http://127.0.0.1:<free port>, set by the `app` fixture
KEY = {"Authorization": "Bearer key-one"}  # the colocated app's API key


@pytest.fixture(scope="module")
def app(tmp_path_factory, drafting_predictor):
    """Two applications on one free port: `speckv` (disaggregated, whose `adaptive` reads a configured
    controller artifact that drafts) and `speckv-colocated` (API keys, 2 generations at once)."""
    global BASE
    apply_ray_env()
    import ray
    from ray import serve

    from deployments.app import build_app

    models = tmp_path_factory.mktemp("models")
    target, draft = save_tiny_pair(models, resolve_model_dir(DEFAULT_TARGET))
    port = free_port()
    BASE = f"http://127.0.0.1:{port}"
    with ray_temp_root():
        # logical CPUs: every replica asks for one, and up to five apps (main, colocated, paying, slow, kv) of
        # 3-5 replicas live at once; one that does not fit waits to be scheduled and serve.run never returns
        ray.init(num_cpus=32, include_dashboard=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = {
                "draft_model": draft, "target_model": target, "tiers": ["fp16"], "dtype": "float32",
                "draft_dtype": "float32", "torch_threads": 1, "max_tokens_limit": 256,
                "predictor": str(drafting_predictor), "policy_refresh_s": 0.5, "max_batch_size": 2,
                "deployment_options": {
                    "target-fp16": {"max_ongoing_requests": 2, "autoscaling_config": {
                        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 3, "upscale_delay_s": 0,
                        "downscale_delay_s": 600, "look_back_period_s": 2}},
                },
            }
            serve.run(build_app(config), name="speckv", route_prefix="/")
            colocated = {**config, "topology": "colocated", "api_keys_env": "SPECKV_TEST_KEYS",
                         "max_concurrent_generations": 2, "retry_after_s": 3, "deployment_options": {
                "router": {"ray_actor_options": {"runtime_env": {
                    "env_vars": {"SPECKV_TEST_KEYS": "key-one,key-two"}}}}}}
            serve.run(build_app(colocated), name="speckv-colocated", route_prefix="/colocated")
            # the server on this port is the one started here: only it has this keyed app
            assert httpx.get(BASE + "/colocated/v1/models").status_code == 401
            assert httpx.get(BASE + "/colocated/v1/models", headers=KEY).status_code == 200
            engine = LocalEngine(load_model(draft, dtype="float32"), load_model(target, dtype="float32"),
                                 load_tokenizer(target))
            version = json.loads((drafting_predictor / "predictor.json").read_text())["version"]
            yield {"engine": engine, "config": config, "predictor": drafting_predictor, "version": version}
        finally:
            serve.shutdown()
            ray.shutdown()


def post(path: str, body: dict | bytes, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(BASE + path, content=body, headers={"content-type": "application/json"}, timeout=120, **kw)
    return httpx.post(BASE + path, json=body, timeout=120, **kw)


@contextlib.contextmanager
def derived_app(app: dict, name: str, route_prefix: str, **overrides) -> Iterator[None]:
    """Another application on the same server: the `speckv` app's config with `overrides` (Serve options
    reset), deleted afterwards, on failure too."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app({**app["config"], "deployment_options": {}, **overrides}), name=name,
              route_prefix=route_prefix)
    try:
        yield
    finally:
        serve.delete(name)


def sse_events(response_text: str) -> list:
    lines = [line[len("data: "):] for line in response_text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_health_and_models(app):
    assert httpx.get(BASE + "/healthz").json() == {"status": "ok"}
    ids = [m["id"] for m in httpx.get(BASE + "/v1/models").json()["data"]]
    assert ids == ["speckv-fp16", "speckv"]
    assert httpx.get(BASE + "/v1/models/speckv-fp16").json()["id"] == "speckv-fp16"
    missing = httpx.get(BASE + "/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


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
    assert spec["policy"] == "fixed:3" and spec["steps"] == expected.stats.steps
    assert spec["accepted_tokens"] == expected.stats.accepted_tokens > 0
    assert set(spec["gamma_histogram"]) <= {"0", "1", "2", "3"} and spec["gamma_histogram"]["3"] >= 1
    assert spec["mean_accepted"] == pytest.approx(expected.stats.mean_accepted)


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


@pytest.fixture(scope="module")
def paying_app(app):
    """An application whose target calls take 60 ms longer (calibration sees it too): a verify pass costs
    ~10x a drafted token of the tiny draft, so drafting pays whatever the machine's noise. On the plain tiny
    pair a step's time is mostly handle hops and drafting is near break-even, so whether `adaptive` should draft
    there turns on a few milliseconds of a calibration measured on a busy machine."""
    with derived_app(app, "speckv-pays", "/pays", added_ms_per_call={"target-fp16": 60.0}, calibration_budget_s=4.0):
        yield


def test_adaptive_drafts_and_equals_target_only(app, paying_app):
    """Where drafting pays, `adaptive` (the app's configured controller, which drafts) and fixed γ both really
    speculate, and greedy output equals target-only decoding."""
    base = {"model": "speckv", "prompt": "import numpy as", "max_tokens": 16, "temperature": 0}
    spec = post("/pays/v1/completions", {**base, "speculation": {"policy": "fixed", "gamma": 4}}).json()
    plain = post("/pays/v1/completions", {**base, "speculation": {"policy": "none"}}).json()
    assert plain["speculation"]["draft_tokens"] == 0
    assert plain["speculation"]["gamma_histogram"] == {"0": plain["speculation"]["steps"]}
    assert spec["speculation"]["draft_tokens"] > 0
    assert plain["choices"][0]["text"] == spec["choices"][0]["text"]
    adaptive = post("/pays/v1/completions", base).json()
    assert adaptive["speculation"]["policy"] == "adaptive"
    assert adaptive["speculation"]["predictor_version"] == app["version"]
    assert adaptive["speculation"]["draft_tokens"] > 0, adaptive["speculation"]
    assert adaptive["speculation"]["steps"] < plain["speculation"]["steps"]
    assert adaptive["choices"][0]["text"] == plain["choices"][0]["text"]


def test_router_follows_the_controller_version(app, paying_app, hopeless_predictor):
    """Loading another predictor into the controller deployment reaches the routers within policy_refresh_s,
    and their decisions follow it: one sure that nothing is accepted never drafts, the configured one does
    (where drafting pays)."""
    from ray import serve

    from speckv.predictor import load_predictor

    hopeless = load_predictor(hopeless_predictor).version()
    controller = serve.get_deployment_handle("controller", "speckv-pays")
    body = {"model": "speckv-fp16", "prompt": "def f(x):", "max_tokens": 8, "temperature": 0}

    def settle(version: str) -> dict:
        deadline = time.time() + 20
        while True:
            spec = post("/pays/v1/completions", body).json()["speculation"]
            if spec["predictor_version"] == version or time.time() > deadline:
                return spec
            time.sleep(0.25)

    try:
        assert controller.load.remote(str(hopeless_predictor)).result() == hopeless
        spec = settle(hopeless)
        assert spec["predictor_version"] == hopeless and spec["draft_tokens"] == 0
    finally:
        assert controller.load.remote(str(app["predictor"])).result() == app["version"]
    spec = settle(app["version"])
    assert spec["predictor_version"] == app["version"] and spec["draft_tokens"] > 0, spec


def test_chat_stream_equals_non_stream(app):
    # a fixed γ: `adaptive` follows live step times, so two runs of the same request may take different steps
    # (a fresh-clone CI run: 19 and 20) with the same tokens
    body = {"model": "speckv-fp16", "messages": [{"role": "user", "content": "Write a loop in Python."}],
            "max_tokens": 20, "temperature": 0, "speculation": {"policy": "fixed", "gamma": 3}}
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


def test_seeded_sampling_equals_the_library_and_seeds_differ(app):
    """Sampling through Serve with a seed gives exactly the library engine's output for that seed (the
    draws derive from the seed and the step, wherever the step runs); other seeds give other texts."""
    engine: LocalEngine = app["engine"]
    prompt = "x ="
    body = {"model": "speckv-fp16", "prompt": prompt, "max_tokens": 12, "temperature": 1.3, "top_p": 0.95,
            "speculation": {"policy": "fixed", "gamma": 3}}
    ids = encode_prompt(engine.tokenizer, prompt, chat=False)
    texts = []
    for seed in (3, 4, 5):
        served = post("/v1/completions", {**body, "seed": seed}).json()
        assert served["speculation"]["draft_tokens"] > 0
        library = engine.generate(ids, "fixed:3", 12, SamplingParams(temperature=1.3, top_p=0.95, seed=seed))
        assert served["choices"][0]["text"] == library.text
        texts.append(library.text)
    assert post("/v1/completions", {**body, "seed": 3}).json()["choices"][0]["text"] == texts[0]
    assert len(set(texts)) == 3, texts


def test_stop_strings_across_tokens_and_steps(app):
    """Stop strings that span a step boundary (so several tokens), several at once (the earliest wins),
    streamed and not: the text ends right before the stop string and the stream adds up to it."""
    base = {"model": "speckv-fp16", "prompt": "class Stack:", "max_tokens": 40, "temperature": 0,
            "speculation": {"policy": "fixed", "gamma": 3}}
    steps = [e["choices"][0]["text"] for e in sse_events(post("/v1/completions", {**base, "stream": True}).text)]
    full = "".join(steps)
    # a boundary between two steps' texts, late enough that the string around it first occurs there
    cut = next(i for i in (sum(len(t) for t in steps[:k]) for k in range(2, len(steps)))
               if i >= 4 and full.find(full[i - 2: i + 2]) == i - 2 and full[i - 2: i + 2].strip())
    spanning = full[cut - 2: cut + 2]
    later = full[-3:] if full.find(full[-3:]) > cut else None
    for stop in ([spanning], [spanning, "\x00never"], [later, spanning] if later else [spanning]):
        whole = post("/v1/completions", {**base, "stop": stop}).json()
        assert whole["choices"][0]["text"] == full[:cut - 2], stop
        assert whole["choices"][0]["finish_reason"] == "stop"
        events = sse_events(post("/v1/completions", {**base, "stop": stop, "stream": True}).text)
        assert "".join(e["choices"][0]["text"] for e in events) == full[:cut - 2], stop
        assert events[-1]["choices"][0]["finish_reason"] == "stop"


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
    ({"model": "speckv", "prompt": "a", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"model": "speckv", "prompt": "a", "best_of": 2}, 400, "best_of"),
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


def test_chunked_body_without_content_length_is_limited_too(app):
    """A body sent chunked (no Content-Length) is refused once it passes the limit; one within it is
    read whole and served."""
    def chunked(body: bytes, size: int = 65536):
        for i in range(0, len(body), size):
            yield body[i: i + size]

    headers = {"content-type": "application/json"}
    big = json.dumps({"model": "speckv", "prompt": "a" * 2_000_000}).encode()
    r = httpx.post(BASE + "/v1/completions", content=chunked(big), headers=headers, timeout=120)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
    ok = json.dumps({"model": "speckv", "prompt": "def f():", "max_tokens": 4, "temperature": 0}).encode()
    r = httpx.post(BASE + "/v1/completions", content=chunked(ok, 5), headers=headers, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text


def _replica_actor_names(app_name: str, deployment: str) -> list[str]:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    found = [n for n in names if n.startswith(f"SERVE_REPLICA::{app_name}#{deployment}#")]
    assert found, names
    return found


@pytest.fixture(scope="module")
def slow_app(app):
    """A third application whose model calls take 100 ms (draft) and 300 ms (target) longer, so a test
    knows when a call is in flight: after a step's chunk arrives the router drafts (one 100 ms call at
    γ = 1), then verifies (one 300 ms call)."""
    with derived_app(app, "speckv-slow", "/slow", added_ms_per_call={"draft": 100.0, "target-fp16": 300.0}):
        yield


# when the next step's call to each deployment is surely running. The draft's call starts as a step's chunk is
# sent: kill this long after a chunk arrives. The target's (300 ms added) ends the step: kill this long before
# the next chunk is due, timed from the last two chunks' interval (a fixed wait after the chunk missed the call
# once, on a loaded machine whose draft passes ran slower)
KILL_AFTER_CHUNK_S = {"draft": 0.03}
KILL_BEFORE_NEXT_CHUNK_S = {"target-fp16": 0.15}


@pytest.mark.parametrize("deployment", ["target-fp16", "draft"])
def test_replica_killed_mid_request_same_output(app, slow_app, deployment):
    """Kill the replica holding the request's cache while a call to it is running (only this app's: the
    other apps' replicas of the same name live on): the call fails and is retried, a new replica rebuilds
    the cache from token ids, and the output is unchanged."""
    import ray

    body = {"model": "speckv-fp16", "prompt": "def quicksort(items):", "max_tokens": 16, "temperature": 0,
            "speculation": {"policy": "fixed", "gamma": 1}}
    expected = post("/slow/v1/completions", body).json()["choices"][0]["text"]
    before = _cache_stats(deployment, "speckv-slow")
    others_before = {a: set(_replica_actor_names(a, "target-fp16")) for a in ("speckv", "speckv-colocated")}
    victims = [ray.get_actor(n, namespace="serve") for n in _replica_actor_names("speckv-slow", deployment)]
    pieces, final, arrived = [], None, []
    killed = False
    with httpx.stream("POST", BASE + "/slow/v1/completions", json={**body, "stream": True}, timeout=180) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            pieces.append(event["choices"][0]["text"])
            arrived.append(time.monotonic())
            final = event
            if not killed and len(pieces) == 3:
                step_s = arrived[-1] - arrived[-2]
                time.sleep(KILL_AFTER_CHUNK_S[deployment] if deployment in KILL_AFTER_CHUNK_S
                           else max(step_s - KILL_BEFORE_NEXT_CHUNK_S[deployment], 0.0))
                for victim in victims:
                    ray.kill(victim, no_restart=True)
                killed = True
    assert killed and final["choices"][0]["finish_reason"] == "length"
    assert "".join(pieces) == expected
    assert final["speculation"]["retries"] >= 1  # the call in flight failed and was sent again
    after = _cache_stats(deployment, "speckv-slow")
    assert not set(after) & set(before), (before.keys(), after.keys())  # every replica is a new one
    assert sum(s["rebuilds"] for s in after.values()) >= 1  # the new replica rebuilt the session from ids
    assert {a: set(_replica_actor_names(a, "target-fp16")) for a in others_before} == others_before
    # the deployment serves the next request
    assert post("/slow/v1/completions", {**body, "max_tokens": 4}).status_code == 200


def _running_replicas(deployment: str) -> int:
    from ray import serve

    states = serve.status().applications["speckv"].deployments[deployment].replica_states or {}
    return states.get("RUNNING", 0)


def test_tier_scales_up_under_load(app):
    """One running fp16 target before the load; while concurrent requests keep it busy, the autoscaler
    brings a second one to RUNNING (counted while the load lasts, STARTING replicas not counted). It scales on
    the sessions the replica reports (deployments.autoscaling: 6 requests at a target of 3 each), not on the calls
    in flight, which the router groups and the replica caps at 2: counted by those, it never scaled (seen)."""
    deadline = time.time() + 60
    while _running_replicas("target-fp16") != 1 and time.time() < deadline:
        time.sleep(0.5)
    assert _running_replicas("target-fp16") == 1

    body = {"model": "speckv-fp16", "prompt": "for i in range(", "max_tokens": 200, "temperature": 0,
            "speculation": {"policy": "fixed", "gamma": 1}}

    async def run() -> tuple[list[int], int]:
        codes: list[int] = []
        peak = 0
        async with httpx.AsyncClient(timeout=300) as client:
            stop_at = time.time() + 120  # bounded: rounds of 6 concurrent requests until the second replica runs
            while peak < 2 and time.time() < stop_at:
                round_ = asyncio.gather(*[client.post(BASE + "/v1/completions", json=body) for _ in range(6)])
                task = asyncio.ensure_future(round_)
                while not task.done():
                    peak = max(peak, _running_replicas("target-fp16"))
                    await asyncio.sleep(0.5)
                codes += [r.status_code for r in task.result()]
        return codes, peak

    codes, peak = asyncio.run(run())
    assert codes and set(codes) == {200}, codes
    assert peak == 2


# ---------------------------------------------------------------- reliability: fuzz, overload, disconnects

def _json_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=30))
    return st.recursive(scalars,
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
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


def _valid_bodies(models: list[str]):
    """Bodies every OpenAI client could send and the API documents: each must get 200."""
    from hypothesis import strategies as st

    text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40)
    speculation = (st.sampled_from(["adaptive", "none", "heuristic"]).map(lambda p: {"policy": p})
                   | st.integers(1, 8).map(lambda g: {"policy": "fixed", "gamma": g}))
    optional = {
        "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2) | st.none(),
        "top_p": st.floats(0.05, 1) | st.none(),
        "seed": st.integers(0, 2**63 - 1), "stop": st.lists(st.text(min_size=1, max_size=10), max_size=3),
        "stream": st.booleans(), "speculation": speculation, "user": st.text(max_size=10),
        # what frameworks send explicitly at the value that changes nothing
        "frequency_penalty": st.sampled_from([0, 0.0]), "presence_penalty": st.sampled_from([0, 0.0]),
        "logit_bias": st.sampled_from([None, {}]),
    }
    token_ids = st.lists(st.integers(0, 1000), min_size=1, max_size=8)
    prompt = text | st.lists(text, min_size=1, max_size=1) | token_ids | st.lists(token_ids, min_size=1, max_size=1)
    completion = st.fixed_dictionaries({"model": st.sampled_from(models), "prompt": prompt},
                                       optional={**optional, "best_of": st.just(1)})
    parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), min_size=1, max_size=2)
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                     "content": text | parts})
    chat = st.fixed_dictionaries({"model": st.sampled_from(models),
                                  "messages": st.lists(message, min_size=1, max_size=3)},
                                 optional={**optional, "max_completion_tokens": st.integers(1, 8),
                                           "response_format": st.just({"type": "text"}),
                                           "tool_choice": st.sampled_from(["none", "auto"])})
    return st.one_of(completion.map(lambda b: ("/v1/completions", b)), chat.map(lambda b: ("/v1/chat/completions", b)))


APPS = [("", {}), ("/colocated", KEY)]  # (route prefix, headers) of the two applications


def test_valid_requests_get_200_on_every_model_of_both_apps(app):
    """Valid bodies (hypothesis, derandomized) to both endpoints of both apps, for every model each app
    advertises: always 200 with a whole answer (a stream ends in [DONE] without an error event)."""
    from hypothesis import HealthCheck, given, settings

    for prefix, headers in APPS:
        models = [m["id"] for m in httpx.get(BASE + prefix + "/v1/models", headers=headers).json()["data"]]
        served: set[str] = set()
        with httpx.Client(timeout=60, headers=headers) as client:
            @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=_valid_bodies(models))
            def valid(case):
                path, body = case
                r = client.post(BASE + prefix + path, json=body)
                assert r.status_code == 200, (body, r.text[:500])
                _check_answer(r)
                if not body.get("stream"):
                    most = body.get("max_completion_tokens", body.get("max_tokens", 16))  # chat: the former wins
                    assert 0 <= r.json()["usage"]["completion_tokens"] <= most
                served.add(body["model"])

            valid()
        assert served == set(models), (prefix, served, models)


def test_fuzzed_requests_never_get_5xx(app):
    """Property-based fuzz (hypothesis, derandomized so CI sees the same cases): any body, to either
    endpoint of either app, gets 200 or an OpenAI-shaped 4xx; never a 5xx or a hang. The servers stay
    healthy."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    for prefix, headers in APPS:
        with httpx.Client(timeout=60, headers=headers) as client:
            @settings(max_examples=100, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=_request_bodies())
            def json_bodies(path, body):
                try:
                    content = json.dumps(body, allow_nan=True).encode()
                except (ValueError, OverflowError):
                    return
                _check_answer(client.post(BASE + prefix + path, content=content,
                                          headers={"content-type": "application/json"}))

            @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), raw=st.binary(max_size=120),
                   content_type=st.sampled_from(["application/json", "text/plain", ""]))
            def raw_bodies(path, raw, content_type):
                r = client.post(BASE + prefix + path, content=raw,
                                headers={"content-type": content_type} if content_type else {})
                _check_answer(r)
                assert r.status_code != 200

            json_bodies()
            raw_bodies()
        assert httpx.get(BASE + prefix + "/healthz").status_code == 200
        assert post(prefix + "/v1/completions", {"model": "speckv", "prompt": "ok", "max_tokens": 3},
                    headers=headers).status_code == 200


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

    from deployments.executors import backend_error
    from speckv.workers import KVCapacityError

    err = backend_error(BackPressureError(num_queued_requests=65, max_queued_requests=64), retry_after_s=2)
    assert err.status == 503 and err.headers == {"Retry-After": "2"} and err.code == "overloaded"
    err = backend_error(KVCapacityError("full"), retry_after_s=2)
    assert err.status == 503 and err.headers == {"Retry-After": "2"} and err.code == "kv_cache_full"
    assert backend_error(ValueError("bug"), 2) is None


def _cache_stats(deployment: str, app_name: str = "speckv") -> dict[str, dict]:
    """Cache stats per replica of a deployment (sticky routing spreads these calls over the replicas)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    stats = [handle.options(session_id=f"probe-{i}").stats.remote() for i in range(24)]
    return {s["replica"]: s for s in (r.result() for r in stats)}


def _sessions_and_passes() -> tuple[int, int, int]:
    """(draft sessions, target sessions, target forward passes) over every replica of the split app."""
    draft, target = _cache_stats("draft"), _cache_stats("target-fp16")
    return (sum(s["sessions"] for s in draft.values()), sum(s["sessions"] for s in target.values()),
            sum(s["hits"] + s["rebuilds"] for s in target.values()))


def _assert_generation_stopped(before: tuple[int, int, int], max_passes: int) -> None:
    """After a client went away: no more target passes, at most `max_passes` made for the request, and
    the draft and target sessions back to what they were before it."""
    time.sleep(1.0)
    after = _sessions_and_passes()
    time.sleep(1.0)
    assert _sessions_and_passes()[2] == after[2], "the generation kept running after the client left"
    print(f"passes after the client left: {after[2] - before[2]} (bound {max_passes})")
    assert after[2] - before[2] <= max_passes, (before, after)
    assert after[:2] == before[:2], (before, after)


# Earlier tests may leave sessions orphaned by a replica-set change (the scale-up test): those wait for LRU
# or the idle timeout, so the checks below compare with the sessions held before the request.
DISCONNECT_BODY = {"model": "speckv-fp16", "prompt": "while True:", "max_tokens": 250, "temperature": 0,
                   "speculation": {"policy": "fixed", "gamma": 2}}  # 84+ target passes if it ran to the end


def test_client_disconnect_frees_sessions_at_once(app):
    """A client that goes away mid-stream stops its generation within a few steps and frees its draft and
    target sessions at once."""
    before = _sessions_and_passes()
    with httpx.stream("POST", BASE + "/v1/completions", json={**DISCONNECT_BODY, "stream": True}, timeout=120) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    _assert_generation_stopped(before, max_passes=10)


def test_cancelled_non_streamed_request_frees_sessions(app):
    """A client that gives up on a non-streamed request (its read times out and it closes the connection)
    cancels the generation: it stops early and its sessions are freed."""
    before = _sessions_and_passes()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(BASE + "/v1/completions", json=DISCONNECT_BODY, timeout=httpx.Timeout(10, read=0.4))
    _assert_generation_stopped(before, max_passes=30)


def test_bounded_load_run_loses_nothing(app, tmp_path):
    """A short bounded load run (deployments/load_run.py) on the split app: every answer, streamed or not,
    equals the greedy reference; the only non-200 answers allowed are overload answers."""
    from deployments.load_run import main

    out = tmp_path / "load.json"
    rc = main(["--url", BASE, "--clients", "4", "--duration", "15", "--max-tokens", "24", "--policy", "fixed:2",
               "--sample-rss", "--rss-interval", "3", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 0 and doc["mismatches"] == 0, doc["mismatch_examples"]
    assert doc["answers_by_kind"].get("ok", 0) >= 8, doc["answers_by_kind"]
    assert set(doc["answers_by_kind"]) <= {"ok", "http_429", "http_503"}, doc["answers_by_kind"]
    assert doc["rss_bytes"], "no Serve replica processes were sampled"


def test_concurrent_requests_share_passes_and_each_equals_its_reference(app, slow_app):
    """Requests of different lengths sent at once (to the app whose model calls are slow, so they overlap
    in the replicas) are drafted and verified in shared passes (their `batch_histogram` shows passes of
    more than one request) and each answer is token for token its single-request reference (fp32)."""
    engine: LocalEngine = app["engine"]
    prompts = ["def f(x):", "class Stack:\n    def push(self, item):", "import os\n", "# sort a list of numbers\n"
               "def sort_numbers(values):", "x = [i * i for i in range(10)]\n", "def add(a, b):"]
    budgets = [24, 16, 30, 20, 12, 28]
    expected = [engine.generate(encode_prompt(engine.tokenizer, p, chat=False), "fixed:3", n).text
                for p, n in zip(prompts, budgets)]

    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=300) as client:
            calls = [client.post(BASE + "/slow/v1/completions", json={
                "model": "speckv-fp16", "prompt": p, "max_tokens": n, "temperature": 0,
                "speculation": {"policy": "fixed", "gamma": 3}}) for p, n in zip(prompts, budgets)]
            return [r.json() for r in await asyncio.gather(*calls)]

    bodies = asyncio.run(run())
    assert [b["choices"][0]["text"] for b in bodies] == expected
    shared = [int(size) for b in bodies for size, n in b["speculation"]["batch_histogram"].items()]
    assert max(shared) > 1, [b["speculation"]["batch_histogram"] for b in bodies]


def test_a_full_kv_cache_turns_new_requests_away_with_503_and_loses_nothing(app):
    """Replicas bounded to 80 tokens of KV cache: while a long request runs (streamed; the new one is sent once
    10 of its steps have reached the client, so it surely holds more than the 9 tokens of room a 71-token prompt
    leaves), the new one gets 503 + Retry-After with an OpenAI-shaped body; the running one completes as it
    would alone, and the new one is served once the running one has ended."""
    per_token = 2 * 2 * 2 * 12 * 4  # the tiny pair: layers x (K, V) x KV heads x head size x float32
    with derived_app(app, "speckv-kv", "/kv", kv_cache_mib=80 * per_token / 2**20,
                     added_ms_per_call={"target-fp16": 150.0}):
        engine: LocalEngine = app["engine"]
        long_body = {"model": "speckv-fp16", "prompt": "def f(x):", "max_tokens": 70, "temperature": 0,
                     "speculation": {"policy": "fixed", "gamma": 2}}  # 4 + 70 tokens: fits alone
        new_body = {**long_body, "prompt": "# " + "numbers and letters " * 23, "max_tokens": 4}  # 71 tokens

        async def run() -> tuple[str, httpx.Response]:
            async with httpx.AsyncClient(timeout=300) as client:
                texts, steps, turned_away = [], 0, None
                async with client.stream("POST", BASE + "/kv/v1/completions",
                                         json={**long_body, "stream": True}) as running:
                    assert running.status_code == 200
                    async for line in running.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        text = json.loads(line[len("data: "):])["choices"][0]["text"]
                        texts.append(text)
                        steps += bool(text)
                        if turned_away is None and steps >= 10:
                            turned_away = await client.post(BASE + "/kv/v1/completions", json=new_body)
                return "".join(texts), turned_away

        done_text, turned_away = asyncio.run(run())
        assert turned_away is not None, "the long request ended before 10 of its steps arrived"
        assert turned_away.status_code == 503, turned_away.text
        assert turned_away.headers["Retry-After"] and turned_away.json()["error"]["code"] == "kv_cache_full"
        expected = engine.generate(encode_prompt(engine.tokenizer, long_body["prompt"], chat=False), "fixed:2", 70)
        assert done_text == expected.text
        later = post("/kv/v1/completions", new_body)
        assert later.status_code == 200 and later.json()["usage"]["completion_tokens"] == 4

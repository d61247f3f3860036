"""The router's request path without Ray: the Router class over fake deployment handles that wrap
in-process workers, so replica failures can be injected exactly where a test needs them."""

from __future__ import annotations

import asyncio
import inspect
import json

import pytest
from ray.exceptions import ActorUnavailableError
from starlette.requests import ClientDisconnect

from deployments.grouping import answer_group
from deployments.protocol import APIError, CompletionRequest
from deployments.router import Router
from speckv.models import DEFAULT_TARGET, load_model, resolve_model_dir
from speckv.workers import DraftWorker, SessionLM, TargetWorker

from .serve_helpers import save_tiny_pair


class FakeHandle:
    """Stands in for a DeploymentHandle: `handle.options(...).method.remote(*args)` runs `method` of a local
    object, unless the handle is down, when the call raises what Ray raises for a replica that is gone.
    Records the Serve request context each call was made in (Serve links a call made in a request's
    context to that request, and cancels it with the request)."""

    def __init__(self, target: object) -> None:
        self.target = target
        self.calls = 0
        self.fail_after: int | None = None  # calls that succeed before the replica "dies" for good
        self.contexts: list[tuple[str, object]] = []

    def options(self, **_) -> FakeHandle:
        return self

    def __getattr__(self, name: str):
        method = getattr(self.target, name)
        handle = self

        class _Method:
            @staticmethod
            def remote(*args):
                from ray.serve.context import _serve_request_context

                handle.contexts.append((name, _serve_request_context.get()))

                async def call():
                    handle.calls += 1
                    if handle.fail_after is not None and handle.calls > handle.fail_after:
                        raise ActorUnavailableError("replica gone (injected)", None)
                    result = method(*args)
                    return await result if inspect.isawaitable(result) else result
                return call()

        return _Method()


class _Replica:
    """Answers a router's grouped calls as a model replica does (deployments.grouping)."""

    async def call_group(self, method: str, calls: list[tuple]):
        return await answer_group(self, f"fake-{type(self).__name__}", method, calls)


class _Target(_Replica):
    def __init__(self, worker: TargetWorker) -> None:
        self.verify, self.close = worker.verify, worker.lm.close


class _Draft(_Replica):
    def __init__(self, worker: DraftWorker) -> None:
        self.propose, self.close = worker.propose, worker.lm.close


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    target, draft = save_tiny_pair(tmp_path_factory.mktemp("models"), resolve_model_dir(DEFAULT_TARGET))
    return target, draft


@pytest.fixture()
def router(models):
    target, draft = models
    config = {"draft_model": draft, "target_model": target, "tiers": ["fp16"], "dtype": "float32",
              "draft_dtype": "float32", "retry_deadline_s": 1.0, "retry_after_s": 7, "default_policy": "fixed:2"}
    target_handle = FakeHandle(_Target(TargetWorker(SessionLM(load_model(target, dtype="float32")))))
    draft_handle = FakeHandle(_Draft(DraftWorker(SessionLM(load_model(draft, dtype="float32")))))
    r = Router(config, {"fp16": target_handle}, controller=None, draft=draft_handle)
    return r, target_handle, draft_handle


BODY = {"model": "speckv-fp16", "prompt": "def add(a, b):", "max_tokens": 24, "temperature": 0}


async def _stream_events(response) -> list:
    chunks = [c if isinstance(c, str) else c.decode() async for c in response.body_iterator]
    lines = [line[6:] for line in "".join(chunks).splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_retried_step_is_counted_and_the_output_unchanged(router):
    r, target, _ = router
    expected = asyncio.run(r.completions(CompletionRequest(**BODY)))
    expected = json.loads(expected.body)
    assert expected["speculation"]["retries"] == 0 and expected["speculation"]["draft_tokens"] > 0

    # the target's replica fails once (at its third call), then answers again
    original = target.target.verify

    def flaky(*args):
        if target.calls == 3:
            raise ActorUnavailableError("replica restarting (injected)", None)
        return original(*args)

    target.target.verify = flaky
    target.calls = 0
    again = json.loads(asyncio.run(r.completions(CompletionRequest(**BODY))).body)
    assert again["choices"][0]["text"] == expected["choices"][0]["text"]
    assert again["speculation"]["retries"] == 1


def test_retries_run_out_before_the_first_token_gives_503(router):
    r, target, _ = router
    target.fail_after = 0
    with pytest.raises(APIError) as err:
        asyncio.run(r.completions(CompletionRequest(**BODY)))
    assert err.value.status == 503 and err.value.code == "unavailable"
    assert err.value.headers == {"Retry-After": "7"}
    assert target.calls > 1  # it did retry before giving up
    assert r.active == 0  # the admission slot was given back


def test_retries_run_out_mid_stream_gives_an_error_event_then_done(router):
    r, target, draft = router
    target.fail_after = 3  # three steps answered, then the replica is gone for good

    async def run():
        response = await r.completions(CompletionRequest(**{**BODY, "stream": True}))
        return await _stream_events(response)

    events = asyncio.run(run())
    text_events = [e for e in events if "choices" in e]
    assert len(text_events) >= 1 and "error" in events[-1], events[-3:]
    error = events[-1]["error"]
    assert error["code"] == "unavailable" and error["type"] == "server_error" and error["message"]
    assert r.active == 0
    # the request's draft session was closed on the way out (the target's replica is gone with its own)
    assert draft.target.close.__self__.stats().sessions == 0


def test_a_non_replica_error_is_not_retried(router):
    r, target, _ = router

    verifies = []

    def broken(*args):
        verifies.append(args)
        raise ValueError("a bug, not a lost replica")

    target.target.verify = broken
    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(r.completions(CompletionRequest(**BODY)))
    assert len(verifies) == 1


def test_model_calls_and_closes_are_made_outside_the_request_context(router):
    """Serve cancels the handle calls a cancelled request made that still wait for a replica; a close made
    in the request's context could be cancelled with it (a client going away left a draft session behind),
    and a grouped call carries other requests' calls too (deployments.grouping): both are made outside it."""
    from ray.serve.context import _RequestContext, _serve_request_context

    r, target, draft = router
    token = _serve_request_context.set(_RequestContext(request_id="parent", _internal_request_id="parent"))
    try:
        asyncio.run(r.completions(CompletionRequest(**BODY)))
    finally:
        _serve_request_context.reset(token)
    for handle in (target, draft):
        by_method = {}
        for name, ctx in handle.contexts:
            by_method.setdefault(name, set()).add(getattr(ctx, "_internal_request_id", None))
        assert by_method["close"] == {None} and by_method["call_group"] == {None}, by_method


def test_the_router_takes_its_executor_factory(models, router):
    """The router runs requests through whatever executor its factory builds (here: in-process workers, no
    handles at all), with the same answer as through the deployment handles."""
    from speckv.local import local_executor

    target, draft = models
    r_handles, _, _ = router
    workers = (DraftWorker(SessionLM(load_model(draft, dtype="float32"))),
               TargetWorker(SessionLM(load_model(target, dtype="float32"))))
    made = []

    def factory(topology, target_handle, draft_handle, retry):
        made.append((topology, target_handle, draft_handle))
        return local_executor(*workers)

    r = Router(r_handles.config.model_dump(), {"fp16": "no handle"}, controller=None, executor_factory=factory)
    got = json.loads(asyncio.run(r.completions(CompletionRequest(**BODY))).body)
    expected = json.loads(asyncio.run(r_handles.completions(CompletionRequest(**BODY))).body)
    assert [(t, calls.handle, d) for t, calls, d in made] == [("disaggregated", "no handle", None)]
    assert got["choices"][0]["text"] == expected["choices"][0]["text"] and got["speculation"]["draft_tokens"] > 0


def test_what_load_tools_send_is_served(router):
    """vLLM's extensions that load tools (GuideLLM) send: `ignore_eos` generates max_tokens tokens past
    end-of-sequence tokens (here every token is one), and `stream_options.continuous_usage_stats` puts the
    usage so far in every streamed chunk."""
    import dataclasses

    r, _, _ = router
    r.text = dataclasses.replace(r.text, eos_token_ids=tuple(range(r.text.tokenizer.vocab_size + 64)))
    stopped = json.loads(asyncio.run(r.completions(CompletionRequest(**BODY))).body)
    assert stopped["usage"]["completion_tokens"] == 0 and stopped["choices"][0]["finish_reason"] == "stop"
    body = {**BODY, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}

    async def run():
        return await _stream_events(await r.completions(CompletionRequest(**body)))

    events = asyncio.run(run())
    counts = [e["usage"]["completion_tokens"] for e in events if e["choices"] and e["choices"][0]["text"]]
    assert counts == sorted(counts) and len(counts) > 1
    assert events[-1]["usage"]["completion_tokens"] == BODY["max_tokens"]


def test_stats_count_what_each_policy_did_on_this_replica(router):
    """GET /speckv/stats: per tier and policy, the requests ended and their steps and draft tokens (a load
    tool diffs it around a run to get the mean γ under that load)."""
    r, _, _ = router
    assert asyncio.run(r.speculation_stats())["data"] == []
    answers = [json.loads(asyncio.run(r.completions(CompletionRequest(**body))).body) for body in
               (BODY, BODY, {**BODY, "speculation": {"policy": "none"}})]
    stats = {row["policy"]: row for row in asyncio.run(r.speculation_stats())["data"]}
    fixed, none = stats["fixed:2"], stats["none"]
    assert fixed["tier"] == "fp16" and fixed["requests"] == 2 and none["requests"] == 1
    assert fixed["steps"] == sum(a["speculation"]["steps"] for a in answers[:2])
    assert fixed["draft_tokens"] == sum(a["speculation"]["draft_tokens"] for a in answers[:2])
    assert fixed["mean_gamma"] == fixed["draft_tokens"] / fixed["steps"] > 1
    assert none["mean_gamma"] == 0 and none["steps"] == answers[2]["usage"]["completion_tokens"]


@pytest.mark.parametrize("share_cores", [True, False])
def test_generations_in_flight_are_the_sharing_adaptive_prices_on_shared_cores(models, share_cores):
    """Where the replicas share the machine's cores, every generation in flight (any tier, any policy) waits
    for the others' passes: the router tells each tier's estimates how many there are (TierEstimates.sharing).
    And, shared cores or not, how many are in flight on the tier: a pass may carry them all, and before any pass
    is seen `adaptive` prices one as carrying them (TierEstimates.in_flight)."""
    from speckv.cost_model import CostModel
    from speckv.estimates import TierEstimates

    target, draft = models
    config = {"draft_model": draft, "target_model": target, "tiers": ["fp16"], "share_cores": share_cores}
    r = Router(config, {"fp16": FakeHandle(object())}, controller=None, draft=FakeHandle(object()))
    r._estimates["fp16"] = estimates = TierEstimates.calibrated(CostModel(50.0, 100.0, 2.0))
    for _ in range(3):
        r._admit("fp16")
    assert estimates.sharing == (3 if share_cores else 1)
    assert estimates.in_flight == 3  # whether or not they share the cores, a pass may carry them all
    for _ in range(3):
        r._count("fp16", -1)
    assert estimates.sharing == 1 and estimates.in_flight == 0


def test_a_client_gone_during_the_first_step_gives_its_slot_back(router):
    """A client that disconnects while its first step runs cancels the request there: its generation slot and
    its sessions are given back. They were not (only errors were handled there): after a load run whose window
    cut streams in their prefill, the router counted 17 phantom generations (nf4, AVX2 EPYC) in flight for good,
    `adaptive` priced every drafting step for them and never drafted, and enough of them would have refused
    everything."""
    r, target, draft = router

    def cancelled(*args):
        raise asyncio.CancelledError  # what the awaiting request sees when its client goes away

    target.target.verify = cancelled
    for stream in (False, True):
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(r.completions(CompletionRequest(**{**BODY, "stream": stream})))
        assert r.active == 0
    assert draft.target.close.__self__.stats().sessions == 0


def test_a_stream_whose_client_left_before_it_began_gives_its_slot_back(router):
    """The response is closed before its body generator ever ran (the client went away before the headers
    were sent): closing a generator that never started does not run its cleanup, so the response does it."""
    r, _, draft = router

    async def run():
        response = await r.completions(CompletionRequest(**{**BODY, "stream": True}))
        assert r.active == 1

        async def gone(message):
            raise OSError("client disconnected")

        async def receive():
            return {"type": "http.disconnect"}

        with pytest.raises(ClientDisconnect):  # what Starlette makes of it
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, gone)

    asyncio.run(run())
    assert r.active == 0
    assert draft.target.close.__self__.stats().sessions == 0


def test_requests_that_arrive_together_are_all_in_flight_at_their_first_step(models):
    """Where the replicas share the cores, a request's first step (where the draft reads its whole prompt) is
    priced for every generation in flight: requests that arrive together are all counted before the first of
    them decides it (speckv.local.LocalEngine.generate_many says what counting them one by one cost)."""
    from speckv.cost_model import CostModel
    from speckv.estimates import TierEstimates

    target, draft = models
    config = {"draft_model": draft, "target_model": target, "tiers": ["fp16"], "dtype": "float32",
              "draft_dtype": "float32", "share_cores": True, "default_policy": "fixed:2"}
    estimates = TierEstimates.calibrated(CostModel(50.0, 100.0, 2.0))
    worker, seen = DraftWorker(SessionLM(load_model(draft, dtype="float32"))), []
    counting = _Draft(worker)

    def propose(inputs, *args):
        if inputs.step == 0:
            seen.append(estimates.sharing)
        return worker.propose(inputs, *args)
    counting.propose = propose
    r = Router(config, {"fp16": FakeHandle(_Target(TargetWorker(SessionLM(load_model(target, dtype="float32")))))},
               controller=None, draft=FakeHandle(counting))
    r._estimates["fp16"] = estimates

    async def run():
        return await asyncio.gather(*(r.completions(CompletionRequest(**{**BODY, "max_tokens": 4}))
                                      for _ in range(3)))
    asyncio.run(run())
    assert seen == [3, 3, 3]


def test_a_burst_spread_over_tens_of_ms_is_counted_before_its_first_requests_decide_to_draft(models, monkeypatch):
    """A burst reaches the router over tens of milliseconds (GuideLLM's 16 streams: 86 ms), not on one turn of
    its loop. Three `adaptive` requests 60 ms apart, whose first steps would have the draft read a 144-token
    prompt: alone, the first would draft (0.7 s of reading repaid over 100 tokens); priced for two or three on
    the shared cores, no first step would. None drafts: the first waits (AdaptivePolicy.settle_s, 0.18 s here)
    until the second is counted, and decides then, not at the end of its wait. Deciding at once, the first
    requests of a burst drafted, and the whole burst waited for their readings (int8 at 16 streams on an AVX2
    EPYC: first tokens at 97.6 s against `none`'s 68.3 s); waiting on once their first step would not draft,
    they would only let those that did not wait start their prefill pass without them."""
    import time

    from speckv.adaptive import AdaptivePolicy
    from speckv.cost_model import CostModel
    from speckv.estimates import TierEstimates

    from ..conftest import predictor_with_acceptance

    target, draft = models
    config = {"draft_model": draft, "target_model": target, "tiers": ["fp16"], "dtype": "float32",
              "draft_dtype": "float32", "share_cores": True, "default_policy": "adaptive", "policy_refresh_s": 600}
    r = Router(config, {"fp16": FakeHandle(_Target(TargetWorker(SessionLM(load_model(target, dtype="float32")))))},
               controller=None, draft=FakeHandle(_Draft(DraftWorker(SessionLM(load_model(draft, dtype="float32"))))))
    r._predictor, r._predictor_checked = predictor_with_acceptance(3.0), time.monotonic()
    cpu = CostModel(draft_ms_per_token=20.0, verify_ms_base=100.0, verify_ms_per_token=2.0,
                    draft_prefill_ms_per_token=5.0)
    r._estimates["fp16"] = TierEstimates.calibrated(cpu)
    first_steps, choose = {}, AdaptivePolicy.choose  # each policy's (seconds into the burst, sharing, γ)
    began = time.monotonic()

    def recording(policy, context):
        gamma = choose(policy, context)
        if context.step == 0:
            first_steps[policy] = (time.monotonic() - began, policy.estimates.tier.sharing, gamma)
        return gamma
    monkeypatch.setattr(AdaptivePolicy, "choose", recording)
    body = {**BODY, "prompt": "def add(a, b):\n    return a + b\n" * 12, "max_tokens": 100, "ignore_eos": True}
    prompt_len = len(r.text.encode(body["prompt"], chat=False))
    waits = []
    for sharing, drafts in ((1, True), (2, False), (3, False)):
        estimates = TierEstimates.calibrated(cpu)
        estimates.sharing = sharing
        waits.append(AdaptivePolicy(r._predictor, "fp16", estimates).settle_s(prompt_len, 100))
        assert (waits[-1] > 0) == drafts
    assert waits[0] > 0.15
    arrived, init = [], AdaptivePolicy.__init__  # the policies in their requests' arrival order

    def made(policy, *args):
        init(policy, *args)
        arrived.append(policy)
    monkeypatch.setattr(AdaptivePolicy, "__init__", made)

    async def arriving(delay_s: float):
        await asyncio.sleep(delay_s)
        return await r.completions(CompletionRequest(**body))

    async def burst():
        nonlocal began
        # a first request warms the path up (its first call took 60 ms: the second arrived before it decided)
        await r.completions(CompletionRequest(**{**body, "max_tokens": 2, "speculation": {"policy": "none"}}))
        began = time.monotonic()
        return await asyncio.gather(*(arriving(0.06 * i) for i in range(3)))
    asyncio.run(burst())
    decisions = [first_steps[policy] for policy in arrived]
    assert [gamma for _, _, gamma in decisions] == [0, 0, 0], decisions
    first_decided = decisions[0][0]
    assert 0.05 < first_decided < waits[0] - 0.03, decisions  # with the second counted, before its wait ran out


def test_time_to_first_token_counts_from_the_requests_admission(router):
    """What a request waits before its first step (for its burst: Router._settle) is its client's wait too."""
    r, _, _ = router
    observed = []
    r.metrics.ttft_ms.observe = lambda ms, tags: observed.append(ms)

    async def first_event():
        gen = await r._prepare(CompletionRequest(**BODY), r.text.encode(BODY["prompt"], chat=False), 4)
        gen.started -= 1.0  # admitted a second ago
        events = r._events(gen)
        await anext(events)
        await events.aclose()
    asyncio.run(first_event())
    assert observed and observed[0] >= 1000.0


def test_requests_that_need_a_tiers_calibration_before_it_has_come_wait_for_one_fetch(models):
    """The first `adaptive` requests of a tier fetch its replicas' calibration once, together: each fetching its
    own, those whose fetch a replica answered after the prefill pass the others had started (a replica answers
    between passes) missed that pass (nf4, 16 streams, AVX2 EPYC: four first tokens 5.3 s after the twelve)."""
    import time

    from speckv.calibration import Calibration, CalibrationKey

    from ..conftest import predictor_with_acceptance

    def calibration(role: str, rows: list[dict]) -> dict:
        return Calibration(CalibrationKey("cpu", "torch", "weights", role, "fp16", "float32", "cpu"), rows).to_dict()

    target, draft = models
    config = {"draft_model": draft, "target_model": target, "tiers": ["fp16"], "dtype": "float32",
              "draft_dtype": "float32", "default_policy": "adaptive", "policy_refresh_s": 600}
    target_side = _Target(TargetWorker(SessionLM(load_model(target, dtype="float32"))))
    fetches = []
    target_side.calibration = lambda: fetches.append(1) or {"target": calibration("target", [
        {"kind": "verify", "context_len": 16, "tokens": t, "ms": 100.0 + t} for t in (1, 2, 3)])}
    draft_side = _Draft(DraftWorker(SessionLM(load_model(draft, dtype="float32"))))
    draft_side.calibration = lambda: {"draft": calibration("draft", [
        {"kind": "draft", "context_len": 16, "tokens": 1, "ms": 20.0}])}
    r = Router(config, {"fp16": FakeHandle(target_side)}, controller=None, draft=FakeHandle(draft_side))
    r._predictor, r._predictor_checked = predictor_with_acceptance(3.0), time.monotonic()

    async def burst():
        return await asyncio.gather(*(r.completions(CompletionRequest(**{**BODY, "max_tokens": 2})) for _ in range(3)))
    answers = asyncio.run(burst())
    assert len(answers) == 3 and len(fetches) == 1 and "fp16" in r._estimates


def test_chat_content_parts_and_the_developer_role_are_read_as_their_plain_forms(router):
    """OpenAI's array form of a message's content and its `developer` role reach the chat template as the joined
    text and the system role: greedy answers equal the plain form's."""
    from deployments.protocol import ChatCompletionRequest

    r, _, _ = router
    body = {"model": "speckv-fp16", "max_tokens": 12, "temperature": 0}

    def answer(messages: list[dict]) -> str:
        reply = json.loads(asyncio.run(r.chat_completions(ChatCompletionRequest(**body, messages=messages))).body)
        return reply["choices"][0]["message"]["content"]

    def text(*parts: str) -> list[dict]:
        return [{"type": "text", "text": p} for p in parts]

    plain = answer([{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "add\ntwo"}])
    assert plain == answer([{"role": "developer", "content": text("Answer in Python.")},
                            {"role": "user", "content": text("add", "two")}])


def test_a_model_is_retrieved_by_its_id_and_an_unknown_one_is_404(router):
    """OpenAI's `client.models.retrieve(id)`: GET /v1/models/{id} answers the card /v1/models lists, and an id
    this app does not serve is 404 model_not_found."""
    r, _, _ = router
    listed = {m["id"]: m for m in asyncio.run(r.models())["data"]}
    assert all(asyncio.run(r.model(mid)) == card for mid, card in listed.items()) and "speckv-fp16" in listed
    with pytest.raises(APIError) as e:
        asyncio.run(r.model("gpt-4"))
    assert e.value.status == 404 and e.value.code == "model_not_found"


def test_a_prompt_sent_as_token_ids_is_answered_as_its_text_and_ids_outside_the_vocabulary_are_400(router):
    r, _, _ = router
    ids = r.text.encode(BODY["prompt"], chat=False)

    def text_of(prompt) -> str:
        reply = json.loads(asyncio.run(r.completions(CompletionRequest(**{**BODY, "prompt": prompt}))).body)
        return reply["choices"][0]["text"]

    assert text_of(ids) == text_of([ids]) == text_of(BODY["prompt"])
    for bad in ([len(r.text.tokenizer)], [-1]):
        with pytest.raises(APIError) as e:
            text_of(bad)
        assert e.value.status == 400 and e.value.param == "prompt"


def test_concurrent_requests_share_handle_calls_and_each_equals_its_answer_alone(router):
    """Requests in flight together: after each one's first call (where its replica is learnt), the calls they make
    in the same turn go in one handle call to their replica (deployments.grouping), and each answer is token for
    token the one it gets alone (fp32)."""
    r, target, draft = router
    prompts = ["def add(a, b):", "class Stack:", "import os\n", "x = [i for i in"]
    bodies = [{**BODY, "prompt": p, "max_tokens": n} for p, n in zip(prompts, (20, 12, 16, 24))]
    alone = [json.loads(asyncio.run(r.completions(CompletionRequest(**b))).body)["choices"][0]["text"]
             for b in bodies]
    target.calls = draft.calls = 0
    before, draft_before = r.target_calls["fp16"].stats.calls, r.draft_calls.stats.calls

    async def together():
        return await asyncio.gather(*(r.completions(CompletionRequest(**b)) for b in bodies))

    answers = [json.loads(a.body)["choices"][0]["text"] for a in asyncio.run(together())]
    assert answers == alone
    verifies = r.target_calls["fp16"].stats.calls - before
    proposals = r.draft_calls.stats.calls - draft_before
    assert target.calls < verifies * 0.6, (target.calls, verifies)  # handle calls, each carrying several
    assert draft.calls < proposals * 0.6, (draft.calls, proposals)
    assert asyncio.run(r.speculation_stats())["grouping"]["target-fp16"]["largest"] == len(bodies)

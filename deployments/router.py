"""Router: the HTTP ingress. Validates OpenAI requests, runs speckv's speculation loop through deployment
handles, streams tokens, and records metrics."""

import asyncio
import contextvars
import hmac
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from speckv.calibration import Calibration, cost_model
from speckv.controller import ControllerSnapshot
from speckv.engine import GenerationRequest, SplitExecutor, StepCall, StepEvent, StepExecutor, TextAssembler, speculate
from speckv.estimates import TierEstimates
from speckv.local import encode_prompt, eos_token_ids
from speckv.models import load_tokenizer, resolve_model_dir
from speckv.policy import make_policy
from speckv.sampling import SamplingParams
from speckv.workers import StepInputs

from .config import AppConfig
from .metrics import ServeMetrics, hop_ms
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, new_id, now

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def _is_replica_failure(error: BaseException) -> bool:
    """Errors that mean a replica went away (died, restarted, scaled down), not a bug in the request."""
    import ray.exceptions as rex

    kinds = tuple(k for k in (getattr(rex, n, None) for n in (
        "RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError")) if k)
    return isinstance(error, kinds)


def backend_error(error: BaseException, retry_after_s: int) -> APIError | None:
    """The HTTP answer for a model-side failure before any token was sent: 503 + Retry-After when a tier is
    overloaded (its queue is full) or its replicas stayed unreachable past the retry deadline."""
    from ray.serve.exceptions import BackPressureError

    headers = {"Retry-After": str(retry_after_s)}
    if isinstance(error, BackPressureError):
        return APIError(503, "the model is overloaded (its request queue is full); retry later", type_="server_error",
                        code="overloaded", headers=headers)
    if _is_replica_failure(error):
        return APIError(503, "the model's replicas are unavailable; retry later", type_="server_error",
                        code="unavailable", headers=headers)
    return None


class StepRetries:
    """One request's calls to replicas, retried while a replica is gone (died, restarting, scaled down).

    A step is idempotent (token ids in, seeds derived from the step), so a call whose replica went away is
    retried until a replica answers (Serve restarts or reroutes) or `deadline_s` passes. `count` is how many
    retries the request needed: the response's `speculation.retries`.
    """

    def __init__(self, deadline_s: float, on_retry: Callable[[], None] | None = None) -> None:
        self.deadline_s = deadline_s
        self.count = 0
        self._on_retry = on_retry

    async def __call__(self, call: Callable[[], Awaitable]):
        deadline = time.monotonic() + self.deadline_s
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as e:  # noqa: BLE001 - filtered below
                if not _is_replica_failure(e) or time.monotonic() > deadline:
                    raise
                attempt += 1
                self.count += 1
                if self._on_retry:
                    self._on_retry()
                logger.warning("replica failure (%s); retrying the step, attempt %d", type(e).__name__, attempt)
                await asyncio.sleep(min(0.25 * 2**attempt, 2.0))


async def close_detached(*calls: Callable[[], Awaitable]) -> None:
    """Make the close calls so that they reach the replicas even when the request is being cancelled
    (client gone): shielded from that cancellation, and made outside the request's context, because Serve
    cancels the handle calls of a cancelled request that are still waiting for a replica (its child
    requests), which left a session behind now and then."""
    async def run() -> None:
        await asyncio.gather(*(call() for call in calls), return_exceptions=True)

    task = contextvars.Context().run(asyncio.get_running_loop().create_task, run())
    await asyncio.shield(task)


def remote_split_executor(draft: DeploymentHandle, target: DeploymentHandle, retry: StepRetries) -> SplitExecutor:
    """Disaggregated topology: draft and target replicas reached through sticky handles."""

    async def propose(inputs: StepInputs):
        return await retry(lambda: draft.options(session_id=inputs.session_id).propose.remote(inputs))

    async def verify(inputs: StepInputs, draft_token_ids: list[int]):
        return await retry(lambda: target.options(session_id=inputs.session_id).verify.remote(inputs, draft_token_ids))

    async def close(sid: str) -> None:
        await close_detached(lambda: draft.options(session_id=sid).close.remote(sid),
                               lambda: target.options(session_id=sid).close.remote(sid))

    return SplitExecutor(propose, verify, close)


class RemoteColocatedExecutor:
    """Colocated topology: the target replica drafts too, so a step is one hop."""

    def __init__(self, target: DeploymentHandle, retry: StepRetries) -> None:
        self.target = target
        self.retry = retry

    async def run_step(self, inputs: StepInputs) -> StepCall:
        start = time.perf_counter()
        inner: StepCall = await self.retry(
            lambda: self.target.options(session_id=inputs.session_id).step.remote(inputs))
        wall_ms = (time.perf_counter() - start) * 1e3
        return StepCall(inner.proposal, inner.verification, inner.draft_wall_ms, wall_ms - inner.draft_wall_ms)

    async def close(self, sid: str) -> None:
        await close_detached(lambda: self.target.options(session_id=sid).close.remote(sid))


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator when the response ends for any reason, a client that went away included,
    so the generator's cleanup (releasing the workers' sessions) runs now rather than whenever the
    abandoned generator is garbage-collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.body_iterator.aclose())


api = FastAPI(title="SpecKV", description="Adaptive speculative decoding, OpenAI-compatible.")
# What the middleware below reads, set by the router replica in this process. Not `api.state`: Serve's
# ingress serves a copy of `api` made when the deployment class is wrapped, so state set on the module's
# `api` at replica start is not on the app that handles requests.
SETTINGS = SimpleNamespace()


@api.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    """Framework-level 4xx (a body that is not JSON or not UTF-8, an unknown route or method) in OpenAI's shape."""
    error = APIError(e.status_code, str(e.detail), code="invalid_body" if e.status_code == 400 else None)
    return JSONResponse(error.body(),
                        status_code=e.status_code, headers=getattr(e, "headers", None))


@api.exception_handler(Exception)
async def _unexpected_error(_: Request, e: Exception) -> JSONResponse:
    """Anything unforeseen still answers in OpenAI's error shape (and is logged with its traceback)."""
    logger.exception("unhandled error")
    return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type_="server_error").body(),
                        status_code=500)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    first = errors[0] if errors else {}
    def where(err: dict) -> str:
        return ".".join(str(x) for x in err.get("loc", []) if x not in ("body",) and not isinstance(x, int))

    loc = where(first).split(".") if where(first) else []
    message = "; ".join(f"{where(err) or 'body'}: {err.get('msg')}" for err in errors[:5])
    return JSONResponse(APIError(400, message, param=".".join(loc) or None, code=first.get("type")).body(),
                        status_code=400)


def _authorized(request: Request) -> bool:
    keys: frozenset[str] = getattr(SETTINGS, "api_keys", frozenset())
    if not keys or request.url.path.endswith("/healthz"):
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip(), k) for k in keys)


class BodyLimit:
    """ASGI middleware: a request body over `SETTINGS.max_body_bytes` gets 413, whether it declares its
    length (refused before reading) or arrives chunked without Content-Length (refused once the bytes read
    pass the limit, without reading the rest). A body within the limit is passed on unchanged."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        limit = getattr(SETTINGS, "max_body_bytes", None)
        if scope["type"] != "http" or not limit:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await self._too_large(limit, scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return await self._too_large(limit, scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(limit: int, scope, receive, send) -> None:
        response = JSONResponse(APIError(413, f"request body over {limit} bytes", code="body_too_large").body(),
                                status_code=413)
        await response(scope, receive, send)


api.add_middleware(BodyLimit)  # inside the API-key check below (middleware added later runs first)


@api.middleware("http")
async def _auth(request: Request, call_next):
    if not _authorized(request):
        return JSONResponse(APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                     code="invalid_api_key").body(),
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


class Router:
    """The HTTP ingress as a plain class (tests build it over fake handles); `RouterDeployment` below is it
    as a Serve deployment."""

    def __init__(
        self,
        config: dict,
        targets: dict[str, DeploymentHandle],
        controller: DeploymentHandle,
        draft: DeploymentHandle | None = None,
    ) -> None:
        from transformers import AutoConfig, GenerationConfig

        self.config = AppConfig.model_validate(config)
        SETTINGS.max_body_bytes = self.config.max_body_bytes
        SETTINGS.api_keys = frozenset(
            k.strip() for k in os.environ.get(self.config.api_keys_env, "").split(",") if k.strip())
        self.tokenizer = load_tokenizer(self.config.target_model)
        path = resolve_model_dir(self.config.target_model)
        model_config = AutoConfig.from_pretrained(path)
        self.context_window = int(getattr(model_config, "max_position_embeddings", 32768))
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # a model directory without generation_config.json
            generation_config = None
        self.eos = eos_token_ids(self.tokenizer, generation_config)
        self.model_ids = self.config.model_ids()
        self.targets, self.draft = targets, draft
        self.controller = controller
        self._snapshot: ControllerSnapshot | None = None
        self._snapshot_checked = 0.0
        self._estimates: dict[str, TierEstimates] = {}  # per tier, from its replicas' calibration, then live
        self.metrics = ServeMetrics()
        self.active = 0  # generations in flight on this replica (admission control)

    # ------------------------------------------------------------------ helpers

    def _executor(self, tier: str) -> tuple[StepExecutor, StepRetries]:
        """A request's executor for a tier, with the retry counter its calls share."""
        retry = StepRetries(self.config.retry_deadline_s,
                            on_retry=lambda: self.metrics.retries.inc(1, {"tier": tier}))
        target = self.targets[tier]
        if self.config.topology == "colocated":
            return RemoteColocatedExecutor(target, retry), retry
        return remote_split_executor(self.draft, target, retry), retry

    async def _controller_snapshot(self) -> ControllerSnapshot:
        """The cached controller snapshot, revalidated against the controller's version every refresh period."""
        if self._snapshot is None or time.monotonic() - self._snapshot_checked > self.config.policy_refresh_s:
            version = await self.controller.version.remote()
            if self._snapshot is None or version != self._snapshot.version:
                self._snapshot = await self.controller.snapshot.remote()
            self._snapshot_checked = time.monotonic()
        return self._snapshot

    async def _tier_estimates(self, tier: str) -> TierEstimates:
        """What `adaptive` knows of a tier's step costs: the calibration its replicas measured when they loaded
        (fetched once), followed online by every step this router runs."""
        if tier not in self._estimates:
            measured = await self.targets[tier].calibration.remote()
            if "draft" not in measured:
                measured = {**measured, **(await self.draft.calibration.remote())}
            cost = cost_model(Calibration.from_dict(measured["draft"]), Calibration.from_dict(measured["target"]))
            self._estimates.setdefault(tier, TierEstimates.calibrated(cost))
        return self._estimates[tier]

    async def _prepare(self, req: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
                       max_tokens: int | None):
        tier = self.model_ids.get(req.model)
        if tier is None:
            raise APIError(404, f"model {req.model!r} does not exist; available: {', '.join(self.model_ids)}",
                           param="model", code="model_not_found")
        max_tokens = max_tokens or DEFAULT_MAX_TOKENS
        if max_tokens > self.config.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of "
                                f"{self.config.max_tokens_limit}", param="max_tokens")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) + max_tokens > self.context_window:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"context window of {self.context_window} tokens", param="max_tokens",
                           code="context_length_exceeded")
        stops = req.stop_list()
        if len(stops) > self.config.max_stop_strings:
            raise APIError(400, f"at most {self.config.max_stop_strings} stop strings", param="stop")
        try:
            sampling = SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
            request = GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=max_tokens, sampling=sampling,
                                        stop=tuple(stops), eos_token_ids=self.eos, tier=tier.value)
        except ValueError as e:
            raise APIError(400, str(e), param="stop" if "stop" in str(e) else None) from None
        spec = req.speculation.policy_spec() if req.speculation else self.config.default_policy
        snapshot = estimates = None
        if spec == "adaptive":
            snapshot, estimates = await self._controller_snapshot(), await self._tier_estimates(tier.value)
        policy = make_policy(spec, tier.value, snapshot, estimates, sampling.greedy)
        return request, policy, tier.value, snapshot

    async def _events(self, request: GenerationRequest, policy, tier: str, stats: dict) -> AsyncIterator[StepEvent]:
        start = time.perf_counter()
        assembler = TextAssembler(self.tokenizer, request.stop)
        outcome = "error"
        executor, retries = self._executor(tier)
        steps = speculate(request, executor, policy, assembler)
        try:
            async for event in steps:
                if stats["steps"] == 0:
                    self.metrics.ttft_ms.observe((time.perf_counter() - start) * 1e3, {"tier": tier})
                self.metrics.step(event.record)
                stats["steps"] += 1
                stats["draft_tokens"] += event.record.gamma
                stats["accepted_tokens"] += event.record.accepted
                stats["completion_tokens"] += len(event.token_ids)
                stats["gammas"][event.record.gamma] += 1
                stats["draft_ms"] += event.record.draft_ms
                stats["verify_ms"] += event.record.verify_ms
                stats["hop_ms"] += hop_ms(event.record)
                stats["policy_us"] += event.record.policy_us
                stats["finish_reason"] = event.finish_reason
                yield event
            outcome = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            await steps.aclose()  # runs speculate's cleanup (closing the sessions) now, not at garbage collection
            stats["retries"] = retries.count  # set before any caller reads stats: it does so after this ends
            report = getattr(policy, "report", None)  # adaptive: what it estimates now
            stats["estimates"] = report() if report else None
            if tier in self._estimates:
                self.metrics.estimates(tier, self._estimates[tier])
            seconds = time.perf_counter() - start
            if outcome == "ok" and seconds > 0:
                self.metrics.tokens_per_s.set(stats["completion_tokens"] / seconds, {"tier": tier})
            self.metrics.requests.inc(1, {"tier": tier, "outcome": outcome})

    @staticmethod
    def _new_stats(policy_name: str, controller_version: str | None) -> dict:
        return {"policy": policy_name, "controller_version": controller_version, "retries": 0, "steps": 0,
                "draft_tokens": 0, "accepted_tokens": 0, "completion_tokens": 0, "gammas": Counter(),
                "finish_reason": None, "draft_ms": 0.0, "verify_ms": 0.0, "hop_ms": 0.0, "policy_us": 0.0}

    @staticmethod
    def _speculation(stats: dict) -> dict:
        steps = stats["steps"]
        out = {"policy": stats["policy"], "steps": steps, "draft_tokens": stats["draft_tokens"],
               "accepted_tokens": stats["accepted_tokens"],
               "mean_accepted": stats["accepted_tokens"] / steps if steps else 0.0,
               "gamma_histogram": {str(g): n for g, n in sorted(stats["gammas"].items())},
               # totals over the request's steps: wall time of draft and verify calls as the router saw them,
               # the part of it spent outside the models (hops), and time spent choosing γ
               "timing": {k: stats[k] for k in ("draft_ms", "verify_ms", "hop_ms", "policy_us")},
               # model calls re-sent because a replica went away mid-request (died, restarted, scaled down)
               "retries": stats["retries"]}
        if stats["controller_version"]:  # adaptive: the controller snapshot its decisions came from
            out["controller_version"] = stats["controller_version"]
        if stats.get("estimates"):  # adaptive: its step costs, acceptance bias and rate at the end of the request
            out["estimates"] = stats["estimates"]
        return out

    def _admit(self) -> None:
        """Take a generation slot or answer 429: overload is refused at once, not queued without bound."""
        if self.active >= self.config.max_concurrent_generations:
            self.metrics.requests.inc(1, {"tier": "", "outcome": "rejected"})
            raise APIError(429, f"server busy: {self.active} generations in flight; retry after "
                                f"{self.config.retry_after_s} s", type_="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        self.active += 1

    async def _respond(self, req, prompt_ids: list[int], max_tokens: int | None, chat: bool):
        request, policy, tier, snapshot = await self._prepare(req, prompt_ids, max_tokens)
        self._admit()
        stats = self._new_stats(policy.name, snapshot.version if snapshot else None)
        events = self._events(request, policy, tier, stats)
        try:  # the first step runs before answering, so failures before any token get a proper HTTP status
            first = await anext(events, None)
        except Exception as e:
            self.active -= 1
            await events.aclose()
            mapped = backend_error(e, self.config.retry_after_s)
            if mapped is None:
                raise
            raise mapped from None
        rid = new_id("chatcmpl" if chat else "cmpl")
        created = now()
        usage = lambda: {"prompt_tokens": len(prompt_ids), "completion_tokens": stats["completion_tokens"],
                         "total_tokens": len(prompt_ids) + stats["completion_tokens"]}

        async def all_events() -> AsyncIterator[StepEvent]:
            if first is not None:
                yield first
            async for event in events:
                yield event

        if not req.stream:
            try:
                parts = [event.text async for event in all_events()]
            except Exception as e:
                mapped = backend_error(e, self.config.retry_after_s)
                if mapped is None:
                    raise
                raise mapped from None
            finally:
                self.active -= 1
                await events.aclose()
            text = "".join(parts)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": stats["finish_reason"], "logprobs": None} if chat else
                      {"index": 0, "text": text, "finish_reason": stats["finish_reason"], "logprobs": None})
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": req.model, "choices": [choice], "usage": usage(),
                                 "speculation": self._speculation(stats)})

        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta_text: str | None, finish: str | None, role: bool = False, extra: dict | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if delta_text is None else
                                                                            {"content": delta_text})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice],
                    **(extra or {})}
            return f"data: {json.dumps(body)}\n\n"

        async def sse() -> AsyncIterator[str]:
            try:
                if chat:
                    yield chunk(None, None, role=True)
                async for event in all_events():
                    if event.text:
                        yield chunk(event.text, None)
                yield chunk(None if chat else "", stats["finish_reason"],
                            extra={"speculation": self._speculation(stats)})
                if include_usage:
                    last = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [],
                            "usage": usage()}
                    yield f"data: {json.dumps(last)}\n\n"
            except Exception as e:  # noqa: BLE001 - the stream has started; report in-band, then end it
                logger.exception("request %s failed mid-stream", rid)
                err = backend_error(e, self.config.retry_after_s) or APIError(
                    500, f"generation failed: {type(e).__name__}", type_="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:  # also on client disconnect (cancellation): free the slot and the workers' sessions now
                self.active -= 1
                await events.aclose()
            yield "data: [DONE]\n\n"

        return ClosingStreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [
            {"id": mid, "object": "model", "created": 0, "owned_by": "speckv", "tier": tier.value}
            for mid, tier in self.model_ids.items()]}

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        prompt_ids = encode_prompt(self.tokenizer, req.prompt_text(), chat=False)
        return await self._respond(req, prompt_ids, req.max_tokens, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest):
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        prompt_ids = encode_prompt(self.tokenizer, messages, chat=True)
        return await self._respond(req, prompt_ids, req.effective_max_tokens(), chat=True)


RouterDeployment = serve.deployment(name="router", max_ongoing_requests=64)(serve.ingress(api)(Router))

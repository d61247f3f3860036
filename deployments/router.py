"""Router: the HTTP ingress. Validates OpenAI requests, runs speckv's speculation loop through an executor
over the model deployments (deployments.executors), streams tokens, and records metrics. The answer's shape
is in deployments.protocol; the HTTP app around it (errors, body limit, API keys) in deployments.http_app."""

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from speckv.calibration import Calibration, cost_model
from speckv.cost_model import CostModel
from speckv.engine import GenerationRequest, StepEvent, TextAssembler, speculate
from speckv.estimates import TierEstimates
from speckv.models import Tier
from speckv.policy import GammaPolicy, make_policy
from speckv.predictor import AcceptancePredictor
from speckv.records import RequestStats
from speckv.sampling import SamplingParams
from speckv.text import load_model_text

from .config import AppConfig
from .executors import ExecutorFactory, StepRetries, backend_error, detached_task, remote_executor
from .grouping import ReplicaCalls
from .http_app import SETTINGS, ClosingStreamingResponse, api
from .metrics import ServeMetrics
from .protocol import SSE_DONE, APIError, ChatCompletionRequest, CompletionRequest, Reply, StreamOptions, sse

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclass
class Generation:
    """One admitted request on its way: what it runs and what it has produced so far."""

    request: GenerationRequest
    policy: GammaPolicy
    tier: str
    stats: RequestStats
    started: float = field(default_factory=time.perf_counter)  # its time to first token counts from here


class Router:
    """The HTTP ingress as a plain class (tests build it over fake handles); `RouterDeployment` below is it
    as a Serve deployment. `executor_factory` builds each request's step executor from the app's topology,
    its tier's target handle, the draft handle and its retry policy (as Ray Serve LLM takes `engine_cls`)."""

    def __init__(
        self,
        config: dict,
        targets: dict[str, DeploymentHandle],
        controller: DeploymentHandle,
        draft: DeploymentHandle | None = None,
        executor_factory: ExecutorFactory = remote_executor,
    ) -> None:
        self.config = AppConfig.model_validate(config)
        SETTINGS.max_body_bytes = self.config.max_body_bytes
        SETTINGS.api_keys = frozenset(
            k.strip() for k in os.environ.get(self.config.api_keys_env, "").split(",") if k.strip())
        self.text = load_model_text(self.config.target_model)
        self.model_ids = self.config.model_ids()
        self.targets, self.draft, self.controller = targets, draft, controller
        # each step's model calls, grouped with the other requests' into one handle call per replica a turn
        group = self.config.max_batch_size
        self.target_calls = {tier: ReplicaCalls(h, group) for tier, h in targets.items()}
        self.draft_calls = ReplicaCalls(draft, group) if draft is not None else None
        self.executor_factory = executor_factory
        self._predictor: AcceptancePredictor | None = None  # the controller's, cached
        self._predictor_checked = 0.0
        self._estimates: dict[str, TierEstimates] = {}  # per tier, from its replicas' calibration, then live
        self._fetching: dict[str, asyncio.Task] = {}  # per tier, its replicas' calibration on its way
        self.metrics = ServeMetrics()
        self._in_flight: Counter[str] = Counter()  # generations in flight on this replica, per tier
        self._arrival = asyncio.Event()  # set, and replaced, as each generation is admitted
        # every step this replica ran, per (tier, policy), and the requests that ended (GET /speckv/stats)
        self.totals: dict[tuple[str, str], RequestStats] = {}
        self.requests_ended: Counter[tuple[str, str]] = Counter()

    # ------------------------------------------------------------------ what a request runs with

    async def _current_predictor(self) -> AcceptancePredictor:
        """The controller's acceptance predictor, cached and revalidated against its version every refresh
        period (a hop per request at most, none per step)."""
        if self._predictor is None or time.monotonic() - self._predictor_checked > self.config.policy_refresh_s:
            version = await self.controller.version.remote()
            if self._predictor is None or version != self._predictor.version():
                self._predictor = await self.controller.predictor.remote()
            self._predictor_checked = time.monotonic()
        return self._predictor

    @property
    def active(self) -> int:
        """Generations in flight on this replica, all tiers (admission control)."""
        return sum(self._in_flight.values())

    def _count(self, tier: str, delta: int) -> None:
        """A generation of `tier` admitted (+1) or ended (-1), and each tier's estimates told: its own in flight
        (a pass may carry them all: TierEstimates.in_flight) and, where the model replicas share the machine's
        cores, everyone's, since every generation in flight waits for the others' passes whatever its tier
        (`adaptive` prices its drafting for all of them: TierEstimates.sharing)."""
        self._in_flight[tier] += delta
        self._update_in_flight()

    def _update_in_flight(self) -> None:
        active = self.active
        for tier, estimates in self._estimates.items():
            estimates.in_flight = self._in_flight[tier]
            if self.config.share_cores:
                estimates.sharing = max(active, 1)

    async def _tier_estimates(self, tier: str) -> TierEstimates:
        """What `adaptive` knows of a tier's step costs: the calibration its replicas measured when they loaded
        (fetched once: the requests that need it before it has come wait for the same fetch), followed online by
        every step this router runs. Each fetching its own, the requests of a first burst whose fetch a replica
        answered only after the prefill pass the others had started (a replica answers between passes) missed
        that pass (nf4, 16 streams, AVX2 EPYC: four first tokens 5.3 s after the other twelve)."""
        if tier not in self._estimates:
            fetch = self._fetching.get(tier)
            if fetch is None:  # not cancelled with the request that started it
                fetch = self._fetching[tier] = detached_task(self._fetch_cost(tier))
                fetch.add_done_callback(lambda _: self._fetching.pop(tier, None))  # a failed one is tried again
            cost = await asyncio.shield(fetch)
            self._estimates.setdefault(tier, TierEstimates.calibrated(cost))
            self._update_in_flight()
        return self._estimates[tier]

    async def _fetch_cost(self, tier: str) -> CostModel:
        """The tier's cost model from its replicas' calibrations (the draft's from the draft replica where the
        target replica does not draft)."""
        measured = await self.targets[tier].calibration.remote()
        if "draft" not in measured:
            measured = {**measured, **(await self.draft.calibration.remote())}
        return cost_model(Calibration.from_dict(measured["draft"]), Calibration.from_dict(measured["target"]))

    def _check_limits(self, req: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
                      max_tokens: int) -> None:
        if max_tokens > self.config.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of "
                                f"{self.config.max_tokens_limit}", param="max_tokens")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) + max_tokens > self.text.context_window:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"context window of {self.text.context_window} tokens", param="max_tokens",
                           code="context_length_exceeded")
        if len(req.stop_list()) > self.config.max_stop_strings:
            raise APIError(400, f"at most {self.config.max_stop_strings} stop strings", param="stop")

    async def _prepare(self, req: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
                       max_tokens: int | None) -> Generation:
        tier = self._tier_of(req.model)
        max_tokens = max_tokens or DEFAULT_MAX_TOKENS
        self._check_limits(req, prompt_ids, max_tokens)
        try:
            sampling = SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
            request = GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=max_tokens, sampling=sampling,
                                        stop=tuple(req.stop_list()),
                                        eos_token_ids=() if req.ignore_eos else self.text.eos_token_ids,
                                        tier=tier.value)
        except ValueError as e:
            raise APIError(400, str(e), param="stop" if "stop" in str(e) else None) from None
        spec = req.speculation.policy_spec() if req.speculation else self.config.default_policy
        predictor = estimates = None
        if spec == "adaptive":
            predictor, estimates = await self._current_predictor(), await self._tier_estimates(tier.value)
        policy = make_policy(spec, tier.value, predictor, estimates, sampling.greedy)
        stats = RequestStats(policy.name, predictor_version=predictor.version() if predictor else None)
        return Generation(request, policy, tier.value, stats)

    def _admit(self, tier: str) -> None:
        """Take a generation slot or answer 429: overload is refused at once, not queued without bound."""
        if self.active >= self.config.max_concurrent_generations:
            self.metrics.requests.inc(1, {"tier": "", "outcome": "rejected"})
            raise APIError(429, f"server busy: {self.active} generations in flight; retry after "
                                f"{self.config.retry_after_s} s", type_="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        self._count(tier, +1)
        self._arrival.set()  # wakes the requests waiting for their burst (`_settle`)
        self._arrival = asyncio.Event()

    # ------------------------------------------------------------------ running it

    async def _settle(self, gen: Generation) -> None:
        """Let the requests that arrived with this one be counted in flight before it decides its first step
        (where the draft reads its whole prompt, priced for every request waiting for that): those already
        scheduled on this loop at once, those still on their way for as long as its policy asks
        (AdaptivePolicy.settle_s: a burst reaches the router over tens of milliseconds), or until, with those
        counted since, its first step no longer drafts: waiting on then would only let the requests that did not
        wait start their prefill pass without it."""
        await asyncio.sleep(0)
        settle = getattr(gen.policy, "settle_s", None)
        if settle is None:
            return
        prompt_len, budget = len(gen.request.prompt_ids), gen.request.max_new_tokens
        deadline = time.monotonic() + settle(prompt_len, budget)
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._arrival.wait(), left)
            except TimeoutError:
                return
            if settle(prompt_len, budget) == 0:  # another request counted, and its first step would not draft
                return

    async def _events(self, gen: Generation) -> AsyncIterator[StepEvent]:
        """The request's steps, with its stats and the metrics kept as they come."""
        tier, stats = gen.tier, gen.stats
        start = gen.started  # before its first decision: a wait for its burst (`_settle`) is the client's too
        outcome = "error"
        retries = StepRetries(self.config.retry_deadline_s,
                              on_retry=lambda: self.metrics.retries.inc(1, {"tier": tier}))
        executor = self.executor_factory(self.config.topology, self.target_calls[tier], self.draft_calls, retries)
        steps = speculate(gen.request, executor, gen.policy, TextAssembler(self.text.tokenizer, gen.request.stop))
        key = (tier, gen.policy.name)
        totals = self.totals.setdefault(key, RequestStats(gen.policy.name))
        try:
            async for event in steps:
                if stats.steps == 0:
                    self.metrics.ttft_ms.observe((time.perf_counter() - start) * 1e3, {"tier": tier})
                self.metrics.step(event.record)
                stats.add(event.record, event.finish_reason)
                totals.add(event.record)
                yield event
            outcome = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            await steps.aclose()  # runs speculate's cleanup (closing the sessions) now, not at garbage collection
            stats.retries = retries.count  # set before any caller reads stats: it does so after this ends
            report = getattr(gen.policy, "report", None)  # adaptive: what it estimates now
            stats.estimates = report() if report else None
            if tier in self._estimates:
                self.metrics.estimates(tier, self._estimates[tier])
            seconds = time.perf_counter() - start
            if outcome == "ok" and seconds > 0:
                self.metrics.tokens_per_s.set(stats.completion_tokens / seconds, {"tier": tier})
            self.metrics.requests.inc(1, {"tier": tier, "outcome": outcome})
            self.requests_ended[key] += 1

    def _http_error(self, error: Exception) -> Exception:
        """A model-side failure before any token was sent, as its HTTP answer (503) where it has one."""
        return backend_error(error, self.config.retry_after_s) or error

    async def _respond(self, req, prompt_ids: list[int], max_tokens: int | None, chat: bool):
        gen = await self._prepare(req, prompt_ids, max_tokens)
        self._admit(gen.tier)
        events = self._events(gen)
        close = self._closer(events, gen.tier)
        try:  # the first step runs before answering, so failures before any token get a proper HTTP status
            await self._settle(gen)
            first = await anext(events, None)
        except BaseException as e:  # a client gone during the first step (cancelled) gives its slot back too
            await close()
            if isinstance(e, Exception):
                raise self._http_error(e) from None
            raise
        reply = Reply.new(req.model, chat, len(prompt_ids))
        if not req.stream:
            try:
                text = "".join([e.text async for e in self._after(first, events)])
            except Exception as e:
                raise self._http_error(e) from None
            finally:
                await close()
            return JSONResponse(reply.body(text, gen.stats))
        options = req.stream_options or StreamOptions()
        return ClosingStreamingResponse(self._stream(reply, gen.stats, first, events, options, close), on_close=close,
                                        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _closer(self, events: AsyncIterator[StepEvent], tier: str) -> Callable[[], Awaitable[None]]:
        """What ends an admitted generation, once, however it ends (finished, failed, its client gone before
        or during its stream): its slot given back and its steps closed (the workers' sessions released now).
        A slot that a cancelled first step or a stream closed before it began kept was never given back: after
        a load run whose window cut streams, the router counted them in flight for good (`adaptive` priced
        drafting for 17 phantom requests and never drafted, nf4 on an AVX2 EPYC; enough of them and every
        request gets 429)."""
        closed = False

        async def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                self._count(tier, -1)
                await events.aclose()
        return close

    @staticmethod
    async def _after(first: StepEvent | None, events: AsyncIterator[StepEvent]) -> AsyncIterator[StepEvent]:
        """`first`, already taken from `events`, then the rest of them."""
        if first is not None:
            yield first
        async for event in events:
            yield event

    async def _stream(self, reply: Reply, stats: RequestStats, first: StepEvent | None,
                      events: AsyncIterator[StepEvent], options: StreamOptions,
                      close: Callable[[], Awaitable[None]]) -> AsyncIterator[str]:
        """The answer as server-sent events; a failure after the first event is reported in-band."""
        try:
            if reply.chat:
                yield reply.chunk(None, role=True)
            tokens = 0
            async for event in self._after(first, events):
                tokens += len(event.token_ids)
                if event.text:
                    usage = {"usage": reply.usage(tokens)} if options.continuous_usage_stats else {}
                    yield reply.chunk(event.text, **usage)
            yield reply.last_chunk(stats)
            if options.include_usage:
                yield reply.usage_chunk(stats)
        except Exception as e:  # noqa: BLE001 - the stream has started; report in-band, then end it
            logger.exception("request %s failed mid-stream", reply.id)
            err = backend_error(e, self.config.retry_after_s) or APIError(
                500, f"generation failed: {type(e).__name__}", type_="server_error")
            yield sse(err.body())
        finally:  # also on client disconnect (cancellation); where this never started, the response's on_close
            await close()
        yield SSE_DONE

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/speckv/stats")
    async def speculation_stats(self) -> dict:
        """What this router replica's requests did since it started, per tier and policy (requests ended,
        steps, draft tokens, mean γ, the γ and batch histograms), `adaptive`'s current estimates per tier, and the
        handle calls that carried its model calls per deployment (deployments.grouping): a load tool reads it
        before and after a run to see what speculation did under that load (Prometheus has the same counters
        summed over replicas)."""
        calls = {f"target-{tier}": c for tier, c in sorted(self.target_calls.items())}
        if self.draft_calls is not None:
            calls["draft"] = self.draft_calls
        return {"object": "speckv.stats", "data": [
            {"tier": tier, "requests": self.requests_ended[(tier, policy)], "mean_gamma": stats.mean_gamma,
             **{k: v for k, v in stats.speculation().items() if k not in ("retries", "estimates")}}
            for (tier, policy), stats in sorted(self.totals.items())],
            "estimates": {tier: estimates.to_dict() for tier, estimates in sorted(self._estimates.items())},
            "grouping": {name: c.stats.to_dict() for name, c in calls.items()}}

    def _tier_of(self, model: str) -> Tier:
        """The tier a model id serves; 404 model_not_found for an id this app does not serve."""
        tier = self.model_ids.get(model)
        if tier is None:
            raise APIError(404, f"model {model!r} does not exist; available: {', '.join(self.model_ids)}",
                           param="model", code="model_not_found")
        return tier

    @staticmethod
    def _model_card(model: str, tier: Tier) -> dict:
        return {"id": model, "object": "model", "created": 0, "owned_by": "speckv", "tier": tier.value}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card(mid, tier) for mid, tier in self.model_ids.items()]}

    @api.get("/v1/models/{model}")
    async def model(self, model: str) -> dict:
        """OpenAI's model retrieval (`client.models.retrieve`)."""
        return self._model_card(model, self._tier_of(model))

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        prompt_ids = req.prompt_token_ids()
        if prompt_ids is None:
            prompt_ids = self.text.encode(req.prompt_text(), chat=False)
        elif prompt_ids:
            vocab = len(self.text.tokenizer)
            if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
                raise APIError(400, f"prompt token ids must be in [0, {vocab}), this model's vocabulary",
                               param="prompt")
        return await self._respond(req, prompt_ids, req.max_tokens, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest):
        messages = [m.for_template() for m in req.messages]
        prompt_ids = self.text.encode(messages, chat=True)
        return await self._respond(req, prompt_ids, req.effective_max_tokens(), chat=True)


RouterDeployment = serve.deployment(name="router", max_ongoing_requests=64)(serve.ingress(api)(Router))

"""How the router reaches the model replicas: a request's step executor over deployment handles, the retries
that carry it over a replica going away, and what a model-side failure answers over HTTP."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING

from speckv.engine import SplitExecutor, StepCall, StepExecutor, WhileVerifying
from speckv.workers import KVCapacityError, StepInputs

from .protocol import APIError

if TYPE_CHECKING:  # grouping sends its calls with detached_task, below
    from .grouping import ReplicaCalls

logger = logging.getLogger("ray.serve")


def _is_replica_failure(error: BaseException) -> bool:
    """Errors that mean a replica went away (died, restarted, scaled down), not a bug in the request."""
    import ray.exceptions as rex

    kinds = tuple(k for k in (getattr(rex, n, None) for n in (
        "RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError")) if k)
    return isinstance(error, kinds)


def backend_error(error: BaseException, retry_after_s: int) -> APIError | None:
    """The HTTP answer for a model-side failure before any token was sent: 503 + Retry-After when a tier is
    overloaded (its queue is full), its replica's KV cache bound is taken by running requests, or its
    replicas stayed unreachable past the retry deadline."""
    from ray.serve.exceptions import BackPressureError

    headers = {"Retry-After": str(retry_after_s)}
    if isinstance(error, KVCapacityError):
        return APIError(503, "the model's KV cache memory is taken by running requests; retry later",
                        type_="server_error", code="kv_cache_full", headers=headers)
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


def detached_task(coro: Coroutine) -> asyncio.Task:
    """`coro` as a task outside the current request's context: Serve cancels the handle calls of a cancelled
    request that are still waiting for a replica (its child requests), so work that must outlive the request
    that started it (a close; a fetch other requests wait for) runs apart from it."""
    return contextvars.Context().run(asyncio.get_running_loop().create_task, coro)


async def close_detached(*calls: Callable[[], Awaitable]) -> None:
    """Make the close calls so that they reach the replicas even when the request is being cancelled
    (client gone): shielded from that cancellation, and made outside the request's context (`detached_task`),
    which left a session behind now and then when they were not."""
    async def run() -> None:
        await asyncio.gather(*(call() for call in calls), return_exceptions=True)

    await asyncio.shield(detached_task(run()))


def remote_split_executor(draft: ReplicaCalls, target: ReplicaCalls, retry: StepRetries) -> SplitExecutor:
    """Disaggregated topology: draft and target replicas reached through sticky handles, a step's calls grouped
    with the other requests' (deployments.grouping)."""

    async def propose(inputs: StepInputs):
        return await retry(lambda: draft.call("propose", inputs.session_id, inputs))

    async def verify(inputs: StepInputs, draft_token_ids: list[int]):
        return await retry(lambda: target.call("verify", inputs.session_id, inputs, draft_token_ids))

    async def close(sid: str) -> None:
        await close_detached(lambda: draft.close(sid), lambda: target.close(sid))

    return SplitExecutor(propose, verify, close)


class RemoteColocatedExecutor:
    """Colocated topology: the target replica drafts too, so a step is one hop."""

    def __init__(self, target: ReplicaCalls, retry: StepRetries) -> None:
        self.target = target
        self.retry = retry

    async def run_step(self, inputs: StepInputs, while_verifying: WhileVerifying | None = None) -> StepCall:
        """One hop for the whole step: the proposal comes back with its verification, so there is nothing to
        overlap and `while_verifying` is not called (the policy then prepares inside its own choice)."""
        start = time.perf_counter()
        inner: StepCall = await self.retry(lambda: self.target.call("step", inputs.session_id, inputs))
        wall_ms = (time.perf_counter() - start) * 1e3
        return StepCall(inner.proposal, inner.verification, inner.draft_wall_ms, wall_ms - inner.draft_wall_ms)

    async def close(self, sid: str) -> None:
        await close_detached(lambda: self.target.close(sid))


ExecutorFactory = Callable[[str, "ReplicaCalls", "ReplicaCalls | None", StepRetries], StepExecutor]


def remote_executor(topology: str, target: ReplicaCalls, draft: ReplicaCalls | None,
                    retry: StepRetries) -> StepExecutor:
    """The router's default executor factory: one request's executor for the app's topology."""
    if topology == "colocated":
        return RemoteColocatedExecutor(target, retry)
    return remote_split_executor(draft, target, retry)

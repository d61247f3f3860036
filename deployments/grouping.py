"""One handle call per replica for the model calls a router's requests make together.

Under load a replica's pass carries several requests, and after it each request's loop makes its next call:
one Serve handle call per request, each a few milliseconds of the router's loop (Serve's routing, Ray's
calls), made one after another while the replica waits for them to regroup its next pass. Eight streams of
nf4 on an AVX512-BF16 EPYC: 34-47 ms between passes of ~200 ms, most of it those calls (py-spy, forty-sixth
session, docs/serving_log.md). On a GPU, whose passes take tens of milliseconds, they would be as long as a pass
(estimated, not measured: eight calls at the 2-4 ms a hop costs here; a pass of the 1.5B took ~32 ms on an H100,
docs/results/gpu/h100).

So the router gathers the calls its requests make to one method in the same turn of its event loop and sends
them as one call (`ReplicaCalls`) to the replica that last answered those sessions; the replica runs each as
if it had come alone (`answer_group`), so its batching (speckv.batching, `@serve.batch`) forms its passes as
before, and answers each call's result or its exception apart: a call that fails fails alone. A session whose
replica is not known yet (its first call) goes alone, routed by its session id as before, and its answer says
where it ran. Affinity only saves time: a session that lands elsewhere is rebuilt from its token ids.

A grouped call is one request to Serve, so Serve's own autoscaling signal (requests in flight per replica)
no longer counts the load: replicas report the sessions they serve instead (deployments.autoscaling).
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from .executors import detached_task

GROUPED_METHODS = frozenset({"propose", "verify", "step"})  # the per-step calls; closes and the rest go alone


@dataclass(frozen=True)
class GroupReply:
    """A replica's answer to a grouped call: where it ran, and per call its result or the exception it raised."""

    replica: str
    results: list[Any]


async def answer_group(replica: object, replica_id: str, method: str, calls: list[tuple]) -> GroupReply:
    """Run `replica.<method>(*args)` for each call's args concurrently, as separate calls would run (each its own
    await, so the replica's batching gathers them into its passes); each result or exception in order."""
    if method not in GROUPED_METHODS:
        raise ValueError(f"{method!r} is not a groupable call; one of {sorted(GROUPED_METHODS)}")
    fn: Callable = getattr(replica, method)

    async def one(args: tuple) -> Any:
        result = fn(*args)
        return await result if inspect.isawaitable(result) else result

    results = await asyncio.gather(*(one(args) for args in calls), return_exceptions=True)
    return GroupReply(replica_id, [_sendable(r) if isinstance(r, BaseException) else r for r in results])


def _sendable(error: BaseException) -> BaseException:
    """An exception as it can travel back in a reply: itself where it pickles; else a RuntimeError naming it (one
    that does not pickle would fail the whole group's reply, not its own call)."""
    try:
        pickle.dumps(error)
    except Exception:  # noqa: BLE001 - any failure to pickle
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


@dataclass
class _Call:
    session_id: str
    args: tuple
    future: asyncio.Future


@dataclass
class GroupStats:
    """What the grouping did: handle calls sent and the model calls they carried (GET /speckv/stats)."""

    handle_calls: int = 0
    calls: int = 0
    largest: int = 0

    def sent(self, calls: int) -> None:
        self.handle_calls += 1
        self.calls += calls
        self.largest = max(self.largest, calls)

    def to_dict(self) -> dict:
        return {"handle_calls": self.handle_calls, "calls": self.calls, "largest": self.largest,
                "calls_per_handle_call": round(self.calls / self.handle_calls, 3) if self.handle_calls else None}


class ReplicaCalls:
    """A router's calls to one deployment through its handle. The per-step calls (`call`) go one handle call per
    (method, replica) for the calls made in the same turn of the router's event loop, routed by the first call's
    session (`handle.options(session_id=...).call_group.remote(method, [args, ...])`), at most `max_group` (the
    replica's batch) to a call; the rest go alone (`close`, `handle`).

    A group goes out from a task of its own, outside any one request's context: Serve cancels a cancelled
    request's calls still in flight (deployments.executors.detached_task), and one client going away must not
    fail the others' calls. A session's replica is forgotten when a call of it fails, so its retry goes alone
    and is routed afresh."""

    def __init__(self, handle: DeploymentHandle, max_group: int = 8) -> None:
        if max_group < 1:
            raise ValueError("max_group must be >= 1")
        self.handle = handle
        self.max_group = max_group
        self.stats = GroupStats()
        self._replica_of: dict[str, str] = {}  # session -> the replica that answered its last call
        self._pending: dict[tuple[str, str | None], list[_Call]] = {}
        self._flushing = False

    async def call(self, method: str, session_id: str, *args) -> Any:
        """`method(*args)` on the replica of `session_id`, sent with the calls made to that replica in this turn."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.setdefault((method, self._replica_of.get(session_id)), []).append(
            _Call(session_id, args, future))
        if not self._flushing:
            self._flushing = True
            # a turn later, after what is ready now has run: the other requests woken with this one, and the tasks
            # they start to make their calls (the engine sends a verify call from a task where it overlaps work)
            loop.call_soon(loop.call_soon, self._flush)
        return await future

    async def close(self, session_id: str) -> None:
        """The request has ended: its session closed on its replica (alone: closes are rare and must not wait)."""
        self._replica_of.pop(session_id, None)
        await self.handle.options(session_id=session_id).close.remote(session_id)

    def _flush(self) -> None:
        pending, self._pending, self._flushing = self._pending, {}, False
        for (method, replica), calls in pending.items():
            groups = ([[c] for c in calls] if replica is None
                      else [calls[i:i + self.max_group] for i in range(0, len(calls), self.max_group)])
            for group in groups:
                detached_task(self._send(method, group))

    async def _send(self, method: str, group: list[_Call]) -> None:
        self.stats.sent(len(group))
        try:
            reply: GroupReply = await self.handle.options(session_id=group[0].session_id).call_group.remote(
                method, [c.args for c in group])
        except BaseException as e:  # the whole call failed (its replica gone): each call fails, and is retried alone
            for c in group:
                self._settle(c, e)
            if not isinstance(e, Exception):
                raise
            return
        for c, result in zip(group, reply.results, strict=True):
            self._settle(c, result, reply.replica)

    def _settle(self, call: _Call, result: Any, replica: str | None = None) -> None:
        failed = isinstance(result, BaseException)
        if failed or replica is None:
            self._replica_of.pop(call.session_id, None)
        else:
            self._replica_of[call.session_id] = replica
        if not call.future.done():  # its request may be gone (cancelled)
            (call.future.set_exception if failed else call.future.set_result)(result)

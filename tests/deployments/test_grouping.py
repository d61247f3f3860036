"""deployments.grouping: a router's model calls of one turn go one handle call per replica, each answered apart."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorUnavailableError

from deployments.grouping import GroupReply, ReplicaCalls, answer_group


class _Replicas:
    """Stands in for a sticky DeploymentHandle over two replicas: a session id routes to replica "a" or "b" by
    its first letter; each handle call is recorded as (routing session, method, the calls it carried)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, list[tuple]]] = []
        self.down = False
        self._routed = ""

    def options(self, session_id: str) -> _Replicas:
        self._routed = session_id
        return self

    @property
    def call_group(self) -> _Replicas:
        return self

    def remote(self, method: str, calls: list[tuple]):
        routed = self._routed
        self.sent.append((routed, method, calls))

        async def answer() -> GroupReply:
            await asyncio.sleep(0.001)
            if self.down:
                raise ActorUnavailableError("replica gone (injected)", None)
            results = [ValueError(f"bad {args[0]}") if args[0] < 0 else args[0] * 10 for args in calls]
            return GroupReply(routed[0], results)
        return answer()


def _run(coro):
    return asyncio.run(coro)


def test_calls_of_one_turn_go_as_one_handle_call_per_replica():
    """First calls go alone (their replica unknown) and learn where they ran; then the calls made in the same turn
    go one handle call per replica, in groups of at most `max_group`, and each caller gets its own result."""
    handle = _Replicas()
    calls = ReplicaCalls(handle, max_group=3)
    sessions = ["a1", "a2", "a3", "a4", "b1"]

    async def run() -> tuple[list, list]:
        first = await asyncio.gather(*(calls.call("verify", s, i) for i, s in enumerate(sessions)))
        handle.sent.clear()
        second = await asyncio.gather(*(calls.call("verify", s, i + 100) for i, s in enumerate(sessions)))
        return first, second

    first, second = _run(run())
    assert first == [0, 10, 20, 30, 40] and second == [1000, 1010, 1020, 1030, 1040]
    carried = sorted((routed[0], [a[0] for a in args]) for routed, _, args in handle.sent)
    assert carried == [("a", [100, 101, 102]), ("a", [103]), ("b", [104])]
    assert calls.stats.to_dict()["largest"] == 3


def test_a_failing_call_fails_alone_and_a_lost_replica_fails_each_call_to_be_retried_alone():
    handle = _Replicas()
    calls = ReplicaCalls(handle)

    async def run():
        await asyncio.gather(calls.call("verify", "a1", 1), calls.call("verify", "a2", 2))
        handle.sent.clear()
        return await asyncio.gather(calls.call("verify", "a1", -1), calls.call("verify", "a2", 3),
                                    return_exceptions=True)

    bad, good = _run(run())
    assert isinstance(bad, ValueError) and good == 30
    assert len(handle.sent) == 1  # both in one call

    handle.down = True

    async def lost():
        return await asyncio.gather(calls.call("verify", "a2", 4), calls.call("verify", "a3", 5),
                                    return_exceptions=True)
    assert all(isinstance(e, ActorUnavailableError) for e in _run(lost()))
    handle.down, handle.sent = False, []
    assert _run(lost()) == [40, 50]
    assert len(handle.sent) == 2  # their replica forgotten with the failure: each goes alone and is routed afresh


def test_a_caller_gone_does_not_fail_the_others_of_its_group():
    handle = _Replicas()
    calls = ReplicaCalls(handle)

    async def run():
        await asyncio.gather(calls.call("verify", "a1", 1), calls.call("verify", "a2", 2))
        gone = asyncio.ensure_future(calls.call("verify", "a1", 3))
        stays = asyncio.ensure_future(calls.call("verify", "a2", 4))
        await asyncio.sleep(0)  # both queued and sent
        gone.cancel()
        return await asyncio.wait_for(stays, 5)  # a failure here left it waiting for ever

    assert _run(run()) == 40


def test_the_replica_answers_each_call_as_if_it_came_alone():
    class Replica:
        def __init__(self) -> None:
            self.running = 0
            self.most = 0

        async def verify(self, x: int) -> int:
            self.running += 1
            self.most = max(self.most, self.running)
            await asyncio.sleep(0.001)  # where a replica's batching gathers the calls in flight into one pass
            self.running -= 1
            if x < 0:
                raise ValueError("bad")
            return x + 1

    replica = Replica()
    reply = _run(answer_group(replica, "r1", "verify", [(1,), (-1,), (3,)]))
    assert reply.replica == "r1" and reply.results[0] == 2 and reply.results[2] == 4
    assert isinstance(reply.results[1], ValueError)
    assert replica.most == 3  # in flight together, not one after another
    with pytest.raises(ValueError, match="not a groupable call"):
        _run(answer_group(replica, "r1", "close", [("s",)]))


def test_an_exception_that_does_not_pickle_fails_its_own_call_not_the_reply():
    import pickle

    class Unpicklable(Exception):
        def __init__(self) -> None:
            super().__init__("held a lock")
            self.lock = __import__("threading").Lock()

    class Replica:
        async def verify(self, x: int) -> int:
            if x < 0:
                raise Unpicklable()
            return x

    reply = _run(answer_group(Replica(), "r1", "verify", [(1,), (-1,)]))
    sent = pickle.loads(pickle.dumps(reply))
    assert sent.results[0] == 1 and isinstance(sent.results[1], RuntimeError)
    assert "Unpicklable: held a lock" in str(sent.results[1])


def test_calls_made_from_tasks_started_in_the_same_turn_join_the_group():
    """Requests woken by one pass's results make their next calls either at once or from a task they start (the
    engine sends a verify call from a task where the policy prepares meanwhile: `adaptive` beside `none` in one
    pass). Both kinds go in one handle call."""
    handle = _Replicas()
    calls = ReplicaCalls(handle)
    sessions = ["a1", "a2", "a3"]

    async def run() -> list[int]:
        await asyncio.gather(*(calls.call("verify", s, 0) for s in sessions))
        handle.sent.clear()
        woken = asyncio.Event()

        async def request(session: str, x: int, from_task: bool) -> int:
            await woken.wait()
            if from_task:
                return await asyncio.ensure_future(calls.call("verify", session, x))
            return await calls.call("verify", session, x)

        waiting = [asyncio.ensure_future(request(s, i + 1, i != 1)) for i, s in enumerate(sessions)]
        await asyncio.sleep(0)
        woken.set()
        return await asyncio.gather(*waiting)

    assert _run(run()) == [10, 20, 30]
    assert len(handle.sent) == 1, handle.sent

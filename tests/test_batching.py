"""speckv.batching: CoreLease makes passes of replicas in different processes take turns for the cores; the
Batcher waits for it before it takes the calls, so calls arriving meanwhile share the pass."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing as mp
import os
import subprocess
import time
import uuid

from speckv.batching import Batcher, BatchSettings, CoreLease

PASS_S = 0.15


def _passes(name: str | None, out: mp.Queue, n: int, start: mp.Barrier) -> None:
    """A replica's loop: n passes that each occupy PASS_S, with the lease named `name` (None: without one), begun
    once every process is ready (`start`)."""

    def busy(items: list[int]) -> list[int]:
        start = time.monotonic()
        time.sleep(PASS_S)
        out.put((start, time.monotonic()))
        return items

    async def main() -> None:
        batcher = Batcher(busy, BatchSettings(), CoreLease(name) if name else None)
        for i in range(n):
            await batcher(i)

    start.wait(60)
    asyncio.run(main())


def _overlap_s(name: str | None) -> float:
    """Two processes run three passes each at once; how long their passes overlapped in all. They begin together:
    spawned processes import at different speeds on a loaded machine, and one that began its passes after the
    other had ended made the control (no lease) see no overlap (fresh-clone CI, 2026-12-04)."""
    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_passes, args=(name, out, 3, start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    intervals = sorted(out.get(timeout=5) for _ in range(6))
    return sum(max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
               for i, a in enumerate(intervals) for b in intervals[i + 1:])


def test_core_lease_serialises_passes_of_different_processes():
    assert _overlap_s(f"speckv-test-{uuid.uuid4().hex}") < 0.01
    assert _overlap_s(None) > PASS_S  # the control: without the lease the two processes' passes overlap


def test_calls_arriving_while_another_replica_holds_the_cores_join_the_next_pass():
    async def main() -> None:
        cores = CoreLease(f"speckv-test-{uuid.uuid4().hex}")
        other = CoreLease(cores.path.rsplit("/", 1)[1].removesuffix(".lock"))  # another replica's open file
        passes: list[list[int]] = []

        def fn(items: list[int]) -> list[int]:
            assert cores._local.locked()  # the pass holds the lease
            passes.append(items)
            return [i * 2 for i in items]

        batcher = Batcher(fn, BatchSettings(max_batch_size=4), cores)
        async with other.hold():  # another replica's pass runs: three calls arrive one by one meanwhile
            calls = []
            for i in range(3):
                calls.append(asyncio.ensure_future(batcher(i)))
                await asyncio.sleep(0.05)
        assert await asyncio.gather(*calls) == [0, 2, 4]
        assert passes == [[0, 1, 2]]  # one pass, not three

    asyncio.run(main())


def test_a_cancelled_wait_for_the_cores_returns_them():
    async def main() -> None:
        cores = CoreLease(f"speckv-test-{uuid.uuid4().hex}")
        other = CoreLease(cores.path.rsplit("/", 1)[1].removesuffix(".lock"))  # its own open file

        async def hold_other() -> None:
            async with other.hold():
                pass

        async with cores.hold():
            waiter = asyncio.ensure_future(hold_other())
            await asyncio.sleep(0.1)
            waiter.cancel()
        await asyncio.sleep(0.2)
        fd = os.open(cores.path, os.O_RDWR)  # as another process would
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the cancelled wait kept it
        finally:
            os.close(fd)

    asyncio.run(main())


def test_a_result_learns_how_long_its_call_waited_for_its_pass():
    from speckv.workers import Verification

    async def main() -> None:
        cores = CoreLease(f"speckv-test-{uuid.uuid4().hex}")
        other = CoreLease(cores.path.rsplit("/", 1)[1].removesuffix(".lock"))
        batcher = Batcher(lambda items: [Verification(None, None) for _ in items], BatchSettings(), cores)
        async with other.hold():  # another replica's pass runs for 0.2 s after the call arrives
            call = asyncio.ensure_future(batcher(0))
            await asyncio.sleep(0.2)
        assert 190 <= (await call).waited_ms < 1000

    asyncio.run(main())


def test_handed_the_cores_a_pass_waits_for_the_calls_the_other_pass_set_off():
    """Another replica's pass (a draft pass) ends and its requests' calls (their verifications) arrive a router
    hop later: handed the cores, the pass waits `handover_s` for them, so requests that drafted and requests
    that did not share one pass instead of alternating passes that each pay a pass's fixed cost. On cores
    nobody else held, it does not wait."""
    async def run(handover_s: float) -> tuple[list[list[int]], float]:
        cores = CoreLease(f"speckv-test-{uuid.uuid4().hex}")
        other = CoreLease(cores.path.rsplit("/", 1)[1].removesuffix(".lock"))
        passes: list[list[int]] = []
        batcher = Batcher(lambda items: passes.append(items) or items, BatchSettings(4, 0.0, handover_s), cores)
        async with other.hold():  # the draft pass runs; a request that did not draft is waiting
            first = asyncio.ensure_future(batcher(0))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.01)  # a hop after the draft pass: its request's verification
        second = asyncio.ensure_future(batcher(1))
        await asyncio.gather(first, second)
        start = time.monotonic()
        await batcher(2)  # the cores are free: nobody handed them over
        return passes, time.monotonic() - start

    passes, alone_s = asyncio.run(run(0.1))
    assert passes[:-1] == [[0, 1]] and alone_s < 0.05
    passes, _ = asyncio.run(run(0.0))  # the control: taken at once, the pass leaves the second call behind
    assert passes[:-1] == [[0], [1]]


def test_a_pass_waits_for_the_sessions_of_the_last_pass_still_drafting():
    """Under load the requests that do not draft at a step are back at the target a draft pass before those
    that do: the next pass waits (up to `regroup_s`) for the last pass's sessions, so all share one pass
    instead of two that each pay a pass's fixed cost. It does not wait for a session that ended (`forget`),
    nor past `regroup_s` for one that never comes back."""
    async def run(regroup_s: float, late: str = "c", forget: bool = False) -> tuple[list[list[str]], float]:
        passes: list[list[str]] = []
        batcher = Batcher(lambda items: passes.append(items) or items, BatchSettings(4, 0.0, 0.0, regroup_s),
                          session=lambda item: item)
        await asyncio.gather(*(batcher(s) for s in "abc"))  # the first pass: three sessions
        start = time.monotonic()
        back = [asyncio.ensure_future(batcher(s)) for s in "abc" if s != late]  # did not draft: back at once
        await asyncio.sleep(0.15)  # the drafting session's draft pass
        if forget:
            batcher.forget(late)  # its request ended instead
        else:
            back.append(asyncio.ensure_future(batcher(late)))
        await asyncio.gather(*back)
        return passes[1:], time.monotonic() - start

    passes, _ = asyncio.run(run(1.0))
    assert passes == [["a", "b", "c"]]  # one pass
    passes, _ = asyncio.run(run(0.0))  # the control: without the wait the pass leaves the drafting one behind
    assert passes == [["a", "b"], ["c"]]
    passes, waited = asyncio.run(run(1.0, forget=True))
    assert passes == [["a", "b"]] and waited < 0.5  # an ended session is not waited for
    passes, waited = asyncio.run(run(0.05, late="c"))  # back later than regroup_s: the pass went without it
    assert passes == [["a", "b"], ["c"]]


def test_the_regroup_wait_counts_only_time_the_loop_was_free_of_passes():
    """In-process, a draft pass runs on the event loop's thread (Batcher) and may take longer than `regroup_s`:
    that time was the cores' (the verify pass could not have run then), so the verify pass still waits for the
    session that drafted, and all three share it. Counted in wall time, the wait ran out during the draft pass
    and the verify pass began with the two that did not draft (fp16, 8 requests, AVX2 EPYC: passes of 3-5
    beside passes of 8)."""
    async def run() -> list[list[str]]:
        passes: list[list[str]] = []
        verify = Batcher(lambda items: passes.append(items) or items, BatchSettings(4, 0.0, 0.0, 0.05),
                         session=lambda item: item)
        draft = Batcher(lambda items: time.sleep(0.3) or items, BatchSettings(4))  # blocks the loop, as a pass does

        async def step(session: str, drafts: bool) -> str:  # as SplitExecutor.run_step with a `while_verifying`
            if drafts:
                await draft(session)
            verifying = asyncio.ensure_future(verify(session))
            await asyncio.sleep(0)
            return await verifying

        await asyncio.gather(*(verify(s) for s in "abc"))  # the first pass: three sessions
        await asyncio.gather(step("a", False), step("b", False), step("c", True))
        start = time.monotonic()
        await asyncio.gather(step("a", False), step("b", False))  # c's request ended: not waited for past regroup_s
        assert time.monotonic() - start < 0.25
        return passes[1:]

    assert asyncio.run(run()) == [["a", "b", "c"], ["a", "b"]]


def test_served_the_regroup_wait_leaves_out_time_another_replica_held_the_cores():
    """Served, the draft's passes run in another replica, which holds the core lease for them: that time was
    the cores' too, so the target's verify pass still waits for the session that drafted, even past a draft
    pass longer than `regroup_s` and a router hop longer than `handover_s`. Counted on the target's own loop
    (idle the while), the wait ran out during the draft pass and the verify pass began with the sessions that
    did not draft (fp16, fixed γ = 2, 8 streams, AVX2 EPYC: 5.3 sequences a pass)."""
    async def run() -> list[list[str]]:
        cores = CoreLease(f"speckv-test-{uuid.uuid4().hex}")
        draft_replica = CoreLease(cores.path.rsplit("/", 1)[1].removesuffix(".lock"))  # its own open file
        passes: list[list[str]] = []
        verify = Batcher(lambda items: passes.append(items) or items, BatchSettings(4, 0.0, 0.01, 0.1), cores,
                         session=lambda item: item)
        await asyncio.gather(*(verify(s) for s in "abc"))  # the first pass: three sessions

        async def drafting(session: str) -> str:
            async with draft_replica.hold():
                await asyncio.sleep(0.4)  # c's draft pass, longer than regroup_s
            await asyncio.sleep(0.05)  # the router hop, longer than handover_s
            return await verify(session)

        await asyncio.gather(verify("a"), verify("b"), drafting("c"))
        return passes[1:]

    assert asyncio.run(run()) == [["a", "b", "c"]]


def test_the_cores_busy_clock_counts_holds_in_progress_and_not_those_of_dead_holders():
    cores = CoreLease(f"speckv-test-{uuid.uuid4().hex}")
    other = CoreLease(cores.path.rsplit("/", 1)[1].removesuffix(".lock"))
    assert cores.busy_s() == 0.0
    with other.held():
        time.sleep(0.1)
        assert 0.09 < cores.busy_s() < 0.5  # held by another open file, now
    held = cores.busy_s()
    time.sleep(0.1)
    assert cores.busy_s() == held  # free: the clock stands
    dead = subprocess.Popen(["true"])
    dead.wait()
    cores._write(held, time.monotonic() - 10.0, dead.pid)  # a holder killed mid-pass left its start behind
    assert cores.busy_s() == held


def test_with_a_pass_log_named_every_pass_appends_what_ran_and_for_how_long(tmp_path, monkeypatch):
    """SPECKV_PASS_LOG: each pass a JSON line (scripts/pass_timeline.py reads them); the drafted tokens of verify
    calls ((inputs, draft ids) pairs) are counted."""
    import json

    from speckv.batching import PASS_LOG_ENV

    log = tmp_path / "passes.jsonl"
    monkeypatch.setenv(PASS_LOG_ENV, str(log))

    def verify_batch(items: list) -> list:
        time.sleep(0.05)
        return items

    async def main() -> None:
        batcher = Batcher(verify_batch)
        await asyncio.gather(batcher(("a", [1, 2])), batcher(("b", [3])))
        await batcher(("a", []))

    asyncio.run(main())
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(p["calls"], p["drafted"]) for p in lines] == [(2, 3), (1, 0)]
    assert all(p["fn"].endswith("verify_batch") and 45 <= p["ms"] < 1000 for p in lines)


def test_a_lone_pass_below_regroup_from_sets_no_session_to_wait_for():
    """The draft's Batcher (regroup_from=2): a lone call under load is a probe whose session does not draft at its
    next step, so the next pass does not wait for it; a pass of two or more is waited for as the target's is."""
    async def run(regroup_from: int, first: str) -> float:
        batcher = Batcher(lambda items: items, BatchSettings(4, 0.0, 0.0, 0.3), session=lambda item: item,
                          regroup_from=regroup_from)
        await asyncio.gather(*(batcher(s) for s in first))
        start = time.monotonic()
        await batcher("z")  # another session's call; the first pass's sessions never come back
        return time.monotonic() - start

    assert asyncio.run(run(2, "a")) < 0.1
    assert asyncio.run(run(1, "a")) >= 0.25  # the control: a lone pass's session waited for
    assert asyncio.run(run(2, "ab")) >= 0.25


def test_with_every_session_of_the_last_pass_back_a_pass_waits_for_no_more_calls():
    """Regrouping, once every session the last pass set to wait for is back, no call is expected that `wait_s`
    would let join: the pass begins at once (one stream: 10 ms of every 270-ms step). The first pass, and a pass
    whose sessions are not all back, still wait `wait_s`."""
    async def run() -> tuple[float, float, float]:
        batcher = Batcher(lambda items: items, BatchSettings(4, 0.2, 0.0, 1.0), session=lambda item: item[0])
        start = time.monotonic()
        await asyncio.gather(batcher("a0"), batcher("b0"))  # the first pass
        first = time.monotonic() - start
        start = time.monotonic()
        await asyncio.gather(batcher("a1"), batcher("b1"))  # the whole pass back
        whole = time.monotonic() - start
        start = time.monotonic()
        await asyncio.gather(batcher("a2"), batcher("c2"))  # b not back: regroups for it, then waits as before
        partial = time.monotonic() - start
        return first, whole, partial

    first, whole, partial = asyncio.run(run())
    assert first >= 0.19 and whole < 0.1 and partial >= 0.19

"""Gathering concurrent calls into batched forward passes, in-process.

The in-process counterpart of Ray Serve's `@serve.batch` (which the deployments use): calls that arrive
while a batch runs wait and form the next one, so requests join and leave between passes (continuous
batching at step granularity). The batched computation itself lives in the workers
(`DraftWorker.propose_batch`, `TargetWorker.verify_batch`); this only decides what goes in a pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import struct
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from .workers import ModelWorker, StepInputs

T = TypeVar("T")
R = TypeVar("R")


PASS_LOG_ENV = "SPECKV_PASS_LOG"  # a file to which every Batcher made under it appends a JSON line a pass (diagnosis)

_BUSY_S: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, float] = weakref.WeakKeyDictionary()  # s in passes


def _idle_time(loop: asyncio.AbstractEventLoop) -> float:
    """The loop's clock less the time Batchers' passes held its thread: advances only while the loop is free."""
    return loop.time() - _BUSY_S.get(loop, 0.0)


@dataclass(frozen=True)
class BatchSettings:
    """How calls are gathered: at most `max_batch_size` per pass; a pass waits `wait_s` for more calls to
    join once one arrived (0: whatever arrived while the last pass ran); where replicas share the cores, a
    pass that got them from another replica's pass waits `handover_s` more, with them, for the calls that
    pass set off; a Batcher that knows its calls' sessions waits up to `regroup_s` of idle time (time the cores
    were free of passes) for the sessions of its last pass to come back before it starts the next without them,
    and once they are all back waits neither `wait_s` nor `handover_s` (Batcher)."""

    max_batch_size: int = 8
    wait_s: float = 0.0
    handover_s: float = 0.0
    regroup_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or min(self.wait_s, self.handover_s, self.regroup_s) < 0:
            raise ValueError(f"max_batch_size must be >= 1, wait_s, handover_s and regroup_s >= 0, got {self}")


class Batcher(Generic[T, R]):
    """`await batcher(item)` runs `fn([items...])` for the calls gathered with it and returns this item's
    result; one batch at a time, in arrival order.

    `fn` runs on the event loop's thread, blocking it for the pass: a pass in a worker thread competes for
    the GIL with whatever Python the loop runs meanwhile, and a CPU pass made of many small ops (a 4-bit
    bitsandbytes matmul is several) waits for the GIL at each: measured on this project's 2-core Xeon, an
    nf4 pass of eight requests took 2.0 s in a thread beside the live loop and 1.1 s on the loop's thread
    (25 s beside a busy Python thread). The requests' own work runs between passes.

    Regrouping. Given `session` (a call's session), the Batcher expects every session of its last pass back
    (a request verifies at every step) and waits up to `regroup_s` for the missing ones before it starts the
    next pass without them, unless the pass is full already or `forget` says a session ended. Without it,
    under load the requests that do not draft at a step reach the target a draft pass before those that do,
    and the pass starts without the drafting ones: two passes each paying a pass's fixed cost where one
    would carry them all (nf4 on an AVX2 EPYC, `adaptive` at 8 streams: 6.70 sequences a pass where `none`
    ran 8.00; docs/serving_log.md). A split costs at least one pass's fixed cost, so waiting up to that long
    costs at most what it may save. A served draft replica regroups its proposal calls too: a verify pass's
    requests reach it one router hop and their share of the router's loop apart (~20 ms for 8), and its pass
    began with the first one alone, then ran the other seven (int8 at 8 streams, `fixed:1`, AVX512-BF16 EPYC:
    passes of 1 and 7 every step, a lone pass's ~125 ms lost per step; docs/serving_log.md). Its bound is that
    spread, not a pass (deployments.workers.WorkerSpec.draft_batching), and a pass of fewer than `regroup_from`
    calls (2) sets no sessions to wait for: a lone call under load is a probe, whose session does not draft at
    its next step. In-process the calls of a pass arrive together and the draft does not regroup.
    The wait counts only idle time (`_idle_now`): time spent in passes is the cores' and not the wait's, since
    the pass it would start could not have run then anyway. In-process that is the time this event loop spent
    in passes (any Batcher's on it: a draft pass, a prefill chunk); where replicas share the cores, the time
    any of them held the lease (`CoreLease.busy_s`). Counted in wall time, a draft pass longer than
    `regroup_s` used the whole wait up; the next verify pass began without the requests that drafted, and
    every step split in two (fp16 at 8 requests on an AVX2 EPYC: in-process, passes of 3-5 bf16 rows beside
    passes of 8, 5.6 sequences a pass; served, 5.3 at fixed γ = 2; docs/serving_log.md)."""

    def __init__(self, fn: Callable[[list[T]], list[R]], settings: BatchSettings = BatchSettings(),
                 cores: CoreLease | None = None, session: Callable[[T], Hashable] | None = None,
                 regroup_from: int = 1) -> None:
        self.fn = fn
        self.settings = settings
        self.cores = cores  # held for each pass where replicas share the machine's cores
        self.session = session
        self.regroup_from = regroup_from  # a pass of fewer calls sets no sessions to wait for (a lone probe)
        self._pass_log = os.environ.get(PASS_LOG_ENV)  # read once: off, a pass does nothing more for it
        # (call, its result, when it arrived, when on the idle clock: `_idle_now`, read only where it regroups)
        self._pending: list[tuple[T, asyncio.Future, float, float]] = []
        self._runner: asyncio.Task | None = None
        self._expected: set[Hashable] = set()  # sessions of the last pass not yet back (regrouping)
        self._awaited = False  # the last pass set sessions to wait for (regrouping)
        self._arrived: asyncio.Event | None = None  # set when a call arrives or a session is forgotten
        self.batches = 0  # passes run, for tests and reports
        self.largest = 0

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future, loop.time(), self._idle_now(loop) if self._regroups else 0.0))
        if self.session is not None:
            self._expected.discard(self.session(item))
            self._wake()
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        return await future

    def forget(self, session: Hashable) -> None:
        """The session has ended: the next pass does not wait for it."""
        self._expected.discard(session)
        self._wake()

    @property
    def _regroups(self) -> bool:
        return self.session is not None and self.settings.regroup_s > 0

    def _idle_now(self, loop: asyncio.AbstractEventLoop) -> float:
        """A clock that advances only while the cores are free of passes: with a lease, every replica's on this
        machine; without, this loop's."""
        if self.cores is not None:
            return time.monotonic() - self.cores.busy_s()
        return _idle_time(loop)

    def _whole(self) -> bool:
        """Regrouping, every session the last pass set to wait for is back (or ended): no call is expected that
        waiting (`wait_s`, `handover_s`) would let join. With one stream those waits were 10 ms of every 270-ms
        step (fp16, AVX512-BF16 EPYC; docs/serving_log.md); a new request joins at the next pass."""
        return self._regroups and self._awaited and not self._expected

    def _wake(self) -> None:
        if self._arrived is not None:
            self._arrived.set()

    async def _regroup(self) -> None:
        """Wait, up to `regroup_s` of idle time after the first call of the next pass arrived, for the last
        pass's sessions that are not back yet (none where the pass is full already)."""
        if not self._pending:
            return
        deadline = self._pending[0][3] + self.settings.regroup_s  # on the idle clock
        loop = asyncio.get_running_loop()
        while self._expected and len(self._pending) < self.settings.max_batch_size:
            left = deadline - self._idle_now(loop)
            if left <= 0:
                break
            self._arrived = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        self._arrived = None

    async def _run(self) -> None:
        while self._pending:
            if not self._whole():
                await asyncio.sleep(self.settings.wait_s)  # 0: let the calls already scheduled join
            if self._regroups:
                await self._regroup()  # before the cores are taken: the draft pass it waits for needs them
            if self.cores is None:
                self._pass()
                continue
            # where replicas share the cores, wait for them before taking the calls: the calls that arrive
            # while another replica's pass runs join this one (taken first, the pass would carry one call and
            # the others would wait for the next turn: passes of one sequence each under load). Handed the
            # cores by another replica's pass, wait `handover_s` more for the calls that pass set off: a
            # draft pass ends, its requests' verify calls reach the target a router hop later, and a pass
            # taken at once left them for the next one, so requests that draft and requests that do not
            # verified in alternate passes, each paying a whole pass's fixed cost (nf4 on an AVX2 EPYC:
            # 4.5 sequences a pass at fixed γ = 3 with 8 streams, 8 without drafting)
            async with self.cores.hold() as handed_over:
                if handed_over and self.settings.handover_s and not self._whole():
                    await asyncio.sleep(self.settings.handover_s)
                self._pass()

    def _pass(self) -> None:
        """Take up to max_batch_size pending calls and run them as one pass (on the loop's thread). A result
        with a `waited_ms` field gets how long its call waited here for the pass to begin."""
        batch = [(item, f, t) for item, f, t, _ in self._pending[:self.settings.max_batch_size] if not f.done()]
        del self._pending[:self.settings.max_batch_size]
        if not batch:
            return
        if self.session is not None:  # expected back for the next pass (those still pending are there already)
            self._expected = {self.session(item) for item, _, _ in batch} if len(batch) >= self.regroup_from else set()
            self._awaited = bool(self._expected)
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        loop = asyncio.get_running_loop()
        begun = loop.time()
        try:
            results = self.fn([item for item, _, _ in batch])
        except Exception as e:  # noqa: BLE001 - handed to every caller of the batch
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(e)
            return
        finally:
            _BUSY_S[loop] = _BUSY_S.get(loop, 0.0) + loop.time() - begun
            if self._pass_log:
                _log_pass(self._pass_log, self.fn, [item for item, _, _ in batch], (begun - batch[0][2]) * 1e3,
                          (loop.time() - begun) * 1e3)
        for (_, future, arrived), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):  # this call failed alone (workers.raise_failed)
                future.set_exception(result)
                continue
            if hasattr(result, "waited_ms"):
                result.waited_ms = (begun - arrived) * 1e3
            future.set_result(result)


def _log_pass(path: str, fn: Callable, items: list, waited_ms: float, ms: float) -> None:
    """Append this pass to the log at `path` (SPECKV_PASS_LOG when the Batcher was made): its end on the wall
    clock (comparable across the replicas' processes), what ran, how many calls, the drafted tokens of verify
    calls ((inputs, draft ids) pairs), how long its first call waited for it and how long it ran."""
    drafted = sum(len(item[1]) for item in items if isinstance(item, tuple) and len(item) == 2)
    line = {"end": time.time(), "pid": os.getpid(), "fn": getattr(fn, "__qualname__", repr(fn)), "calls": len(items),
            "drafted": drafted, "waited_ms": round(waited_ms, 2), "ms": round(ms, 2)}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


async def admit_and_prefill(worker: ModelWorker, inputs: StepInputs,
                            prefill_step: Callable[[StepInputs], Awaitable[int]]) -> None:
    """Before a request's call joins a batched pass: admit it (KVCapacityError where its cache would not
    fit) and, where its cache lacks more of its context than a chunk (a long prompt), prefill it through
    `prefill_step` (a batched `ModelWorker.prefill_step`) until it lacks at most a chunk, which the call's own
    pass then feeds beside the others' rows (a short prompt makes no pass of its own); one chunk pass per call,
    shared with other new requests, so the running requests' passes run between the chunks."""
    worker.admit(inputs)
    while worker.needs_prefill(inputs):
        await prefill_step(inputs)


class CoreLease:
    """Model replicas on one machine that share its cores take turns for them, one forward pass at a time.

    Each replica's torch runs as many threads as the cores it was given; two replicas' passes at once (a
    draft pass and a target pass of different requests, disaggregated on one machine) run twice the threads
    on the same cores and slow each other (docs/serving_log.md, "Measured under load"). Every calibration times
    a model alone, so taking turns is also what keeps the cost model true. The lease is an exclusive
    `flock` on a file named by `name` in the machine's temp directory, so it spans processes (Ray workers)
    but not machines; within a process an asyncio lock orders the passes. Waiting for it happens in a
    thread, off the event loop.

    The file also keeps the cores' busy clock (`busy_s`: how long any holder has held the lease), written by
    each holder under the lease, so a replica can tell time the cores were free from time another replica's
    pass had them (Batcher, regrouping)."""

    # seconds held in all by past holds; when the hold in progress began (0: none) and by which process
    _CLOCK = struct.Struct("ddq")

    def __init__(self, name: str = "speckv-cores") -> None:
        self.path = os.path.join(tempfile.gettempdir(), f"{name}.lock")
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666)
        self._local = asyncio.Lock()
        self._since = 0.0  # when this holder took the lease (time.monotonic); 0: it does not hold it

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[bool]:
        """The lease, for one pass; yields whether another holder had it when asked (handed over)."""
        async with self._local:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                handed_over = False
            except BlockingIOError:
                handed_over = True
                acquire = asyncio.ensure_future(asyncio.to_thread(fcntl.flock, self._fd, fcntl.LOCK_EX))
                try:
                    await asyncio.shield(acquire)
                except asyncio.CancelledError:  # the thread still takes the lock: hand it back when it does
                    acquire.add_done_callback(lambda f: f.cancelled() or f.exception() or self._release())
                    raise
            self._taken()
            try:
                yield handed_over
            finally:
                self._release()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The lease, taken blocking, outside an event loop: for what a replica runs while it loads (calibrating,
        warming up), so that neither times nor slows the passes other replicas serve meanwhile."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._taken()
        try:
            yield
        finally:
            self._release()

    def busy_s(self) -> float:
        """Seconds the cores have been held by any replica on this machine (on `time.monotonic`'s scale, which
        all processes share), a hold in progress included: `time.monotonic() - busy_s()` advances only while
        they are free. A hold in progress whose holder died without releasing (its lock went with it) is not
        counted."""
        total, since, pid = self._read()
        if since and _alive(pid):
            total += max(0.0, time.monotonic() - since)
        return total

    def _taken(self) -> None:
        self._since = time.monotonic()
        self._write(self._read()[0], self._since, os.getpid())

    def _release(self) -> None:
        if self._since:
            self._write(self._read()[0] + time.monotonic() - self._since, 0.0, 0)
            self._since = 0.0
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _read(self) -> tuple[float, float, int]:
        """The clock as last written; read twice until two reads agree, as a holder may be writing it."""
        last = None
        for _ in range(4):
            raw = os.pread(self._fd, self._CLOCK.size, 0)
            if raw == last:
                break
            last = raw
        return self._CLOCK.unpack(last) if len(last) == self._CLOCK.size else (0.0, 0.0, 0)

    def _write(self, total: float, since: float, pid: int) -> None:
        os.pwrite(self._fd, self._CLOCK.pack(total, since, pid), 0)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True

"""GuideLLM's command line with its Poisson arrivals mended (GuideLLM 0.8.1, the newest on PyPI).

Run by `deployments.load_sweep` with the load tool's own Python (`.loadtool/bin/python`), never imported by the
server. Two faults of `AsyncPoissonStrategy`, both read in its source:

- **The start race.** `init_processes_start` sets the workers' start event (the base class) *before* it writes
  the arrival clock's offset, which starts at -1. A worker that wakes in between adds its exponential delays to
  -1, so its arrival times lie in 1970 and it sends every request at once, up to its concurrency limit: a burst,
  not the rate (seen here: 77 requests in a 60 s level at 0.3/s). Mended: the offset is written first.
- **Identical delays.** Every worker process seeds its own `random.Random` with the same seed, so each process
  draws the same sequence of delays and successive arrivals come in runs of equal gaps. Mended: each worker's
  generator is seeded by the seed and its worker index (still reproducible).

GuideLLM starts its workers with `spawn`, which imports this file again in each of them as `__mp_main__`: the
mends are applied at import, so the workers' copies of the class are mended too.
"""

from __future__ import annotations

import random
import sys

# what a worker's seed is multiplied by before its index is added (any odd constant beyond the worker count)
SEED_STRIDE = 1_000_003


def init_processes_start(strategy, start_time: float, base_start) -> None:
    """Write the arrival clock's offset, then let `base_start` (the base class's) wake the workers."""
    with strategy._offset.get_lock():
        strategy._offset.value = start_time
    base_start(strategy, start_time)


def worker_random(seed: int, worker_index: int) -> random.Random:
    """A worker's own generator of delays: the same seed and index draw the same delays, other workers others."""
    return random.Random(seed * SEED_STRIDE + worker_index)


def mend() -> None:
    """Apply both mends to GuideLLM's AsyncPoissonStrategy (in this process)."""
    from guidellm.scheduler.strategies import AsyncPoissonStrategy, SchedulingStrategy

    def start(self, start_time: float) -> None:
        init_processes_start(self, start_time, SchedulingStrategy.init_processes_start)

    async def next_request_time(self, worker_index: int) -> float:
        await self.get_processes_start_time()  # wait until the offset is written
        if self._random is None:
            self._random = worker_random(self.random_seed, worker_index)
        delay = self._random.expovariate(self.rate)
        with self._offset.get_lock():
            self._offset.value += delay
            return self._offset.value

    AsyncPoissonStrategy.init_processes_start = start
    AsyncPoissonStrategy.next_request_time = next_request_time


if __name__ in ("__main__", "__mp_main__"):
    mend()

if __name__ == "__main__":
    from guidellm.__main__ import cli

    sys.exit(cli())

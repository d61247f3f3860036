"""speckv.local: the in-process executor's batched path gathers each step's calls into passes."""

from __future__ import annotations

import asyncio

from speckv.batching import BatchSettings
from speckv.local import local_executor
from speckv.sampling import SamplingParams
from speckv.workers import StepInputs


class _Worker:
    """A model worker that records the calls of each pass (no model, no prefill)."""

    def __init__(self) -> None:
        self.passes: list[list[str]] = []
        self.lm = self

    def admit(self, inputs: StepInputs) -> None:
        pass

    def needs_prefill(self, inputs: StepInputs) -> bool:
        return False

    def propose_batch(self, batch: list[StepInputs]) -> list[str]:
        self.passes.append([inputs.session_id for inputs in batch])
        return [inputs.session_id for inputs in batch]

    prefill_step = verify_batch = propose_batch

    def close(self, session_id: str) -> None:
        pass


def test_the_drafts_calls_of_a_pass_that_arrive_apart_share_one_drafting_pass():
    """Served, a verify pass's requests reach the draft a router hop and their share of the router's loop apart:
    the drafting pass waits for the sessions of the last one, so they share one pass, not a lone one and then
    the rest (int8 at 8 streams, AVX512-BF16 EPYC: passes of 1 and 7 at every step)."""
    draft, target = _Worker(), _Worker()
    executor = local_executor(draft, target, BatchSettings(8, 0.0, 0.0, 0.5))
    params = SamplingParams()

    def call(session: str, step: int):
        return executor._propose(StepInputs(session, [1, 2, 3], 1, params, 0, step))

    async def main() -> None:
        await asyncio.gather(*(call(s, 0) for s in "abc"))

        async def late(s: str) -> None:
            await asyncio.sleep(0.03)
            await call(s, 1)

        await asyncio.gather(call("a", 1), late("b"), late("c"))

    asyncio.run(main())
    assert draft.passes == [["a", "b", "c"], ["a", "b", "c"]]

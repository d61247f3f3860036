"""In-process engine: draft and target in this process, used by the CLI, benchmarks and tests."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from .batching import Batcher, BatchSettings, CoreLease, admit_and_prefill
from .calibration import PairCalibration, calibrate_pair
from .engine import (
    GenerationRequest,
    GenerationResult,
    RequestStats,
    SplitExecutor,
    run_to_completion,
)
from .estimates import TierEstimates
from .models import DEFAULT_DRAFT, DEFAULT_TARGET, DRAFT_TIER, Tier, draft_dtype_for, load_model, load_tokenizer
from .policy import GammaPolicy, make_policy, policy_kind, validate_policy_spec
from .predictor import AcceptancePredictor
from .sampling import SamplingParams
from .text import eos_token_ids
from .workers import DraftWorker, Proposal, SessionLM, StepInputs, TargetWorker, Verification, verify_session


def local_executor(draft: DraftWorker, target: TargetWorker, batching: BatchSettings | None = None,
                   cores: CoreLease | None = None) -> SplitExecutor:
    """A step executor over in-process workers. With `batching`, the calls of requests running concurrently
    (on one event loop) share forward passes (speckv.batching); a new request's prompt rides in its first pass
    (a prompt longer than a chunk is first prefilled in chunk passes, together with other new requests', between
    those passes); with `cores` too, every pass holds that lease."""
    if batching is None:
        # Both passes run on the loop's thread, as the Batcher's do (speckv.batching.Batcher says why), so the
        # policy's `prepare` runs after the verification, not beside it (SplitExecutor.run_step): verified in
        # a worker thread, the same requests took 1.16x as long (nf4, fixed γ = 6, AVX2 EPYC; 6 of 6 paired
        # runs slower: scripts/verify_thread_ab.py), far more than the preparation the thread let overlap.
        async def propose(inputs: StepInputs) -> Proposal:
            return draft.propose(inputs)

        async def verify(inputs: StepInputs, draft_token_ids: list[int]) -> Verification:
            return target.verify(inputs, draft_token_ids)
    else:
        proposals, draft_prefills = (Batcher(draft.propose_batch, batching, cores),
                                     Batcher(draft.prefill_step, batching, cores))
        verifications, target_prefills = (Batcher(target.verify_batch, batching, cores, session=verify_session),
                                          Batcher(target.prefill_step, batching, cores))

        async def propose(inputs: StepInputs) -> Proposal:
            await admit_and_prefill(draft, inputs, draft_prefills)
            return await proposals(inputs)

        async def verify(inputs: StepInputs, draft_token_ids: list[int]) -> Verification:
            await admit_and_prefill(target, inputs, target_prefills)
            return await verifications((inputs, draft_token_ids))

    async def close(session_id: str) -> None:
        draft.lm.close(session_id)
        target.lm.close(session_id)
        if batching is not None:
            verifications.forget(session_id)

    return SplitExecutor(propose, verify, close)


@dataclass
class LocalEngine:
    """A draft/target pair in this process."""

    draft_model: torch.nn.Module
    target_model: torch.nn.Module
    tokenizer: object
    tier: str = "fp16"
    predictor: AcceptancePredictor | None = None  # for `adaptive` (None: the one shipped with speckv)
    # what `adaptive` knows of this machine; None: calibrate at first use (half-precision layers on the CPU: at once,
    # __post_init__)
    estimates: TierEstimates | None = None
    calibration_budget_s: float | None = None  # None: speckv.calibration's default
    batching: BatchSettings | None = None  # concurrent requests (generate_many) share passes; None: one by one

    def __post_init__(self) -> None:
        self.draft_worker = DraftWorker(SessionLM(self.draft_model))
        self.target_worker = TargetWorker(SessionLM(self.target_model))
        self.executor = local_executor(self.draft_worker, self.target_worker, self.batching)
        self.eos = eos_token_ids(self.tokenizer, getattr(self.target_model, "generation_config", None))
        if self.target_worker.lm.half_layers or self.draft_worker.lm.half_layers:
            # the calibration of a model with half-precision layers on the CPU also decides what its passes
            # compute in (SessionLM.float32_from): from the first request on, whatever the policy, not from the first
            # `adaptive` one; and for these workers even where estimates were handed in (an engine copied with
            # `dataclasses.replace` has new workers: left as loaded, its draft read eight nf4 prompts in bf16
            # in 31.7 s against 4-7 s in float32, AVX2 EPYC, scripts/concurrent_bench.py)
            pair = self._calibrate_workers()
            if self.estimates is None:
                self.estimates = TierEstimates.calibrated(pair.cost_model)

    def calibrate(self, force: bool = False, progress=None) -> TierEstimates:
        """This machine's step costs for the pair (cached under SPECKV_HOME; measured within the budget if not),
        as fresh estimates for `adaptive`."""
        self.estimates = TierEstimates.calibrated(self._calibrate_workers(force, progress).cost_model)
        return self.estimates

    def _calibrate_workers(self, force: bool = False, progress=None) -> PairCalibration:
        """The pair's calibration (cached, or measured), with what it chose set on both workers."""
        return calibrate_pair(self.draft_worker.lm, self.target_worker.lm, self.tier, self.calibration_budget_s,
                              force, progress=progress)

    @classmethod
    def load(
        cls,
        draft: str = DEFAULT_DRAFT,
        target: str = DEFAULT_TARGET,
        tier: str = "fp16",
        dtype: str = "auto",
        draft_dtype: str | None = None,
        device: str | None = None,
    ) -> LocalEngine:
        """Load the pair. The draft stays in half precision unless `draft_dtype` (or float32 `dtype`) says
        otherwise: exactness checks in float32 need both models in float32."""
        tier_enum = Tier.parse(tier)
        tokenizer = load_tokenizer(target)
        draft_tok = load_tokenizer(draft)
        if draft_tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"draft {draft!r} and target {target!r} do not share a tokenizer")
        draft_dtype = draft_dtype or draft_dtype_for(dtype)
        draft_model = load_model(draft, DRAFT_TIER, draft_dtype, device)
        target_model = load_model(target, tier_enum, dtype, device)
        return cls(draft_model, target_model, tokenizer, tier_enum.value)

    def generate(
        self,
        prompt_ids: list[int],
        policy: str = "adaptive",
        max_new_tokens: int = 128,
        sampling: SamplingParams = SamplingParams(),
        stop: tuple[str, ...] = (),
        prompt_id: str = "",
        category: str = "",
        min_confidence: float = 0.0,
    ) -> GenerationResult:
        if not policy_kind(validate_policy_spec(policy)).in_engine:
            return self.generate_hf_assisted(prompt_ids, max_new_tokens, sampling)
        request = self.request(prompt_ids, max_new_tokens, sampling, stop, prompt_id, category, min_confidence)
        return asyncio.run(run_to_completion(request, self.executor, self.policy(policy, sampling), self.tokenizer))

    def request(self, prompt_ids: list[int], max_new_tokens: int = 128, sampling: SamplingParams = SamplingParams(),
                stop: tuple[str, ...] = (), prompt_id: str = "", category: str = "",
                min_confidence: float = 0.0) -> GenerationRequest:
        """A request for this engine's tier and end-of-sequence tokens."""
        return GenerationRequest(
            prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop,
            eos_token_ids=self.eos, tier=self.tier, prompt_id=prompt_id, category=category,
            min_confidence=min_confidence,
        )

    def policy(self, policy: str, sampling: SamplingParams = SamplingParams()) -> GammaPolicy:
        """A fresh per-request policy (calibrating this machine first where `adaptive` needs it)."""
        if policy == "adaptive" and self.estimates is None:
            self.calibrate()
        return make_policy(policy, self.tier, self.predictor, self.estimates, sampling.greedy)

    async def generate_many(self, requests: list[GenerationRequest], policy: str = "adaptive",
                            starts_s: list[float] | None = None) -> list[GenerationResult]:
        """Run the requests concurrently (request i starts `starts_s[i]` seconds in): with `batching` set,
        their draft and verify calls share forward passes."""
        running = [0]

        def share(delta: int) -> None:  # in one process every pass runs on the same cores
            running[0] += delta
            if self.estimates is not None:
                self.estimates.sharing = max(running[0], 1)
                self.estimates.in_flight = running[0]

        async def one(request: GenerationRequest, delay: float) -> GenerationResult:
            if delay > 0:
                await asyncio.sleep(delay)
            share(+1)  # before its first step: it prices that step for the requests running with it
            try:
                # and for those that arrived with it: counted one by one as each decided at once, the first of
                # eight requests started together priced its first step (the draft reading its whole prompt)
                # as if alone; six of eight drafted there (nf4, AVX2 EPYC), every request waited 32 s for those
                # draft prefills, and none of that paid in 32 tokens
                await asyncio.sleep(0)
                gamma_policy = self.policy(policy, request.sampling)
                return await run_to_completion(request, self.executor, gamma_policy, self.tokenizer)
            finally:
                share(-1)

        return list(await asyncio.gather(*(one(r, d) for r, d in zip(requests, starts_s or [0.0] * len(requests)))))

    @torch.inference_mode()
    def generate_hf_assisted(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams
    ) -> GenerationResult:
        """transformers' assisted generation with its default schedule: the peer users could pick instead.

        Steps are counted as target forward passes, so tokens/step compares with SpecKV's.
        """
        calls = [0]
        hook = self.target_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        kwargs: dict = {"do_sample": not sampling.greedy}
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        device = next(self.target_model.parameters()).device
        try:
            start = time.perf_counter()
            out = self.target_model.generate(
                torch.tensor([prompt_ids], device=device), assistant_model=self.draft_model,
                max_new_tokens=max_new_tokens, eos_token_id=list(self.eos), pad_token_id=self.eos[0], **kwargs,
            )
            seconds = time.perf_counter() - start
        finally:
            hook.remove()
        new = out[0, len(prompt_ids):].tolist()
        finish = "length"
        for i, token in enumerate(new):
            if token in self.eos:
                new, finish = new[:i], "stop"
                break
        steps = max(calls[0], 1)  # as in SpecKV, the first verification pass also reads the prompt
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        stats = RequestStats("hf-assisted", steps=steps, accepted_tokens=max(len(new) - steps, 0),
                             completion_tokens=len(new), finish_reason=finish)
        return GenerationResult(text, new, seconds, 0.0, stats, [])

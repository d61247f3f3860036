"""Draft and target deployments: thin Ray Serve wrappers over speckv's DraftWorker and TargetWorker.

Each replica keeps per-request KV caches (speckv.workers.SessionLM). Requests stick to a replica through
the consistent-hash request router keyed on the request's session id; when a replica lacks a session it
rebuilds it from the token ids, so affinity only saves time and never decides correctness.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
from ray import serve

from speckv.batching import Batcher, BatchSettings, CoreLease, admit_and_prefill
from speckv.calibration import budget_share, load_or_calibrate, warm_up
from speckv.engine import StepCall
from speckv.kernels import kernels_for, many_rows_of
from speckv.local import local_executor
from speckv.models import DRAFT_TIER, load_model
from speckv.workers import (
    DraftWorker,
    Proposal,
    SessionLM,
    StepInputs,
    TargetWorker,
    Verification,
    draft_session,
    raise_failed,
    verify_session,
)

from .autoscaling import SESSIONS_METRIC
from .grouping import GroupReply, answer_group

HANDOVER_MIN_S = 0.005  # at least a router hop (2-4 ms here) for the calls another replica's pass set off
logger = logging.getLogger("ray.serve")
STICKY_ROUTER = {"request_router_class": "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"}


@dataclass(frozen=True)
class WorkerSpec:
    """How a replica builds its model(s): the engine is injected as this spec, not built at import."""

    model: str
    tier: str = DRAFT_TIER.value  # the draft's; targets name theirs
    dtype: str = "auto"
    device: str | None = None
    max_sessions: int = 64
    idle_timeout_s: float = 600.0
    max_kv_bytes: int | None = None  # see SessionLM
    torch_threads: int | None = None
    added_ms_per_call: float = 0.0  # see SessionLM
    calibration_budget_s: float | None = None  # for a draft/target pair; None: speckv.calibration's default
    max_batch_size: int = 8  # requests per forward pass (speckv.batching)
    batch_wait_share: float = 0.05  # an idle replica waits this share of a pass for more requests to join
    share_cores: bool = False  # model replicas on one machine take turns for its cores (speckv.batching.CoreLease)

    def batching(self, calibration: dict) -> BatchSettings:
        """How this replica gathers calls into passes: the wait is a share of its calibrated single pass, so
        the first caller of a batch loses at most that share of a step to the others joining."""
        rows = [r for r in calibration.get("rows", []) if r.get("tokens") == 1 and r.get("sequences", 1) == 1]
        pass_ms = min((r["ms"] for r in rows), default=0.0)
        wait_s = self.batch_wait_share * pass_ms / 1e3
        if not self.share_cores:
            return BatchSettings(self.max_batch_size, wait_s)
        # handed the shared cores by another replica's pass, the calls it set off are a router hop away; the
        # sessions of the last verify pass still drafting are waited for up to what a split would cost: one
        # more pass's fixed cost (speckv.batching.Batcher, regrouping)
        return BatchSettings(self.max_batch_size, wait_s, max(wait_s, HANDOVER_MIN_S), pass_ms / 1e3)

    def draft_batching(self, calibration: dict) -> BatchSettings:
        """The draft's gathering: as `batching`, but its regroup waits at most for the calls of a whole pass to
        come through the router a handover (a hop) apart, not a pass's fixed cost. A session that does not come
        back drafts nothing this step and waits at the target, whose pass waits for the drafting ones: bounded
        by a pass's fixed cost both waited it out (in-process, a regrouping draft made every step of requests
        that stopped drafting wait for its whole bound)."""
        settings = self.batching(calibration)
        return dataclasses.replace(settings, regroup_s=min(settings.regroup_s,
                                                           settings.max_batch_size * settings.handover_s))

    def build_lm(self) -> SessionLM:
        """Load the model; where replicas share the cores, holding them, as calibrating does (`calibrate`): a
        load quantizes weights and times kernels (speckv.kernels), and beside it another replica's calibration
        measured 5-8x what its passes cost (the draft beside the int8 target's load on the AMX Xeon: a draft
        token 405 ms where 80 is true, so `adaptive` never drafted where fixed:2 ran 1.31x `none`)."""
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        with self._cores_held():
            model = load_model(self.model, self.tier, self.dtype, self.device)
        # what load-time probes chose (speckv.kernels) differs between machines and, near a crossover, between loads
        many_rows = many_rows_of(model)
        logger.info("%s at %s loaded; kernels of ours: %s%s", self.model, self.tier, kernels_for(model) or "none",
                    f"; 4-bit passes dequantized from (rows by weight shape) {many_rows}" if many_rows else "")
        return SessionLM(model, self.max_sessions, self.idle_timeout_s, self.added_ms_per_call, self.max_kv_bytes)

    def _cores_held(self) -> contextlib.AbstractContextManager:
        """What a replica runs while it starts (loading, calibrating, warming up) holds the cores it shares."""
        return CoreLease().held() if self.share_cores else contextlib.nullcontext()

    def calibrate(self, lm: SessionLM, role: str) -> dict:
        """This replica's step costs, measured at load (or cached for this machine and setting): the router
        prices γ with them (speckv.calibration)."""
        with self._cores_held():
            result, cached = load_or_calibrate(lm, role, self.tier,
                                               budget_s=budget_share(role, self.calibration_budget_s))
            if cached:  # measuring warmed the model up; a cached calibration did not
                warm_up(lm, role)
        return {**result.to_dict(), "spot_check": result.spot_check}  # the spot check: what this load found


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit tests)
        return f"pid-{os.getpid()}"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _gatherers(serve_pass, serve_prefill, pass_fn, prefill_fn, settings: BatchSettings, cores: CoreLease | None,
               session=None, regroup_from: int = 1):
    """How a replica gathers calls into passes: Serve's `@serve.batch` handlers where it has its cores; where
    it shares them (`cores`), speckv's Batcher, which waits for the cores before it takes the calls, so the
    calls that arrive while another replica's pass runs join the next pass (a `@serve.batch` handler is
    handed its batch already formed: waiting for the cores inside it, passes carried one call each), and
    regroups its passes by `session` where given (the target's verify calls)."""
    if cores is None:
        return serve_pass, serve_prefill
    return Batcher(pass_fn, settings, cores, session, regroup_from), Batcher(prefill_fn, settings, cores)


def _apply(handler, settings: BatchSettings) -> None:
    """Set a `@serve.batch` handler's gathering from this replica's measured pass cost."""
    handler.set_max_batch_size(settings.max_batch_size)
    handler.set_batch_wait_timeout_s(settings.wait_s)


class _ModelReplica:
    """What every model replica answers besides its own calls: several requests' calls in one handle call, and its
    load for Serve's autoscaler."""

    worker: DraftWorker | TargetWorker

    async def call_group(self, method: str, calls: list[tuple]) -> GroupReply:
        """Several requests' calls in one handle call (deployments.grouping), each run as if it came alone."""
        return await answer_group(self, _replica_id(), method, calls)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The load Serve's autoscaler reads (deployments.autoscaling): the requests this replica serves."""
        return {SESSIONS_METRIC: self.worker.lm.active_sessions()}


@serve.deployment(name="draft", max_ongoing_requests=32, request_router_config=STICKY_ROUTER)
class DraftDeployment(_ModelReplica):
    """Drafts for every tier; concurrent requests' proposals share forward passes (`@serve.batch`)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = DraftWorker(spec.build_lm())
        self.cores = CoreLease() if spec.share_cores else None
        self._calibration = spec.calibrate(self.worker.lm, "draft")
        self.batching = spec.draft_batching(self._calibration)
        _apply(self._propose_batch, self.batching)
        _apply(self._prefill_step, self.batching)
        self._propose, self._prefill = _gatherers(self._propose_batch, self._prefill_step, self.worker.propose_batch,
                                                  self.worker.prefill_step, self.batching, self.cores, draft_session,
                                                  regroup_from=2)

    def calibration(self) -> dict:
        """{"draft": this replica's calibration (speckv.calibration.Calibration as a dict)}."""
        return {"draft": self._calibration}

    async def propose(self, inputs: StepInputs) -> Proposal:
        await admit_and_prefill(self.worker, inputs, self._prefill)  # a long prompt's chunks before the last
        return raise_failed(await self._propose(inputs))  # a closed session fails alone

    # the passes run on the replica's event loop, not in a thread (speckv.batching.Batcher says why)
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _propose_batch(self, batch: list[StepInputs]) -> list[Proposal]:
        return self.worker.propose_batch(batch)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _prefill_step(self, batch: list[StepInputs]) -> list[int]:
        return self.worker.prefill_step(batch)

    def close(self, session_id: str) -> None:
        """The request has ended: close its session (a call still in flight for it is refused); its next drafting
        pass does not wait for it."""
        self.worker.lm.close(session_id)
        if isinstance(self._propose, Batcher):
            self._propose.forget(session_id)

    def stats(self) -> dict:
        return {"replica": _replica_id(), "node": _node_id(), **self.worker.lm.stats().__dict__}


@serve.deployment(name="target", max_ongoing_requests=32, request_router_config=STICKY_ROUTER)
class TargetDeployment(_ModelReplica):
    """One compression tier of the target; concurrent requests' verifications share forward passes
    (`@serve.batch`). With `draft` set (colocated topology) it also drafts, and a whole step runs in one call
    (concurrent steps batched in-process, speckv.batching)."""

    def __init__(self, spec: WorkerSpec, draft: WorkerSpec | None = None) -> None:
        self.tier = spec.tier
        self.worker = TargetWorker(spec.build_lm())
        self.cores = CoreLease() if spec.share_cores else None
        self.draft = DraftWorker(draft.build_lm()) if draft else None
        self._calibration = {"target": spec.calibrate(self.worker.lm, "target")}
        if self.draft:
            self._calibration["draft"] = draft.calibrate(self.draft.lm, "draft")
        self.batching = spec.batching(self._calibration["target"])
        _apply(self._verify_batch, self.batching)
        _apply(self._prefill_step, self.batching)
        self._verify, self._prefill = _gatherers(self._verify_batch, self._prefill_step, self.worker.verify_batch,
                                                 self.worker.prefill_step, self.batching, self.cores, verify_session)
        self.executor = local_executor(self.draft, self.worker, self.batching, self.cores) if self.draft else None

    def calibration(self) -> dict:
        """{"target": this replica's calibration, and "draft" when it also drafts} (as dicts)."""
        return self._calibration

    async def verify(self, inputs: StepInputs, draft_token_ids: list[int]) -> Verification:
        await admit_and_prefill(self.worker, inputs, self._prefill)  # a long prompt's chunks before the last
        return raise_failed(await self._verify((inputs, draft_token_ids)))  # a closed session fails alone

    # the passes run on the replica's event loop, not in a thread (speckv.batching.Batcher says why)
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _verify_batch(self, batch: list[tuple[StepInputs, list[int]]]) -> list[Verification]:
        return self.worker.verify_batch(batch)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _prefill_step(self, batch: list[StepInputs]) -> list[int]:
        return self.worker.prefill_step(batch)

    async def step(self, inputs: StepInputs) -> StepCall:
        if self.executor is None:
            raise RuntimeError("this target replica has no colocated draft; use the disaggregated topology")
        return await self.executor.run_step(inputs)

    def close(self, session_id: str) -> None:
        """The request has ended: close its sessions (a call still in flight for it is refused); its next verify
        pass does not wait for it."""
        self.worker.lm.close(session_id)
        if self.draft:
            self.draft.lm.close(session_id)
        if isinstance(self._verify, Batcher):
            self._verify.forget(session_id)

    def stats(self) -> dict:
        return {"replica": _replica_id(), "node": _node_id(), "tier": self.tier, **self.worker.lm.stats().__dict__}

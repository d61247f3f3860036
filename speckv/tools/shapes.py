"""Step-cost shapes this machine lacks, to prove `adaptive` on them without the hardware (offline tooling).

A shape is a CostModel standing for a machine: GPU-like (flat verify, a cheap or a dear draft), the CPUs
measured so far, or a step change mid-run (a neighbour starts). `decode_together` runs requests decoding together
in batched passes under a shape (what load does to γ). `compare` replays greedy traces (the real
pair's, or synthetic ones in tests) under a shape: every policy's steps are charged, and `adaptive` is told,
what the shape says a step takes, as the live loop would tell it from the wall clock; `ShapedExecutor` does
the same to live model calls (a virtual clock over any StepExecutor). `adaptive` starts from a calibration
(by default the shape itself at the first step, as calibration at load would measure it, or one whose
verify slope is off, as a few noisy timed passes leave it: `slope_errors`) and learns online.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..adaptive import AdaptivePolicy
from ..cost_model import CostModel
from ..engine import StepCall, StepExecutor, WhileVerifying
from ..estimates import TierEstimates
from ..policy import GammaPolicy, RequestProgress, StepTiming
from ..predictor import AcceptancePredictor
from ..signals import DraftSignals
from ..workers import StepInputs
from .replay import Trace, fixed, replay

SHAPES: dict[str, CostModel] = {  # ms: draft per token, verify base, verify per extra token scored
    "gpu-cheap-draft": CostModel(1.5, 20.0, 0.3),  # memory-bound verify, a small draft on the same GPU
    "gpu-dear-draft": CostModel(12.0, 20.0, 0.3),  # a draft as dear as half a target pass
    "cpu-avx2-bf16": CostModel(94.0, 224.0, 148.0),  # bf16 emulated: scoring a token costs almost a pass
    "cpu-avx512-bf16": CostModel(74.0, 175.0, 9.3),  # bf16 in hardware: drafting pays well
    "cpu-nf4-dear-draft": CostModel(93.0, 81.0, 22.0),  # a draft token dearer than a target pass
    "cpu-avx2-nf4": CostModel(66.0, 1588.0, 94.0),  # 4-bit dequantised every pass: drafting pays, long runs don't
}
# the AMX Xeon's fp16 (bf16) calibration with its batched passes (docs/results/amx/calibrate_fp16.txt): a flat
# verify pass, a draft token 40% of it, each more sequence 5.9 ms, each more token 2.7 ms, the draft's prefill
# 1.5 ms a token; where 8 requests decoding together run fastest without drafting
AMX_FP16_BATCHED = CostModel(draft_ms_per_token=68.0, verify_ms_base=167.0, verify_ms_per_token=0.0,
                             verify_ms_per_sequence=5.9, batched_ms_per_token=2.7, draft_ms_per_sequence=3.1,
                             draft_prefill_ms_per_token=1.5)
# GPU-like with batched passes (tests/test_adaptive.py): a flat verify pass; one more sequence in a pass costs 1 ms,
# each token beyond one per sequence 0.6 ms, alone or batched
GPU_BATCHED = CostModel(draft_ms_per_token=2.0, verify_ms_base=20.0, verify_ms_per_token=0.6,
                        verify_ms_per_sequence=1.0, batched_ms_per_token=0.6, draft_ms_per_sequence=0.2)
FIXED_GAMMAS = range(1, 9)
# a calibration's verify slope off by these factors (one noisy timed pass per point: nf4 on an AVX2 EPYC spread
# 66-148 ms a token), on shapes where the slope decides: GPU-like, and the two AVX2 CPU tiers measured
SLOPE_ERRORS = (0.25, 4.0)
SLOPE_ERROR_SHAPES = ("gpu-cheap-draft", "cpu-avx2-bf16", "cpu-avx2-nf4")


@dataclass(frozen=True)
class StepChange:
    """Costs that change at a global step: `before` until `at_step`, then `after` (a neighbour starts)."""

    before: CostModel
    after: CostModel
    at_step: int

    def __call__(self, step: int) -> CostModel:
        return self.before if step < self.at_step else self.after


Shape = CostModel | Callable[[int], CostModel]


def _at(shape: Shape, step: int) -> CostModel:
    return shape(step) if callable(shape) else shape


def run_policy(make: Callable[[], object], traces: list[Trace], shape: Shape) -> list[dict]:
    """Replay a policy (a fresh one per trace from `make`) over the traces in order, one global step count."""
    rows, steps = [], 0
    for trace in traces:
        result = replay(trace, make(), shape, first_step=steps)
        rows.append({"prompt_id": trace.prompt_id, "first_step": steps, "tokens": result.tokens, "ms": result.ms,
                     "tokens_per_s": result.tokens_per_s, "gammas": result.gammas})
        steps += result.steps
    return rows


def compare(artifact: AcceptancePredictor, traces: list[Trace], shape: Shape, tier: str = "fp16",
            prior: CostModel | None = None, learning: bool = True, learn_shape: bool = True) -> dict:
    """tokens/s (geomean over traces) of none, every fixed γ and adaptive under a shape (`adaptive_rows`)."""
    runs = {**baseline_runs(traces, shape),
            "adaptive": adaptive_rows(artifact, traces, shape, tier, prior, learning, learn_shape)}
    return {"policies": {name: summary(rows) for name, rows in runs.items()}, "runs": runs}


def baseline_runs(traces: list[Trace], shape: Shape) -> dict[str, list[dict]]:
    """none and every fixed γ replayed under a shape (what adaptive is judged against)."""
    return {"none": run_policy(lambda: fixed(0), traces, shape),
            **{f"fixed:{g}": run_policy(lambda g=g: fixed(g), traces, shape) for g in FIXED_GAMMAS}}


def adaptive_rows(artifact: AcceptancePredictor, traces: list[Trace], shape: Shape, tier: str = "fp16",
                  prior: CostModel | None = None, learning: bool = True, learn_shape: bool = True) -> list[dict]:
    """adaptive replayed under a shape, starting from `prior` (default: the shape at step 0, what calibration at
    load measures) and learning online unless `learning` is off (with `learn_shape` off, the verify curve's
    level alone: LiveCost)."""
    estimates = TierEstimates.calibrated(prior or _at(shape, 0), learning)
    estimates.cost.learn_shape = learn_shape
    return run_policy(lambda: AdaptivePolicy(artifact, tier, estimates), traces, shape)


def summary(rows: list[dict]) -> dict:
    return {"tokens_per_s_geomean": statistics.geometric_mean(r["tokens_per_s"] for r in rows),
            "mean_gamma": statistics.mean(g for r in rows for g in r["gammas"])}


def best_baseline(policies: dict) -> str:
    """The fastest of none and the fixed γ."""
    return max((n for n in policies if n != "adaptive"), key=lambda n: policies[n]["tokens_per_s_geomean"])


def token_acceptance_predictor(artifact: AcceptancePredictor, acceptance: float) -> AcceptancePredictor:
    """`artifact` made to predict that each draft token is accepted with `acceptance` given the ones before it were
    (P(first k accepted) = acceptance^k), whatever the context: a prior that knows nothing of the text."""
    first_k = acceptance ** np.arange(1, artifact.gamma_max + 1)
    return dataclasses.replace(artifact, w2=np.zeros_like(artifact.w2), b2=np.log(first_k / (1 - first_k)))


def decode_together(make_policy: Callable[[TierEstimates], GammaPolicy], cost: CostModel, acceptance: list[float],
                    seed: int, prompt_len: int = 64, tokens: int = 32, requests: int = 1,
                    steady: bool = False, unseen_ms: float = 0.0) -> tuple[float, float]:
    """Streams decoding together under a shape, one per entry of `acceptance` (its requests' per-token
    acceptance): each sends `requests` requests one after another, of `tokens` tokens each (their prompts read by
    the target, not by the draft), so the load holds as requests end and new ones begin. One verify pass per step
    over every request running; each request has its own policy over the tier's shared estimates; its draft reads
    what it lacks before drafting (a prefill each), then drafts one pass per position over the requests still
    drafting, as the replicas do. Every call takes what `cost` says, and every request waits for the whole step.
    Returns (tokens per second, mean γ) of all the streams until the last is done (a burst, as
    scripts/concurrent_bench.py runs it), or, `steady`, until the first is done: a steady load, as a load tool
    keeping `len(acceptance)` streams in flight measures it, without the stragglers at the end.
    `unseen_ms`: wall time every drafting pass costs beyond what `cost` says and the calls report, which every
    request waits for (the waits of requests out of step on shared cores, which no call's time shows; served fp16
    at 8 streams on the AMX Xeon, rounds priced ~1.6 s took ~2.8 s): only the steps' whole times show it.

    Common random numbers: whether the draft's token at a position of a request is accepted is drawn once per
    (seed, stream, request, position), as a trace fixes it, so every policy meets the same text and runs with
    one seed differ by their decisions alone. Drawn from one stream in the order the tokens were drafted, a
    policy's first different run changed every draw after it: two policies drafting alike almost every step
    (`fixed:1` and `adaptive`, the H100's int8 costs, 8 requests) differed by up to 10% in a seed."""
    estimates = TierEstimates.calibrated(cost)

    def new_request(stream: int, left: int) -> dict:
        draws = random.Random(f"{seed}-{stream}-{requests - 1 - left}")  # its stream's first request: 0
        return {"policy": make_policy(estimates), "progress": RequestProgress(max_new_tokens=tokens), "position": 0,
                "step": 0, "left": left, "stream": stream,
                "accepts": [draws.random() < acceptance[stream] for _ in range(tokens)]}  # the draft's token at each

    running = [new_request(i, requests - 1) for i in range(len(acceptance))]
    clock, gammas, emitted = 0.0, [], 0
    while running:
        estimates.sharing = estimates.in_flight = len(running)
        for r in running:
            r["context"] = r["progress"].context(r["step"], r["position"], prompt_len + r["position"])
            gamma = min(r["policy"].choose(r["context"]), tokens - r["position"] - 1)
            stopper = r["policy"].draft_stop.stopper()  # the draft worker ends the run by the policy's rule
            r["gamma"] = next((k + 1 for k in range(gamma) if stopper.stop_after(0.8, 0.5)), gamma)
        runs = [r["gamma"] for r in running]
        gammas += runs
        tokens_scored = sum(runs) + len(runs)
        catch_up = sum(cost.catch_up_ms(r["context"].draft_behind) for r in running if r["gamma"])
        drafting = sum(float(cost.draft_ms(1, sum(g >= k for g in runs))) for k in range(1, max(runs) + 1))
        draft = catch_up + drafting  # the catch-ups, then the drafting passes: what a drafting request waits
        verify = float(cost.verify_ms(0, prompt_len, len(running), tokens_scored - 1))
        wall = draft + verify + unseen_ms * max(runs)  # every request waits for the whole step
        clock += wall
        for i, r in enumerate(list(running)):
            accepted = 0  # the draft's tokens at the positions after this one, until one is rejected
            while accepted < r["gamma"] and r["accepts"][r["position"] + accepted]:
                accepted += 1
            others = max(runs[:i] + runs[i + 1:], default=0)
            drafted = bool(r["gamma"])
            timing = StepTiming(draft if drafted else 0.0, verify, r["context"].context_len, accepted + 1,
                                drafting if drafted else 0.0, verify, len(running), tokens_scored,
                                r["context"].draft_behind, catch_up if drafted else 0.0, others_deepest=others,
                                draft_passes=max(runs) if drafted else 0, draft_rows=sum(runs) if drafted else 0,
                                wall_ms=wall)
            signals = DraftSignals([0.8] * r["gamma"], [0.8] * r["gamma"], [0.5] * r["gamma"])
            r["policy"].observe(r["progress"].advance(signals, accepted, timing if r["step"] else None))
            r["position"] += accepted + 1
            r["step"] += 1
            emitted += accepted + 1
            if r["position"] >= tokens:
                if r["left"]:
                    running[i] = new_request(r["stream"], r["left"] - 1)
                elif steady:
                    return emitted / clock * 1e3, statistics.mean(gammas)
                else:
                    running[i] = None
        running = [r for r in running if r is not None]
    return emitted / clock * 1e3, statistics.mean(gammas)


class ShapedExecutor:
    """A StepExecutor whose step times come from a shape instead of the wall clock (a virtual clock): the
    live loop, with real or tiny models, as if it ran on the shape's machine. Steps are counted across
    requests, so a StepChange can land mid-request."""

    def __init__(self, inner: StepExecutor, shape: Shape) -> None:
        self.inner, self.shape, self.steps = inner, shape, 0

    async def run_step(self, inputs: StepInputs, while_verifying: WhileVerifying | None = None) -> StepCall:
        call = await self.inner.run_step(inputs, while_verifying)
        cost = _at(self.shape, self.steps)
        self.steps += 1
        drafted = len(call.proposal.token_ids)
        draft_ms, verify_ms = float(cost.draft_ms(drafted)), float(cost.verify_ms(drafted, len(inputs.context_ids)))
        # the shape's times are the models' times (no hop), so the policy learns them as the live loop would
        return dataclasses.replace(call, draft_wall_ms=draft_ms, verify_wall_ms=verify_ms,
                                   proposal=dataclasses.replace(call.proposal, compute_ms=draft_ms),
                                   verification=dataclasses.replace(call.verification, compute_ms=verify_ms))

    async def close(self, session_id: str) -> None:
        await self.inner.close(session_id)


def step_changes(base: CostModel, at_step: int) -> dict[str, StepChange]:
    """The step changes `report` runs from a machine's own costs: the draft 6x dearer (a neighbour on its
    cores), verification 2.5x dearer (a neighbour on the target's)."""
    dear_draft = dataclasses.replace(base, draft_ms_per_token=6 * base.draft_ms_per_token)
    return {"draft-neighbour": StepChange(base, dear_draft, at_step),
            "verify-slows": StepChange(base, CostModel(base.draft_ms_per_token, 2.5 * base.verify_ms_base,
                                                       2.5 * base.verify_ms_per_token), at_step)}


def report(artifact: AcceptancePredictor, traces: list[Trace], measured: CostModel | None = None,
           tier: str = "fp16", change_at: int = 100) -> dict:
    """`compare` on every shape (and on `measured`, this machine's own costs), with learning on and off,
    and the step changes from the first CPU shape: per shape, adaptive over the best of none and fixed γ."""
    shapes = dict(SHAPES, **({"measured-here": measured} if measured else {}))
    out: dict = {"shapes": {}, "slope_errors": {}, "changes": {}}
    for name, shape in shapes.items():
        doc = compare(artifact, traces, shape, tier)["policies"]
        frozen = compare(artifact, traces, shape, tier, learning=False)["policies"]["adaptive"]
        best = best_baseline(doc)
        out["shapes"][name] = {"cost_model": shape.to_dict(), "best": best, "policies": doc,
                               "adaptive_over_best": doc["adaptive"]["tokens_per_s_geomean"]
                               / doc[best]["tokens_per_s_geomean"],
                               "frozen_over_best": frozen["tokens_per_s_geomean"] / doc[best]["tokens_per_s_geomean"]}
    for name in SLOPE_ERROR_SHAPES:
        out["slope_errors"][name] = slope_errors(artifact, traces, SHAPES[name], tier)
    stream = traces * 3  # the prompts again after the change, so some start 30+ steps after it whatever γ is
    for name, change in step_changes(measured or SHAPES["cpu-avx512-bf16"], change_at).items():
        out["changes"][name] = {"at_step": change_at, **{
            mode: after_change(artifact, stream, change, learning, tier) for mode, learning in (("learning", True),
                                                                                         ("frozen", False))}}
    return out


def slope_errors(artifact: AcceptancePredictor, traces: list[Trace], shape: CostModel, tier: str = "fp16",
                 factors: tuple[float, ...] = SLOPE_ERRORS) -> dict:
    """adaptive over the best baseline where its calibration's verify slope is off by each of `factors` (the
    level right), learning the curve's per-token part online and, for comparison, its level alone."""
    baselines = {name: summary(rows) for name, rows in baseline_runs(traces, shape).items()}
    best = baselines[best_baseline(baselines)]["tokens_per_s_geomean"]
    out = {}
    for factor in factors:
        prior = dataclasses.replace(shape, verify_ms_per_token=factor * shape.verify_ms_per_token)
        out[f"x{factor:g}"] = {
            mode: summary(adaptive_rows(artifact, traces, shape, tier, prior, learn_shape=learn_shape))[
                "tokens_per_s_geomean"] / best for mode, learn_shape in (("learning", True), ("level_only", False))}
    return out


def after_change(artifact: AcceptancePredictor, traces: list[Trace], change: StepChange, learning: bool,
                 tier: str = "fp16") -> dict:
    """adaptive against the best baseline for the new costs, over prompts starting ≥ 30 steps after the change."""
    estimates = TierEstimates.calibrated(change.before, learning)
    rows = run_policy(lambda: AdaptivePolicy(artifact, tier, estimates), traces, change)
    late = [i for i, r in enumerate(rows) if r["first_step"] >= change.at_step + 30]
    if not late:
        return {"prompts": 0}
    tail = [traces[i] for i in late]
    baselines = {"none": run_policy(lambda: fixed(0), tail, change.after),
                 **{f"fixed:{g}": run_policy(lambda g=g: fixed(g), tail, change.after) for g in FIXED_GAMMAS}}
    scored = {n: summary(r)["tokens_per_s_geomean"] for n, r in baselines.items()}
    best = max(scored, key=scored.get)
    adaptive = summary([rows[i] for i in late])
    return {"prompts": len(late), "best": best, "adaptive_over_best": adaptive["tokens_per_s_geomean"] / scored[best],
            "adaptive_mean_gamma": adaptive["mean_gamma"]}

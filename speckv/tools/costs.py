"""Measure a tier's step costs on the machine at hand: draft ms per token, target verify ms per γ.

This is the cost model exact replay and the controller use (speckv.cost_model.CostModel); the verify curve's
shape is what decides whether speculation pays: nearly flat in γ where a step is memory-bound (GPUs, fp32
on AVX2 CPUs), linear where it is compute-bound (bf16 emulated on CPUs without AVX512-BF16/AMX). Calls are
timed by `speckv.calibration.time_call`, the one place that times the live loop's call patterns.
"""

from __future__ import annotations

import dataclasses
import statistics
import uuid

from ..calibration import synthetic_ids, time_call, time_prefill
from ..cost_model import CostModel, measured_curve
from ..local import LocalEngine
from ..models import DRAFT_TIER, draft_dtype_for, load_model
from ..workers import SessionLM

LIVE_OVER_PROFILE_FLAG = 1.5  # a part of the live step this much slower than the profile is reported


def check_live_policy(policy: str) -> None:
    """The live check compares drafting steps with the profile: its policy must always draft."""
    if not (policy.startswith("fixed:") or policy == "heuristic"):
        raise ValueError(f"live policy {policy}: the live check needs a policy that always drafts "
                         "(fixed:N or heuristic)")


def measure_costs(
    draft: str, target: str, tier: str, dtype: str, gammas: list[int], context_lens: list[int], repeats: int = 3,
    device: str | None = None, live_prompts: list[list[int]] | None = None, live_policy: str = "fixed:2",
    live_tokens: int = 24,
) -> dict:
    """Load the pair and measure its cost model (see `measure_loaded_costs`); with `live_prompts`, also run
    the live loop on them and compare its steps with the model (see `live_vs_profile`). Raises ValueError
    before loading anything when the live policy would not draft (there would be nothing to compare)."""
    if live_prompts:
        check_live_policy(live_policy)
    draft_lm = SessionLM(load_model(draft, DRAFT_TIER, draft_dtype_for(dtype), device))
    target_lm = SessionLM(load_model(target, tier, dtype, device))
    doc = measure_loaded_costs(draft_lm, target_lm, gammas, context_lens, repeats)
    if live_prompts:
        from ..models import load_tokenizer

        engine = LocalEngine(draft_lm.model, target_lm.model, load_tokenizer(target), tier)
        doc["live"] = live_vs_profile(engine, CostModel.from_dict(doc["cost_model"]), live_prompts, live_policy,
                                      live_tokens)
    return {"tier": tier, "dtype": dtype, "draft": draft, "target": target, **doc}


def live_vs_profile(engine: LocalEngine, cost: CostModel, prompts: list[list[int]], policy: str,
                    max_new_tokens: int) -> dict:
    """Run the live loop (greedy) and compare each step's time inside the models with what the profiled cost
    model predicts for that step, per part: `draft` (γ tokens drafted, the catch-up of the last step's
    tokens included) and `verify` (γ+1 tokens scored after the context). The profile times other call
    patterns (single tokens after a cached context), so a part whose live time is far above it means the
    live loop takes a path the profile never sees (as the strided-logits slow path did). The first step
    also reads the prompt, which the profile does not model: it is reported apart, as `prefill_ms`."""
    ratios: dict[str, list[float]] = {"draft": [], "verify": []}
    prefill = []
    for ids in prompts:
        records = engine.generate(ids, policy, max_new_tokens).records
        prefill.append(records[0].draft_compute_ms + records[0].verify_compute_ms)
        for r in records[1:]:
            if r.gamma:
                ratios["draft"].append(r.draft_compute_ms / cost.draft_ms(r.gamma))
            ratios["verify"].append(r.verify_compute_ms / cost.verify_ms(r.gamma, r.context_len))
    parts = {}
    for part, values in ratios.items():
        if values:
            median = statistics.median(values)
            parts[part] = {"steps": len(values), "median_live_over_profile": median,
                           "max_live_over_profile": max(values), "flagged": median > LIVE_OVER_PROFILE_FLAG}
    return {"policy": policy, "prompts": len(prompts), "max_new_tokens": max_new_tokens, "parts": parts,
            "prefill_ms": statistics.median(prefill) if prefill else None,
            "flagged": sorted(p for p, v in parts.items() if v["flagged"])}


def measure_loaded_costs(
    draft_lm: SessionLM, target_lm: SessionLM, gammas: list[int], context_lens: list[int], repeats: int = 3
) -> dict:
    """Per context length: draft ms per token, and verify ms for each γ (γ+1 tokens scored); the draft's
    prefill of the first context length (what its catch-up costs per token, as calibration times it); plus
    the fitted CostModel."""
    rows = []
    for ctx in context_lens:
        context = synthetic_ids(ctx, int(target_lm.model.config.vocab_size))
        session = f"cost-{uuid.uuid4().hex}"
        draft_ms = time_call(draft_lm, context, 1, 1, repeats, session=session)
        for gamma in gammas:
            rows.append({"context_len": ctx, "gamma": gamma, "draft_ms": draft_ms * gamma,
                         "verify_ms": time_call(target_lm, context, gamma + 1, gamma + 1, repeats,
                                                    session=session)})
        draft_lm.close(session)
        target_lm.close(session)
    prefill = {"tokens": context_lens[0], "ms": time_prefill(draft_lm, context_lens[0], f"cost-{uuid.uuid4().hex}")}
    return {"rows": rows, "draft_prefill_ms": prefill, "cost_model": rows_cost_model(rows, prefill).to_dict()}


def rows_cost_model(rows: list[dict], prefill: dict | None) -> CostModel:
    """The cost model of measured rows ({context_len, gamma, draft_ms, verify_ms}): the line fitted over every
    row, the verify curve as measured at the first context (`_rows_curve`: replay prices γ as the live
    calibration does, by the points where they were measured), and the draft's prefill per token."""
    model = CostModel.fit([r["gamma"] for r in rows], [r["draft_ms"] for r in rows], [r["verify_ms"] for r in rows],
                          [r["context_len"] for r in rows])
    return dataclasses.replace(model, **_rows_curve(rows),
                               draft_prefill_ms_per_token=prefill["ms"] / prefill["tokens"] if prefill else 0.0)


def cost_file_model(doc: dict) -> CostModel:
    """The cost model of a cost file (`measure_loaded_costs`'s document); files written before the verify curve
    was kept get it from their rows."""
    model = CostModel.from_dict(doc["cost_model"])
    if model.verify_curve or not doc.get("rows"):
        return model
    return dataclasses.replace(model, **_rows_curve(doc["rows"]))


def _rows_curve(rows: list[dict]) -> dict:
    """The CostModel fields of the verify curve measured at the rows' first context (`measured_curve`)."""
    first = rows[0]["context_len"]
    return {"verify_curve": measured_curve([(r["gamma"], r["verify_ms"]) for r in rows if r["context_len"] == first]),
            "curve_context_len": first}

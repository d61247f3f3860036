"""Measure a tier's step costs on the machine at hand: draft ms per token, target verify ms per γ.

This is the cost model exact replay and the controller use (speckv.replay.CostModel); the verify curve's
shape is what decides whether speculation pays: nearly flat in γ where a step is memory-bound (GPUs, fp32
on AVX2 CPUs), linear where it is compute-bound (bf16 emulated on CPUs without AVX512-BF16/AMX).
"""

from __future__ import annotations

import statistics
import time

from .models import load_model
from .replay import CostModel
from .workers import SessionLM


def time_forward(lm: SessionLM, context: list[int], new_tokens: int, repeats: int) -> float:
    """Median ms to score `new_tokens` tokens after a cached `context` (the cache is cut back each time)."""
    times = []
    lm.logits("cost", context, 1)
    for r in range(repeats):
        fed = context + [(7 + r + i) % 1000 + 100 for i in range(new_tokens)]
        start = time.perf_counter()
        lm.logits("cost", fed, new_tokens)
        times.append((time.perf_counter() - start) * 1e3)
        lm.logits("cost", context, 1)  # back to the context for the next repeat
    return statistics.median(times)


def measure_costs(
    draft: str, target: str, tier: str, dtype: str, gammas: list[int], context_lens: list[int], repeats: int = 3,
    device: str | None = None,
) -> dict:
    """Load the pair and measure its cost model (see `measure_loaded_costs`)."""
    draft_lm = SessionLM(load_model(draft, "fp16", "float32" if dtype == "float32" else "auto", device))
    target_lm = SessionLM(load_model(target, tier, dtype, device))
    doc = measure_loaded_costs(draft_lm, target_lm, gammas, context_lens, repeats)
    return {"tier": tier, "dtype": dtype, "draft": draft, "target": target, **doc}


def measure_loaded_costs(
    draft_lm: SessionLM, target_lm: SessionLM, gammas: list[int], context_lens: list[int], repeats: int = 3
) -> dict:
    """Per context length: draft ms per token, and verify ms for each γ (γ+1 tokens scored); plus the fitted
    CostModel."""
    rows = []
    for ctx in context_lens:
        context = [(i * 37) % 5000 + 200 for i in range(ctx)]
        draft_ms = time_forward(draft_lm, context, 1, repeats)
        for gamma in gammas:
            rows.append({"context_len": ctx, "gamma": gamma, "draft_ms": draft_ms * gamma,
                         "verify_ms": time_forward(target_lm, context, gamma + 1, repeats)})
        draft_lm.release("cost")
        target_lm.release("cost")
    model = CostModel.fit([r["gamma"] for r in rows], [r["draft_ms"] for r in rows], [r["verify_ms"] for r in rows],
                          [r["context_len"] for r in rows])
    return {"rows": rows, "cost_model": model.to_dict()}

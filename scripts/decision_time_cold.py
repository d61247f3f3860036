"""Time a decision (the step's context, then `choose`) as the live loop makes it: right after a forward pass has
evicted the caches (simulated by touching 64 MiB), in-process, no models. Steps are drawn at random under the
AVX2 EPYC's nf4 costs; `adaptive` prepares each step while it is "verified", as the engine does.

    python scripts/decision_time_cold.py --out results/decision_time_cold.json    # 1 min

Prints and saves the median µs per decision (a request's first step left out: it runs the MLP itself) of
`adaptive` and of fixed:6 (which builds its context and nothing else). Run it at two commits to compare them.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from speckv.adaptive import AdaptivePolicy
from speckv.cost_model import CostModel
from speckv.estimates import TierEstimates
from speckv.policy import FixedGamma, RequestProgress, StepTiming
from speckv.predictor import shipped_predictor
from speckv.signals import DraftSignals

NF4_AVX2 = CostModel(draft_ms_per_token=107, verify_ms_base=1668, verify_ms_per_token=186.4,
                     draft_prefill_ms_per_token=45.5)


def decision_us(name: str, requests: int, steps: int, rng: np.random.Generator, evict: np.ndarray) -> list[float]:
    """µs of each decision after the first of `requests` requests of `steps` steps under policy `name`."""
    out = []
    for _ in range(requests):
        policy = (AdaptivePolicy(shipped_predictor(), "nf4", TierEstimates.calibrated(NF4_AVX2), greedy=False)
                  if name == "adaptive" else FixedGamma(6))
        progress, position = RequestProgress(max_new_tokens=64), 0
        for step in range(steps):
            evict += 1.0
            start = time.perf_counter()
            gamma = policy.choose(progress.context(step, position, 100 + position))
            if step:
                out.append((time.perf_counter() - start) * 1e6)
            gamma = max(gamma, 1)
            confidence = rng.uniform(0.3, 1, gamma).tolist()
            signals = DraftSignals(confidence, confidence, rng.uniform(0, 2, gamma).tolist())
            if name == "adaptive":
                policy.prepare(progress.previews(signals, step, position, 100 + position))
            accepted = int(rng.integers(0, gamma + 1))
            timing = StepTiming(107.0 * gamma, 1668 + 186 * gamma, 100 + position, accepted + 1)
            policy.observe(progress.advance(signals, accepted, timing))
            position += accepted + 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rng, evict = np.random.default_rng(0), np.ones(64 << 17)  # 64 MiB of float64
    result = {name: float(np.median(decision_us(name, args.requests, args.steps, rng, evict)))
              for name in ("fixed:6", "adaptive")}
    print(json.dumps({"decision_us_p50": result}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"decision_us_p50": result, "requests": args.requests, "steps": args.steps}, f, indent=1)


if __name__ == "__main__":
    main()

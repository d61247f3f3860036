"""Paired comparisons of per-prompt throughputs: geometric-mean speedup, bootstrap CI and p-value."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    speedup: float  # geometric mean over prompts of a/b
    ci95: tuple[float, float]
    p_value: float  # two-sided paired sign-flip permutation test, H0: geometric-mean ratio = 1
    n: int

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "speedup": self.speedup, "ci95": list(self.ci95),
                "p_value": self.p_value, "n": self.n}


def paired_speedup(
    a_name: str, a: list[float], b_name: str, b: list[float], n_boot: int = 10_000, seed: int = 0
) -> Comparison:
    """Speedup of a over b from paired per-prompt values (tokens/s): geometric mean of the ratios, a 95%
    paired-bootstrap CI over prompts, and the p-value of a sign-flip permutation test on the log-ratios
    (exact over all 2^n flips for n <= 16; with n prompts it cannot go below 2/2^n, which is honest for
    small benchmarks where a bootstrap p-value would read 0).
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or a_arr.size == 0:
        raise ValueError(f"need the same non-zero number of paired values, got {a_arr.size} and {b_arr.size}")
    if (a_arr <= 0).any() or (b_arr <= 0).any():
        raise ValueError("throughputs must be positive")
    log_ratio = np.log(a_arr / b_arr)
    observed = float(log_ratio.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, log_ratio.size, size=(n_boot, log_ratio.size))
    boot = log_ratio[idx].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    p = sign_flip_p_value(log_ratio, rng)
    return Comparison(a_name, b_name, float(np.exp(observed)), (float(np.exp(lo)), float(np.exp(hi))), p,
                      int(log_ratio.size))


def sign_flip_p_value(values: np.ndarray, rng: np.random.Generator, n_random: int = 20_000) -> float:
    """Two-sided p-value that the mean of paired differences is 0, by flipping their signs."""
    n = values.size
    observed = abs(values.mean())
    if n <= 16:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
    else:
        signs = rng.choice([-1, 1], size=(n_random, n))
    means = np.abs((signs * values).mean(axis=1))
    return float((means >= observed - 1e-12).mean())


def first_divergence(reference: list[int], other: list[int]) -> int | None:
    """Index of the first token where two outputs differ (a length difference counts); None if identical."""
    for i, (x, y) in enumerate(zip(reference, other)):
        if x != y:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))

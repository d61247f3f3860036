"""Each timing behind `install_many_rows`'s choice, as the nf4 target loads: per weight shape and row count, the
(packed kernel, dequantized) milliseconds of each probe round, then the counts chosen. Prints; save with `>`.

    python scripts/many_rows_probe_trace.py > docs/results/amx_1206/nf4_many_rows_probe_trace.txt   # 1 min
"""

from __future__ import annotations

import sys
import time

import torch

from speckv import kernels
from speckv.models import DEFAULT_TARGET, load_model

chosen_by = kernels.probe_many_rows


def traced(layer, counts=kernels.MANY_ROWS_PROBED, rounds=kernels.PROBE_ROUNDS, clock=time.perf_counter):
    """Time the probe's products as it does and print them; then let it choose (it times them again)."""
    for rows in counts:
        x = torch.randn(rows, layer.in_features, dtype=layer.compute_dtype or torch.bfloat16)
        for dense_from in (sys.maxsize, rows):
            layer.dense_from = dense_from
            layer(x)
        took = []
        for _ in range(rounds):
            times = []
            for dense_from in (sys.maxsize, rows):
                layer.dense_from = dense_from
                start = clock()
                layer(x)
                times.append(round((clock() - start) * 1e3, 2))
            took.append(tuple(times))
        print(layer.unpacked.shape, rows, took, flush=True)
    return chosen_by(layer, counts, rounds, clock)


if __name__ == "__main__":
    kernels.probe_many_rows = traced
    print(kernels.many_rows_of(load_model(DEFAULT_TARGET, "nf4", device="cpu")))

"""Each timing behind `install_many_rows`'s choice, as the nf4 target loads: per weight shape and row count, the
(packed kernel, dequantized) milliseconds of each probe round, then the counts chosen. Prints; save with `>`.

    python scripts/many_rows_probe_trace.py > docs/results/amx_1206/nf4_many_rows_probe_trace.txt   # 1 min
"""

from __future__ import annotations

import time

from speckv import kernels
from speckv.models import DEFAULT_TARGET, load_model

chosen_by = kernels.probe_many_rows


def traced(layer, counts=kernels.MANY_ROWS_PROBED, rounds=kernels.PROBE_ROUNDS, clock=time.perf_counter):
    """Print the probe's timings for each count; then let it choose (it times them again)."""
    for rows in counts:
        took = kernels.time_many_rows(layer, rows, rounds, clock)
        print(layer.unpacked.shape, rows, [(round(p * 1e3, 2), round(d * 1e3, 2)) for p, d in took], flush=True)
    return chosen_by(layer, counts, rounds, clock)


if __name__ == "__main__":
    kernels.probe_many_rows = traced
    print(kernels.many_rows_of(load_model(DEFAULT_TARGET, "nf4", device="cpu")))

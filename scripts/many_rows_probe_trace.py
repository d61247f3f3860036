"""Each timing behind `install_many_rows`'s choice, as the nf4 target loads: per weight shape and row count, the
(packed kernel, dequantized) milliseconds of each probe round and the minor page faults each took (a fresh 27 MB
bf16 weight is 6720 of them), then the counts chosen. Prints; save with `>`; run it twice to see if loads agree.

    python scripts/many_rows_probe_trace.py > docs/results/amx_1206/nf4_many_rows_probe_trace.txt   # 1 min
"""

from __future__ import annotations

import resource
import time

from speckv import kernels
from speckv.models import DEFAULT_TARGET, load_model

chosen_by = kernels.probe_many_rows


def traced(layer, counts=kernels.MANY_ROWS_PROBED, rounds=kernels.PROBE_ROUNDS, clock=time.perf_counter):
    """Print the probe's timings and page faults for each count; then let it choose (it times them again)."""
    for rows in counts:
        faults = []

        def counting_clock():
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
            return clock()

        took = kernels.time_many_rows(layer, rows, rounds, counting_clock)
        paired = [faults[i + 1] - faults[i] for i in range(0, len(faults), 2)]  # each timed pass's faults
        print(layer.unpacked.shape, rows, [(round(p * 1e3, 2), round(d * 1e3, 2), paired[2 * i], paired[2 * i + 1])
                                           for i, (p, d) in enumerate(took)], flush=True)
    return chosen_by(layer, counts, rounds, clock)


if __name__ == "__main__":
    kernels.probe_many_rows = traced
    print(kernels.many_rows_of(load_model(DEFAULT_TARGET, "nf4", device="cpu")))

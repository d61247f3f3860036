"""What `adaptive` costs the host per request and step under load, where a pass is cheap enough for that to
show: a GPU running transformers in eager mode is bound by its host's kernel launches (a pass of 8 sequences
of the 1.5B took ~32 ms on an H100, docs/results/gpu/h100), and in-process the policy's work between passes
(folding in the step's outcome, repricing, preparing the next decisions: AdaptivePolicy.prepare) runs
serially with them. Here a pair of tiny random models with the embedded pair's vocabulary on the CPU, one
thread, stands for that regime (a pass of 8 sequences ~10-15 ms of host work).

Requests decode together through the in-process engine's batched passes (speckv.batching), `none` and
`adaptive` alternating, `--repeats` times per load; prints and saves the wall time of each run, adaptive's
over none's (median over repeats), and the time inside AdaptivePolicy's `prepare` (which holds `_fold_in`
and `_refresh`) and `choose` per request-step. Random weights accept nothing, so adaptive's probes (a few
percent of steps) are in its time too; `--no-probes` takes them out (an ablation: γ = 0 made absorbing). Run it
at two commits to compare them:

    python scripts/policy_host_time.py --out results/policy_host_time.json     # ~1 min

Never beside other CPU work: it times the host.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from speckv import adaptive
from speckv.batching import BatchSettings
from speckv.estimates import TierEstimates
from speckv.local import LocalEngine
from speckv.models import DEFAULT_TARGET, load_tokenizer

TIMED = ("prepare", "choose", "_fold_in", "_refresh")


def tiny_pair(vocab: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two 2-layer Qwen2 models (hidden 64) with different random weights and the given vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def one(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        return Qwen2ForCausalLM(config).eval()

    return one(1), one(2)


def instrument(seconds: dict[str, float]) -> None:
    """Accumulate the time spent in AdaptivePolicy's TIMED methods into `seconds`."""
    for name in TIMED:
        method = getattr(adaptive.AdaptivePolicy, name)

        def timed(*args, _method=method, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                seconds[_name] += time.perf_counter() - start

        setattr(adaptive.AdaptivePolicy, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default="1,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-probes", action="store_true", help="adaptive never probes (γ = 0 absorbing)")
    args = parser.parse_args()
    if args.no_probes:  # the probe spacing never reached: γ = 0 absorbing (AdaptivePolicy._probe_spacing)
        adaptive.MIN_PROBE_EVERY = 10**9
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(DEFAULT_TARGET)
    draft, target = tiny_pair(len(tokenizer))
    engine = LocalEngine(draft, target, tokenizer, "fp16")
    engine.calibration_budget_s = 10
    calibrated = engine.calibrate(force=True).cost.base
    prompt = tokenizer.encode("def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n" * 8)
    seconds: dict[str, float] = defaultdict(float)
    instrument(seconds)
    rows = []
    for load in (int(x) for x in args.loads.split(",")):
        batched = dataclasses.replace(engine, batching=BatchSettings(load, 0.0, 0.0,
                                                                     float(calibrated.verify_ms(0)) / 1e3))

        def requests() -> list:  # fresh each run: a request's id names its sessions
            return [dataclasses.replace(batched.request(prompt[:len(prompt) - 3 * i], args.tokens), eos_token_ids=())
                    for i in range(load)]

        asyncio.run(batched.generate_many(requests(), "none"))  # warm-up
        runs: dict[str, list[dict]] = {"none": [], "adaptive": []}
        for _ in range(args.repeats):
            for policy in runs:
                seconds.clear()
                batched.estimates = TierEstimates.calibrated(calibrated)  # each run starts from the calibration
                start = time.perf_counter()
                results = asyncio.run(batched.generate_many(requests(), policy))
                wall = time.perf_counter() - start
                steps = sum(len(r.records) for r in results)
                runs[policy].append({"seconds": wall, "request_steps": steps,
                                     "mean_gamma": statistics.mean(x.gamma for r in results for x in r.records),
                                     "ms_per_request_step": {k: seconds[k] / steps * 1e3 for k in TIMED}})
        ratio = statistics.median(r["seconds"] for r in runs["adaptive"]) / statistics.median(
            r["seconds"] for r in runs["none"])
        per_step = {k: statistics.median(r["ms_per_request_step"][k] for r in runs["adaptive"]) for k in TIMED}
        rows.append({"load": load, "adaptive_over_none_seconds": ratio, "adaptive_ms_per_request_step": per_step,
                     "runs": runs})
        print(f"load {load:>2}: none {statistics.median(r['seconds'] for r in runs['none']):.3f} s, adaptive "
              f"{statistics.median(r['seconds'] for r in runs['adaptive']):.3f} s ({ratio:.3f}x the time); adaptive "
              "per request-step: " + ", ".join(f"{k} {v:.3f} ms" for k, v in per_step.items()), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "no_probes": args.no_probes, "rows": rows},
                                       indent=1))


if __name__ == "__main__":
    main()

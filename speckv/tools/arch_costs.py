"""Step costs of a draft/target pair's architecture on this device, with random weights.

What calibration measures (a forward pass's time against tokens scored and context) depends on the models'
shapes, dtype and device, not on their weights' values. Where the weights cannot travel (a lent GPU with no
network and a 64 MiB upload), this builds each model from its `config.json` with random weights and measures
what the product measures there: the calibration of the pair (speckv.calibration, as a replica does when it
loads), the live loop's step times at each γ against it, and the time `adaptive` takes to decide between
GPU steps. Acceptance is meaningless with random weights (the draft and target disagree), so no speed-up is
measured here; the calibrated cost model is replayed over real traces elsewhere (speckv.tools.shapes).

`--loads 1,2,4,8,16` adds requests decoding together in the engine's batched passes (speckv.batching) at each
load: aggregate tokens/s per policy and each verify pass's time by sequences and γ beside what the calibrated
cost model predicts for it (whether the calibration's batched terms hold on this device). `none`'s tokens/s
there is real whatever the weights; a drafting policy's is not (nothing is accepted).

Usage: python -m speckv.tools.arch_costs DRAFT_CONFIG TARGET_CONFIG TOKENIZER_DIR OUT_JSON [--device cuda]
       [--loads 1,2,4,8,16] [--attention both] [--exactness]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def random_model(config_path: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The architecture of `config_path` with random weights, in `dtype` on `device`, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import prepare_device

    prepare_device(device)
    config = AutoConfig.from_pretrained(config_path.parent if config_path.is_file() else config_path)
    torch.manual_seed(config.num_hidden_layers * 1000 + config.hidden_size)  # the draft's weights differ
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_target(config_path: Path, tier: str, dtype: str, device: str, work: Path) -> torch.nn.Module:
    """The target at a tier: fp16 built in place; int8/nf4 written to `work` with random weights and loaded
    through the product's own loader (bitsandbytes quantizes it there, as it does a real checkpoint)."""
    from ..models import load_model

    if tier == "fp16":
        return random_model(config_path, getattr(torch, dtype), device)
    # built where it will run: random init of a 1.5B model in float16 on the CPU took over 90 s on the H200's host
    random_model(config_path, torch.float16, device).save_pretrained(work)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return load_model(str(work), tier, "auto" if dtype == "float16" else dtype, device)


def live_steps(engine, prompt_ids: list[int], policy: str, tokens: int) -> dict:
    """One run of the live loop: the median draft and verify wall times per γ, and the decision times."""
    result = engine.generate(prompt_ids, policy, tokens)
    by_gamma: dict[int, list] = {}
    for r in result.records[1:]:  # the first step also reads the prompt
        by_gamma.setdefault(r.gamma, []).append((r.draft_ms, r.verify_ms, r.draft_compute_ms, r.verify_compute_ms))
    return {"policy": policy, "steps": result.stats.steps, "seconds": result.seconds,
            "decision_us_p50": statistics.median(r.policy_us for r in result.records),
            "by_gamma": {g: {"steps": len(v), "draft_ms": statistics.median(x[0] for x in v),
                             "verify_ms": statistics.median(x[1] for x in v),
                             "draft_compute_ms": statistics.median(x[2] for x in v),
                             "verify_compute_ms": statistics.median(x[3] for x in v)}
                         for g, v in sorted(by_gamma.items())}}


def batched_loads(engine, prompt_ids: list[int], loads: list[int], policies: list[str], tokens: int,
                  both_attentions: bool = False) -> list[dict]:
    """At each load, that many requests (contexts a few tokens apart, no end-of-sequence stop) decoding together
    through batched passes, per policy: aggregate tokens/s, mean γ and sequences a pass, and the verify passes'
    compute time by (sequences, γ) beside the calibrated cost model's prediction for a pass of that shape.
    `both_attentions`: each policy run twice back to back, packed passes attending a call per row (the default)
    and in one call (speckv.attention.ONE_CALL_DEVICES: padded_attention)."""
    from .. import attention
    from ..batching import BatchSettings
    from ..estimates import TierEstimates

    device = engine.target_worker.lm.device.type
    as_set = attention.ONE_CALL_DEVICES
    paths = [as_set, as_set ^ {device}] if both_attentions else [as_set]

    calibrated = engine.estimates.cost.base
    single_s = float(calibrated.verify_ms(0)) / 1e3
    batched = dataclasses.replace(engine, batching=BatchSettings(max(loads), 0.0, 0.0, single_s))
    rows = []
    for load in loads:
        def requests() -> list:  # fresh ones each run: a request's id names its sessions, closed at its end
            return [dataclasses.replace(batched.request(prompt_ids[: len(prompt_ids) - 3 * i], tokens),
                                        eos_token_ids=()) for i in range(load)]

        asyncio.run(batched.generate_many(requests(), "none"))  # warm-up: this pass shape's kernels
        for policy, one_call in ((p, d) for p in policies for d in paths):
            batched.estimates = TierEstimates.calibrated(calibrated)  # each run starts from the calibration
            start = time.perf_counter()
            with attention.one_call_on(one_call):
                results = asyncio.run(batched.generate_many(requests(), policy))
            seconds = time.perf_counter() - start
            records = [r for result in results for r in result.records[1:]]  # the first step reads the prompt
            passes: dict[tuple[int, int], list[float]] = {}
            for r in records:
                passes.setdefault((r.batch_size, r.gamma), []).append(r.verify_compute_ms)
            row = {"load": load, "policy": policy, "seconds": seconds,
                   "attention": "one call" if device in one_call else "per row",
                   "tokens_per_s": sum(r.new_tokens for r in results) / seconds,
                   "mean_gamma": statistics.mean(r.gamma for r in records),
                   "sequences_per_pass": statistics.mean(r.batch_size for r in records),
                   "verify_passes": [{"sequences": s, "gamma": g, "steps": len(v),
                                      "compute_ms": statistics.median(v),
                                      "predicted_ms": float(calibrated.verify_ms(g, len(prompt_ids), s,
                                                                                (s - 1) * (g + 1)))}
                                     for (s, g), v in sorted(passes.items())]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "verify_passes"}), flush=True)
    return rows


def main(argv: list[str]) -> int:
    from transformers import AutoTokenizer

    from ..local import LocalEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("draft_config", type=Path)
    parser.add_argument("target_config", type=Path)
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--tier", default="fp16", choices=["fp16", "int8", "nf4"])
    parser.add_argument("--budget-s", type=float, default=30.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--loads", default="", help="requests decoding together, e.g. 1,2,4,8,16 (none: skipped)")
    parser.add_argument("--load-policies", default="none,fixed:1,fixed:3,adaptive")
    parser.add_argument("--attention", choices=["default", "both"], default="default",
                        help="both: each load and policy with packed passes attending a call per row and in one "
                             "call (speckv.attention.padded_attention), back to back")
    parser.add_argument("--exactness", action="store_true",
                        help="instead: in float32, greedy outputs of none, fixed:3 and adaptive must be identical")
    args = parser.parse_args(argv)
    if args.exactness:
        return exactness(args)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        target = random_target(args.target_config, args.tier, args.dtype, args.device, Path(work))
    engine = LocalEngine(random_model(args.draft_config, dtype, args.device), target,
                         AutoTokenizer.from_pretrained(args.tokenizer), args.tier)
    engine.calibration_budget_s = args.budget_s
    loaded_s = time.perf_counter() - start
    t = time.perf_counter()
    estimates = engine.calibrate(force=True)
    doc = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
           "torch": torch.__version__, "dtype": args.dtype, "tier": args.tier, "load_s": loaded_s,
           "calibration_s": time.perf_counter() - t, "cost_model": estimates.cost.base.to_dict(), "live": []}
    print(json.dumps({k: v for k, v in doc.items() if k != "live"}, indent=1), flush=True)
    prompt = engine.tokenizer.encode("def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n" * 8)
    engine.generate(prompt, "fixed:2", 8)  # warm-up
    for policy in ("none", "fixed:1", "fixed:4", "fixed:8", "adaptive"):
        doc["live"].append(live_steps(engine, prompt, policy, args.tokens))
        print(json.dumps(doc["live"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))  # kept if the loads below do not finish
    if args.loads:
        doc["loads"] = batched_loads(engine, prompt, [int(x) for x in args.loads.split(",")],
                                     args.load_policies.split(","), args.tokens, args.attention == "both")
        args.out.write_text(json.dumps(doc, indent=1))
    return 0


def exactness(args: argparse.Namespace) -> int:
    """Greedy outputs in float32 on the device: speculation must not change a token (random weights serve as
    well as trained ones for this), one request alone and requests of different lengths joining and leaving
    batched passes; with the draft's own weights (nothing accepted) and with the target's (all accepted)."""
    from transformers import AutoTokenizer

    from ..batching import BatchSettings
    from ..cost_model import CostModel
    from ..estimates import TierEstimates
    from ..local import LocalEngine

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    target = random_model(args.target_config, torch.float32, args.device)
    prompt = tokenizer.encode("def fibonacci(n):\n")
    texts = ["def fibonacci(n):\n", "Translate to French: the cat sleeps.", "SELECT name FROM users WHERE",
             "Once upon a time, in a village by the sea, there lived"]
    prompts = [tokenizer.encode(t) for t in texts]
    doc: dict = {"device": args.device, "tokens": args.tokens, "drafts": {}}
    for draft_name, draft_config in (("own", args.draft_config), ("target's", args.target_config)):
        engine = LocalEngine(random_model(draft_config, torch.float32, args.device), target, tokenizer, "fp16",
                             estimates=TierEstimates.calibrated(CostModel(1.0, 10.0, 0.1)))  # adaptive drafts
        outputs = {p: engine.generate(prompt, p, args.tokens).token_ids for p in ("none", "fixed:3", "adaptive")}
        alone = [engine.generate(p, "none", args.tokens - 4 * i).token_ids for i, p in enumerate(prompts)]
        batched = dataclasses.replace(engine, batching=BatchSettings(len(prompts), 0.0, 0.0, 0.05))
        together = {}
        for policy in ("fixed:3", "adaptive"):  # the later requests join while the first ones decode
            requests = [batched.request(p, args.tokens - 4 * i) for i, p in enumerate(prompts)]
            results = asyncio.run(batched.generate_many(requests, policy, [0.0, 0.0, 0.02, 0.05]))
            together[policy] = [r.token_ids for r in results]
        doc["drafts"][draft_name] = {
            "alone_identical": all(o == outputs["none"] for o in outputs.values()),
            "batched_identical": all(t == alone for t in together.values()),
            "outputs": outputs, "alone": alone, "batched": together}
        print(f"float32 greedy, draft with the {draft_name} weights: none / fixed:3 / adaptive identical over "
              f"{args.tokens} tokens: {doc['drafts'][draft_name]['alone_identical']}; {len(prompts)} requests "
              f"joining batched passes identical to each alone: {doc['drafts'][draft_name]['batched_identical']}",
              flush=True)
    same = all(d["alone_identical"] and d["batched_identical"] for d in doc["drafts"].values())
    doc["identical"] = same
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

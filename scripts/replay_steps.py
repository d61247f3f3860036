"""Replay policies over the steps of a sampled run, taken as samples: what each would have decoded, under a cost model.

Sampled decoding has no exact replay (speckv.tools.replay is greedy: the text moves with the policy). But in
speculative sampling whether a drafted token is accepted does not depend on how many were drafted after it, so a
fixed-γ step cut at d tokens is a fair sample of a d-token step from the same context: min(accepted, d) accepted.
This replays each policy over the step records of a fixed-γ run of `speckv bench` (its `<out>.records.jsonl`),
request by request: the policy's i-th step takes the run's i-th step of that request (cycling), cut at the γ the
policy chose and where its stop rule ends the run, priced by the cost model. The texts are the run's; only the
choices differ. Used for issue 13's nf4, t = 0.7 case (docs/RESULTS.md); every policy sees the same steps.

    python scripts/replay_steps.py docs/results/milan/bench_nf4_t07_calib2.records.jsonl --source fixed:8 \\
        --cost 107,1668,186.4,45.5 --out docs/results/milan/replay_steps_nf4_t07.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable

from speckv.adaptive import AdaptivePolicy
from speckv.cost_model import CostModel
from speckv.estimates import TierEstimates
from speckv.policy import GammaPolicy, RequestProgress
from speckv.predictor import shipped_predictor
from speckv.records import StepRecord, read_jsonl
from speckv.tools.replay import fixed, play_step


def requests_of(files: list[str], source: str) -> list[list[StepRecord]]:
    """The source policy's step records, one list per request, in step order."""
    out = []
    for f in files:
        by: dict[str, list[StepRecord]] = defaultdict(list)
        for r in read_jsonl(f):
            if r.policy == source:
                by[r.request_id].append(r)
        out += [sorted(rows, key=lambda r: r.step) for rows in by.values()]
    return out


def replay_steps(requests: list[list[StepRecord]], make: Callable[[TierEstimates], GammaPolicy], cost: CostModel,
                 tier: str, tokens: int, greedy: bool = False, rounds: int = 3) -> dict:
    """tokens/s and mean drafted γ of a policy over the requests (each `rounds` times, starting one step later each
    round), one tier's estimates shared across them as in a server. A run is cut at the source's γ."""
    estimates = TierEstimates.calibrated(cost)
    emitted_total, ms_total, drafted = 0, 0.0, []
    for start in range(rounds):
        for rows in requests:
            policy, progress, position, step = make(estimates), RequestProgress(max_new_tokens=tokens), 0, 0
            prompt_len = rows[0].context_len
            while position < tokens:
                r = rows[(start + step) % len(rows)]
                context = progress.context(step, position, prompt_len + position)
                d, accepted, ms = play_step(policy, progress, context, policy.choose(context), tokens - position,
                                            r.accepted, r.confidence, r.entropy, r.chosen_prob, cost)
                emitted = min(accepted + 1, tokens - position)
                emitted_total, ms_total = emitted_total + emitted, ms_total + ms
                drafted.append(d)
                position, step = position + emitted, step + 1
    return {"tokens_per_s": emitted_total / ms_total * 1e3, "mean_gamma": sum(drafted) / len(drafted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+", help="`speckv bench` step records (<out>.records.jsonl)")
    parser.add_argument("--source", default="fixed:8", help="the fixed-γ policy whose steps are replayed")
    parser.add_argument("--cost", required=True,
                        help="draft ms/token,verify ms base,verify ms/token,draft catch-up ms/token (speckv calibrate)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--greedy", action="store_true", help="the run was greedy (default: sampled)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    try:
        draft, base, per_token, catch_up = (float(x) for x in args.cost.split(","))
    except ValueError:
        parser.error(f"--cost takes four numbers separated by commas, got {args.cost!r}")
    cost = CostModel(draft, base, per_token, draft_prefill_ms_per_token=catch_up)
    requests = requests_of(args.records, args.source)
    if not requests:
        parser.error(f"no steps of {args.source} in {', '.join(args.records)}")
    tier = requests[0][0].tier
    gamma = int(args.source.split(":")[1])
    policies: dict[str, Callable[[TierEstimates], GammaPolicy]] = {
        "none": lambda e: fixed(0), **{f"fixed:{g}": (lambda e, g=g: fixed(g)) for g in range(2, gamma + 1)},
        "adaptive": lambda e: AdaptivePolicy(shipped_predictor(), tier, e, greedy=args.greedy)}
    results = {name: replay_steps(requests, make, cost, tier, args.tokens, args.greedy)
               for name, make in policies.items()}
    best = max((n for n in results if n != "adaptive"), key=lambda n: results[n]["tokens_per_s"])
    for name, r in results.items():
        print(f"{name:<10} {r['tokens_per_s']:.3f} tokens/s  mean γ {r['mean_gamma']:.2f}")
    ratio = results["adaptive"]["tokens_per_s"] / results[best]["tokens_per_s"]
    print(f"adaptive / best fixed ({best}): {ratio:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"records": args.records, "source": args.source, "cost": args.cost, "requests": len(requests),
                       "policies": results, "best": best, "adaptive_over_best": ratio}, f, indent=1)


if __name__ == "__main__":
    main()

"""`speckv calibrate`, `speckv cost`: measure this machine's step costs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..policy import MAX_GAMMA
from .args import CONTEXT_LENS, GAMMAS, CLIError, add_model_args, policy, positive_int, write_json


def register(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser("calibrate", help="measure this machine's step costs with the live loop's calls (cached)")
    cal.add_argument("--max-gamma", type=positive_int, default=8, help="longest draft run whose verification is timed")
    cal.add_argument("--context-lens", type=CONTEXT_LENS, default=[64, 512],
                     help="context lengths to time at (comma-separated)")
    cal.add_argument("--budget-s", type=float, default=30.0,
                     help="time budget for both models (target 22/30 of it, draft 8/30); measuring stops once "
                          "it is spent")
    cal.add_argument("--repeats", type=positive_int, default=3)
    cal.add_argument("--force", action="store_true", help="measure again even if a calibration is cached")
    cal.add_argument("--json", action="store_true", help="print the calibration as JSON")
    add_model_args(cal)
    cal.set_defaults(handler=calibrate)

    cost = sub.add_parser("cost", help="profile a tier's step costs (draft ms/token, verify ms per γ)")
    cost.add_argument("--gammas", type=GAMMAS, default=[0, 1, 2, 3, 4, 6, 8])
    cost.add_argument("--context-lens", type=CONTEXT_LENS, default=[64, 256])
    cost.add_argument("--repeats", type=positive_int, default=3)
    cost.add_argument("--out", type=Path, default=None)
    cost.add_argument("--check-live", type=Path, default=None, metavar="PROMPTS",
                      help="also run the live loop on these prompts (JSONL, as for bench) and report each part "
                           "of a step whose live time is over 1.5x what the profile predicts")
    cost.add_argument("--live-limit", type=positive_int, default=4, help="prompts of --check-live to run")
    cost.add_argument("--live-policy", type=policy, default="fixed:2",
                      help="policy of the --check-live runs (fixed:N or heuristic: it must draft)")
    cost.add_argument("--live-tokens", type=positive_int, default=24, help="new tokens per --check-live prompt")
    add_model_args(cost)
    cost.set_defaults(handler=cost_)


def calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..calibration import calibrate_pair
    from ..models import DRAFT_TIER, draft_dtype_for, load_model
    from ..workers import SessionLM

    if args.max_gamma > MAX_GAMMA:
        raise CLIError(f"--max-gamma must be in [1, {MAX_GAMMA}]")
    if not args.budget_s > 0:
        raise CLIError("--budget-s must be > 0")
    draft = SessionLM(load_model(args.draft, DRAFT_TIER, draft_dtype_for(args.dtype), args.device))
    target = SessionLM(load_model(args.target, args.tier, args.dtype, args.device))
    with tqdm(desc="calibrating", unit="measurement", file=sys.stderr, disable=args.json) as bar:
        def progress(done: int, planned: int) -> None:
            bar.total = planned
            bar.update(done - bar.n)

        pair = calibrate_pair(draft, target, args.tier, args.budget_s, args.force, max_gamma=args.max_gamma,
                              context_lens=tuple(args.context_lens), repeats=args.repeats, progress=progress)
    print(json.dumps(pair.to_dict(), indent=1) if args.json else pair.describe())
    return 0


def cost_(args: argparse.Namespace) -> int:
    from ..tools.costs import check_live_policy, measure_costs

    live_prompts = None
    if args.check_live:
        try:
            check_live_policy(args.live_policy)
        except ValueError as e:
            raise CLIError(str(e)) from None
        from ..models import load_tokenizer
        from ..text import encode_prompt
        from .args import select_prompts

        prompts = select_prompts([args.check_live], None, None)[: args.live_limit]
        tokenizer = load_tokenizer(args.target)
        live_prompts = [encode_prompt(tokenizer, p.text, chat=True) for p in prompts]
    try:
        doc = measure_costs(args.draft, args.target, args.tier, args.dtype, args.gammas, args.context_lens,
                            args.repeats, args.device, live_prompts, args.live_policy, args.live_tokens)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.out:
        write_json(args.out, doc)
    print(json.dumps(doc, indent=1))
    for part in doc.get("live", {}).get("flagged", []):
        ratio = doc["live"]["parts"][part]["median_live_over_profile"]
        print(f"speckv: warning: live {part} steps take {ratio:.2f}x what the profile predicts (median); the live "
              "loop takes a path the profile does not time", file=sys.stderr)
    return 0

"""`speckv generate`, `speckv bench`, `speckv report`: run the engine and measure policies."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..policy import policy_help
from .args import (
    CLIError,
    add_model_args,
    add_predictor_arg,
    add_prompt_args,
    add_sampling_args,
    non_negative_float,
    policy,
    positive_int,
    predictor,
    sampling,
)


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--policy", type=policy, default="adaptive", help=policy_help())
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--min-confidence", type=non_negative_float, default=0.0,
                     help="stop drafting within a step after a token below this confidence (0 = off)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    add_predictor_arg(gen)
    add_model_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(handler=generate)

    bench = sub.add_parser("bench", help="benchmark policies on Spec-Bench style prompts")
    add_prompt_args(bench, repeatable=False)
    bench.add_argument("--policies", default="none,fixed:2,fixed:4,heuristic,adaptive,hf-assisted",
                       help="comma-separated; also `oracle` (greedy, with `none`): the best γ sequence, by replay")
    bench.add_argument("--repeats", type=positive_int, default=1, help="runs of each (prompt, policy) pair")
    bench.add_argument("--out", type=Path, default=Path("results/bench.json"))
    add_predictor_arg(bench)
    add_model_args(bench)
    add_sampling_args(bench)
    bench.set_defaults(handler=bench_)

    report = sub.add_parser("report", help="print markdown tables of `speckv bench` results files")
    report.add_argument("files", nargs="+", type=Path)
    report.set_defaults(handler=report_)


def generate(args: argparse.Namespace) -> int:
    from ..local import LocalEngine
    from ..text import encode_prompt

    params = sampling(args)
    if not args.prompt.strip():
        raise CLIError("--prompt is empty")
    chosen = predictor(args.predictor)
    engine = LocalEngine.load(args.draft, args.target, args.tier, args.dtype, device=args.device)
    engine.predictor = chosen
    prompt_ids = encode_prompt(engine.tokenizer, args.prompt, args.chat)
    try:
        result = engine.generate(prompt_ids, args.policy, args.max_new_tokens, params, tuple(args.stop),
                                 min_confidence=args.min_confidence)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    s = result.stats
    print(result.text)
    print(f"\n[{s.policy}] {result.new_tokens} tokens in {result.seconds:.2f}s ({result.tokens_per_s:.2f} tok/s), "
          f"{s.steps} steps, {s.tokens_per_step:.2f} tokens/step, {s.mean_accepted:.2f} accepted/step",
          file=sys.stderr)
    return 0


def bench_(args: argparse.Namespace) -> int:
    from ..tools.bench import ORACLE, BenchConfig, run_bench
    from .args import select_prompts

    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        config = BenchConfig(
            draft=args.draft, target=args.target, tier=args.tier, dtype=args.dtype,
            policies=[p if p == ORACLE else policy(p) for p in names], max_new_tokens=args.max_new_tokens,
            sampling=sampling(args), repeats=args.repeats, prompts_file=str(args.prompts), device=args.device,
            predictor=args.predictor)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise CLIError(str(e)) from None
    prompts = select_prompts([args.prompts], args.limit_per_category, args.categories)
    predictor(args.predictor)
    run_bench(config, prompts, args.out)
    return 0


def report_(args: argparse.Namespace) -> int:
    from ..tools.bench import markdown_report

    for path in args.files:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot read results file {path}: {e}") from None
        print(f"### {path}\n")
        print(markdown_report(doc))
        print()
    return 0

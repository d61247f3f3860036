"""`speckv` command line: models prepare, generate, bench (and the controller commands)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .models import DEFAULT_DRAFT, DEFAULT_TARGET, EMBEDDED_MODELS, ModelError, Tier


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _non_negative_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return x


def _policy(value: str) -> str:
    from .policy import validate_policy_spec

    try:
        return validate_policy_spec(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", default=DEFAULT_DRAFT, help="draft model: embedded:NAME, a local directory or a hub id")
    p.add_argument("--target", default=DEFAULT_TARGET, help="target model, same forms as --draft")
    p.add_argument("--tier", default="fp16", choices=[t.value for t in Tier], help="target compression tier")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = float16 on GPU, bfloat16 on CPU; float32 for exactness checks")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speckv", description="Adaptive speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="manage the embedded default models")
    msub = models.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="install, verify and convert the embedded default models (idempotent)")
    prep.add_argument("--force", action="store_true", help="prepare again even if a valid cached copy exists")
    prep.add_argument("--only", choices=sorted(EMBEDDED_MODELS), action="append", help="prepare just this model")
    msub.add_parser("list", help="show the embedded models and where they are cached")
    foot = msub.add_parser("footprint", help="load a model at each tier and print its weight memory (JSON)")
    foot.add_argument("--model", default=DEFAULT_TARGET)
    foot.add_argument("--tiers", default="fp16,int8,nf4")
    foot.add_argument("--device", default=None)

    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--policy", type=_policy, default="adaptive",
                     help="none | fixed:N | heuristic | adaptive | hf-assisted")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--min-confidence", type=_non_negative_float, default=0.0,
                     help="stop drafting within a step after a token below this confidence (0 = off)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    _add_model_args(gen)
    _add_sampling_args(gen)

    bench = sub.add_parser("bench", help="benchmark policies on Spec-Bench style prompts")
    bench.add_argument("--prompts", required=True, type=Path, help="JSONL with question_id, category, turns")
    bench.add_argument("--policies", default="none,fixed:2,fixed:4,heuristic,hf-assisted")
    bench.add_argument("--limit-per-category", type=_positive_int, default=None)
    bench.add_argument("--categories", default=None, help="comma-separated categories to keep")
    bench.add_argument("--repeats", type=_positive_int, default=1, help="runs of each (prompt, policy) pair")
    bench.add_argument("--out", type=Path, default=Path("results/bench.json"))
    _add_model_args(bench)
    _add_sampling_args(bench)
    cost = sub.add_parser("cost", help="measure a tier's step costs (draft ms/token, verify ms per γ)")
    cost.add_argument("--gammas", default="0,1,2,3,4,6,8")
    cost.add_argument("--context-lens", default="64,256")
    cost.add_argument("--repeats", type=_positive_int, default=3)
    cost.add_argument("--out", type=Path, default=None)
    _add_model_args(cost)

    report = sub.add_parser("report", help="print markdown tables of `speckv bench` results files")
    report.add_argument("files", nargs="+", type=Path)
    return parser


def cmd_cost(args: argparse.Namespace) -> int:
    from .costs import measure_costs

    try:
        gammas = [int(g) for g in args.gammas.split(",")]
        ctxs = [int(c) for c in args.context_lens.split(",")]
    except ValueError:
        raise CLIError("--gammas and --context-lens take comma-separated integers") from None
    if any(g < 0 or g > 16 for g in gammas) or any(c < 1 for c in ctxs):
        raise CLIError("γ must be in [0, 16] and context lengths >= 1")
    doc = measure_costs(args.draft, args.target, args.tier, args.dtype, gammas, ctxs, args.repeats, args.device)
    text = json.dumps(doc, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .bench import markdown_report

    for path in args.files:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot read results file {path}: {e}") from None
        print(f"### {path}\n")
        print(markdown_report(doc))
        print()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import embedded_dir, prepare_embedded

    chosen = [EMBEDDED_MODELS[n] for n in (args.only or EMBEDDED_MODELS)] if args.models_command == "prepare" \
        else list(EMBEDDED_MODELS.values())
    if args.models_command == "footprint":
        from .models import load_model

        out = {}
        for tier in args.tiers.split(","):
            model = load_model(args.model, Tier.parse(tier.strip()), device=args.device)
            out[tier] = {"weight_bytes": model.get_memory_footprint(), "dtype": str(model.dtype)}
            del model
        print(json.dumps({"model": args.model, "tiers": out}, indent=1))
        return 0
    if args.models_command == "list":
        for m in chosen:
            print(f"{m.spec}\t{m.description}\t{embedded_dir(m)}")
        return 0
    for m in chosen:
        prepare_embedded(m, force=args.force, log=lambda s: print(s, file=sys.stderr))
    return 0


def _sampling(args: argparse.Namespace):
    from .sampling import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from .local import LocalEngine, encode_prompt

    sampling = _sampling(args)
    if not args.prompt.strip():
        raise CLIError("--prompt is empty")
    engine = LocalEngine.load(args.draft, args.target, args.tier, args.dtype, device=args.device)
    prompt_ids = encode_prompt(engine.tokenizer, args.prompt, args.chat)
    try:
        result = engine.generate(prompt_ids, args.policy, args.max_new_tokens, sampling, tuple(args.stop),
                                 min_confidence=args.min_confidence)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.text)
        print(f"\n[{result.policy}] {result.new_tokens} tokens in {result.seconds:.2f}s "
              f"({result.tokens_per_s:.2f} tok/s), {result.steps} steps, {result.tokens_per_step:.2f} tokens/step, "
              f"{result.mean_accepted:.2f} accepted/step", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, load_prompts, run_bench

    policies = [_policy(p) for p in args.policies.split(",") if p.strip()] if args.policies.strip() else []
    if not policies:
        raise CLIError("--policies is empty")
    if len(set(policies)) != len(policies):
        raise CLIError("--policies names a policy twice")
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    try:
        prompts = load_prompts(args.prompts, args.limit_per_category, categories)
    except ValueError as e:
        raise CLIError(str(e)) from None
    config = BenchConfig(
        draft=args.draft, target=args.target, tier=args.tier, dtype=args.dtype, policies=policies,
        max_new_tokens=args.max_new_tokens, sampling=_sampling(args), repeats=args.repeats,
        prompts_file=str(args.prompts), device=args.device,
    )
    run_bench(config, prompts, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler = {"models": cmd_models, "generate": cmd_generate, "bench": cmd_bench, "report": cmd_report,
                   "cost": cmd_cost}[args.command]
        return handler(args)
    except (CLIError, ModelError, argparse.ArgumentTypeError) as e:
        print(f"speckv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("speckv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""What the command groups share: argument types, the model and sampling options, prompt selection."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ..models import DEFAULT_DRAFT, DEFAULT_TARGET, Tier
from ..policy import MAX_GAMMA


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def non_negative_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return x


def policy(value: str) -> str:
    from ..policy import validate_policy_spec

    try:
        return validate_policy_spec(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_list(low: int, high: int | None = None) -> Callable[[str], list[int]]:
    """The one list-argument type: comma-separated integers, each in [low, high] (empty items ignored)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        bad = [v for v in values if v < low or (high is not None and v > high)]
        if bad:
            bounds = f"[{low}, {high}]" if high is not None else f"[{low}, ∞)"
            raise argparse.ArgumentTypeError(f"every value must be in {bounds}, got {bad[0]}")
        return values

    return parse


def tier_list(text: str) -> list[str]:
    """Comma-separated tiers (fp16, int8, nf4), at least one."""
    try:
        tiers = [Tier.parse(t.strip()).value for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not tiers:
        raise argparse.ArgumentTypeError("expected at least one tier")
    return tiers


GAMMAS = int_list(0, MAX_GAMMA)  # γ values, 0 = no drafting
DRAFT_GAMMAS = int_list(1, MAX_GAMMA)  # γ values that draft
CONTEXT_LENS = int_list(1)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", default=DEFAULT_DRAFT, help="draft model: embedded:NAME, a local directory or a hub id")
    p.add_argument("--target", default=DEFAULT_TARGET, help="target model, same forms as --draft")
    p.add_argument("--tier", default="fp16", choices=[t.value for t in Tier], help="target compression tier")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = float16 on GPU, bfloat16 on CPU; float32 for exactness checks")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def add_predictor_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictor", default=None,
                   help="acceptance predictor artifact for adaptive (predictor.json or its directory; default: "
                        "the one shipped with speckv)")


def add_prompt_args(p: argparse.ArgumentParser, repeatable: bool = True) -> None:
    p.add_argument("--prompts", required=True, type=Path, action="append" if repeatable else "store",
                   help="JSONL with question_id, category, turns" + (" (repeatable)" if repeatable else ""))
    p.add_argument("--limit-per-category", type=positive_int, default=None)
    p.add_argument("--categories", default=None, help="comma-separated categories to keep")


def sampling(args: argparse.Namespace):
    from ..sampling import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from None


def predictor(path: str | None):
    """The predictor named on the command line (None: the shipped one), checked up front."""
    from ..predictor import load_predictor

    try:
        return load_predictor(path) if path else None
    except ValueError as e:
        raise CLIError(str(e)) from None


def select_prompts(files: list[Path], limit_per_category: int | None, categories: str | None):
    from ..tools.bench import load_prompts

    chosen = [c.strip() for c in categories.split(",")] if categories else None
    prompts = []
    try:
        for path in files:
            prompts += load_prompts(path, limit_per_category, chosen)
    except ValueError as e:
        raise CLIError(str(e)) from None
    ids = [p.question_id for p in prompts]
    if len(set(ids)) != len(ids):
        raise CLIError("the prompt files repeat a question_id")
    return prompts


def write_json(path: Path, doc) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))

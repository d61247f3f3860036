"""`speckv` command line: a table of command groups, each a module that registers its commands and the
plain functions that run them (litgpt's shape)."""

from __future__ import annotations

import argparse
import os
import sys

from ..models import ModelError
from . import measure, models, run, study
from .args import CLIError

GROUPS = (models, run, measure, study)  # models; generate, bench, report; calibrate, cost; offline studies


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speckv", description="Adaptive speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CLIError, ModelError, argparse.ArgumentTypeError) as e:
        print(f"speckv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("speckv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # its reader stopped reading (`speckv report ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit does not raise
        return 141  # 128 + SIGPIPE, the shell's code for it

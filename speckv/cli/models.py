"""`speckv models`: prepare, list and size the embedded default models."""

from __future__ import annotations

import argparse
import json
import sys

from ..models import DEFAULT_TARGET, EMBEDDED_MODELS, Tier
from .args import tier_list


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="manage the embedded default models")
    msub = models.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="install, verify and convert the embedded default models (idempotent)")
    prep.add_argument("--force", action="store_true", help="prepare again even if a valid cached copy exists")
    prep.add_argument("--only", choices=sorted(EMBEDDED_MODELS), action="append", help="prepare just this model")
    prep.set_defaults(handler=prepare)
    msub.add_parser("list", help="show the embedded models and where they are cached").set_defaults(handler=list_)
    foot = msub.add_parser("footprint", help="load a model at each tier and print its weight memory (JSON)")
    foot.add_argument("--model", default=DEFAULT_TARGET)
    foot.add_argument("--tiers", type=tier_list, default=[t.value for t in Tier])
    foot.add_argument("--device", default=None)
    foot.set_defaults(handler=footprint)


def prepare(args: argparse.Namespace) -> int:
    from ..models import prepare_embedded

    for name in args.only or EMBEDDED_MODELS:
        prepare_embedded(EMBEDDED_MODELS[name], force=args.force, log=lambda s: print(s, file=sys.stderr))
    return 0


def list_(args: argparse.Namespace) -> int:
    from ..models import embedded_dir

    for m in EMBEDDED_MODELS.values():
        print(f"{m.spec}\t{m.description}\t{embedded_dir(m)}")
    return 0


def footprint(args: argparse.Namespace) -> int:
    from ..kernels import many_rows_bytes, many_rows_scratch_bytes
    from ..models import load_model

    out = {}
    for tier in args.tiers:
        model = load_model(args.model, Tier(tier), device=args.device)
        # nf4 on a CPU with bitsandbytes' packed kernel (speckv.kernels): the unpacked 4-bit copies, and per thread
        # that runs passes one dequantized weight of each shape
        copies, scratch = many_rows_bytes(model), many_rows_scratch_bytes(model)
        out[tier] = {"weight_bytes": model.get_memory_footprint() + copies + scratch,
                     "unpacked_4bit_copy_bytes": copies, "dequantized_scratch_bytes": scratch,
                     "dtype": str(model.dtype)}
        del model
    print(json.dumps({"model": args.model, "tiers": out}, indent=1))
    return 0

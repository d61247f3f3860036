"""The offline study commands: `collect` traces, `signals`, `train` the acceptance predictor, `evaluate`
policies by replay, replay under cost `shapes`. They run speckv.tools; nothing served imports them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..policy import MAX_GAMMA
from .args import (
    DRAFT_GAMMAS,
    CLIError,
    add_model_args,
    add_predictor_arg,
    add_prompt_args,
    positive_int,
    select_prompts,
    tier_list,
    write_json,
)


def register(sub: argparse._SubParsersAction) -> None:
    col = sub.add_parser("collect", help="profile the engine into step records and per-tier cost models")
    add_prompt_args(col)
    col.add_argument("--tiers", type=tier_list, default=["fp16"], help="comma-separated tiers")
    col.add_argument("--gammas", type=DRAFT_GAMMAS, default=[], help="comma-separated γ for live fixed-γ runs "
                     "besides the trace")
    col.add_argument("--gamma-max", type=positive_int, default=8, help="draft run length recorded per position")
    col.add_argument("--max-new-tokens", type=positive_int, default=48)
    col.add_argument("--out", type=Path, default=Path("results/collect"))
    add_model_args(col)
    col.set_defaults(handler=collect)

    sig = sub.add_parser("signals", help="study how well draft-side signals predict acceptance (held-out AUC)")
    add_prompt_args(sig)
    sig.add_argument("--max-new-tokens", type=positive_int, default=48)
    sig.add_argument("--out", type=Path, default=Path("results/signals.json"))
    add_model_args(sig)
    sig.set_defaults(handler=signals)

    tr = sub.add_parser("train", help="train the acceptance predictor from step records")
    tr.add_argument("--records", required=True, type=Path, action="append",
                    help="records JSONL, or a `speckv collect` directory (repeatable)")
    tr.add_argument("--format", default="speckv", choices=["speckv", "speckv-paper"],
                    help="speckv: this project's step records; speckv-paper: the paper's phase2_step_results.csv")
    tr.add_argument("--out", type=Path, default=None,
                    help="speckv: directory for predictor.json + predictor.safetensors; paper: report JSON file")
    tr.add_argument("--hidden", type=positive_int, default=None, help="MLP hidden units (32; paper: 16)")
    tr.add_argument("--epochs", type=positive_int, default=None)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--json", action="store_true", help="print one JSON object")
    tr.add_argument("--points", type=Path, default=None,
                    help="write held-out (predicted, actual) acceptance pairs here (for `evaluate --points`)")
    tr.set_defaults(handler=train)

    ev = sub.add_parser("evaluate", help="replay policies over held-out traces (tokens/s under each tier's cost model)")
    _add_replay_args(ev)
    ev.add_argument("--out", type=Path, default=Path("results/evaluate.json"))
    ev.add_argument("--plots", type=Path, default=None, help="write the PNG plots of docs/RESULTS.md here")
    ev.add_argument("--live", type=Path, action="append", default=[],
                    help="`speckv bench` results to add to the speedup plot (repeatable)")
    ev.add_argument("--points", type=Path, default=None, help="`speckv train --points` file for the calibration plot")
    ev.add_argument("--markdown", type=Path, default=None, help="also write the tables as markdown here")
    ev.add_argument("--as-tier", default=None,
                    help="what-if: replay every selected trace (see --source-tier) under this tier's cost model "
                         "and predictor inputs; acceptance then comes from the source tier, so label it a proxy")
    ev.add_argument("--source-tier", default=None, help="only traces collected at this tier")
    ev.set_defaults(handler=evaluate)

    sh = sub.add_parser("shapes", help="replay traces under step-cost shapes this machine lacks (GPU-like, other "
                        "CPUs, step changes): adaptive against the best fixed γ on each")
    _add_replay_args(sh)
    sh.add_argument("--tier", default="fp16", help="tier whose traces to replay")
    sh.add_argument("--out", type=Path, default=Path("results/shapes.json"))
    sh.set_defaults(handler=shapes)


def _add_replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", required=True, type=Path, action="append",
                   help="records JSONL with traces, or a `speckv collect` directory (repeatable)")
    add_predictor_arg(p)
    p.add_argument("--split", default="test", choices=["test", "train", "all"])


def collect(args: argparse.Namespace) -> int:
    from ..tools.collect import CollectConfig, collect

    if args.gamma_max > MAX_GAMMA:
        raise CLIError(f"--gamma-max must be at most {MAX_GAMMA}")
    prompts = select_prompts(args.prompts, args.limit_per_category, args.categories)
    config = CollectConfig(args.draft, args.target, args.tiers, args.dtype, args.gamma_max, args.max_new_tokens,
                           args.gammas, device=args.device)
    collect(config, prompts, args.out)
    return 0


def signals(args: argparse.Namespace) -> int:
    from ..local import LocalEngine
    from ..tools.signal_study import check_splits, collect_rows, study

    prompts = select_prompts(args.prompts, args.limit_per_category, args.categories)
    try:
        check_splits([p.question_id for p in prompts])
    except ValueError as e:
        raise CLIError(str(e)) from None
    engine = LocalEngine.load(args.draft, args.target, args.tier, args.dtype, device=args.device)
    rows, outputs = collect_rows(engine, prompts, args.max_new_tokens)
    try:
        doc = study(rows)
    except ValueError as e:
        raise CLIError(str(e)) from None
    doc.update(draft=args.draft, target=args.target, tier=args.tier, dtype=args.dtype,
               max_new_tokens=args.max_new_tokens, outputs=outputs)
    write_json(args.out, doc)
    print(json.dumps({k: v for k, v in doc.items() if k != "outputs"}, indent=1))
    return 0


TRAIN_SUMMARY = ("test_corr", "raw_corr", "raw_best_feature", "raw_best_signal", "train_states", "test_states",
                 "token_auc", "token_auc_confidence", "token_weights", "version", "policy_tokens_per_step")


def train(args: argparse.Namespace) -> int:
    from ..tools.training import train, train_paper

    try:
        if args.format == "speckv-paper":
            if len(args.records) != 1:
                raise CLIError("--format speckv-paper takes one --records file (phase2_step_results.csv)")
            doc = train_paper(args.records[0], hidden=args.hidden or 16, epochs=args.epochs or 2000, seed=args.seed)
            if args.out:
                write_json(args.out, doc)
        else:
            _, doc = train(args.records, args.out, hidden=args.hidden or 32, epochs=args.epochs or 600, seed=args.seed)
            points = doc.pop("_corr_points")
            if args.points:
                write_json(args.points, points)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(doc))
        return 0
    for key in TRAIN_SUMMARY:
        if key in doc:
            print(f"{key}: {doc[key]}")
    if args.out:
        print(f"written to {args.out}", file=sys.stderr)
    return 0


def _load_replay(args: argparse.Namespace):
    """(predictor, records, costs, traces by (tier, prompt id)) of the --records in --split."""
    from ..predictor import SHIPPED, AcceptancePredictor
    from ..tools.training import load_collection, split_of, traces_from_records

    try:
        predictor = AcceptancePredictor.load(args.predictor or SHIPPED)
        records, costs = load_collection(args.records)
    except ValueError as e:
        raise CLIError(str(e)) from None
    traces = {k: t for k, t in traces_from_records(records).items()
              if args.split == "all" or split_of(t.prompt_id) == args.split}
    return predictor, records, costs, traces


def shapes(args: argparse.Namespace) -> int:
    from ..tools.replay import resize
    from ..tools.shapes import report

    predictor, _, costs, traces = _load_replay(args)
    chosen = [resize(t, 2 * predictor.gamma_max) for (tier, _), t in sorted(traces.items()) if tier == args.tier]
    if not chosen:
        raise CLIError(f"no {args.tier} traces in the {args.split} split of the records")
    doc = report(predictor, chosen, costs.get(args.tier), args.tier)
    doc.update(predictor=predictor.version(), prompts=len(chosen), tier=args.tier, split=args.split)
    write_json(args.out, doc)
    print(f"{len(chosen)} {args.tier} traces; adaptive / best of none and fixed γ 1..8 (geomean tokens/s):")
    for name, s in doc["shapes"].items():
        print(f"  {name:<20} best {s['best']:<8} adaptive {s['adaptive_over_best']:.3f}  "
              f"(frozen, no online learning: {s['frozen_over_best']:.3f})  "
              f"mean γ {s['policies']['adaptive']['mean_gamma']:.2f}")
    for name, errors in doc["slope_errors"].items():
        print(f"  {name:<20} calibrated verify slope " + ", ".join(
            f"{k}: adaptive {e['learning']:.3f} (level learned alone: {e['level_only']:.3f})"
            for k, e in errors.items()))
    for name, c in doc["changes"].items():
        print(f"  step change {name:<16} after 30 steps: adaptive {c['learning'].get('adaptive_over_best', 0):.3f}"
              f" of {c['learning'].get('best')}, frozen {c['frozen'].get('adaptive_over_best', 0):.3f}")
    print(f"written to {args.out}", file=sys.stderr)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from ..predictor import SHIPPED
    from ..tools.training import evaluate, evaluation_markdown

    predictor, records, costs, traces = _load_replay(args)
    traces = {k: t for k, t in traces.items() if args.source_tier is None or k[0] == args.source_tier}
    if args.as_tier:
        traces = {(args.as_tier, pid): t for (_, pid), t in traces.items()}
    if not traces:
        raise CLIError(f"no traces in the {args.split} split of the records")
    missing = sorted({tier for tier, _ in traces} - set(costs))
    if missing:
        raise CLIError(f"no cost model (cost_<tier>.json beside the records) for tier(s) {', '.join(missing)}")
    doc = evaluate(predictor, traces, costs)
    doc["predictor"] = {"version": predictor.version(), "path": str(args.predictor or SHIPPED)}
    doc["split"] = args.split
    doc["proxy"] = {"source_tier": args.source_tier, "as_tier": args.as_tier} if args.as_tier else None
    write_json(args.out, doc)
    _print_evaluation(doc)
    print(f"results written to {args.out}", file=sys.stderr)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(evaluation_markdown(doc))
    if args.plots:
        _evaluation_plots(args, doc, records)
    return 0


def _print_evaluation(doc: dict) -> None:
    for tier, t in doc["tiers"].items():
        pol = t["policies"]
        shown = ("none", t["best_fixed"], "heuristic", "adaptive", "oracle")
        print(f"{tier}: {t['prompts']} prompts, best fixed {t['best_fixed']}; tokens/s geomean: "
              + ", ".join(f"{n} {pol[n]['tokens_per_s_geomean']:.2f}" for n in shown)
              + f"; adaptive/oracle {t['adaptive_vs_oracle']:.3f}; decision p50 {t['decision_us']['p50']:.1f} us")
        for c in t["comparisons"]:
            print(f"   adaptive vs {c['b']}: {c['speedup']:.3f}x [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] "
                  f"p={c['p_value']:.4f}")


def _evaluation_plots(args: argparse.Namespace, doc: dict, records) -> None:
    from ..tools import plots
    from ..tools.training import traces_from_records

    live = {}
    for path in args.live:
        try:
            bench_doc = json.loads(path.read_text())
            live[bench_doc["config"]["tier"]] = bench_doc
        except (OSError, ValueError, KeyError) as e:
            raise CLIError(f"cannot read bench results {path}: {e}") from None
    all_traces = traces_from_records(records)
    written = [plots.acceptance_vs_signals(all_traces, args.plots), plots.gamma_choices(doc, args.plots),
               plots.optimal_gamma_by_task(doc, args.plots), plots.speedup_bars(doc, args.plots, live=live)]
    if args.points:
        try:
            points = json.loads(args.points.read_text())
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot read {args.points}: {e}") from None
        written.append(plots.predicted_vs_actual(points, args.plots))
    print("plots: " + ", ".join(str(w) for w in written), file=sys.stderr)

"""`speckv` command line: models prepare, generate, bench (and the controller commands)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .models import DEFAULT_DRAFT, DEFAULT_TARGET, EMBEDDED_MODELS, ModelError, Tier
from .policy import MAX_GAMMA, policy_help


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
                     help=policy_help())
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--min-confidence", type=_non_negative_float, default=0.0,
                     help="stop drafting within a step after a token below this confidence (0 = off)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--controller", default=None, help="controller.json for adaptive (default: the shipped one)")
    _add_model_args(gen)
    _add_sampling_args(gen)

    bench = sub.add_parser("bench", help="benchmark policies on Spec-Bench style prompts")
    bench.add_argument("--prompts", required=True, type=Path, help="JSONL with question_id, category, turns")
    bench.add_argument("--policies", default="none,fixed:2,fixed:4,heuristic,adaptive,hf-assisted",
                       help="comma-separated; also `oracle` (greedy, with `none`): the best γ sequence, by replay")
    bench.add_argument("--controller", default=None, help="controller.json for adaptive (default: the shipped one)")
    bench.add_argument("--limit-per-category", type=_positive_int, default=None)
    bench.add_argument("--categories", default=None, help="comma-separated categories to keep")
    bench.add_argument("--repeats", type=_positive_int, default=1, help="runs of each (prompt, policy) pair")
    bench.add_argument("--out", type=Path, default=Path("results/bench.json"))
    _add_model_args(bench)
    _add_sampling_args(bench)
    col = sub.add_parser("collect", help="profile the engine into step records and per-tier cost models")
    col.add_argument("--prompts", required=True, type=Path, action="append",
                     help="JSONL with question_id, category, turns (repeatable)")
    col.add_argument("--tiers", default="fp16", help="comma-separated tiers")
    col.add_argument("--gammas", default="", help="comma-separated γ for live fixed-γ runs besides the trace")
    col.add_argument("--gamma-max", type=_positive_int, default=8, help="draft run length recorded per position")
    col.add_argument("--max-new-tokens", type=_positive_int, default=48)
    col.add_argument("--limit-per-category", type=_positive_int, default=None)
    col.add_argument("--categories", default=None, help="comma-separated categories to keep")
    col.add_argument("--out", type=Path, default=Path("results/collect"))
    _add_model_args(col)

    sig = sub.add_parser("signals", help="study how well draft-side signals predict acceptance (held-out AUC)")
    sig.add_argument("--prompts", required=True, type=Path, action="append",
                     help="JSONL with question_id, category, turns (repeatable)")
    sig.add_argument("--max-new-tokens", type=_positive_int, default=48)
    sig.add_argument("--limit-per-category", type=_positive_int, default=None)
    sig.add_argument("--categories", default=None, help="comma-separated categories to keep")
    sig.add_argument("--out", type=Path, default=Path("results/signals.json"))
    _add_model_args(sig)

    tr = sub.add_parser("train", help="train the γ controller from step records")
    tr.add_argument("--records", required=True, type=Path, action="append",
                    help="records JSONL, or a `speckv collect` directory (repeatable)")
    tr.add_argument("--format", default="speckv", choices=["speckv", "speckv-paper"],
                    help="speckv: this project's step records; speckv-paper: the paper's phase2_step_results.csv")
    tr.add_argument("--out", type=Path, default=None,
                    help="speckv: directory for controller.json + controller.safetensors; paper: report JSON file")
    tr.add_argument("--hidden", type=_positive_int, default=None, help="MLP hidden units (32; paper: 16)")
    tr.add_argument("--epochs", type=_positive_int, default=None)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--json", action="store_true", help="print one JSON object")
    tr.add_argument("--points", type=Path, default=None,
                    help="write held-out (predicted, actual) acceptance pairs here (for `evaluate --points`)")

    ev = sub.add_parser("evaluate", help="replay policies over held-out traces (tokens/s under each tier's cost model)")
    ev.add_argument("--records", required=True, type=Path, action="append")
    ev.add_argument("--controller", default=None, help="controller.json (default: the one shipped with speckv)")
    ev.add_argument("--split", default="test", choices=["test", "train", "all"])
    ev.add_argument("--out", type=Path, default=Path("results/evaluate.json"))
    ev.add_argument("--plots", type=Path, default=None, help="write the PNG plots of docs/RESULTS.md here")
    ev.add_argument("--live", type=Path, action="append", default=[],
                    help="`speckv bench` results to add to the speedup plot (repeatable)")
    ev.add_argument("--points", type=Path, default=None, help="`speckv train --points` file for the calibration plot")
    ev.add_argument("--markdown", type=Path, default=None, help="also write the tables as markdown here")
    ev.add_argument("--as-tier", default=None,
                    help="what-if: replay every selected trace (see --source-tier) under this tier's cost model "
                         "and controller inputs; acceptance then comes from the source tier, so label it a proxy")
    ev.add_argument("--source-tier", default=None, help="only traces collected at this tier")

    sh = sub.add_parser("shapes", help="replay traces under step-cost shapes this machine lacks (GPU-like, other "
                        "CPUs, step changes): adaptive against the best fixed γ on each")
    sh.add_argument("--records", required=True, type=Path, action="append",
                    help="records JSONL with traces, or a `speckv collect` directory (repeatable)")
    sh.add_argument("--tier", default="fp16", help="tier whose traces to replay")
    sh.add_argument("--controller", default=None, help="controller.json (default: the one shipped with speckv)")
    sh.add_argument("--split", default="test", choices=["test", "train", "all"])
    sh.add_argument("--out", type=Path, default=Path("results/shapes.json"))

    cost = sub.add_parser("cost", help="measure a tier's step costs (draft ms/token, verify ms per γ)")
    cost.add_argument("--gammas", default="0,1,2,3,4,6,8")
    cost.add_argument("--context-lens", default="64,256")
    cost.add_argument("--repeats", type=_positive_int, default=3)
    cost.add_argument("--out", type=Path, default=None)
    cost.add_argument("--check-live", type=Path, default=None, metavar="PROMPTS",
                      help="also run the live loop on these prompts (JSONL, as for bench) and report each part "
                           "of a step whose live time is over 1.5x what the profile predicts")
    cost.add_argument("--live-limit", type=_positive_int, default=4, help="prompts of --check-live to run")
    cost.add_argument("--live-policy", type=_policy, default="fixed:2",
                      help="policy of the --check-live runs (fixed:N or heuristic: it must draft)")
    cost.add_argument("--live-tokens", type=_positive_int, default=24, help="new tokens per --check-live prompt")
    _add_model_args(cost)

    cal = sub.add_parser("calibrate", help="measure this machine's step costs with the live loop's calls (cached)")
    cal.add_argument("--max-gamma", type=_positive_int, default=8, help="longest draft run whose verification is timed")
    cal.add_argument("--context-lens", default="64,512", help="context lengths to time at (comma-separated)")
    cal.add_argument("--budget-s", type=float, default=30.0,
                     help="time budget for both models (target 22/30 of it, draft 8/30); measuring stops once "
                          "it is spent")
    cal.add_argument("--repeats", type=_positive_int, default=3)
    cal.add_argument("--force", action="store_true", help="measure again even if a calibration is cached")
    cal.add_argument("--json", action="store_true", help="print the calibration as JSON")
    _add_model_args(cal)

    report = sub.add_parser("report", help="print markdown tables of `speckv bench` results files")
    report.add_argument("files", nargs="+", type=Path)
    return parser


def _context_lens(text: str) -> list[int]:
    """--context-lens: comma-separated context lengths, each >= 1."""
    try:
        values = [int(c) for c in text.split(",")]
    except ValueError:
        raise CLIError(f"--context-lens takes comma-separated integers, got {text!r}") from None
    if any(c < 1 for c in values):
        raise CLIError("context lengths must be >= 1")
    return values


def cmd_calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .calibration import calibrate_pair, calibration_path
    from .models import draft_dtype_for, load_model
    from .workers import SessionLM

    ctxs = tuple(_context_lens(args.context_lens))
    if args.max_gamma > MAX_GAMMA:
        raise CLIError(f"--max-gamma must be in [1, {MAX_GAMMA}]")
    if not args.budget_s > 0:
        raise CLIError("--budget-s must be > 0")
    draft = SessionLM(load_model(args.draft, "fp16", draft_dtype_for(args.dtype), args.device))
    target = SessionLM(load_model(args.target, args.tier, args.dtype, args.device))
    with tqdm(desc="calibrating", unit="measurement", file=sys.stderr, disable=args.json) as bar:
        def progress(done: int, planned: int) -> None:
            bar.total = planned
            bar.update(done - bar.n)

        pair = calibrate_pair(draft, target, args.tier, args.budget_s, args.force, max_gamma=args.max_gamma,
                              context_lens=ctxs, repeats=args.repeats, progress=progress)
    cost = pair.cost_model
    if args.json:
        print(json.dumps({"cost_model": cost.to_dict(), "cached": pair.cached, "seconds": pair.seconds,
                          **{c.key.role: {**c.to_dict(), "path": str(calibration_path(c.key))}
                             for c in (pair.target, pair.draft)}}, indent=1))
        return 0
    key = pair.target.key
    print(f"tier {key.tier} ({key.dtype}) on {key.hardware}, torch {key.torch}, {key.device}")
    for c in (pair.target, pair.draft):
        cut = "" if c.complete else " (the budget ran out before every planned measurement)"
        print(f"{c.key.role}: {'cached' if pair.cached else 'measured'} in {c.seconds:.1f} s{cut}: "
              f"{calibration_path(c.key)}")
    rows = pair.target.rows + pair.draft.rows
    for ctx in sorted({r["context_len"] for r in rows}):
        verify = "  ".join(f"{r['tokens']}: {r['ms']:.0f}" for r in sorted(rows, key=lambda r: r["tokens"])
                           if r["kind"] == "verify" and r["context_len"] == ctx)
        draft_ms = "  ".join(f"{r['tokens']}: {r['ms']:.0f}" for r in rows
                             if r["kind"] == "draft" and r["context_len"] == ctx)
        print(f"context {ctx}: verify ms by tokens scored {verify}; draft ms by tokens fed {draft_ms}")
    print(f"cost model: verify {cost.verify_ms_base:.0f} + {cost.verify_ms_per_token:.1f}·γ "
          f"+ {cost.verify_ms_per_context_token:.3f}·context ms; draft {cost.draft_ms_per_token:.0f} ms/token")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from .tools.costs import measure_costs

    try:
        gammas = [int(g) for g in args.gammas.split(",")]
    except ValueError:
        raise CLIError("--gammas takes comma-separated integers") from None
    if any(g < 0 or g > MAX_GAMMA for g in gammas):
        raise CLIError(f"γ must be in [0, {MAX_GAMMA}]")
    ctxs = _context_lens(args.context_lens)
    live_prompts = None
    if args.check_live:
        if not (args.live_policy.startswith("fixed:") or args.live_policy == "heuristic"):
            raise CLIError(f"--live-policy {args.live_policy}: the live check needs a policy that always drafts "
                           "(fixed:N or heuristic)")
        from .models import load_tokenizer
        from .text import encode_prompt

        prompts = _select_prompts([args.check_live], None, None)[: args.live_limit]
        tokenizer = load_tokenizer(args.target)
        live_prompts = [encode_prompt(tokenizer, p.text, chat=True) for p in prompts]
    doc = measure_costs(args.draft, args.target, args.tier, args.dtype, gammas, ctxs, args.repeats, args.device,
                        live_prompts, args.live_policy, args.live_tokens)
    text = json.dumps(doc, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    for part in doc.get("live", {}).get("flagged", []):
        ratio = doc["live"]["parts"][part]["median_live_over_profile"]
        print(f"speckv: warning: live {part} steps take {ratio:.2f}x what the profile predicts (median); the live "
              "loop takes a path the profile does not time", file=sys.stderr)
    return 0


def _gamma_list(text: str, name: str, allow_zero: bool) -> list[int]:
    try:
        values = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise CLIError(f"{name} takes comma-separated integers, got {text!r}") from None
    low = 0 if allow_zero else 1
    if any(not low <= g <= MAX_GAMMA for g in values):
        raise CLIError(f"{name}: every γ must be in [{low}, {MAX_GAMMA}], got {text!r}")
    return values


def _select_prompts(files: list[Path], limit_per_category: int | None, categories: str | None):
    from .tools.bench import load_prompts

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


def cmd_collect(args: argparse.Namespace) -> int:
    from .tools.collect import CollectConfig, collect

    try:
        tiers = [Tier.parse(t.strip()).value for t in args.tiers.split(",") if t.strip()]
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not tiers:
        raise CLIError("--tiers is empty")
    gammas = _gamma_list(args.gammas, "--gammas", allow_zero=False)
    if args.gamma_max > MAX_GAMMA:
        raise CLIError(f"--gamma-max must be at most {MAX_GAMMA}")
    prompts = _select_prompts(args.prompts, args.limit_per_category, args.categories)
    config = CollectConfig(args.draft, args.target, tiers, args.dtype, args.gamma_max, args.max_new_tokens, gammas,
                           device=args.device)
    collect(config, prompts, args.out)
    return 0


def cmd_signals(args: argparse.Namespace) -> int:
    from .local import LocalEngine
    from .tools.signal_study import check_splits, collect_rows, study

    prompts = _select_prompts(args.prompts, args.limit_per_category, args.categories)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: v for k, v in doc.items() if k != "outputs"}, indent=1))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .tools.training import train, train_paper

    try:
        if args.format == "speckv-paper":
            if len(args.records) != 1:
                raise CLIError("--format speckv-paper takes one --records file (phase2_step_results.csv)")
            doc = train_paper(args.records[0], hidden=args.hidden or 16, epochs=args.epochs or 2000, seed=args.seed)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(doc, indent=1))
        else:
            _, doc = train(args.records, args.out, hidden=args.hidden or 32, epochs=args.epochs or 600, seed=args.seed)
            points = doc.pop("_corr_points")
            if args.points:
                args.points.parent.mkdir(parents=True, exist_ok=True)
                args.points.write_text(json.dumps(points))
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(doc))
    else:
        for key in ("test_corr", "raw_corr", "raw_best_feature", "raw_best_signal", "train_states", "test_states",
                    "token_auc", "token_auc_confidence", "token_weights", "version",
                    "policy_tokens_per_step"):
            if key in doc:
                print(f"{key}: {doc[key]}")
        if args.out:
            print(f"written to {args.out}", file=sys.stderr)
    return 0


def cmd_shapes(args: argparse.Namespace) -> int:
    from .controller import SHIPPED, ControllerArtifact
    from .tools.replay import resize
    from .tools.shapes import report
    from .tools.training import load_collection, split_of, traces_from_records

    try:
        artifact = ControllerArtifact.load(args.controller or SHIPPED)
        records, costs = load_collection(args.records)
    except ValueError as e:
        raise CLIError(str(e)) from None
    traces = [resize(t, 2 * artifact.gamma_max) for (tier, _), t in sorted(traces_from_records(records).items())
              if tier == args.tier and (args.split == "all" or split_of(t.prompt_id) == args.split)]
    if not traces:
        raise CLIError(f"no {args.tier} traces in the {args.split} split of the records")
    doc = report(artifact, traces, costs.get(args.tier), args.tier)
    doc.update(controller=artifact.version(), prompts=len(traces), tier=args.tier, split=args.split)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"{len(traces)} {args.tier} traces; adaptive / best of none and fixed γ 1..8 (geomean tokens/s):")
    for name, s in doc["shapes"].items():
        print(f"  {name:<20} best {s['best']:<8} adaptive {s['adaptive_over_best']:.3f}  "
              f"(frozen, no online learning: {s['frozen_over_best']:.3f})  "
              f"mean γ {s['policies']['adaptive']['mean_gamma']:.2f}")
    for name, c in doc["changes"].items():
        print(f"  step change {name:<16} after 30 steps: adaptive {c['learning'].get('adaptive_over_best', 0):.3f}"
              f" of {c['learning'].get('best')}, frozen {c['frozen'].get('adaptive_over_best', 0):.3f}")
    print(f"written to {args.out}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .controller import SHIPPED, ControllerArtifact
    from .tools.training import evaluate, load_collection, split_of, traces_from_records

    try:
        artifact = ControllerArtifact.load(args.controller or SHIPPED)
        records, costs = load_collection(args.records)
        traces = {k: t for k, t in traces_from_records(records).items()
                  if (args.split == "all" or split_of(t.prompt_id) == args.split)
                  and (args.source_tier is None or k[0] == args.source_tier)}
        if args.as_tier:
            traces = {(args.as_tier, pid): t for (_, pid), t in traces.items()}
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not traces:
        raise CLIError(f"no traces in the {args.split} split of the records")
    missing = sorted({tier for tier, _ in traces} - set(costs))
    if missing:
        raise CLIError(f"no cost model (cost_<tier>.json beside the records) for tier(s) {', '.join(missing)}")
    doc = evaluate(artifact, traces, costs)
    doc["controller"] = {"version": artifact.version(), "path": str(args.controller or SHIPPED)}
    doc["split"] = args.split
    doc["proxy"] = {"source_tier": args.source_tier, "as_tier": args.as_tier} if args.as_tier else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    for tier, t in doc["tiers"].items():
        pol = t["policies"]
        print(f"{tier}: {t['prompts']} prompts, best fixed {t['best_fixed']}; tokens/s geomean: "
              + ", ".join(f"{n} {pol[n]['tokens_per_s_geomean']:.2f}" for n in ("none", t["best_fixed"], "heuristic",
                                                                              "adaptive", "oracle"))
              + f"; adaptive/oracle {t['adaptive_vs_oracle']:.3f}; decision p50 {t['decision_us']['p50']:.1f} us")
        for c in t["comparisons"]:
            print(f"   adaptive vs {c['b']}: {c['speedup']:.3f}x [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] "
                  f"p={c['p_value']:.4f}")
    print(f"results written to {args.out}", file=sys.stderr)
    if args.markdown:
        from .tools.training import evaluation_markdown

        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(evaluation_markdown(doc))
    if args.plots:
        from .tools import plots

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
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .tools.bench import markdown_report

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


def _controller(path: str | None):
    """The controller snapshot named on the command line (None: the shipped one), checked up front."""
    from .controller import load_snapshot

    try:
        return load_snapshot(path) if path else None
    except ValueError as e:
        raise CLIError(str(e)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from .local import LocalEngine
    from .text import encode_prompt

    sampling = _sampling(args)
    if not args.prompt.strip():
        raise CLIError("--prompt is empty")
    controller = _controller(args.controller)
    engine = LocalEngine.load(args.draft, args.target, args.tier, args.dtype, device=args.device)
    engine.controller = controller
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
        s = result.stats
        print(f"\n[{s.policy}] {result.new_tokens} tokens in {result.seconds:.2f}s "
              f"({result.tokens_per_s:.2f} tok/s), {s.steps} steps, {s.tokens_per_step:.2f} tokens/step, "
              f"{s.mean_accepted:.2f} accepted/step", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .tools.bench import ORACLE, BenchConfig, load_prompts, run_bench

    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    policies = [p if p == ORACLE else _policy(p) for p in names]
    if not policies:
        raise CLIError("--policies is empty")
    if len(set(policies)) != len(policies):
        raise CLIError("--policies names a policy twice")
    sampling = _sampling(args)
    if ORACLE in policies and (not sampling.greedy or "none" not in policies):
        raise CLIError("the oracle is replayed from the target-only greedy output: it needs --temperature 0 "
                       "and `none` among --policies")
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    try:
        prompts = load_prompts(args.prompts, args.limit_per_category, categories)
    except ValueError as e:
        raise CLIError(str(e)) from None
    config = BenchConfig(
        draft=args.draft, target=args.target, tier=args.tier, dtype=args.dtype, policies=policies,
        max_new_tokens=args.max_new_tokens, sampling=sampling, repeats=args.repeats,
        prompts_file=str(args.prompts), device=args.device, controller=args.controller,
    )
    _controller(args.controller)
    run_bench(config, prompts, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler = {"models": cmd_models, "generate": cmd_generate, "bench": cmd_bench, "report": cmd_report,
                   "cost": cmd_cost, "calibrate": cmd_calibrate, "collect": cmd_collect, "signals": cmd_signals,
                   "train": cmd_train, "evaluate": cmd_evaluate, "shapes": cmd_shapes}[args.command]
        return handler(args)
    except (CLIError, ModelError, argparse.ArgumentTypeError) as e:
        print(f"speckv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("speckv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

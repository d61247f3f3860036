"""`speckv bench`: every policy on every prompt, interleaved, with paired statistics.

For each prompt the policies run one after another in an order rotated per prompt, so slow phases of a
shared machine fall on all policies alike. Each (prompt, policy) pair is run `repeats` times and the
median time kept. Results are JSON (schema in docs/BENCHMARKS.md) plus a printed table; every step record of
every run goes beside it (`records_path`), so what a policy was shown at each step can be studied afterwards
(scripts/acceptance_by_position.py rebuilds the predictor's prior from them).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..sampling import SamplingParams
from .stats import first_divergence, paired_speedup

# Spec-Bench labels its multi-turn conversation prompts with MT-Bench's sub-categories; it reports them as one.
MT_BENCH_SUBCATEGORIES = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


@dataclass(frozen=True)
class Prompt:
    question_id: str
    category: str
    text: str


@dataclass
class BenchConfig:
    draft: str
    target: str
    tier: str
    dtype: str
    policies: list[str]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    repeats: int = 1
    prompts_file: str = ""
    device: str | None = None
    predictor: str | None = None  # predictor artifact for adaptive (None: the shipped one)

    def __post_init__(self) -> None:
        """The rules between fields, where library users meet them too. Raises ValueError."""
        if not self.policies:
            raise ValueError("no policies to bench")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError("the policies name one twice")
        if ORACLE in self.policies and (not self.sampling.greedy or "none" not in self.policies):
            raise ValueError("the oracle is replayed from the target-only greedy output: it needs temperature 0 "
                             "and `none` among the policies")


ORACLE = "oracle"  # bench-only: the best γ sequence for the prompt, replayed (speckv.tools.replay.oracle)
ORACLE_GAMMA_MAX = 8


def records_path(out: Path) -> Path:
    """Where the bench writing `out` keeps its step records (JSON Lines, speckv.records)."""
    return out.with_name(out.stem + ".records.jsonl")


def oracle_row(engine, ids: list[int], none_row: dict, cost) -> dict:
    """The oracle's result for one prompt from the target-only greedy run: the prompt's trace is collected,
    the oracle's and target-only's decode times are replayed under the tier's cost model, and the difference
    is applied to the measured target-only time (prefill and everything outside the steps stay as measured)."""
    from .replay import collect_trace, fixed, oracle, replay

    trace = collect_trace(engine.draft_worker, none_row["token_ids"], ids, ORACLE_GAMMA_MAX, none_row["question_id"])
    best, base = oracle(trace, cost), replay(trace, fixed(0), cost)
    seconds = none_row["seconds"] + (best.ms - base.ms) / 1e3
    accepted = trace.n - best.steps
    return {**none_row, "seconds": seconds, "tokens_per_s": none_row["new_tokens"] / seconds,
            "tokens_per_step": best.tokens_per_step, "mean_accepted": accepted / best.steps, "steps": best.steps,
            "gammas": best.gammas, "replayed": True}


def load_prompts(path: Path, limit_per_category: int | None = None,
                 categories: list[str] | None = None) -> list[Prompt]:
    """Spec-Bench JSONL: question_id, category, turns (the first turn is the prompt)."""
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    prompts: list[Prompt] = []
    per_cat: dict[str, int] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                qid, cat, turns = row["question_id"], row["category"], row["turns"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with question_id, category, turns "
                                 f"({e})") from None
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
                raise ValueError(f"{path}:{n}: turns must be a non-empty list of strings")
            cat = "mt_bench" if cat in MT_BENCH_SUBCATEGORIES else cat
            if categories and cat not in categories:
                continue
            if limit_per_category is not None and per_cat.get(cat, 0) >= limit_per_category:
                continue
            per_cat[cat] = per_cat.get(cat, 0) + 1
            prompts.append(Prompt(str(qid), str(cat), turns[0]))
    if not prompts:
        raise ValueError(f"no prompts selected from {path}")
    return prompts


def compare(runs: dict[str, list[dict]]) -> list[dict]:
    """Every policy against `none` and against `hf-assisted` (when present), paired by prompt."""
    comparisons = []
    for base in [b for b in ("none", "hf-assisted") if b in runs]:
        for name in runs:
            if name == base or (base == "hf-assisted" and name == "none"):
                continue
            comparisons.append(paired_speedup(
                name, [r["tokens_per_s"] for r in runs[name]], base, [r["tokens_per_s"] for r in runs[base]]
            ).to_dict())
    return comparisons


def summarize(config: BenchConfig, runs: dict[str, list[dict]]) -> dict:
    """Aggregate per-prompt runs into the results document."""
    policies = {}
    for name, rows in runs.items():
        tps = [r["tokens_per_s"] for r in rows]
        tpst = [r["tokens_per_step"] for r in rows]
        policies[name] = {
            "per_prompt": rows,
            "tokens_per_s": statistics.median(tps),
            "tokens_per_s_geomean": statistics.geometric_mean(tps),
            "tokens_per_step": statistics.mean(tpst),
            "mean_accepted": statistics.mean(r["mean_accepted"] for r in rows),
            "new_tokens": sum(r["new_tokens"] for r in rows),
        }
        decisions = [us for r in rows for us in r.get("policy_us", [])]
        if decisions:
            policies[name]["decision_us_p50"] = float(np.percentile(decisions, 50))
            policies[name]["decision_us_p99"] = float(np.percentile(decisions, 99))
    comparisons = compare(runs)
    if "none" in runs and config.sampling.greedy:
        ref = {r["question_id"]: r["token_ids"] for r in runs["none"]}
        for name, rows in runs.items():
            for r in rows:
                r["first_divergence_vs_none"] = first_divergence(ref[r["question_id"]], r["token_ids"])
            divs = [r["first_divergence_vs_none"] for r in rows]
            policies[name]["identical_to_none"] = sum(d is None for d in divs)
            policies[name]["first_divergence_median"] = (
                statistics.median([d for d in divs if d is not None]) if any(d is not None for d in divs) else None
            )
    by_category: dict[str, dict[str, float]] = {}
    for name, rows in runs.items():
        for cat in sorted({r["category"] for r in rows}):
            vals = [r["tokens_per_s"] for r in rows if r["category"] == cat]
            by_category.setdefault(cat, {})[name] = statistics.median(vals)
    cfg = asdict(config)
    cfg["sampling"] = asdict(config.sampling)
    cfg["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                      "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    return {"config": cfg, "policies": policies, "comparisons": comparisons, "by_category_tokens_per_s": by_category}


def format_table(doc: dict) -> str:
    lines = [f"{'policy':<24}{'tok/s(med)':>11}{'tok/step':>10}{'acc/step':>10}{'vs none':>9}  95% CI          p"]
    vs_none = {c["a"]: c for c in doc["comparisons"] if c["b"] == "none"}
    for name, p in doc["policies"].items():
        c = vs_none.get(name)
        extra = f"{c['speedup']:>8.2f}x  [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]  {c['p_value']:.3f}" if c else ""
        lines.append(f"{name:<24}{p['tokens_per_s']:>11.2f}{p['tokens_per_step']:>10.2f}{p['mean_accepted']:>10.2f}{extra}")
    return "\n".join(lines)


def run_bench(config: BenchConfig, prompts: list[Prompt], out: Path) -> dict:
    from tqdm import tqdm

    from ..local import LocalEngine
    from ..predictor import load_predictor
    from ..records import write_jsonl
    from ..text import encode_prompt

    engine = LocalEngine.load(config.draft, config.target, config.tier, config.dtype, device=config.device)
    engine.predictor = load_predictor(config.predictor)
    # the oracle prices steps with this machine's calibration (adaptive calibrates on its first request)
    oracle_cost = engine.calibrate().cost.base if ORACLE in config.policies else None
    live = [p for p in config.policies if p != ORACLE]
    encoded = [encode_prompt(engine.tokenizer, p.text, chat=True) for p in prompts]
    engine.generate(encoded[0], "fixed:2", 4, config.sampling)  # warm-up: first-call allocations, kernels
    runs: dict[str, list[dict]] = {name: [] for name in config.policies}
    out.parent.mkdir(parents=True, exist_ok=True)
    records_out = records_path(out)
    records_out.unlink(missing_ok=True)
    total = len(prompts) * len(live) * config.repeats
    with tqdm(total=total, desc=f"bench {config.tier}", file=sys.stderr) as bar:
        for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
            order = live[i % len(live):] + live[: i % len(live)]
            results: dict[str, list] = {name: [] for name in order}
            for _ in range(config.repeats):
                for name in order:
                    results[name].append(engine.generate(ids, name, config.max_new_tokens, config.sampling,
                                                         prompt_id=prompt.question_id, category=prompt.category))
                    bar.update(1)
            for name, rs in results.items():
                for r in rs:
                    write_jsonl(r.records, records_out, append=True)
                seconds = statistics.median(r.seconds for r in rs)
                r = rs[0]
                runs[name].append({
                    "question_id": prompt.question_id, "category": prompt.category, "new_tokens": r.new_tokens,
                    "seconds": seconds, "tokens_per_s": r.new_tokens / seconds,
                    "tokens_per_step": r.stats.tokens_per_step, "mean_accepted": r.stats.mean_accepted,
                    "steps": r.stats.steps, "token_ids": r.token_ids,
                    "gammas": [rec.gamma for rec in r.records], "accepted": [rec.accepted for rec in r.records],
                    "policy_us": [rec.policy_us for rec in r.records],
                    **({"estimates": r.stats.estimates} if r.stats.estimates else {}),
                })
            if oracle_cost is not None:
                runs[ORACLE].append(oracle_row(engine, ids, runs["none"][-1], oracle_cost))
            bar.set_postfix_str(f"{prompt.category}:{prompt.question_id}")
    doc = summarize(config, runs)
    doc["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.write_text(json.dumps(doc, indent=1))
    print(format_table(doc))
    print(f"results written to {out}, step records to {records_out}", file=sys.stderr)
    return doc


def markdown_report(doc: dict) -> str:
    """Markdown tables of a results document (comparisons recomputed from its per-prompt rows)."""
    runs = {name: p["per_prompt"] for name, p in doc["policies"].items()}
    comparisons = compare(runs)
    vs_none = {c["a"]: c for c in comparisons if c["b"] == "none"}
    vs_hf = {c["a"]: c for c in comparisons if c["b"] == "hf-assisted"}
    n = len(next(iter(runs.values())))
    cfg = doc["config"]
    cats = sorted({r["category"] for r in next(iter(runs.values()))})
    lines = [f"{n} prompts ({', '.join(cats)}), tier {cfg['tier']}, dtype {cfg['dtype']}, "
             f"max_new_tokens {cfg['max_new_tokens']}, temperature {cfg['sampling']['temperature']}.", "",
             "| policy | tokens/s (median) | tokens/step | accepted/step | vs none [95% CI] | p "
             "| vs hf-assisted [95% CI] | p | identical to none | first divergence |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda c: ((f"{c['speedup']:.2f}x [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]", f"{c['p_value']:.3f}")
                     if c else ("", ""))
    for name, p in doc["policies"].items():
        a, h = vs_none.get(name), vs_hf.get(name)
        if all("first_divergence_vs_none" in r for r in p["per_prompt"]):
            divs = [r["first_divergence_vs_none"] for r in p["per_prompt"]]
            first = min((d for d in divs if d is not None), default=None)
            identical = (f"{sum(d is None for d in divs)}/{n}", "" if first is None else str(first))
        else:  # no greedy `none` run to compare outputs with
            identical = ("n/a", "")
        lines.append(f"| {name} | {p['tokens_per_s']:.2f} | {p['tokens_per_step']:.2f} | {p['mean_accepted']:.2f} | "
                     f"{' | '.join(fmt(a))} | {' | '.join(fmt(h))} | {' | '.join(identical)} |")
    if "adaptive" in runs and len(runs) > 1:
        lines += ["", "adaptive against each policy (paired by prompt):", "", "| against | speedup [95% CI] | p |",
                  "|---|---|---|"]
        for name, rows in runs.items():
            if name != "adaptive":
                c = paired_speedup("adaptive", [r["tokens_per_s"] for r in runs["adaptive"]], name,
                                   [r["tokens_per_s"] for r in rows]).to_dict()
                lines.append(f"| {name} | {' | '.join(fmt(c))} |")
    lines += ["", "Median tokens/s per category:", "", "| category | " + " | ".join(runs) + " |",
              "|---|" + "---|" * len(runs)]
    for cat in cats:
        row = [statistics.median(r["tokens_per_s"] for r in rows if r["category"] == cat) for rows in runs.values()]
        lines.append(f"| {cat} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines)

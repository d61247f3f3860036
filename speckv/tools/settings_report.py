"""The issue-13 bar at every setting (scripts/settings_bench.sh): `adaptive` against `none`, the best fixed γ
1..8, `heuristic` and `hf-assisted`, replayed (greedy) or live (sampled), as one markdown table and the cost
curves plotted per setting.

Usage: python -m speckv.tools.settings_report RESULTS_DIR [RESULTS_DIR ...] DOCS_DIR

Several results folders (the same settings collected on different held-out prompts, each priced by the step
costs measured with it) are judged as one: each setting's per-prompt figures pooled, the best fixed γ and the
paired statistics taken over every prompt. Live runs (bench_*.json) are read from the first folder only.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

from .stats import paired_speedup

FIXED = [f"fixed:{g}" for g in range(1, 9)]
AT_LEAST = 0.97  # adaptive / (best fixed γ, none), geomean
ORACLE_AHEAD = 1.15  # where the oracle is this far ahead of the better of them, adaptive must beat both


def _tps(policy: dict) -> list[float]:
    return [r["tokens_per_s"] for r in policy["per_prompt"]]


def row(setting: str, policies: dict[str, dict], oracle: str | None) -> dict:
    """The bar's numbers for one setting from its per-prompt tokens/s."""
    geo = {n: p["tokens_per_s_geomean"] for n, p in policies.items()}
    best_fixed = max((n for n in FIXED if n in geo), key=geo.get)
    vs = {b: paired_speedup("adaptive", _tps(policies["adaptive"]), b, _tps(policies[b])).to_dict()
          for b in ("none", best_fixed, "heuristic", "hf-assisted") if b in policies}
    better = max(geo["none"], geo[best_fixed])
    oracle_ahead = geo[oracle] / better if oracle else None
    meets = vs["none"]["speedup"] >= AT_LEAST and vs[best_fixed]["speedup"] >= AT_LEAST
    if oracle_ahead is not None and oracle_ahead > ORACLE_AHEAD:
        meets = meets and all(vs[b]["speedup"] > 1 and vs[b]["p_value"] < 0.05 for b in ("none", best_fixed))
    return {"setting": setting, "prompts": len(_tps(policies["none"])), "best_fixed": best_fixed,
            "tokens_per_s": {n: geo[n] for n in ("none", best_fixed, "heuristic", "hf-assisted", "adaptive",
                                                 *([oracle] if oracle else [])) if n in geo},
            "adaptive_vs": vs, "oracle_over_better": oracle_ahead, "meets_bar": meets}


def _evaluations(folder: Path) -> Iterator[tuple[str, str, dict]]:
    """(setting, tier, its replay) for every evaluate_<setting>.json in a results folder."""
    for path in sorted(folder.glob("evaluate_*.json")):
        setting = path.stem.removeprefix("evaluate_")
        for tier, t in json.loads(path.read_text())["tiers"].items():
            yield setting, tier, t


def collect_rows(results: Path | list[Path]) -> tuple[list[dict], dict[str, dict]]:
    """The bar's rows: a replayed row per setting (pooled over the folders), a live row per bench of the first
    folder; and each setting's cost file (the first folder's that has one) for the plots."""
    folders = [results] if isinstance(results, Path) else list(results)
    pooled: dict[tuple[str, str], dict] = {}  # (setting, tier) -> its policies, prompts of every folder
    for folder in folders:
        for setting, tier, t in _evaluations(folder):
            entry = pooled.setdefault((setting, tier), {"policies": {}, "cost_model": t["cost_model"]})
            for name, policy in t["policies"].items():
                entry["policies"].setdefault(name, {"per_prompt": []})["per_prompt"] += policy["per_prompt"]
    costs: dict[str, dict] = {}
    for setting in dict.fromkeys(s for s, _ in pooled):
        found = [c for folder in folders for c in sorted((folder / f"collect_{setting}").glob("cost_*.json"))]
        if found:
            costs[setting] = json.loads(found[0].read_text())
    rows = []
    for (setting, _), entry in pooled.items():
        for policy in entry["policies"].values():
            policy["tokens_per_s_geomean"] = statistics.geometric_mean(_tps(policy))
        rows.append({**row(f"{setting} greedy (replayed)", entry["policies"], "oracle"),
                     "cost_model": entry["cost_model"]})
    for path in sorted(folders[0].glob("bench_*.json")):
        doc = json.loads(path.read_text())
        cfg = doc["config"]
        label = f"{cfg['tier']} ({cfg['dtype']}) temperature {cfg['sampling']['temperature']} (live)"
        rows.append(row(label, doc["policies"], None))
    return rows, costs


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | n | none | best fixed | heuristic | hf-assisted | adaptive | adaptive / none [95% CI], p | "
             "adaptive / best fixed [95% CI], p | oracle / better | bar |", "|" + "---|" * 11]
    for r in rows:
        t, vs = r["tokens_per_s"], r["adaptive_vs"]

        def cell(b: str) -> str:
            c = vs[b]
            return f"{c['speedup']:.3f}x [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}], {c['p_value']:.3f}"

        oracle = f"{r['oracle_over_better']:.3f}" if r["oracle_over_better"] else "n/a"
        best = f"{r['best_fixed']} {t[r['best_fixed']]:.2f}"
        lines.append(f"| {r['setting']} | {r['prompts']} | {t['none']:.2f} | {best} | "
                     f"{t.get('heuristic', float('nan')):.2f} | {t.get('hf-assisted', float('nan')):.2f} | "
                     f"{t['adaptive']:.2f} | {cell('none')} | {cell(r['best_fixed'])} | {oracle} | "
                     f"{'met' if r['meets_bar'] else 'missed'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    from .plots import cost_curves

    if len(argv) < 2:
        print("usage: python -m speckv.tools.settings_report RESULTS_DIR [RESULTS_DIR ...] DOCS_DIR", file=sys.stderr)
        return 2
    *results, docs = (Path(a) for a in argv)
    missing = [str(r) for r in results if not any(r.glob("evaluate_*.json")) and not any(r.glob("bench_*.json"))]
    if missing:
        print(f"no evaluate_*.json or bench_*.json in {', '.join(missing)}", file=sys.stderr)
        return 2
    rows, costs = collect_rows(results)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "settings.json").write_text(json.dumps(rows, indent=1))
    (docs / "settings.md").write_text(markdown(rows))
    if costs:
        cost_curves(costs, docs)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One policy against another over the prompts of several `speckv bench` results files, paired within each file
(both policies ran the prompt in the same run): the geometric mean of the per-prompt ratios, a 95% bootstrap CI
and a sign-flip p (speckv.tools.stats.paired_speedup). For live runs too small to judge alone (6 prompts each).

Usage: python scripts/pool_bench.py A.json B.json ... [--policy adaptive] [--against none] [--out pooled.json]

With `--against-files A0.json B0.json ...` (one per file, same prompts) the `against` policy is read from those
instead: one code against another over runs made one after the other (the pairs then carry the drift between
runs as well as the prompts').
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speckv.tools.stats import paired_speedup


def _runs(f: Path, *policies: str) -> dict:
    """The file's runs by policy, which must hold `policies`."""
    runs = json.loads(f.read_text())["policies"]
    missing = [p for p in policies if p not in runs]
    if missing:
        raise SystemExit(f"{f}: needs policies {', '.join(map(repr, missing))}, has {', '.join(runs)}")
    return runs


def paired(files: list[Path], policy: str, against: str,
           against_files: list[Path] | None = None) -> tuple[list[float], list[float], list[str]]:
    """Per-prompt tokens/s of `policy` and `against`, paired within each file (or with the same prompt of the
    matching file of `against_files`); labels `file:question_id`."""
    a, b, labels = [], [], []
    for i, f in enumerate(files):
        runs = _runs(f, policy) if against_files else _runs(f, policy, against)  # each file read once
        base_runs = _runs(against_files[i], against) if against_files else runs
        base = {p["question_id"]: p["tokens_per_s"] for p in base_runs[against]["per_prompt"]}
        for p in runs[policy]["per_prompt"]:
            if p["question_id"] in base:
                a.append(p["tokens_per_s"])
                b.append(base[p["question_id"]])
                labels.append(f"{f.stem}:{p['question_id']}")
    return a, b, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--policy", default="adaptive")
    ap.add_argument("--against", default="none")
    ap.add_argument("--against-files", nargs="+", type=Path, help="read `against` from these, one per file")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.against_files and len(args.against_files) != len(args.files):
        raise SystemExit("--against-files needs one file per file")
    a, b, labels = paired(args.files, args.policy, args.against, args.against_files)
    result = paired_speedup(args.policy, a, args.against, b).to_dict()
    result["prompts"] = {label: x / y for label, x, y in zip(labels, a, b)}
    print(f"{args.policy} / {args.against} over {len(a)} prompts in {len(args.files)} files: "
          f"{result['speedup']:.3f}x [{result['ci95'][0]:.2f}, {result['ci95'][1]:.2f}], p = {result['p_value']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"files": [str(f) for f in args.files],
                                        "against_files": [str(f) for f in args.against_files or []], **result},
                                       indent=1))
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()

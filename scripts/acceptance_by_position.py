"""Acceptance by position in the run, from `speckv bench` JSON: for each policy, the share of drafted tokens at
position k that were accepted, given the k-1 before them were (the conditional acceptance `adaptive`'s
predictor gives per position), and how many such events each position had.

Why: `adaptive` learns one log-odds bias over all its acceptance events; where the first drafted token of a
step is accepted much less often than the ones after it, and most events are first tokens, one bias fitted
to them lowers what it expects of the later ones, and its runs end sooner.

    python scripts/acceptance_by_position.py docs/results/avx2/bench_nf4_t07.json \\
        --out docs/results/avx2/acceptance_by_position_nf4_t07.json
"""

from __future__ import annotations

import argparse
import json


def by_position(gammas: list[int], accepted: list[int]) -> dict[int, tuple[int, int]]:
    """{k: (tokens drafted at position k whose k-1 predecessors were accepted, of those accepted)}."""
    out: dict[int, tuple[int, int]] = {}
    for gamma, acc in zip(gammas, accepted):
        for k in range(1, min(gamma, acc + 1) + 1):
            n, y = out.get(k, (0, 0))
            out[k] = (n + 1, y + (acc >= k))
    return dict(sorted(out.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", help="a `speckv bench` JSON (rows keep each step's γ and accepted count)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with open(args.bench) as f:
        policies = json.load(f)["policies"]
    report = {}
    for name, p in policies.items():
        gammas = [g for row in p["per_prompt"] for g in row.get("gammas", [])]
        accepted = [a for row in p["per_prompt"] for a in row.get("accepted", [])]
        if not any(gammas) or len(accepted) != len(gammas):
            continue
        table = by_position(gammas, accepted)
        events = sum(n for n, _ in table.values())
        report[name] = {"events": events, "first_token_share": table[1][0] / events,
                        "positions": {k: {"events": n, "accepted": y / n} for k, (n, y) in table.items()}}
        cells = "  ".join(f"{k}: {y / n:.2f} ({n})" for k, (n, y) in table.items() if k <= 8)
        print(f"{name:<10} {events:>4} events, {table[1][0] / events:.0%} first tokens   {cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bench": args.bench, "policies": report}, f, indent=1)


if __name__ == "__main__":
    main()

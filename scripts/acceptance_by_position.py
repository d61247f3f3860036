"""Acceptance by position in the run, from `speckv bench` output: for each policy, the share of drafted tokens at
position k that were accepted, given the k-1 before them were (the conditional acceptance `adaptive`'s
predictor gives per position), and how many such events each position had.

With the bench's step records (`<out>.records.jsonl`, written beside its JSON), it also rebuilds the shipped
predictor's prior for every drafted token (its conditional acceptance at that position, from the step's
features: speckv.tools.training.live_states' reading of the records) and fits the log-odds shift that best
corrects it, once over all events (what `adaptive` learns) and apart for the first drafted token of a step and
for the continuation.

Why: `adaptive` learned one log-odds bias over all its acceptance events; where the first drafted token of a
step is accepted much less often than the predictor expects and the later ones more, one bias fitted to both
lowers what it expects of the later ones, and its runs end sooner.

    python scripts/acceptance_by_position.py docs/results/avx2/bench_nf4_t07.json \\
        --out docs/results/avx2/acceptance_by_position_nf4_t07.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar


def by_position(gammas: list[int], accepted: list[int]) -> dict[int, tuple[int, int]]:
    """{k: (tokens drafted at position k whose k-1 predecessors were accepted, of those accepted)}."""
    out: dict[int, tuple[int, int]] = {}
    for gamma, acc in zip(gammas, accepted):
        for k in range(1, min(gamma, acc + 1) + 1):
            n, y = out.get(k, (0, 0))
            out[k] = (n + 1, y + (acc >= k))
    return dict(sorted(out.items()))


def prior_events(records: list, predictor) -> dict[str, list[tuple[int, float, bool]]]:
    """Per policy: (position k, the predictor's P(token k accepted | k-1 were), accepted) for every drafted token
    whose predecessors were accepted; positions beyond γmax take the prior of γmax."""
    from speckv.predictor import features
    from speckv.tools.training import request_contexts

    out: dict[str, list[tuple[int, float, bool]]] = {}
    for r, context in request_contexts(records):
        if r.gamma > 0:
            probs = predictor.acceptance_probs(np.array([features(context, r.tier)]))[0]  # P(first k accepted)
            cond = probs / np.concatenate([[1.0], probs[:-1]])
            for k in range(1, min(r.gamma, r.accepted + 1) + 1):
                out.setdefault(r.policy, []).append((k, float(cond[min(k, len(cond)) - 1]), r.accepted >= k))
    return out


def best_shift(priors: np.ndarray, outcomes: np.ndarray) -> float:
    """The log-odds shift c minimising the log loss of sigmoid(logit(prior) + c) on the outcomes."""
    z = np.log(np.clip(priors, 1e-6, 1 - 1e-6) / np.clip(1 - priors, 1e-6, 1))

    def loss(c: float) -> float:
        q = np.clip(1.0 / (1.0 + np.exp(-(z + c))), 1e-9, 1 - 1e-9)
        return float(-np.mean(outcomes * np.log(q) + (1 - outcomes) * np.log(1 - q)))

    return float(minimize_scalar(loss, bounds=(-6, 6), method="bounded").x)


def prior_report(events: list[tuple[int, float, bool]]) -> dict:
    """Observed against predicted by position, and the best shift over all events, the first and the rest."""
    k = np.array([e[0] for e in events])
    p = np.array([e[1] for e in events])
    y = np.array([e[2] for e in events], dtype=float)
    positions = {int(j): {"events": int((k == j).sum()), "accepted": float(y[k == j].mean()),
                          "predicted": float(p[k == j].mean())} for j in sorted(set(k.tolist()))}
    first, rest = k == 1, k > 1
    return {"positions": positions, "shift_all": best_shift(p, y),
            "shift_first": best_shift(p[first], y[first]) if first.any() else None,
            "shift_rest": best_shift(p[rest], y[rest]) if rest.any() else None}


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

    from speckv.tools.bench import records_path
    records_file = records_path(Path(args.bench))
    if records_file.exists():
        from speckv.predictor import shipped_predictor
        from speckv.records import read_jsonl

        print("\nthe shipped predictor's prior against what happened (accepted / predicted by position), and the "
              "log-odds shift that fits all events, the first drafted token, the rest:")
        for name, events in prior_events(list(read_jsonl(records_file)), shipped_predictor()).items():
            r = prior_report(events)
            report.setdefault(name, {})["prior"] = r
            cells = "  ".join(f"{k}: {c['accepted']:.2f}/{c['predicted']:.2f}" for k, c in r["positions"].items()
                              if k <= 6)
            shifts = "  ".join(f"{part} {r[f'shift_{part}']:+.2f}" for part in ("all", "first", "rest")
                               if r[f"shift_{part}"] is not None)
            print(f"{name:<10} {cells}   shift: {shifts}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bench": args.bench, "policies": report}, f, indent=1)


if __name__ == "__main__":
    main()

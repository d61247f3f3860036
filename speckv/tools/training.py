"""Training the acceptance predictor from step records and evaluating `adaptive` by replay (speckv.predictor
holds the model itself, speckv.adaptive the policy).

Data. Traces (policy `trace:γmax` records, speckv.tools.replay) give, at every output position, how many of a
γmax-token draft run the target accepts. Features depend on what the policy did before (the previous
step's signals), so training states come from replaying behaviour policies over each trace (uniformly
random γ, fixed γ, the heuristic): at each visited step the features seen and the label A = accept_len at
that position, from which acceptance_probs targets are 1[A ≥ k], k = 1..γmax (masked past the end of the
output). Live engine records (any other policy) add states too, censored at the γ they drafted.

Split. Prompts are assigned to train or test by a hash of their id (`split_of`), so held-out evaluation
never sees a prompt the controller was trained on, at any tier.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adaptive import AdaptivePolicy
from ..cost_model import CostModel
from ..estimates import TierEstimates
from ..policy import (
    HF_ASSISTED_TOKENS,
    MAX_GAMMA,
    HeuristicGamma,
    RequestProgress,
    StepContext,
    StepOutcome,
    hf_assisted_defaults,
)
from ..predictor import FEATURES, AcceptancePredictor, features
from ..records import StepRecord, read_jsonl
from ..signals import NO_STOP, TOKEN_ACCEPTANCE_FEATURES, DraftSignals, token_acceptance_features
from .costs import cost_file_model
from .replay import Trace, fixed, oracle, replay, resize, stop_oracle, traces_from_records
from .stats import paired_speedup

RAW_SIGNALS = ("prev_mean_confidence", "prev_min_confidence", "prev_last_confidence", "prev_mean_entropy",
               "prev_max_entropy")  # the single draft signals the learned predictor is compared against
TEST_FRACTION_MOD = 3  # one prompt in three (by id hash) is held out


def split_of(prompt_id: str) -> str:
    """'test' for about one prompt id in three (stable across runs and tiers), else 'train'."""
    return "test" if int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16) % TEST_FRACTION_MOD == 0 else "train"


@dataclass
class Dataset:
    x: np.ndarray  # [N, F] features
    accept: np.ndarray  # [N] accepted run length A (a lower bound where censored)
    mask: np.ndarray  # [N, γmax] 1 where the label 1[A ≥ k] is known
    gamma: np.ndarray  # [N] γ the behaviour policy drafted at that state (0 = none)

    @property
    def labels(self) -> np.ndarray:
        k = np.arange(1, self.mask.shape[1] + 1)
        return (self.accept[:, None] >= k[None, :]).astype(np.float32)

    @classmethod
    def concat(cls, parts: list[Dataset]) -> Dataset:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("x", "accept", "mask", "gamma")))


class RandomGamma:
    """Behaviour policy for exploration: γ uniform in 0..γmax."""

    name = "random"
    draft_stop = NO_STOP

    def __init__(self, rng: np.random.Generator, gamma_max: int) -> None:
        self.rng, self.gamma_max = rng, gamma_max

    def choose(self, context: StepContext) -> int:
        return int(self.rng.integers(0, self.gamma_max + 1))

    def observe(self, outcome: StepOutcome) -> None:
        pass


class Recorder:
    """Wraps a policy and keeps the features and position of every decision it makes."""

    def __init__(self, inner, tier: str) -> None:
        self.inner, self.tier = inner, tier
        self.name = inner.name
        self.rows: list[tuple[list[float], int]] = []

    @property
    def draft_stop(self):
        return self.inner.draft_stop

    def choose(self, context: StepContext) -> int:
        self.rows.append((features(context, self.tier), context.position))
        return self.inner.choose(context)

    def observe(self, outcome: StepOutcome) -> None:
        self.inner.observe(outcome)


def behaviour_policies(rng: np.random.Generator, gamma_max: int, random_runs: int = 3) -> list:
    return ([RandomGamma(rng, gamma_max) for _ in range(random_runs)] + [fixed(g) for g in (1, 2, 4, gamma_max)]
            + [HeuristicGamma()])


def trace_states(trace: Trace, tier: str, rng: np.random.Generator, gamma_max: int) -> Dataset:
    """Training states from replaying the behaviour policies over one trace."""
    cost = CostModel(1.0, 1.0, 0.0)  # time is irrelevant here; only the visited states matter
    xs, accept, mask, gammas = [], [], [], []
    k = np.arange(1, gamma_max + 1)
    for behaviour in behaviour_policies(rng, gamma_max):
        rec = Recorder(behaviour, tier)
        result = replay(trace, rec, cost)
        for (x, p), g in zip(rec.rows, result.gammas):
            xs.append(x)
            accept.append(min(int(trace.accept_len[p]), gamma_max))
            mask.append((k <= trace.n - p - 1).astype(np.float32))  # no run can outlast the output
            gammas.append(g)
    return Dataset(np.asarray(xs, dtype=np.float32), np.asarray(accept), np.asarray(mask, dtype=np.float32),
                   np.asarray(gammas))


def request_contexts(records: list[StepRecord]) -> Iterator[tuple[StepRecord, StepContext]]:
    """Each record with the StepContext its policy was shown, rebuilt request by request in step order."""
    by_request: dict[str, list[StepRecord]] = {}
    for r in records:
        by_request.setdefault(r.request_id, []).append(r)
    for rows in by_request.values():
        rows.sort(key=lambda r: r.step)
        progress = RequestProgress()
        for r in rows:
            yield r, progress.context(r.step, r.position, r.context_len)
            progress.advance(DraftSignals(r.chosen_prob, r.confidence, r.entropy), r.accepted)


def live_states(records: list[StepRecord], gamma_max: int) -> Dataset | None:
    """Training states from live engine runs (non-trace records with γ > 0), labels censored at γ."""
    xs, accept, mask, gammas = [], [], [], []
    k = np.arange(1, gamma_max + 1)
    for r, context in request_contexts([r for r in records if not r.policy.startswith("trace:")]):
        if r.gamma > 0:
            xs.append(features(context, r.tier))
            accept.append(min(r.accepted, gamma_max))
            known = k <= r.gamma if r.accepted == r.gamma else np.ones(gamma_max, dtype=bool)
            mask.append(known.astype(np.float32))
            gammas.append(r.gamma)
    if not xs:
        return None
    return Dataset(np.asarray(xs, dtype=np.float32), np.asarray(accept), np.asarray(mask, dtype=np.float32),
                   np.asarray(gammas))


def fit_mlp(data: Dataset, hidden: int = 32, epochs: int = 600, seed: int = 0, weight_decay: float = 1e-4) -> dict:
    """Masked binary cross-entropy on 1[A ≥ k]; full-batch Adam. Returns numpy weights and normalisation."""
    import torch

    torch.manual_seed(seed)
    mean = data.x.mean(0)
    std = data.x.std(0)
    std[std < 1e-6] = 1.0
    x = torch.tensor((data.x - mean) / std, dtype=torch.float32)
    y = torch.tensor(data.labels)
    m = torch.tensor(data.mask)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, y.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(net(x), y, reduction="none") * m).sum() / m.sum()
        loss.backward()
        opt.step()
    w1, w2 = net[0].weight.detach().numpy().T.copy(), net[2].weight.detach().numpy().T.copy()
    return {"w1": w1, "b1": net[0].bias.detach().numpy().copy(), "w2": w2, "b2": net[2].bias.detach().numpy().copy(),
            "feature_mean": mean.astype(np.float32), "feature_std": std.astype(np.float32), "loss": float(loss.item())}


def acceptance_correlation(artifact: AcceptancePredictor, data: Dataset) -> dict:
    """On states where something was drafted: predicted vs actual acceptance rate of the drafted γ, and the
    best single feature's |correlation| with the actual rate (the raw-signal baseline)."""
    keep = data.gamma > 0
    if keep.sum() < 3:
        return {"test_corr": None, "raw_corr": None, "raw_best_feature": None, "n": int(keep.sum())}
    x, g, a = data.x[keep], data.gamma[keep], data.accept[keep]
    probs = artifact.acceptance_probs(x)
    cum = np.cumsum(probs, axis=1)
    predicted = cum[np.arange(len(g)), g - 1] / g
    actual = np.minimum(a, g) / g
    test_corr = float(np.corrcoef(predicted, actual)[0, 1])
    raw = {}
    for i, name in enumerate(FEATURES):
        if name not in RAW_SIGNALS:
            continue
        col = x[:, i]
        if col.std() > 1e-9:
            raw[name] = abs(float(np.corrcoef(col, actual)[0, 1]))
    best = max(raw, key=raw.get)
    return {"test_corr": test_corr, "raw_corr": raw[best], "raw_best_feature": best, "n": int(keep.sum()),
            "predicted": predicted.tolist(), "actual": actual.tolist()}


def load_collection(records_paths: list[Path]) -> tuple[list[StepRecord], dict[str, CostModel]]:
    """Records from files (or directories of records_*.jsonl) and the cost_<tier>.json models beside them."""
    records, costs = [], {}
    for path in records_paths:
        files = sorted(path.glob("records_*.jsonl")) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"no records_*.jsonl files in {path}")
        for f in files:
            if not f.is_file():
                raise ValueError(f"records file {f} does not exist")
            records += list(read_jsonl(f))
        for cost_file in sorted(files[0].parent.glob("cost_*.json")):  # the cost models beside the records
            tier = cost_file.stem.removeprefix("cost_")
            try:
                costs[tier] = cost_file_model(json.loads(cost_file.read_text()))
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"cannot read cost model {cost_file}: {e}") from None
    if not records:
        raise ValueError("the records are empty")
    return records, costs


def traces_by_split(records: list[StepRecord]) -> dict[str, dict[tuple[str, str], Trace]]:
    traces = traces_from_records(records)
    return {s: {k: t for k, t in traces.items() if split_of(t.prompt_id) == s} for s in ("train", "test")}


def token_acceptance_rows(traces: list[Trace]) -> tuple[np.ndarray, np.ndarray]:
    """Per drafted token whose predecessors in its run were all accepted: TOKEN_ACCEPTANCE_FEATURES and
    whether it was accepted. [N, 3] and [N]."""
    xs, ys = [], []
    for t in traces:
        for p in range(t.n):
            a = int(t.accept_len[p])
            for j in range(min(a + 1, t.gamma_max, t.n - p - 1)):  # a + 1: the first rejected token too
                xs.append(token_acceptance_features(float(t.confidence[p, j]), float(t.entropy[p, j]), j))
                ys.append(float(a > j))
    return np.asarray(xs, dtype=np.float64).reshape(-1, len(TOKEN_ACCEPTANCE_FEATURES)), np.asarray(ys)


def fit_logistic(design: np.ndarray, labels: np.ndarray, l2: float, penalised: np.ndarray,
                 maxiter: int = 15000) -> np.ndarray:
    """Logistic regression by L-BFGS: the weights minimising log loss + l2/2 · |w[penalised]|². `design`
    [N, F] carries its own bias column; `penalised` [F] bool marks the weights the penalty applies to."""
    from scipy.optimize import minimize

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = design @ w
        nll = np.logaddexp(0.0, z) - labels * z
        grad = design.T @ (1.0 / (1.0 + np.exp(-z)) - labels)
        shrunk = w[penalised]
        return float(nll.sum() + 0.5 * l2 * shrunk @ shrunk), grad + l2 * np.where(penalised, w, 0.0)

    return minimize(loss, np.zeros(design.shape[1]), jac=True, method="L-BFGS-B", options={"maxiter": maxiter}).x


def fit_token_acceptance(x: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    """Logistic regression (a small L2 penalty, none on the bias) for DraftStop.token_weights: weights, then bias."""
    if len(y) == 0 or y.min() == y.max():
        raise ValueError("token acceptance needs both accepted and rejected draft tokens in the traces")
    design = np.hstack([x, np.ones((len(x), 1))])
    w = fit_logistic(design, y, 1e-3, np.arange(design.shape[1]) < x.shape[1])
    return tuple(float(v) for v in w)


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes."""
    from scipy.stats import rankdata

    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train(records_paths: list[Path], out: Path | None, hidden: int = 32, epochs: int = 600, seed: int = 0,
          gamma_max: int | None = None) -> tuple[AcceptancePredictor, dict]:
    """Train on the train split of the records; evaluate acceptance prediction on the test split."""
    records, costs = load_collection(records_paths)
    splits = traces_by_split(records)
    all_traces = {**splits["train"], **splits["test"]}
    if not all_traces:
        raise ValueError("the records hold no traces (policy trace:N); run `speckv collect` first")
    gmax = gamma_max or min(t.gamma_max for t in all_traces.values())
    rng = np.random.default_rng(seed)

    def states(split: str) -> Dataset:
        parts = [trace_states(resize(t, gmax), tier, rng, gmax) for (tier, _), t in sorted(splits[split].items())]
        live = live_states([r for r in records if split_of(r.prompt_id or r.request_id) == split], gmax)
        return Dataset.concat(parts + ([live] if live is not None else []))

    if not splits["train"]:
        raise ValueError("every trace in the records falls in the held-out test split; collect more prompts")
    train_data = states("train")
    test_data = states("test") if splits["test"] else None
    weights = fit_mlp(train_data, hidden, epochs, seed)
    loss = weights.pop("loss")
    token_x, token_y = token_acceptance_rows(list(splits["train"].values()))
    token_weights = fit_token_acceptance(token_x, token_y)
    artifact = AcceptancePredictor(**weights, token_weights=token_weights)
    corr = acceptance_correlation(artifact, test_data) if test_data is not None else {}
    token_x, token_y = token_acceptance_rows(list(splits["test"].values()))
    token_auc = {  # held out; the AUC needs only the logistic model's linear score
        "token_auc": auc(token_x @ np.asarray(token_weights[:-1]), token_y) if len(token_y) else None,
        "token_auc_confidence": auc(token_x[:, 0], token_y) if len(token_y) else None,
        "token_weights": list(token_weights),
    }
    summary = {
        "train_states": len(train_data.x), "test_states": len(test_data.x) if test_data is not None else 0,
        "train_prompts": sorted({k[1] for k in splits["train"]}),
        "test_prompts": sorted({k[1] for k in splits["test"]}),
        "train_loss": loss, "hidden": hidden, "epochs": epochs, "seed": seed,
        **{k: v for k, v in corr.items() if k not in ("predicted", "actual")}, **token_auc,
    }
    artifact.metadata = {"training": summary, "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if out is not None:
        artifact.save(out)
    return artifact, {**summary, "version": artifact.version(),
                      "_corr_points": {"predicted": corr.get("predicted", []), "actual": corr.get("actual", [])}}


def evaluate(artifact: AcceptancePredictor, traces: dict[tuple[str, str], Trace], costs: dict[str, CostModel],
             learning: bool = True) -> dict:
    """Replay every policy over held-out traces, per tier: tokens/s under the tier's cost model (`costs`,
    measured where the traces were collected), tokens/step, paired statistics for adaptive against the best
    fixed γ in hindsight and against none; the oracle. Adaptive starts from that cost model as its
    calibration and learns online as it goes (`learning` False: it does not), one estimate per tier across
    the tier's prompts, as a server would.

    Fixed γ and the oracle span the longest run the controller may draft (twice its MLP's γmax), so
    adaptive is never judged against baselines held to shorter runs than it may use; `hf-assisted` is
    transformers' default drafting policy replayed (runs of up to 20 tokens, ended below confidence 0.4:
    speckv.policy.hf_assisted_defaults)."""
    span = min(2 * artifact.gamma_max, MAX_GAMMA)
    out: dict = {"tiers": {}, "span": span}
    for tier in sorted({t for t, _ in traces}):
        if tier not in costs:
            continue
        cost = costs[tier]
        estimates = TierEstimates.calibrated(cost, learning)
        tier_traces = [resize(t, max(span, HF_ASSISTED_TOKENS)) for (tr, _), t in sorted(traces.items()) if tr == tier]
        policies = {"none": lambda: fixed(0), **{f"fixed:{g}": (lambda g=g: fixed(g)) for g in range(1, span + 1)},
                    "heuristic": HeuristicGamma, "hf-assisted": hf_assisted_defaults,
                    "adaptive": lambda tier=tier, e=estimates: AdaptivePolicy(artifact, tier, e)}
        rows: dict[str, list[dict]] = {}
        decision_us: list[float] = []
        for name, make in policies.items():
            for t in tier_traces:
                r = replay(t, make(), cost)
                if name == "adaptive":
                    decision_us += r.decision_us
                rows.setdefault(name, []).append(_row(t, r))
        spanned = [resize(t, span) for t in tier_traces]
        rows["stop-oracle"] = [_row(t, stop_oracle(t, cost)) for t in spanned]
        rows["oracle"] = [_row(t, oracle(t, cost)) for t in spanned]
        fixed_names = [f"fixed:{g}" for g in range(1, span + 1)]
        best_fixed = max(fixed_names, key=lambda n: statistics.geometric_mean([r["tokens_per_s"] for r in rows[n]]))
        tps = {n: [r["tokens_per_s"] for r in rs] for n, rs in rows.items()}
        comparisons = [paired_speedup("adaptive", tps["adaptive"], b, tps[b]).to_dict()
                       for b in ("none", best_fixed, "heuristic", "hf-assisted", "oracle")]
        out["tiers"][tier] = {
            "cost_model": cost.to_dict(), "prompts": len(tier_traces), "best_fixed": best_fixed,
            "policies": {n: {"tokens_per_s_median": statistics.median(tps[n]),
                             "tokens_per_s_geomean": statistics.geometric_mean(tps[n]),
                             "tokens_per_step": statistics.mean(r["tokens_per_step"] for r in rs),
                             "per_prompt": rs} for n, rs in rows.items()},
            "comparisons": comparisons,
            "adaptive_vs_oracle": statistics.geometric_mean(a / o for a, o in zip(tps["adaptive"], tps["oracle"])),
            "stop_oracle_vs_oracle": statistics.geometric_mean(
                a / o for a, o in zip(tps["stop-oracle"], tps["oracle"])),
            "decision_us": {"p50": float(np.percentile(decision_us, 50)), "p99": float(np.percentile(decision_us, 99)),
                            "n": len(decision_us)},
        }
    return out


def _row(trace: Trace, r) -> dict:
    return {"prompt_id": trace.prompt_id, "category": trace.category, "tokens": r.tokens, "steps": r.steps,
            "ms": r.ms, "tokens_per_s": r.tokens_per_s, "tokens_per_step": r.tokens_per_step, "gammas": r.gammas}


# --- the SpecKV paper's released records -----------------------------------------------------------------

PAPER_SIGNALS = ("mean_draft_entropy", "mean_draft_confidence", "max_draft_entropy", "min_draft_confidence")
PAPER_COLUMNS = ("compression", "gamma", "task", "step", "accepted", "acceptance_rate", "tokens_produced",
                 *PAPER_SIGNALS)


def train_paper(csv_path: Path, hidden: int = 16, epochs: int = 2000, seed: int = 0,
                test_fraction: float = 0.2) -> dict:
    """The paper's setting: predict a step's acceptance rate from that step's own draft signals, γ and the
    compression tier (phase2_step_results.csv), on a seeded random 80/20 split; and its policy comparison
    in its own metric (tokens per step), choosing γ ∈ {2,4,6,8} per (tier, task, step) from the predictions."""
    rows, x, y = _paper_rows(csv_path)
    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = round(len(rows) * test_fraction)
    test, train_idx = order[:n_test], order[n_test:]
    pred = _fit_paper_mlp(x, y, train_idx, hidden, epochs, seed)
    test_corr = float(np.corrcoef(pred[test], y[test])[0, 1])
    raw = {s: abs(float(np.corrcoef(x[test, i], y[test])[0, 1])) for i, s in enumerate(PAPER_SIGNALS)}
    best_raw = max(raw, key=raw.get)
    policy, groups = _paper_policies(rows, pred, set(test.tolist()))
    return {"format": "speckv-paper", "records": len(rows), "test_records": int(n_test), "test_corr": test_corr,
            "raw_corr": raw[best_raw], "raw_best_signal": best_raw, "raw_corr_by_signal": raw,
            "test_mse": float(np.mean((pred[test] - y[test]) ** 2)), "hidden": hidden, "seed": seed,
            "policy_tokens_per_step": policy, "policy_groups": groups,
            "note": ("features are the step's own draft signals (known after drafting, before verifying), as in "
                     "the paper; tokens/step ignores the cost of drafting")}


def _paper_rows(csv_path: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """The CSV's rows, their features (signals, γ/8, tier one-hot) and acceptance rates. Raises ValueError."""
    import csv

    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ValueError(f"cannot read {csv_path}: {e}") from None
    if not rows or any(c not in rows[0] for c in PAPER_COLUMNS):
        raise ValueError(f"{csv_path} lacks the paper's columns {', '.join(PAPER_COLUMNS)}")
    tiers = sorted({r["compression"] for r in rows})
    try:
        x = np.array([[float(r[s]) for s in PAPER_SIGNALS] + [float(r["gamma"]) / 8]
                      + [float(r["compression"] == t) for t in tiers] for r in rows], dtype=np.float32)
        y = np.array([float(r["acceptance_rate"]) for r in rows], dtype=np.float32)
    except ValueError as e:
        raise ValueError(f"{csv_path}: non-numeric value: {e}") from None
    return rows, x, y


def _fit_paper_mlp(x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, hidden: int, epochs: int,
                   seed: int) -> np.ndarray:
    """The paper's MLP (sigmoid output, MSE) fitted on the train rows; its predictions for every row."""
    import torch

    mean, std = x[train_idx].mean(0), x[train_idx].std(0)
    std[std < 1e-6] = 1.0
    xt, yt = torch.tensor((x - mean) / std), torch.tensor(y)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    tr = torch.tensor(train_idx)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(torch.sigmoid(net(xt[tr])).squeeze(-1), yt[tr])
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.sigmoid(net(xt)).squeeze(-1).numpy()


def _paper_policies(rows: list[dict], pred: np.ndarray, test_set: set[int]) -> tuple[dict[str, float], int]:
    """Tokens/step of fixed γ, γ by predicted accepted tokens and the per-step oracle, on test-split
    (tier, task, step) groups that have every γ; and how many groups that is."""
    groups: dict[tuple, dict[int, int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["compression"], r["task"], r["step"]), {})[int(r["gamma"])] = i
    gammas = sorted({int(r["gamma"]) for r in rows})
    complete = [g for g in groups.values() if set(g) == set(gammas) and any(i in test_set for i in g.values())]
    produced = lambda i: float(rows[i]["tokens_produced"])
    policy = {f"fixed:{g}": statistics.mean(produced(grp[g]) for grp in complete) for g in gammas}
    policy["mlp (γ by predicted accepted tokens)"] = statistics.mean(
        produced(grp[max(grp, key=lambda g: pred[grp[g]] * g)]) for grp in complete)
    policy["per-step oracle"] = statistics.mean(max(produced(i) for i in grp.values()) for grp in complete)
    return policy, len(complete)


def _curve_text(cost: dict) -> str:
    """The verify curve a replay priced γ by, where the cost model holds one (" (the line); priced by the curve
    measured at context C: γ 0 ms, γ 1 ms, ..."), else nothing."""
    curve = cost.get("verify_curve")
    if not curve:
        return ""
    return f" (the line); priced by the curve measured at context {cost['curve_context_len']}: " + ", ".join(
        f"γ {g} {ms:.0f}" for g, ms in enumerate(curve))


def evaluation_markdown(doc: dict) -> str:
    """Markdown tables of a `speckv evaluate` document: per tier, every policy, and the paired comparisons."""
    from .stats import paired_speedup

    lines = []
    for tier, t in doc["tiers"].items():
        pol = t["policies"]
        base = [r["tokens_per_s"] for r in pol["none"]["per_prompt"]]
        cats = sorted({r["category"] for r in pol["none"]["per_prompt"]})
        lines += [f"#### {tier}: {t['prompts']} held-out prompts ({', '.join(cats)})", "",
                  f"Cost model (ms): draft {t['cost_model']['draft_ms_per_token']:.1f}/token; verify "
                  f"{t['cost_model']['verify_ms_base']:.0f} + {t['cost_model']['verify_ms_per_token']:.1f}·γ "
                  f"+ {t['cost_model']['verify_ms_per_context_token']:.3f}·context{_curve_text(t['cost_model'])}. "
                  f"Best fixed γ in hindsight: "
                  f"{t['best_fixed']}. Decision overhead: p50 {t['decision_us']['p50']:.1f} µs, "
                  f"p99 {t['decision_us']['p99']:.1f} µs ({t['decision_us']['n']} decisions). Fixed γ, adaptive "
                  f"and the oracles: runs of up to {doc.get('span', '?')} tokens; hf-assisted: up to "
                  f"{HF_ASSISTED_TOKENS}.", "",
                  "| policy | tokens/s (geomean) | tokens/s (median) | tokens/step | vs none [95% CI] | p |",
                  "|---|---|---|---|---|---|"]
        for name, p in pol.items():
            tps = [r["tokens_per_s"] for r in p["per_prompt"]]
            c = paired_speedup(name, tps, "none", base) if name != "none" else None
            vs = f"{c.speedup:.3f}x [{c.ci95[0]:.3f}, {c.ci95[1]:.3f}] | {c.p_value:.4f}" if c else " | "
            lines.append(f"| {name} | {p['tokens_per_s_geomean']:.3f} | {p['tokens_per_s_median']:.3f} | "
                         f"{p['tokens_per_step']:.2f} | {vs} |")
        lines += ["", "| adaptive vs | speedup [95% CI] | p |", "|---|---|---|"]
        for c in t["comparisons"]:
            lines.append(f"| {c['b']} | {c['speedup']:.3f}x [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] "
                         f"| {c['p_value']:.4f} |")
        main = ["none", t["best_fixed"], "heuristic", "hf-assisted", "adaptive", "stop-oracle", "oracle"]
        lines += ["", "Per category, tokens/s (geometric mean over its prompts):", "",
                  "| category | prompts | " + " | ".join(main) + " |", "|---|---|" + "---|" * len(main)]
        for cat in cats:
            picked = [i for i, r in enumerate(pol["none"]["per_prompt"]) if r["category"] == cat]
            means = [statistics.geometric_mean(pol[n]["per_prompt"][i]["tokens_per_s"] for i in picked) for n in main]
            lines.append(f"| {cat} | {len(picked)} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
        lines += ["", f"adaptive reaches {t['adaptive_vs_oracle']:.1%} of the oracle's tokens/s (geometric mean "
                      f"over prompts); stop-oracle (stops each run at its first rejected token, drafting that "
                      f"token) {t['stop_oracle_vs_oracle']:.1%}.", ""]
    return "\n".join(lines)

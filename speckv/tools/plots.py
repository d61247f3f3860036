"""Plots for docs/RESULTS.md (matplotlib, PNG), from collected traces and `speckv evaluate` / `bench` results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .replay import Trace


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def acceptance_vs_signals(traces: dict[tuple[str, str], Trace], out: Path) -> Path:
    """P(first draft token accepted) against its confidence and its entropy, binned, per tier."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for tier in sorted({t for t, _ in traces}):
        ts = [t for (tr, _), t in traces.items() if tr == tier]
        conf = np.concatenate([t.confidence[:, 0] for t in ts])
        ent = np.concatenate([t.entropy[:, 0] for t in ts])
        acc = np.concatenate([(t.accept_len >= 1).astype(float) for t in ts])
        panels = ((axes[0], conf, np.linspace(0, 1, 11)), (axes[1], ent, np.linspace(0, max(ent.max(), 1e-3), 11)))
        for ax, x, bins in panels:
            idx = np.clip(np.digitize(x, bins) - 1, 0, len(bins) - 2)
            centers, means = [], []
            for b in range(len(bins) - 1):
                if (idx == b).sum() >= 5:
                    centers.append((bins[b] + bins[b + 1]) / 2)
                    means.append(acc[idx == b].mean())
            ax.plot(centers, means, marker="o", label=f"{tier} (n={len(acc)})")
    axes[0].set(xlabel="draft confidence of the token", ylabel="P(accepted)", title="acceptance vs confidence")
    axes[1].set(xlabel="draft entropy of the token (nats)", ylabel="P(accepted)", title="acceptance vs entropy")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, out / "acceptance_vs_signals.png")


def gamma_choices(evaluation: dict, out: Path) -> Path:
    """Distribution of γ chosen by adaptive and by the oracle, per tier (replayed on held-out prompts)."""
    plt = _plt()
    tiers = sorted(evaluation["tiers"])
    fig, axes = plt.subplots(1, len(tiers), figsize=(4 * len(tiers), 3.5), squeeze=False)
    for ax, tier in zip(axes[0], tiers):
        pol = evaluation["tiers"][tier]["policies"]
        for name, offset in (("adaptive", -0.2), ("oracle", 0.2)):
            gammas = np.concatenate([r["gammas"] for r in pol[name]["per_prompt"]])
            counts = np.bincount(gammas, minlength=9)
            ax.bar(np.arange(len(counts)) + offset, counts / counts.sum(), width=0.4, label=name)
        ax.set(title=f"{tier}: γ per step", xlabel="γ", ylabel="share of steps")
        ax.legend()
    return _save(fig, out / "gamma_chosen.png")


def optimal_gamma_by_task(evaluation: dict, out: Path) -> Path:
    """Mean oracle γ per tier and task category: how the best γ moves with both."""
    plt = _plt()
    tiers = sorted(evaluation["tiers"])
    cats = sorted({r["category"] for t in tiers for r in evaluation["tiers"][t]["policies"]["oracle"]["per_prompt"]})
    grid = np.full((len(tiers), len(cats)), np.nan)
    for i, tier in enumerate(tiers):
        for j, cat in enumerate(cats):
            gammas = [g for r in evaluation["tiers"][tier]["policies"]["oracle"]["per_prompt"] if r["category"] == cat
                      for g in r["gammas"]]
            if gammas:
                grid[i, j] = np.mean(gammas)
    fig, ax = plt.subplots(figsize=(1.3 * len(cats) + 2, 0.8 * len(tiers) + 1.5))
    im = ax.imshow(grid, cmap="viridis")
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    ax.set_yticks(range(len(tiers)), tiers)
    for i in range(len(tiers)):
        for j in range(len(cats)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="w")
    fig.colorbar(im, ax=ax, label="mean oracle γ")
    ax.set_title("optimal γ per tier and task (oracle, replayed)")
    return _save(fig, out / "optimal_gamma.png")


def speedup_bars(evaluation: dict, out: Path, name: str = "speedup_replayed.png", live: dict | None = None) -> Path:
    """Tokens/s relative to target-only with 95% CIs, per tier, for the main policies (replayed; plus live
    bench documents when given as {tier: bench results})."""
    from .stats import paired_speedup

    plt = _plt()
    # replayed: fixed 1, 2, 4, 8 and the best fixed γ in hindsight; live: every fixed γ that was run
    sources = [("replayed", tier, t["policies"], {"fixed:1", "fixed:2", "fixed:4", "fixed:8", t["best_fixed"]})
               for tier, t in sorted(evaluation["tiers"].items())]
    for tier, doc in sorted((live or {}).items()):
        sources.append(("live", tier, {n: {"per_prompt": p["per_prompt"]} for n, p in doc["policies"].items()},
                        set(doc["policies"])))
    fig, axes = plt.subplots(1, len(sources), figsize=(4.5 * len(sources), 4), squeeze=False)
    for ax, (kind, tier, pol, fixed_shown) in zip(axes[0], sources):
        names = [n for n in pol if n != "none" and (not n.startswith("fixed:") or n in fixed_shown)]
        base = [r["tokens_per_s"] for r in pol["none"]["per_prompt"]]
        stats = [paired_speedup(n, [r["tokens_per_s"] for r in pol[n]["per_prompt"]], "none", base) for n in names]
        values = [s.speedup for s in stats]
        err = np.array([[s.speedup - s.ci95[0] for s in stats], [s.ci95[1] - s.speedup for s in stats]])
        colors = ["tab:green" if n == "adaptive" else "tab:gray" if n == "oracle" else "tab:blue" for n in names]
        ax.bar(names, values, yerr=err, capsize=3, color=colors)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(title=f"{tier} ({kind}, n={len(base)})", ylabel="tokens/s vs none")
        ax.tick_params(axis="x", rotation=60)
    return _save(fig, out / name)


def predicted_vs_actual(points: dict, out: Path) -> Path:
    """Predicted against actual acceptance rate of the drafted γ on held-out states."""
    plt = _plt()
    pred, act = np.asarray(points["predicted"]), np.asarray(points["actual"])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(pred, act + np.random.default_rng(0).uniform(-0.02, 0.02, len(act)), s=4, alpha=0.25)
    bins = np.linspace(0, 1, 11)
    idx = np.clip(np.digitize(pred, bins) - 1, 0, 9)
    centers = [(bins[b] + bins[b + 1]) / 2 for b in range(10) if (idx == b).sum() >= 5]
    means = [act[idx == b].mean() for b in range(10) if (idx == b).sum() >= 5]
    ax.plot(centers, means, "r-o", label="binned mean")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    corr = float(np.corrcoef(pred, act)[0, 1]) if len(pred) > 2 else float("nan")
    ax.set(xlabel="predicted acceptance rate", ylabel="actual acceptance rate",
           title=f"held-out states, r = {corr:.3f}")
    ax.legend()
    return _save(fig, out / "predicted_vs_actual.png")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def cost_curves(costs: dict[str, dict], out: Path, name: str = "cost_curves.png") -> Path:
    """Per setting ({name: `speckv collect` cost_<tier>.json}): verify ms against γ (γ+1 tokens scored, at
    the shortest context measured) and what drafting γ tokens costs, measured points and fitted lines."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (setting, doc) in enumerate(sorted(costs.items())):
        color = f"C{i}"
        ctx = min(r["context_len"] for r in doc["rows"])
        rows = sorted((r for r in doc["rows"] if r["context_len"] == ctx), key=lambda r: r["gamma"])
        gammas = [r["gamma"] for r in rows]
        axes[0].plot(gammas, [r["verify_ms"] for r in rows], "o-", color=color, label=setting)
        axes[1].plot(gammas, [r["draft_ms"] for r in rows], "o-", color=color, label=setting)
    axes[0].set(title="verify pass", xlabel="γ (γ+1 tokens scored)", ylabel="ms")
    axes[1].set(title="drafting γ tokens", xlabel="γ", ylabel="ms")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, out / name)

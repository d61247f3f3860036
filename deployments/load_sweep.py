"""Load sweep of the served OpenAI endpoint with GuideLLM, the field's load tool.

    make loadtool                      # GuideLLM in its own venv (.loadtool/), beside the CPU torch
    make serve                         # in another shell (or any SpecKV endpoint)
    python -m deployments.load_sweep --url http://127.0.0.1:8000 --tiers nf4,fp16 \
        --policies none,fixed:1,adaptive --concurrency 1,2,4,8,16 --rate-shares 0.25,0.5 --out docs/results/load

For each tier GuideLLM runs fixed numbers of concurrent streams, then Poisson arrivals at shares of the capacity
(requests/s) the highest concurrency reached, every policy at each level before the next level (their order
reversed from level to level, so drift falls on all of them), with synthetic prompts of --prompt-tokens tokens
and exactly --output-tokens generated tokens each (`ignore_eos`), greedy, streamed, the policy chosen by the
request's `speculation` field. Each level is its own GuideLLM run, with the server's `GET /speckv/stats`
read before and after it, so the summary has what speculation did at that level (mean γ, sequences per
verify pass), which GuideLLM does not keep. GuideLLM's own report of each run is kept beside the summary;
the summary (aggregate output tokens/s, time to first token and inter-token latency p50/p99, requests
completed and failed, mean γ, per level) is printed and saved as load_sweep.json, with plots.
`deployments/load_run.py` stays the check that every stream equals its greedy reference under load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_GUIDELLM = Path(__file__).resolve().parents[1] / ".loadtool" / "bin" / "guidellm"
POISSON_MENDED = Path(__file__).with_name("guidellm_poisson.py")


def guidellm_command(guidellm: str) -> list[str]:
    """How to start GuideLLM: through `deployments/guidellm_poisson.py` (its Poisson arrivals mended) with the
    Python installed beside the executable; the executable itself where there is none (the Poisson levels then
    keep GuideLLM's start race, which `arrivals_valid` catches)."""
    python = Path(guidellm).with_name("python")
    return [str(python), str(POISSON_MENDED)] if python.exists() else [guidellm]


def speculation(policy: str) -> dict:
    """The request's `speculation` field for a policy spec (none, fixed:N, adaptive, heuristic)."""
    if policy.startswith("fixed:"):
        return {"policy": "fixed", "gamma": int(policy.split(":", 1)[1])}
    return {"policy": policy}


def scenario(url: str, tier: str, policy: str, tokenizer: str, prompt_tokens: int, output_tokens: int,
             seconds: float, profile: dict, levels: list[dict]) -> dict:
    """A GuideLLM scenario: one benchmark per level (overrides of `profile`)."""
    body = {"temperature": 0, "speculation": speculation(policy)}
    return {
        "metadata": {"name": f"speckv-{tier}-{policy}", "description": "SpecKV load sweep (deployments/load_sweep.py)"},
        "spec": {
            "backend": {"kind": "openai_http", "target": url, "model": f"speckv-{tier}",
                        "request_format": "/v1/completions", "extras": {"body": body}, "timeout": 1800,
                        "api_routes": {"/health": "healthz"},
                        "http2": False},
            "profile": profile,
            "tokenizer": {"kind": "huggingface_auto", "model": tokenizer},
            "data": [{"kind": "synthetic_text", "prompt_tokens": prompt_tokens, "output_tokens": output_tokens}],
            "constraints": [{"kind": "max_duration", "seconds": seconds}],
        },
        "benchmarks": levels,
    }


def run_guidellm(guidellm: str, spec: dict, out: Path) -> dict:
    """Run one scenario; GuideLLM's JSON report, also kept at `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".scenario.json")
    path.write_text(json.dumps(spec, indent=2))
    cmd = [*guidellm_command(guidellm), "run", "-c", str(path), "--output", f"kind=json,path={out}",
           "--disable-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"guidellm failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}")
    return json.loads(out.read_text())


def server_stats(url: str) -> dict[tuple[str, str], dict] | None:
    """The server's per (tier, policy) totals (GET /speckv/stats); None where it has no such route."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/speckv/stats", timeout=30) as reply:
            doc = json.load(reply)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return {(row["tier"], row["policy"]): row for row in doc.get("data", [])}


def speculation_during(before: dict | None, after: dict | None, tier: str, policy: str) -> dict:
    """What the server's requests of `tier` and `policy` did between two `server_stats` readings: steps,
    mean γ (draft tokens per step) and mean sequences per verify pass. Empty where not known."""
    if before is None or after is None or (tier, policy) not in after:
        return {}
    new, old = after[(tier, policy)], before.get((tier, policy), {})
    steps = new["steps"] - old.get("steps", 0)
    if steps <= 0:
        return {"steps": 0}
    batches = {int(b): n - old.get("batch_histogram", {}).get(b, 0) for b, n in new["batch_histogram"].items()}
    return {"steps": steps, "mean_gamma": (new["draft_tokens"] - old.get("draft_tokens", 0)) / steps,
            "mean_batch": sum(b * n for b, n in batches.items()) / steps}


def summarize(report: dict, level: str, values: list[float]) -> list[dict]:
    """One row per benchmark of a GuideLLM report: aggregate output tokens/s (every token streamed within
    the window, finished requests or not), requests per second, TTFT and inter-token latency of the finished
    requests (p50, p99), requests finished, failed and cut by the window's end."""
    rows = []
    for bench, value in zip(report["benchmarks"], values):
        m = bench["metrics"]

        def stat(name: str, which: str = "successful") -> dict:
            return m[name][which]

        rows.append({
            level: value, "seconds": bench["duration"],
            "output_tokens_per_s": stat("output_tokens_per_second", "total")["mean"],
            "requests_per_s": stat("requests_per_second")["mean"],
            "ttft_ms_p50": stat("time_to_first_token_ms")["median"],
            "ttft_ms_p99": stat("time_to_first_token_ms")["percentiles"]["p99"],
            "itl_ms_p50": stat("inter_token_latency_ms")["median"],
            "itl_ms_p99": stat("inter_token_latency_ms")["percentiles"]["p99"],
            **{f"requests_{k}": v for k, v in m["request_totals"].items()},
        })
    return rows


def report_path(out: Path, tier: str, policy: str, level: str, round_: int = 1) -> Path:
    """Where a sweep keeps GuideLLM's report of one level (`c8`: 8 streams; `r0.05`: Poisson at 0.05/s) in one
    round (`--rounds`; the first round's name has no round in it)."""
    return out / f"{tier}-{policy.replace(':', '')}-{level}{f'-round{round_}' if round_ > 1 else ''}.json"


def request_seconds(report: dict) -> dict[str, float]:
    """Each finished request of a GuideLLM report's first benchmark by its prompt: seconds from its start to
    its last token. GuideLLM's synthetic prompts are the same, in the same order, for every run with the same
    settings, so a prompt names the same request in every policy's run of a level."""
    out = {}
    for r in report["benchmarks"][0]["requests"]["successful"]:
        t = r["info"]["timings"]
        if t.get("request_start") and t.get("last_token_iteration"):
            out[json.loads(r["request_args"])["body"]["prompt"]] = t["last_token_iteration"] - t["request_start"]
    return out


def paired(rounds: list[tuple[dict, dict]]) -> dict:
    """A policy's requests against the same prompts' under another policy at the same level, as the offline
    benchmarks compare policies (speckv.tools.stats.paired_speedup), over one or more rounds of that level
    (`--rounds`), each a (report, against) pair of GuideLLM reports: each round's requests paired by prompt
    within it, all rounds' pairs pooled. Returns n, the geometric-mean speedup (`against`'s seconds over
    `report`'s: above 1, `report` was faster), its 95% bootstrap CI and the sign-flip p. A level's requests share
    their passes, so they are not independent: read p as a screen, beside the aggregate tokens/s. Two runs one
    after the other put the machine's drift on one side only; rounds in opposite orders (A B, then B A) put it
    on both: in one order, the same two policies (both at γ = 0, fp16, 8 streams) measured 0.94x, p = 0.0004,
    and reversed 1.06x, p = 0.0006 (docs/serving_log.md). With several rounds, `by_round` holds each round's
    speedup and `p_rounds` the sign-flip p over them: the rounds are the units the host's drift does not tie
    together (int8 at 8 streams, both policies deciding alike, two runs gave 1.02x and 0.96x, each p < 0.001 by
    requests); with two rounds `p_rounds` cannot go below 0.5, with six 0.031."""
    import numpy as np

    from speckv.tools.stats import paired_speedup, sign_flip_p_value

    mine, theirs, by_round = [], [], []
    for report, against in rounds:
        a, b = request_seconds(report), request_seconds(against)
        prompts = sorted(p for p in a.keys() & b.keys() if a[p] > 0 and b[p] > 0)
        mine += [1 / a[p] for p in prompts]
        theirs += [1 / b[p] for p in prompts]
        if prompts:  # the round's own speedup: the geometric mean of its pairs' ratios, as `paired_speedup`'s
            by_round.append(statistics.geometric_mean(b[p] / a[p] for p in prompts))
    if not mine:
        return {"n": 0}
    c = paired_speedup("report", mine, "against", theirs)
    out = {"n": c.n, "speedup": c.speedup, "ci95": list(c.ci95), "p": c.p_value}
    if len(rounds) > 1:
        out.update(by_round=by_round, p_rounds=sign_flip_p_value(np.log(by_round), np.random.default_rng(0)))
    return out


def paired_levels(out: Path, tier: str, policies: list[str], levels: list[str], of: str = "adaptive",
                  rounds: int = 1) -> list[dict]:
    """`paired` for `of` against every other policy at every level (`report_path`'s `level`) over its
    `rounds`, from the GuideLLM reports `sweep` saved under `out`."""
    def report(policy: str, level: str, round_: int) -> dict | None:
        path = report_path(out, tier, policy, level, round_)
        return json.loads(path.read_text()) if path.exists() else None

    rows = []
    for level in levels:
        for policy in (p for p in policies if p != of):
            both = [(report(of, level, r), report(policy, level, r)) for r in range(1, rounds + 1)]
            both = [(mine, theirs) for mine, theirs in both if mine is not None and theirs is not None]
            if both:
                rows.append({"tier": tier, "level": level, "policy": of, "against": policy,
                             **({"rounds": len(both)} if rounds > 1 else {}), **paired(both)})
    return rows


def arrivals_valid(row: dict) -> bool:
    """Whether a Poisson level sent about the requests its rate asks for: at most the 99.9th percentile of
    Poisson(rate × window). GuideLLM 0.8.1's Poisson strategy can start its arrival clock at -1 instead of the
    run's start (its start event is set before the clock: a race between processes), and then sends every
    arrival at once, up to its own concurrency limit: a burst, not the rate (seen here: 77 requests in a 60 s
    window at 0.2/s). `guidellm_command` runs it mended; where it cannot, such a level measures the burst, so
    it is rerun, and marked where it stays invalid."""
    from scipy.stats import poisson

    return row["requests_total"] <= poisson.ppf(0.999, row["rate"] * row["seconds"])


def run_level(args: argparse.Namespace, tier: str, policy: str, level: str, value: float, out: Path) -> dict:
    """One level (a number of concurrent streams, or a Poisson rate) as its own GuideLLM run: its summary row,
    with what speculation did meanwhile on the server. A Poisson level whose arrivals were not Poisson
    (`arrivals_valid`) is run again, up to `args.rate_retries` times."""
    profile = {"kind": "concurrent", "streams": [int(value)]} if level == "concurrency" else \
        {"kind": "poisson", "rate": [value]}
    override = {"profile.streams": int(value)} if level == "concurrency" else {"profile.rate": value}
    spec = scenario(args.url, tier, policy, args.tokenizer, args.prompt_tokens, args.output_tokens, args.seconds,
                    profile, [override])
    for attempt in range(1 + (args.rate_retries if level == "rate" else 0)):
        before = server_stats(args.url)
        (row,) = summarize(run_guidellm(args.guidellm, spec, out), level, [value])
        row.update(speculation_during(before, server_stats(args.url), tier, policy))
        if level == "rate":
            row.update(arrivals_valid=bool(arrivals_valid(row)), attempts=attempt + 1)
        print(json.dumps({"tier": tier, "policy": policy, **row}), flush=True)
        if row.get("arrivals_valid", True):
            break
    return row


def warm_up(url: str, tier: str, requests: int = 2) -> None:
    """A few short requests to the tier before it is measured: a tier's first passes are slow (allocation,
    kernels chosen on first use; on an AVX512-BF16 EPYC an nf4 replica's first 16 tokens took 16 s, the next 1.3 s), and
    a tier that scales to zero loads its replica on the first request."""
    import urllib.request

    body = json.dumps({"model": f"speckv-{tier}", "prompt": "def fib(n):", "max_tokens": 16, "temperature": 0,
                       "speculation": {"policy": "fixed", "gamma": 2}}).encode()
    for _ in range(requests):
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as reply:
            reply.read()


def sweep(args: argparse.Namespace) -> dict:
    """Every tier: each concurrency level run for every policy (`args.rounds` times), then Poisson rates at
    shares of the capacity each policy reached. The policies are interleaved level by level, their order
    reversed from one level to the next (A B, B A, A B ...) and from one round to the next, so a drift of the
    machine falls on all of them rather than on the policy run last (run one policy after another, a noisy
    neighbour arriving mid-sweep reads as a policy's regression). With one level, only rounds interleave it."""
    out = Path(args.out)
    results: dict = {"args": vars(args), "runs": []}
    for tier in args.tiers:
        warm_up(args.url, tier)
        rows: dict[str, list[dict]] = {policy: [] for policy in args.policies}
        for r in range(args.rounds):
            for i, c in enumerate(args.concurrency):
                for policy in _in_turn(args.policies, i + r):
                    row = run_level(args, tier, policy, "concurrency", c,
                                    report_path(out, tier, policy, f"c{c}", r + 1))
                    rows[policy].append({**row, "round": r + 1} if args.rounds > 1 else row)
        capacity = {policy: args.capacity or max((r["requests_per_s"] for r in rows[policy]), default=0.0)
                    for policy in args.policies}
        poisson: dict[str, list[dict]] = {policy: [] for policy in args.policies}
        for i, share in enumerate(args.rate_shares, start=len(args.concurrency)):
            for policy in _in_turn(args.policies, i):
                rate = round(share * capacity[policy], 4)
                if rate > 0:
                    row = run_level(args, tier, policy, "rate", rate, report_path(out, tier, policy, f"r{rate}"))
                    poisson[policy].append({**row, "capacity_share": share})
        results["runs"] += [{"tier": tier, "policy": policy, "concurrency": rows[policy], "poisson": poisson[policy],
                             "capacity_requests_per_s": capacity[policy]} for policy in args.policies]
    save_paired(results, out)
    return results


def _in_turn(policies: list[str], level: int) -> list[str]:
    """The policies in the order level `level` runs them: as given, then reversed, alternately."""
    return list(policies) if level % 2 == 0 else list(reversed(policies))


def save_paired(results: dict, out: Path) -> None:
    """Add `adaptive` against each other policy swept, request by request, at every concurrency level
    (`paired_levels`; Poisson levels are not paired: their rates are shares of each policy's own capacity), and
    save the summary as load_sweep.json."""
    args = results["args"]
    results["paired"] = [] if "adaptive" not in args["policies"] else [
        row for tier in args["tiers"]
        for row in paired_levels(out, tier, args["policies"], [f"c{c}" for c in args["concurrency"]],
                                 rounds=args.get("rounds", 1))]  # sweeps saved before --rounds ran one
    (out / "load_sweep.json").write_text(json.dumps(results, indent=2))


def write_summary(results: dict, out: Path) -> None:
    plot(results, out)
    (out / "load_sweep.md").write_text(table(results) + "\n")
    print(table(results))
    print(f"saved {out / 'load_sweep.json'} and load_sweep.png")


def table(results: dict) -> str:
    """The summary as a markdown table: one row per tier, policy and level."""
    lines = ["| tier | policy | load | aggregate output tokens/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) "
             "| requests done / cut / failed | mean γ | sequences per pass |", "|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        levels = [(f"{r['concurrency']} streams" + (f", round {r['round']}" if "round" in r else ""), r)
                  for r in run["concurrency"]]
        levels += [(f"Poisson {r['rate']:.3g}/s ({r['capacity_share']:.0%} of capacity)"
                    + ("" if r.get("arrivals_valid", True) else f": not valid, a burst of {r['requests_total']}"),
                    r) for r in run["poisson"]]
        for load, r in levels:
            lines.append(f"| {run['tier']} | {run['policy']} | {load} | {r['output_tokens_per_s']:.2f} | "
                         f"{r['ttft_ms_p50'] / 1e3:.1f} / {r['ttft_ms_p99'] / 1e3:.1f} | "
                         f"{r['itl_ms_p50']:.0f} / {r['itl_ms_p99']:.0f} | {r['requests_successful']} / "
                         f"{r['requests_incomplete']} / {r['requests_errored']} | {_maybe(r, 'mean_gamma')} | "
                         f"{_maybe(r, 'mean_batch')} |")
    if results.get("paired"):
        lines += ["", "| tier | level | policy | against | requests paired by prompt (rounds pooled) | "
                  "speedup [95% CI] | p | by round (p over rounds) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["paired"]:
            low, high = r.get("ci95", (0, 0))
            ratio = f"{r['speedup']:.2f}x [{low:.2f}, {high:.2f}] | {r['p']:.2g}" if r["n"] else "- | -"
            by_round = (", ".join(f"{x:.2f}x" for x in r["by_round"]) + f" ({r['p_rounds']:.2g})"
                        if "by_round" in r else "-")
            lines.append(f"| {r['tier']} | {r['level']} | {r['policy']} | {r['against']} | {r['n']} | {ratio} "
                         f"| {by_round} |")
    return "\n".join(lines)


def _maybe(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "n/a"


def plot(results: dict, out: Path) -> None:
    """Aggregate tokens/s and TTFT p50 against concurrency, one panel per tier, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = sorted({r["tier"] for r in results["runs"]})
    if not tiers:
        return
    fig, axes = plt.subplots(3, len(tiers), figsize=(5 * len(tiers), 10), squeeze=False)
    for col, tier in enumerate(tiers):
        for run in (r for r in results["runs"] if r["tier"] == tier):
            levels = sorted(run["concurrency"], key=lambda row: row["concurrency"])  # rounds of a level side by side
            c = [row["concurrency"] for row in levels]
            axes[0][col].plot(c, [row["output_tokens_per_s"] for row in levels], "o-", label=run["policy"])
            axes[1][col].plot(c, [row["ttft_ms_p50"] / 1e3 for row in levels], "o-", label=run["policy"])
            axes[2][col].plot(c, [row.get("mean_gamma", float("nan")) for row in levels], "o-", label=run["policy"])
        axes[0][col].set(title=f"{tier}: aggregate output tokens/s", xlabel="concurrent streams", xscale="log")
        axes[1][col].set(title=f"{tier}: TTFT p50 (s)", xlabel="concurrent streams", xscale="log")
        axes[2][col].set(title=f"{tier}: mean γ (server's count)", xlabel="concurrent streams", xscale="log")
        axes[0][col].legend()
    fig.tight_layout()
    fig.savefig(out / "load_sweep.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    from speckv.models import DEFAULT_TARGET, resolve_model_dir

    def floats(s: str) -> list[float]:
        return [float(x) for x in s.split(",") if x]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--guidellm", default=str(DEFAULT_GUIDELLM), help="GuideLLM executable (default: .loadtool's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: the target's)")
    p.add_argument("--tiers", type=lambda s: s.split(","), default=["nf4", "fp16"])
    p.add_argument("--policies", type=lambda s: s.split(","), default=["none", "fixed:1", "adaptive"])
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2, 4, 8, 16],
                   help="streams per level (\"\": none, with --capacity for Poisson levels alone)")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of every concurrency level, the policies' order reversed each round; the paired "
                        "comparisons pool the rounds (2: A B then B A at a level, so drift falls on both)")
    p.add_argument("--rate-shares", type=floats, default=[0.5], help="Poisson rates as shares of the capacity")
    p.add_argument("--capacity", type=float, default=None,
                   help="requests/s the rate shares are of (default: the most the concurrency levels reached); "
                        "to run Poisson levels against a capacity an earlier sweep measured")
    p.add_argument("--rate-retries", type=int, default=2,
                   help="reruns of a Poisson level whose arrivals came as a burst (arrivals_valid)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--seconds", type=float, default=120.0, help="length of each level's window")
    p.add_argument("--out", default="results/load")
    p.add_argument("--pair", metavar="DIR", default=None,
                   help="only add the request-by-request comparisons to the summary of a sweep saved in DIR "
                        "(its GuideLLM reports beside it), and rewrite its table")
    args = p.parse_args(argv)
    if args.rounds < 1:
        print(f"--rounds must be at least 1, got {args.rounds}", file=sys.stderr)
        return 2
    if args.pair:
        out = Path(args.pair)
        if not (out / "load_sweep.json").exists():
            print(f"no load_sweep.json in {out}", file=sys.stderr)
            return 2
        results = json.loads((out / "load_sweep.json").read_text())
        save_paired(results, out)
        write_summary(results, out)
        return 0
    if not Path(args.guidellm).exists():
        print(f"GuideLLM not found at {args.guidellm}; run `make loadtool` (or pass --guidellm)", file=sys.stderr)
        return 2
    args.tokenizer = args.tokenizer or resolve_model_dir(DEFAULT_TARGET)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_summary(sweep(args), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

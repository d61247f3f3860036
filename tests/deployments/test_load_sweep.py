"""The load sweep's own logic (deployments/load_sweep.py): what it asks GuideLLM for and what it reads back."""

import argparse
from pathlib import Path

import pytest

import deployments.guidellm_poisson as guidellm_poisson
import deployments.load_sweep as load_sweep
from deployments.load_sweep import arrivals_valid, scenario, speculation, speculation_during, summarize, table


def test_each_policy_is_asked_for_in_the_request_body():
    assert speculation("none") == {"policy": "none"}
    assert speculation("fixed:3") == {"policy": "fixed", "gamma": 3}
    spec = scenario("http://h:1", "nf4", "adaptive", "/tok", 64, 32, 90, {"kind": "concurrent", "streams": [1, 8]},
                    [{"profile.streams": 1}, {"profile.streams": 8}])
    backend = spec["spec"]["backend"]
    assert backend["model"] == "speckv-nf4" and backend["extras"]["body"]["speculation"] == {"policy": "adaptive"}
    assert backend["extras"]["body"]["temperature"] == 0 and backend["api_routes"] == {"/health": "healthz"}
    assert spec["spec"]["data"][0]["output_tokens"] == 32 and len(spec["benchmarks"]) == 2


def test_a_report_is_summarized_per_level():
    def dist(median: float, p99: float) -> dict:
        return {"median": median, "mean": median, "percentiles": {"p99": p99}}

    bench = {"duration": 90.0, "metrics": {
        "output_tokens_per_second": {"total": dist(2.5, 4.0)}, "requests_per_second": {"successful": dist(0.1, 0.2)},
        "time_to_first_token_ms": {"successful": dist(900.0, 1500.0)},
        "inter_token_latency_ms": {"successful": dist(300.0, 420.0)},
        "request_totals": {"successful": 8, "errored": 0, "incomplete": 2, "total": 10}}}
    (row,) = summarize({"benchmarks": [bench]}, "concurrency", [8])
    assert row["concurrency"] == 8 and row["output_tokens_per_s"] == 2.5 and row["ttft_ms_p99"] == 1500.0
    assert row["itl_ms_p50"] == 300.0 and row["requests_successful"] == 8 and row["requests_incomplete"] == 2
    poisson = {**row, "rate": 0.05, "capacity_share": 0.5}
    md = table({"runs": [{"tier": "nf4", "policy": "none", "concurrency": [row], "poisson": [poisson]}]})
    assert "| nf4 | none | 8 streams | 2.50 | 0.9 / 1.5 | 300 / 420 | 8 / 2 / 0 | n/a | n/a |" in md
    assert "Poisson 0.05/s (50% of capacity)" in md


def test_what_speculation_did_during_a_level_is_the_servers_difference():
    """GuideLLM does not keep the response's `speculation` field: the sweep diffs the server's totals
    (GET /speckv/stats) around each level for the mean γ and the sequences per verify pass."""
    before = {("nf4", "adaptive"): {"steps": 100, "draft_tokens": 300, "batch_histogram": {"1": 100}},
              ("nf4", "none"): {"steps": 50, "draft_tokens": 0, "batch_histogram": {"1": 50}}}
    after = {("nf4", "adaptive"): {"steps": 140, "draft_tokens": 320, "batch_histogram": {"1": 110, "8": 30}},
             ("nf4", "none"): {"steps": 50, "draft_tokens": 0, "batch_histogram": {"1": 50}}}
    assert speculation_during(before, after, "nf4", "adaptive") == {
        "steps": 40, "mean_gamma": 0.5, "mean_batch": (10 * 1 + 30 * 8) / 40}
    assert speculation_during({}, after, "nf4", "adaptive")["mean_gamma"] == 320 / 140  # first run on the server
    assert speculation_during(before, after, "nf4", "none") == {"steps": 0}
    assert speculation_during(None, after, "nf4", "adaptive") == {}  # a server without the route


def _report(total: int) -> dict:
    dist = {"median": 1.0, "mean": 1.0, "percentiles": {"p99": 1.0}}
    return {"benchmarks": [{"duration": 60.0, "metrics": {
        "output_tokens_per_second": {"total": dist}, "requests_per_second": {"successful": dist},
        "time_to_first_token_ms": {"successful": dist}, "inter_token_latency_ms": {"successful": dist},
        "request_totals": {"successful": total, "errored": 0, "incomplete": 0, "total": total}}}]}


def test_a_poisson_level_sent_as_a_burst_is_rerun_and_marked(monkeypatch, tmp_path):
    """0.2/s for 60 s expects 12 requests: 20 is within Poisson noise, 77 (what GuideLLM 0.8.1 sent once) is a
    burst; the level is rerun, and kept marked invalid when every attempt bursts."""
    assert arrivals_valid({"rate": 0.2, "seconds": 60.0, "requests_total": 20})
    assert not arrivals_valid({"rate": 0.2, "seconds": 60.0, "requests_total": 77})
    sent = iter([77, 13, 77, 77, 77, 500])  # the last: a concurrency level, never judged as a rate
    monkeypatch.setattr(load_sweep, "run_guidellm", lambda *a: _report(next(sent)))
    monkeypatch.setattr(load_sweep, "server_stats", lambda url: None)
    args = argparse.Namespace(url="u", tokenizer="t", prompt_tokens=64, output_tokens=32, seconds=60.0,
                              guidellm="g", rate_retries=2)
    row = load_sweep.run_level(args, "fp16", "none", "rate", 0.2, tmp_path / "r.json")
    assert row["requests_total"] == 13 and row["arrivals_valid"] and row["attempts"] == 2
    row = load_sweep.run_level(args, "fp16", "none", "rate", 0.2, tmp_path / "r.json")
    assert row["requests_total"] == 77 and not row["arrivals_valid"] and row["attempts"] == 3
    md = table({"runs": [{"tier": "fp16", "policy": "none", "concurrency": [],
                          "poisson": [{**row, "capacity_share": 0.5}]}]})
    assert "not valid, a burst of 77" in md
    concurrent = load_sweep.run_level(args, "fp16", "none", "concurrency", 8, tmp_path / "c.json")
    assert "arrivals_valid" not in concurrent  # streams are not a rate


def test_the_poisson_clock_is_written_before_the_workers_are_woken():
    """GuideLLM 0.8.1 wakes its workers (the base class's start) before it writes the arrival clock's offset, so a
    worker may add its delays to -1 and send everything at once; the mend writes the offset first, so whatever
    the base's start wakes sees the run's start time."""
    import multiprocessing

    strategy = argparse.Namespace(_offset=multiprocessing.get_context("spawn").Value("d", -1.0))
    seen_at_wake = []
    guidellm_poisson.init_processes_start(strategy, 1234.5,
                                          lambda s, start: seen_at_wake.append(s._offset.value))
    assert seen_at_wake == [1234.5] and strategy._offset.value == 1234.5


def test_each_poisson_worker_draws_its_own_delays_reproducibly():
    """Every GuideLLM worker seeded one generator alike, so all drew the same delays; each worker's own seed
    gives different delays per worker and the same ones again for the same worker."""
    draws = {w: [guidellm_poisson.worker_random(42, w).expovariate(1.0) for _ in range(3)] for w in range(3)}
    assert len({tuple(d) for d in draws.values()}) == 3
    assert draws[1] == [guidellm_poisson.worker_random(42, 1).expovariate(1.0) for _ in range(3)]


def test_guidellm_runs_mended_where_its_python_is_beside_it(tmp_path):
    """The sweep starts GuideLLM through the mend with the load tool's own Python; a bare executable (no Python
    beside it) is run as it is."""
    (tmp_path / "guidellm").touch()
    assert load_sweep.guidellm_command(str(tmp_path / "guidellm")) == [str(tmp_path / "guidellm")]
    (tmp_path / "python").touch()
    assert load_sweep.guidellm_command(str(tmp_path / "guidellm")) == [
        str(tmp_path / "python"), str(Path(load_sweep.__file__).with_name("guidellm_poisson.py"))]


def test_poisson_rates_are_shares_of_the_capacity_measured_or_given(monkeypatch, tmp_path):
    """Rates are shares of the most requests/s the concurrency levels reached, or of --capacity where given
    (one rate for every policy, from an earlier sweep)."""
    asked = []

    def level(args, tier, policy, kind, value, out):
        asked.append((kind, value))
        return {"requests_per_s": 0.4, "rate": value}

    monkeypatch.setattr(load_sweep, "run_level", level)
    monkeypatch.setattr(load_sweep, "warm_up", lambda url, tier: None)
    args = argparse.Namespace(url="u", out=str(tmp_path), tiers=["fp16"], policies=["none"], concurrency=[8],
                              rate_shares=[0.5], capacity=None, rounds=1)
    load_sweep.sweep(args)
    args.capacity = 1.0
    load_sweep.sweep(args)
    assert asked == [("concurrency", 8), ("rate", 0.2), ("concurrency", 8), ("rate", 0.5)]


def test_policies_are_interleaved_level_by_level_in_alternating_order(monkeypatch, tmp_path):
    """Every policy runs a level before the next level starts, in an order reversed from one level to the next,
    so a drift of the machine is shared between them; each policy's Poisson rate is a share of its own
    capacity, and each policy's rows stay its own."""
    asked = []

    def level(args, tier, policy, kind, value, out):
        asked.append((policy, kind, value))
        return {"requests_per_s": {"none": 0.2, "adaptive": 0.4}[policy] * value, "rate": value}

    monkeypatch.setattr(load_sweep, "run_level", level)
    monkeypatch.setattr(load_sweep, "warm_up", lambda url, tier: None)
    args = argparse.Namespace(url="u", out=str(tmp_path), tiers=["nf4"], policies=["none", "adaptive"],
                              concurrency=[1, 8], rate_shares=[0.5], capacity=None, rounds=1)
    results = load_sweep.sweep(args)
    assert asked == [("none", "concurrency", 1), ("adaptive", "concurrency", 1), ("adaptive", "concurrency", 8),
                     ("none", "concurrency", 8), ("none", "rate", 0.8), ("adaptive", "rate", 1.6)]
    by_policy = {run["policy"]: run for run in results["runs"]}
    assert [r["requests_per_s"] for r in by_policy["adaptive"]["concurrency"]] == [0.4, 3.2]
    assert by_policy["none"]["poisson"][0]["rate"] == 0.8
    # with rounds, every level runs again in the other order, and its report is kept apart from the first's
    asked.clear()
    paths = []
    monkeypatch.setattr(load_sweep, "run_level", lambda *a: paths.append(a[-1]) or level(*a))
    args.rounds, args.rate_shares = 2, []
    results = load_sweep.sweep(args)
    assert asked == [("none", "concurrency", 1), ("adaptive", "concurrency", 1), ("adaptive", "concurrency", 8),
                     ("none", "concurrency", 8), ("adaptive", "concurrency", 1), ("none", "concurrency", 1),
                     ("none", "concurrency", 8), ("adaptive", "concurrency", 8)]
    assert len(set(paths)) == 8 and paths[4].name == "nf4-adaptive-c1-round2.json"
    assert [r["round"] for r in results["runs"][0]["concurrency"]] == [1, 1, 2, 2]


def _requests(seconds: dict[str, float]) -> dict:
    """A GuideLLM report whose finished requests took `seconds` each, by prompt."""
    import json

    return {"benchmarks": [{"requests": {"successful": [
        {"request_args": json.dumps({"body": {"prompt": prompt}}),
         "info": {"timings": {"request_start": 100.0, "last_token_iteration": 100.0 + s}}}
        for prompt, s in seconds.items()]}}]}


def test_policies_are_compared_request_by_request_on_the_same_prompts(tmp_path):
    """adaptive against none at a level: the prompts both finished, paired (a prompt that one run cut is left
    out), the speedup, and a p that is small only where every pair points the same way."""
    import json

    from deployments.load_sweep import paired, paired_levels

    none = {f"p{i}": 10.0 + i for i in range(8)}
    faster = {**{p: s / 1.25 for p, s in none.items()}, "cut-in-none": 1.0}
    result = paired([(_requests(faster), _requests(none))])
    assert result["n"] == 8 and abs(result["speedup"] - 1.25) < 1e-9 and result["p"] < 0.01
    mixed = {p: s * (1.1 if i % 2 else 1 / 1.1) for i, (p, s) in enumerate(none.items())}
    assert paired([(_requests(mixed), _requests(none))])["p"] > 0.5
    assert paired([(_requests({"a": 1.0}), _requests({"b": 1.0}))]) == {"n": 0}
    for policy, seconds in (("adaptive", faster), ("none", none), ("fixed1", none)):
        (tmp_path / f"nf4-{policy}-c8.json").write_text(json.dumps(_requests(seconds)))
    rows = paired_levels(tmp_path, "nf4", ["none", "fixed:1", "adaptive"], ["c8", "c16"])
    assert [(r["against"], r["level"], r["n"]) for r in rows] == [("none", "c8", 8), ("fixed:1", "c8", 8)]
    # and added to an earlier sweep's summary (`--pair DIR`), its table rewritten
    args = {"tiers": ["nf4"], "policies": ["none", "fixed:1", "adaptive"], "concurrency": [8, 16]}
    (tmp_path / "load_sweep.json").write_text(json.dumps({"args": args, "runs": []}))
    assert load_sweep.main(["--pair", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "load_sweep.json").read_text())["paired"] == rows
    assert "| nf4 | c8 | adaptive | none | 8 | 1.25x" in (tmp_path / "load_sweep.md").read_text()
    assert load_sweep.main(["--pair", str(tmp_path / "missing")]) == 2
    assert load_sweep.main(["--rounds", "0", "--pair", str(tmp_path)]) == 2


def test_rounds_of_a_level_are_paired_within_each_round_and_pooled(tmp_path):
    """Two rounds of a level, run in opposite orders: each round's requests are paired by prompt within that
    round (a prompt names the same request only within a run's settings), and the pairs of both are pooled, so
    a machine that slowed between the rounds weighs on both policies. Pairing across rounds would not."""
    import json

    from deployments.load_sweep import paired_levels

    none = {f"p{i}": 10.0 + i for i in range(6)}
    rounds = {1: (none, {p: s / 1.1 for p, s in none.items()}),  # round 1: adaptive 1.1x none
              2: ({p: s * 1.5 for p, s in none.items()}, {p: s * 1.5 / 1.1 for p, s in none.items()})}  # slower
    for r, (n, a) in rounds.items():
        suffix = "" if r == 1 else f"-round{r}"
        (tmp_path / f"nf4-none-c8{suffix}.json").write_text(json.dumps(_requests(n)))
        (tmp_path / f"nf4-adaptive-c8{suffix}.json").write_text(json.dumps(_requests(a)))
    (row,) = paired_levels(tmp_path, "nf4", ["none", "adaptive"], ["c8"], rounds=2)
    assert row["n"] == 12 and row["rounds"] == 2 and abs(row["speedup"] - 1.1) < 1e-9 and row["p"] < 0.01
    # each round on its own, and a p over the rounds (two rounds: never below 0.5, however many requests agree)
    assert row["by_round"] == pytest.approx([1.1, 1.1]) and row["p_rounds"] == 0.5
    assert "| 1.10x, 1.10x (0.5) |" in load_sweep.table({"runs": [], "paired": [row]})
    (first,) = paired_levels(tmp_path, "nf4", ["none", "adaptive"], ["c8"])
    assert first["n"] == 6 and "rounds" not in first

"""The load sweep's own logic (deployments/load_sweep.py): what it asks GuideLLM for and what it reads back."""

from deployments.load_sweep import scenario, speculation, speculation_during, summarize, table


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

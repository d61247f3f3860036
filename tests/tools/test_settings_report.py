"""The issue-13 bar as settings_report judges it."""

from speckv.tools.settings_report import row


def _policies(**geo: float) -> dict:
    """Policies whose per-prompt tokens/s are 10 prompts around each geomean (one prompt's noise apart)."""
    out = {}
    for name, g in geo.items():
        tps = [g * (1 + 0.01 * ((i % 3) - 1)) for i in range(10)]
        out[name.replace("_", ":")] = {"per_prompt": [{"tokens_per_s": t} for t in tps], "tokens_per_s_geomean": g}
    return out


def test_bar_met_when_adaptive_is_level_with_the_best_and_the_oracle_is_close():
    r = row("x", _policies(none=3.0, fixed_1=3.2, fixed_2=3.1, adaptive=3.15, oracle=3.4), "oracle")
    assert r["best_fixed"] == "fixed:1" and r["meets_bar"]


def test_bar_missed_below_97_percent_of_the_best_fixed():
    r = row("x", _policies(none=3.0, fixed_1=3.2, adaptive=3.0, oracle=3.3), "oracle")
    assert not r["meets_bar"]


def test_bar_needs_adaptive_strictly_faster_where_the_oracle_is_far_ahead():
    level = row("x", _policies(none=3.0, fixed_1=3.2, adaptive=3.2, oracle=4.0), "oracle")
    ahead = row("x", _policies(none=3.0, fixed_1=3.2, adaptive=3.5, oracle=4.0), "oracle")
    assert not level["meets_bar"] and ahead["meets_bar"]
    assert row("x", _policies(none=3.0, fixed_1=3.2, adaptive=3.2), None)["meets_bar"]  # live: no oracle

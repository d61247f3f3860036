"""The issue-13 bar as settings_report judges it."""

import pytest

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


def test_folders_of_different_prompts_are_judged_as_one(tmp_path):
    """Two collections' evaluations of one setting pool their prompts: the best fixed γ and the paired statistics
    are taken over all of them (each folder alone would pick another best fixed γ and have fewer pairs)."""
    import json
    import statistics

    from speckv.tools.settings_report import collect_rows, main

    def folder(name: str, **geo: float):
        (tmp_path / name).mkdir()
        doc = {"tiers": {"fp16": {"policies": _policies(**geo), "cost_model": {}}}}
        (tmp_path / name / "evaluate_fp16-bf16.json").write_text(json.dumps(doc))
        return tmp_path / name

    a = folder("a", none=3.0, fixed_1=3.4, fixed_2=3.2, adaptive=3.5, oracle=3.6)
    b = folder("b", none=3.0, fixed_1=3.1, fixed_2=3.2, adaptive=3.4, oracle=3.6)
    assert collect_rows(a)[0][0]["best_fixed"] == "fixed:1" and collect_rows(b)[0][0]["best_fixed"] == "fixed:2"
    rows, _ = collect_rows([a, b])
    assert len(rows) == 1 and rows[0]["prompts"] == 20
    assert rows[0]["best_fixed"] == "fixed:1"  # 3.4·3.1 > 3.2·3.2
    every = [p["tokens_per_s"] for g in (3.4, 3.1) for p in _policies(fixed_1=g)["fixed:1"]["per_prompt"]]
    assert rows[0]["tokens_per_s"]["fixed:1"] == pytest.approx(statistics.geometric_mean(every))
    assert main([str(a), str(tmp_path / "empty"), str(tmp_path / "docs")]) == 2  # a folder with nothing to judge

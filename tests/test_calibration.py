"""Calibration: the live loop's calls timed within a budget, fitted, and cached by what changes the costs."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from speckv import calibration
from speckv.batching import BatchSettings
from speckv.calibration import CalibrationKey, calibrate, cost_model, load_or_calibrate, weights_fingerprint
from speckv.workers import SessionLM, drop_float32_copies, multiplies_in

from .test_cli import run_cli


def test_calibration_times_the_live_calls_and_fits_them(draft_model, target_model):
    seen = []
    hook = target_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["input_ids"].shape[1], kw["logits_to_keep"])), with_kwargs=True)
    try:
        target = calibrate(SessionLM(target_model), "target", "fp16", max_gamma=3, context_lens=(16, 32), repeats=2)
    finally:
        hook.remove()
    draft = calibrate(SessionLM(draft_model), "draft", "fp16", max_gamma=3, context_lens=(16, 32), repeats=2)
    verify = sorted((r["context_len"], r["tokens"], r["sequences"]) for r in target.rows)
    assert verify == [(16, 1, 1), (16, 1, 4), (16, 2, 1), (16, 3, 1), (16, 3, 4), (16, 4, 1), (16, 4, 4), (32, 1, 1),
                      (32, 4, 1)]
    assert {r["kind"] for r in target.rows} == {"verify"}
    drafts = sorted((r["kind"], r["context_len"], r["tokens"], r["sequences"]) for r in draft.rows)
    # single token (alone and four in a pass), a catch-up of two tokens keeping one logit, and a prefill of
    # the first context into an empty cache (what reading a prompt or a long catch-up costs)
    assert drafts == [("draft", 16, 1, 1), ("draft", 16, 1, 4), ("draft", 16, 2, 1), ("draft", 32, 1, 1),
                      ("prefill", 0, 16, 1)]
    # verification after a crop: γ+1 tokens fed after the cached context, all of them scored
    assert (4, 4) in seen and all(fed == keep for fed, keep in seen if isinstance(keep, int) and fed > 1)
    assert target.complete and draft.complete and target.seconds > 0
    cost = cost_model(draft, target)
    # a pass costs something; the fitted line's base may be 0 (never below: NNLS) where a tiny model's noisy
    # timings put its few ms in the slopes (a fresh-clone CI run: base 0, 27 ms a token from one slow pass)
    assert cost.draft_ms_per_token > 0 and cost.verify_ms(0, 16) > 0 and cost.verify_ms_base >= 0
    prefill = next(r["ms"] for r in draft.rows if r["kind"] == "prefill")
    assert cost.draft_prefill_ms_per_token == pytest.approx(prefill / 16) and cost.catch_up_ms(18) > 0
    # decisions price γ with the measured points: the curve at the first context as measured (made
    # non-decreasing where noise dipped it: CostModel)
    from scipy.optimize import isotonic_regression

    measured = {r["tokens"]: r["ms"] for r in target.rows if r["context_len"] == 16 and r["sequences"] == 1}
    expected = isotonic_regression([measured[t] for t in (1, 2, 3, 4)]).x
    assert cost.verify_curve == pytest.approx(tuple(expected)) and cost.curve_context_len == 16
    assert cost.verify_ms(2, 16) == pytest.approx(expected[2])
    # a batched pass is priced through the measured batched points: four sequences scoring 1, 3 or 4 tokens
    # each, every token beyond one a sequence at the least-squares slope through them
    batched = {r["tokens"]: r["ms"] for r in target.rows if r["sequences"] == 4}
    assert cost.verify_ms(0, 16, sequences=4, other_tokens=3) == pytest.approx(batched[1])
    slope = (8 * (batched[3] - batched[1]) + 12 * (batched[4] - batched[1])) / (8**2 + 12**2)
    # (scoring more never priced cheaper: a tiny model's noise can time the wider pass below the narrow one)
    assert cost.verify_ms(3, 16, sequences=4, other_tokens=12) == pytest.approx(batched[1] + 12 * max(slope, 0.0))
    drafted = next(r["ms"] for r in draft.rows if r["sequences"] == 4)
    assert cost.draft_ms(2, sequences=4) == pytest.approx(2 * drafted)
    assert target.key.role == "target" and target.key.tier == "fp16" and target.key.dtype == "torch.float32"
    with pytest.raises(ValueError, match="draft and a target"):
        cost_model(target, draft)


def test_the_curve_fills_what_the_budget_left_out():
    from speckv.calibration import Calibration

    key = lambda role: CalibrationKey("cpu", "t", "m", role, "fp16", "float32", "cpu")  # noqa: E731
    target = Calibration(key("target"), [{"kind": "verify", "context_len": 64, "tokens": t, "ms": ms}
                                         for t, ms in ((1, 100.0), (5, 180.0), (2, 150.0))])
    draft = Calibration(key("draft"), [{"kind": "draft", "context_len": 64, "tokens": 1, "ms": 30.0}])
    cost = cost_model(draft, target)
    assert cost.verify_curve == (100.0, 150.0, 160.0, 170.0, 180.0)  # 3 and 4 interpolated, the rest as measured
    assert cost.draft_ms_per_token == 30.0
    noisy = Calibration(key("draft"), [{"kind": "draft", "context_len": 64, "tokens": 1, "ms": 224.0},
                                       {"kind": "draft", "context_len": 64, "tokens": 2, "ms": 132.0}])
    assert cost_model(noisy, target).draft_ms_per_token == 132.0  # one token never costs more than two
    assert cost.verify_ms(5, 64) == 180.0 + cost.verify_ms_per_token  # beyond the curve (γ = 4 is its end): its slope


def test_the_cost_model_prices_passes_from_the_probes_choice_on_its_float32_passes():
    """What the probe chose (passes from 8 positions in float32) and the line through its float32 passes go
    into the cost model, for the target and the draft apart; a calibration without a choice adds nothing."""
    from speckv.calibration import Calibration

    key = lambda role: CalibrationKey("cpu", "t", "m", role, "fp16", "bfloat16", "cpu")  # noqa: E731
    probe = lambda f32, choice: {"sizes": [{"tokens": n, "float32_ms": ms, "loaded_ms": 1.0}  # noqa: E731
                                           for n, ms in zip((16, 8, 4), f32)], "float32_from": choice}
    rows = [{"kind": "verify", "context_len": 64, "tokens": t, "ms": ms} for t, ms in ((1, 100.0), (9, 500.0))]
    target = Calibration(key("target"), rows, float32_probe=probe((1300.0, 1220.0, 1180.0), 8))
    draft = Calibration(key("draft"), [{"kind": "draft", "context_len": 64, "tokens": 1, "ms": 30.0}],
                        float32_probe=probe((400.0, 360.0, 340.0), 8))
    cost = cost_model(draft, target)
    assert cost.float32_from == cost.draft_float32_from == 8
    assert cost.float32_ms_per_token == pytest.approx(10.0)
    assert cost.draft_float32_ms == pytest.approx((320.0, 5.0))
    plain = cost_model(dataclasses.replace(draft, float32_probe=probe((400.0,), None)),
                       dataclasses.replace(target, float32_probe=None))
    assert plain.float32_from is None and plain.draft_float32_from is None


def test_a_longer_context_is_priced_at_the_cheapest_rate_measured():
    """Reading 448 more tokens is estimated from the draft's prefill rate (1.5 ms a token), or the cheapest pass
    per token (a 9-token verify: 20 ms), never at a 1-token pass's 130 ms a token (a minute: never measured)."""
    from speckv.calibration import estimate_measurement_ms

    verify = [{"kind": "verify", "tokens": 1, "ms": 130.0}, {"kind": "verify", "tokens": 9, "ms": 180.0}]
    assert estimate_measurement_ms(verify, 448, 1, 1, 3) == 448 * 20.0 + (1 + 3) * 130.0  # untimed first + 3
    draft = [{"kind": "draft", "tokens": 1, "ms": 50.0}, {"kind": "prefill", "tokens": 64, "ms": 96.0}]
    assert estimate_measurement_ms(draft, 448, 1, 1, 3) == 448 * 1.5 + 4 * 50.0
    assert estimate_measurement_ms(draft, 0, 1, 4, 3) == 4 * 2.5 * 50.0  # four sequences: 2.5 passes' worth


def test_long_passes_are_timed_once_so_the_budget_reaches_the_batched_ones(target_model, monkeypatch):
    """A 1.4 s pass (nf4 on an AVX2 EPYC) is timed once, not three times, and what one more sequence costs is
    measured next: at three repeats a 22 s budget held the two ends of the curve and never the batched passes
    load is priced with."""
    from speckv.calibration import ENOUGH_TIMED_MS, estimate_measurement_ms, time_call

    slow = [{"kind": "verify", "tokens": 1, "ms": 1448.0}, {"kind": "verify", "tokens": 9, "ms": 2453.0}]
    assert ENOUGH_TIMED_MS < 1448.0
    # untimed + one timed, each as 4 tokens on the line through the single passes (1448 + 3 × 125.6 ms)
    assert estimate_measurement_ms(slow, 0, 1, 4, 3) == pytest.approx(2 * (1448.0 + 3 * (2453.0 - 1448.0) / 8))
    monkeypatch.setattr(calibration, "ENOUGH_TIMED_MS", 100.0)  # the same, at a tenth of the scale
    lm = SessionLM(target_model, added_ms_per_call=150.0)
    start = time.perf_counter()
    time_call(lm, [1, 2, 3], 1, 1, repeats=3)
    assert time.perf_counter() - start < 0.6  # context, untimed, one timed: 0.45 s; three repeats: 0.75 s
    target = calibrate(SessionLM(target_model, added_ms_per_call=300.0), "target", "nf4", max_gamma=8,
                       context_lens=(16, 64), budget_s=4.5)
    assert [(r["tokens"], r["sequences"]) for r in target.rows][:3] == [(1, 1), (9, 1), (1, 4)]


def test_what_drafting_costs_a_batched_pass_is_measured_before_the_rest_of_the_curve(target_model):
    """Right after the curve's ends and the one-token batched pass, a batched pass scoring three tokens a
    sequence, and its price per token beyond one a sequence is what load-aware γ charges a drafted token in a
    shared pass. On an AVX2 EPYC the 22 s budget never reached the old batched row (γmax + 1 tokens, after the
    small-γ points) at any tier, so drafting under load was priced on the single-sequence line: 84-370 ms a
    token for an int8 pass of 8 sequences whose passes of 8 × 1 and 8 × 4 cost the same, and `adaptive` never
    drafted where `fixed:1` was faster (docs/serving_log.md)."""
    from speckv.calibration import Calibration

    # every call 300 ms more: five measurements fit where the whole plan (14) does not
    target = calibrate(SessionLM(target_model, added_ms_per_call=300.0), "target", "nf4", max_gamma=8,
                       context_lens=(16, 64), budget_s=6.0, repeats=1)
    assert not target.complete
    assert [(r["tokens"], r["sequences"]) for r in target.rows][:4] == [(1, 1), (9, 1), (1, 4), (3, 4)]
    # priced from the batched rows, not from the single line: a flat batched pass (as int8 on that EPYC) makes
    # a drafted token in a shared pass nearly free, however dear it is alone
    key = lambda role: CalibrationKey("cpu", "t", "m", role, "int8", "float32", "cpu")  # noqa: E731
    rows = [{"kind": "verify", "context_len": 64, "tokens": t, "ms": ms, "sequences": n}
            for t, n, ms in ((1, 1, 434.0), (9, 1, 1151.0), (1, 4, 893.0), (3, 4, 901.0))]
    draft = Calibration(key("draft"), [{"kind": "draft", "context_len": 64, "tokens": 1, "ms": 77.0}])
    cost = cost_model(draft, Calibration(key("target"), rows))
    assert cost.batched_ms_per_token == pytest.approx(1.0)
    assert cost.verify_ms(1, 64, sequences=8, other_tokens=7) - cost.verify_ms(0, 64, sequences=8, other_tokens=7) \
        == pytest.approx(1.0)
    alone = cost_model(draft, Calibration(key("target"), rows[:3]))  # without the row: the single line's 90 ms
    assert alone.batched_ms_per_token is None and alone.verify_ms_per_token == pytest.approx((1151 - 434) / 8, rel=0.01)


def test_the_budget_bounds_calibration_and_it_still_fits(draft_model, target_model):
    target = calibrate(SessionLM(target_model), "target", "fp16", max_gamma=8, context_lens=(16, 64), budget_s=1e-9)
    draft = calibrate(SessionLM(draft_model), "draft", "fp16", max_gamma=8, context_lens=(16, 64), budget_s=1e-9)
    assert not target.complete and not draft.complete
    assert [r["tokens"] for r in target.rows] == [1, 9]
    assert [(r["kind"], r["tokens"]) for r in draft.rows] == [("draft", 1), ("prefill", 16)]
    cost = cost_model(draft, target)
    assert cost.draft_ms_per_token > 0 and cost.draft_prefill_ms_per_token > 0


def test_the_budget_holds_with_slow_calls(target_model):
    """Every call takes 20 ms more: a 0.6 s budget ends calibration on time (a measurement that would not
    fit is left out, repeats stop at the deadline), not after the whole plan (about 3 s)."""
    result = calibrate(SessionLM(target_model, added_ms_per_call=20.0), "target", "fp16", max_gamma=8,
                       context_lens=(16, 64), budget_s=0.6)
    assert not result.complete and len(result.rows) >= 2
    assert result.seconds < 0.6 + 0.15, result.seconds


def test_cached_per_setting_and_measured_again_when_it_changes(draft_model, target_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECKV_HOME", str(tmp_path))
    target = SessionLM(target_model)
    kw = {"max_gamma": 2, "context_lens": (16,), "repeats": 1}
    first, cached = load_or_calibrate(target, "target", "fp16", **kw)
    assert not cached and calibration.calibration_path(first.key).is_file()

    measured = []
    real = calibration.calibrate
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: measured.append(1) or real(*a, **k))
    again, cached = load_or_calibrate(target, "target", "fp16", **kw)
    assert cached and again.to_dict() == first.to_dict() and not measured
    _, cached = load_or_calibrate(target, "target", "nf4", **kw)  # another tier: its own entry
    assert not cached and measured == [1]
    _, cached = load_or_calibrate(SessionLM(draft_model), "target", "fp16", **kw)  # other weights: their own
    assert not cached and measured == [1, 1]
    _, cached = load_or_calibrate(SessionLM(target_model, added_ms_per_call=1.0), "target", "fp16", **kw)
    assert not cached and measured == [1, 1, 1]  # a slowed model (tests' added delay) is not the model
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        assert CalibrationKey.of(target_model, "target", "fp16") != first.key
    finally:
        torch.set_num_threads(threads)
    calibration.calibration_path(first.key).write_text("{not json")  # a damaged file is measured anew
    repaired, cached = load_or_calibrate(target, "target", "fp16", **kw)
    written = json.loads(calibration.calibration_path(first.key).read_text())
    assert not cached and written["format"] == calibration.CALIBRATION_FORMAT
    _, cached = load_or_calibrate(target, "target", "fp16", force=True, **kw)
    assert not cached


def test_a_cached_calibration_dearer_than_its_spot_check_at_load_is_measured_anew(draft_model, target_model,
                                                                                   tmp_path, monkeypatch):
    """A calibration measured while something else held the machine stays cached until its key changes (a bf16
    one 4x dear priced drafting out, live). At load its first measurement is timed again: a cache over twice as
    dear as now is measured anew and replaced; one cheaper than now is kept (the machine is busy now: the load
    is the online estimates' to follow, and measured now, the cache would keep it). `speckv calibrate` says so."""
    from speckv.calibration import PairCalibration

    monkeypatch.setenv("SPECKV_HOME", str(tmp_path))
    kw = {"max_gamma": 2, "context_lens": (16,), "repeats": 1}
    loaded = {}
    for role, model in (("target", target_model), ("draft", draft_model)):
        lm = SessionLM(model)
        first, _ = load_or_calibrate(lm, role, "fp16", **kw)
        path = calibration.calibration_path(first.key)
        written = json.loads(path.read_text())

        def cache_scaled(factor: float, extra_ms: float) -> float:
            """The cache file with every row's ms scaled; returns the spot-checked row's."""
            doc = json.loads(json.dumps(written))
            for row in doc["rows"]:
                row["ms"] = row["ms"] * factor + extra_ms
            path.write_text(json.dumps(doc))
            return doc["rows"][0]["ms"]  # the first measurement: one token, verified or drafted

        busy_now = cache_scaled(0.01, 0.0)
        kept, cached = load_or_calibrate(lm, role, "fp16", **kw)
        assert cached and kept.rows[0]["ms"] == busy_now
        assert kept.spot_check["cached_ms"] == busy_now and not kept.spot_check["stale"]
        assert kept.spot_check["now_ms"] > busy_now

        stale = cache_scaled(4.0, 50.0)
        again, cached = load_or_calibrate(lm, role, "fp16", **kw)
        assert not cached and again.spot_check["stale"] and again.spot_check["cached_ms"] == stale
        assert json.loads(path.read_text())["rows"][0]["ms"] < stale  # replaced by what was measured now
        loaded[role] = again
    text = PairCalibration(loaded["draft"], loaded["target"], False).describe()
    assert text.count("spot check at load") == 2 and "stale, measured anew" in text
    assert "with " not in text  # the tiny models run none of speckv.kernels
    loaded["target"].key = dataclasses.replace(loaded["target"].key, kernels="small-rows,nf4-many-rows")
    text = PairCalibration(loaded["draft"], loaded["target"], False).describe()
    assert "target, with small-rows,nf4-many-rows: measured in" in text and "draft: measured in" in text


def test_a_read_only_speckv_home_caches_calibrations_in_the_temp_directory(target_model, tmp_path, monkeypatch):
    """cluster/ mounts SPECKV_HOME (the models' volume) read-only: a replica there still measures, caches and
    takes its turn under the lock, in the system's temp directory, instead of failing to load."""
    import tempfile

    blocked = tmp_path / "home"
    blocked.write_text("a file where the directory would be")  # nothing can be made under it, even by root
    monkeypatch.setenv("SPECKV_HOME", str(blocked))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lm, kw = SessionLM(target_model), {"max_gamma": 1, "context_lens": (8,), "repeats": 1}
    first, cached = load_or_calibrate(lm, "target", "fp16", **kw)
    path = calibration.calibration_path(first.key)
    assert not cached and path.is_file() and path.parent == tmp_path / "tmp" / "speckv-calibration"
    assert load_or_calibrate(lm, "target", "fp16", **kw)[1]  # and found there at the next load


def test_a_replica_with_a_cached_calibration_warms_its_model_up(draft_model, target_model, tmp_path, monkeypatch):
    """Every live call shape runs once before the first request (its first passes are the slow ones), only
    where calibration did not already run them, and no warm-up session stays behind."""
    from deployments.workers import WorkerSpec

    monkeypatch.setenv("SPECKV_HOME", str(tmp_path))
    shapes = []
    for role, model in (("target", target_model), ("draft", draft_model)):
        lm = SessionLM(model)
        real = lm.logits_batch
        monkeypatch.setattr(lm, "logits_batch", lambda calls, real=real: shapes.append(
            (len(calls), max(len(c.token_ids) for c in calls), calls[0].num_logits)) or real(calls))
        assert calibration.warm_up(lm, role, max_gamma=2) > 0 and lm.stats().sessions == 0
    # (sequences, tokens fed after the 64-token context, logits kept): target 1 token, γmax+1 tokens, γmax+1
    # for BATCH_PROBE sequences; draft one token, a two-token catch-up keeping one logit, one token batched
    fed = sorted({(n, t - 64, k) for n, t, k in shapes if t > 64})
    assert fed == [(1, 1, 1), (1, 2, 1), (1, 3, 3), (4, 1, 1), (4, 3, 3)], shapes

    tiny = SessionLM(target_model, max_kv_bytes=1)  # a replica bound too small for any warm-up pass
    calibration.warm_up(tiny, "target", max_gamma=2)  # loads all the same, its bound kept for what it serves
    assert tiny.max_kv_bytes == 1 and tiny.stats().sessions == 0

    warmed = []
    monkeypatch.setattr("deployments.workers.warm_up", lambda lm, role: warmed.append(role))
    spec = WorkerSpec(model="unused", calibration_budget_s=2.0)
    lm = SessionLM(target_model)
    spec.calibrate(lm, "target")  # measured: warm already
    assert warmed == []
    spec.calibrate(lm, "target")  # cached: warmed up
    assert warmed == ["target"]


def test_weights_fingerprint_follows_the_files(tmp_path):
    from .conftest import tiny_model

    model = tiny_model(0)
    model.save_pretrained(tmp_path)
    model.config._name_or_path = str(tmp_path)
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes() + b"x")
    assert weights_fingerprint(model) != before


def test_calibrate_command(tmp_path):
    from transformers import AutoTokenizer

    from speckv.models import DEFAULT_TARGET, resolve_model_dir

    from .conftest import perturbed_copy, tiny_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(DEFAULT_TARGET))
    target = tiny_model(0)
    for name, model in (("target", target), ("draft", perturbed_copy(target, 0.2, 1))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    args = ["calibrate", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--dtype", "float32",
            "--max-gamma", "2", "--context-lens", "16", "--repeats", "1"]
    env = {"SPECKV_HOME": str(tmp_path / "home")}
    first = run_cli(*args, "--json", env=env)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert not doc["cached"] and doc["cost_model"]["verify_curve"][0] > 0 <= doc["cost_model"]["verify_ms_base"]
    assert doc["target"]["key"]["hardware"].startswith("cpu:") and doc["draft"]["key"]["role"] == "draft"
    text = run_cli(*args, env=env)
    assert text.returncode == 0 and "cached in" in text.stdout and "cost model: verify" in text.stdout, text.stdout
    for bad, message in ((["--budget-s", "0"], "--budget-s must be > 0"), (["--max-gamma", "99"], "--max-gamma"),
                         (["--context-lens", "x"], "comma-separated")):
        proc = run_cli(*args, *bad, env=env)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_the_offline_profile_times_the_same_calls(draft_model, target_model):
    """`speckv cost` (and collect) time through the same `time_call`: every γ at every context, fitted."""
    from speckv.tools.costs import measure_loaded_costs

    doc = measure_loaded_costs(SessionLM(draft_model), SessionLM(target_model), [0, 1, 3], [8, 24], repeats=2)
    assert [(r["context_len"], r["gamma"]) for r in doc["rows"]] == [(8, 0), (8, 1), (8, 3), (24, 0), (24, 1), (24, 3)]
    assert all(r["verify_ms"] > 0 for r in doc["rows"]) and doc["cost_model"]["draft_ms_per_token"] > 0
    # the draft's prefill of the first context, so replay prices its catch-up as the live policy does
    assert doc["cost_model"]["draft_prefill_ms_per_token"] == doc["draft_prefill_ms"]["ms"] / 8 > 0


def test_replicas_loading_together_measure_one_at_a_time(draft_model, target_model, tmp_path, monkeypatch):
    """Calibrations on one machine never overlap (each would time the other's load), and one that waited
    for the same key reuses what was measured meanwhile."""
    import threading
    import time

    monkeypatch.setenv("SPECKV_HOME", str(tmp_path))
    spans = []
    real = calibration.calibrate

    def slow(*args, **kwargs):
        start = time.perf_counter()
        time.sleep(0.3)
        result = real(*args, **kwargs)
        spans.append((start, time.perf_counter()))
        return result

    monkeypatch.setattr(calibration, "calibrate", slow)
    kw = {"max_gamma": 1, "context_lens": (8,), "repeats": 1}
    target, draft = SessionLM(target_model), SessionLM(draft_model)
    jobs = [(target, "target"), (target, "target"), (draft, "draft")]
    cached = {}
    threads = [threading.Thread(target=lambda i=i, lm=lm, role=role: cached.__setitem__(
        i, load_or_calibrate(lm, role, "fp16", **kw)[1])) for i, (lm, role) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(spans) == 2 and sorted(cached.values()) == [False, False, True]  # the same key measured once
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    assert a_end <= b_start  # one after the other


@pytest.fixture
def private_cores(tmp_path, monkeypatch):
    """The cores' lease (speckv.batching.CoreLease, a file in the temp directory) private to the test: a server
    running on the machine meanwhile holds the machine's own for each of its passes."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _cores_held() -> bool:
    """Whether some replica on this machine holds the shared cores (speckv.batching.CoreLease) now."""
    import fcntl
    import os

    from speckv.batching import CoreLease

    fd = os.open(CoreLease().path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_replica_sharing_the_cores_holds_them_while_it_calibrates(target_model, tmp_path, monkeypatch,
                                                                    private_cores):
    """Replicas of one machine take turns for its cores; one that loads (a tier scaling up from zero under
    load) must neither time the others' passes nor slow them while it measures or warms up."""
    from deployments.workers import WorkerSpec

    monkeypatch.setenv("SPECKV_HOME", str(tmp_path))
    held = []

    def probe(*args, **kwargs):
        held.append(_cores_held())
        return real(*args, **kwargs)

    real = calibration.load_or_calibrate
    monkeypatch.setattr("deployments.workers.load_or_calibrate", probe)
    lm = SessionLM(target_model)
    WorkerSpec(model="unused", calibration_budget_s=1.0, share_cores=True).calibrate(lm, "target")
    WorkerSpec(model="unused", calibration_budget_s=1.0).calibrate(lm, "target")
    assert held == [True, False]


def test_a_replica_sharing_the_cores_holds_them_while_it_loads(target_model, monkeypatch, private_cores):
    """Loading quantizes weights and times kernels: beside another replica's calibration on the AMX Xeon it made
    the draft's measured 5-8x what its passes cost, and `adaptive` never drafted where drafting paid 1.31x."""
    from deployments.workers import WorkerSpec

    held = []

    def load(*args, **kwargs):
        held.append(_cores_held())
        return target_model

    monkeypatch.setattr("deployments.workers.load_model", load)
    WorkerSpec(model="unused", share_cores=True).build_lm()
    WorkerSpec(model="unused").build_lm()
    assert held == [True, False]


def test_a_replica_logs_what_its_load_time_probes_chose(target_model, monkeypatch, caplog):
    """They differ between machines and, near a crossover, between loads: an operator reads them in the log."""
    import logging

    from deployments.workers import WorkerSpec

    monkeypatch.setattr("deployments.workers.load_model", lambda *args, **kwargs: target_model)
    monkeypatch.setattr("deployments.workers.kernels_for", lambda model: "small-rows,nf4-many-rows")
    monkeypatch.setattr("deployments.workers.many_rows_of", lambda model: {(8960, 1536): 24})
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        WorkerSpec(model="some/model", tier="nf4").build_lm()
    assert ("some/model at nf4 loaded; kernels of ours: small-rows,nf4-many-rows; 4-bit passes dequantized from "
            "(rows by weight shape) {(8960, 1536): 24}") in caplog.messages


@pytest.mark.parametrize("crossover, expected", [(None, None), (8, 8), (1, 1)])
def test_a_half_precision_model_computes_in_float32_from_the_pass_size_its_calibration_measured(
        half_model, tmp_path, monkeypatch, crossover, expected):
    """The probe times passes of 16, 8, 4, 2 and 1 tokens with the half-precision layers (4-bit or plain bf16)
    in float32 and as loaded (bf16), and passes from the smallest size at which float32 won (and won at every
    larger size) run in float32. Made here: passes cost 0.3 s more in bf16 from `crossover` rows on and in
    float32 below it (None: float32 always slower). Every calibration pass after the probe ran as chosen; a
    replica that finds the calibration cached chooses the same; float32 copies exist only where chosen."""
    monkeypatch.setenv("SPECKV_HOME", str(tmp_path))
    seen: list[tuple[int, torch.dtype]] = []

    def slow(module, args):
        rows = args[0].shape[0] * args[0].shape[1] if args[0].dim() == 3 else args[0].shape[0]
        in_float32 = multiplies_in(module) == torch.float32
        seen.append((rows, multiplies_in(module)))
        if in_float32 == (crossover is None or rows < crossover):
            time.sleep(0.3)

    lm = SessionLM(half_model)
    plain = type(lm.half_layers[0]) is torch.nn.Linear  # not 4-bit
    tier = "fp16" if plain else "nf4"
    hook = lm.half_layers[0].register_forward_pre_hook(slow)
    try:
        result, cached = load_or_calibrate(lm, "target", tier, max_gamma=2, context_lens=(64,), repeats=1)
    finally:
        hook.remove()
    probe = result.float32_probe
    assert not cached and result.float32_from == lm.float32_from == expected
    assert [r["tokens"] for r in probe["sizes"]] == {None: [16], 8: [16, 8, 4], 1: [16, 8, 4, 2, 1]}[crossover]
    after_probe = seen[1 + 2 * len(probe["sizes"]):]  # the warm-up pass, then the probe's
    assert after_probe and all((dtype == torch.float32) == (expected is not None and rows >= expected)
                               for rows, dtype in after_probe)
    assert (lm.float32_copy_bytes() > 0) == (expected is not None)
    again = SessionLM(half_model)
    drop_float32_copies(again.half_layers + [again.output_layer])  # the same modules: the first worker's copies
    reloaded, cached = load_or_calibrate(again, "target", tier, max_gamma=2, context_lens=(64,), repeats=1)
    assert cached and reloaded.float32_probe == probe and again.float32_from == expected
    assert (again.float32_copy_bytes() > 0) == (expected is not None)


def test_an_engine_with_a_half_precision_target_is_calibrated_when_it_loads(half_model, draft_model, tokenizer,
                                                                            tmp_path, monkeypatch):
    """The in-process engine calibrates a target with half-precision layers on the CPU (4-bit or bf16) at once
    (its calibration decides how prompts are read, from the first request whatever its policy); a
    full-precision pair is still calibrated at first use."""
    from speckv.local import LocalEngine

    monkeypatch.setenv("SPECKV_HOME", str(tmp_path))
    real_probe = calibration.probe_float32_from

    def float32_chosen(lm, context, session):  # a tiny model may run faster as loaded: float32 is the case to see
        measured = real_probe(lm, context, session)
        lm.compute_in_float32_from(4)
        return {**measured, "float32_from": 4}

    monkeypatch.setattr(calibration, "probe_float32_from", float32_chosen)
    engine = LocalEngine(draft_model, half_model, tokenizer, tier="nf4", calibration_budget_s=3.0)
    assert engine.estimates is not None
    assert load_or_calibrate(SessionLM(half_model), "target", "nf4")[0].float32_from == 4
    assert engine.target_worker.lm.float32_from == 4
    # a copy with estimates handed in (dataclasses.replace: new workers) reads prompts as the calibration chose too
    copy = dataclasses.replace(engine, batching=BatchSettings(max_batch_size=4))
    assert copy.target_worker.lm is not engine.target_worker.lm and copy.estimates is engine.estimates
    assert copy.target_worker.lm.float32_from == 4
    assert LocalEngine(draft_model, draft_model, tokenizer, tier="nf4").estimates is None


def test_the_drafts_catch_up_is_timed_as_a_prompt_is_read(bf16_model):
    """time_prefill (what a draft's catch-up costs) reads its tokens the way a replica reads a prompt: a pass
    as long as the probe's choice in float32 (here from 16 positions), not as loaded."""
    lm = SessionLM(bf16_model)
    lm.compute_in_float32_from(16)
    seen = []
    hook = lm.half_layers[0].register_forward_pre_hook(lambda module, args: seen.append(multiplies_in(module)))
    try:
        calibration.time_prefill(lm, 40, "catch-up")
    finally:
        hook.remove()
    assert seen == [torch.float32]

"""What a step costs, followed online: the robust factor and the per-call hop."""

import numpy as np
import pytest

from speckv.cost_model import CostModel, LiveCost, RobustScale, TokenFactor


def test_robust_scale_follows_a_step_change_and_ignores_outliers():
    scale = RobustScale(window=9)
    for _ in range(9):
        scale.observe(100.0, 100.0)
    for outlier in (5000.0, 1.0, 4000.0):  # fewer than half the window
        scale.observe(outlier, 100.0)
    assert scale.value == pytest.approx(1.0)
    for _ in range(5):  # a real change: half the window sees it
        scale.observe(300.0, 100.0)
    assert scale.value == pytest.approx(3.0)


def test_the_hop_is_learned_apart_from_the_model_time():
    """Served, each call pays a fixed hop: learned as such, it is paid by any drafting step whatever its γ and
    not at all by a step that does not draft; folded into the per-token factor (wall time only), the cost of
    long drafts is overestimated."""
    base = CostModel(draft_ms_per_token=10.0, verify_ms_base=50.0, verify_ms_per_token=2.0)
    hop = 4.0
    split, folded = LiveCost(base), LiveCost(base)
    for _ in range(9):  # steps drafting one token, the models as calibrated, every call `hop` ms outside them
        d, v = float(base.draft_ms(1)), float(base.verify_ms(1))
        split.observe(1, d + hop, v + hop, 0, d, v)
        folded.observe(1, d + hop, v + hop, 0)
    for gamma in (1, 4, 8):
        truth = float(base.step_ms(gamma)) + 2 * hop
        assert float(split.step_ms(gamma)) == pytest.approx(truth)
    assert float(split.step_ms(0)) == pytest.approx(float(base.verify_ms(0)) + hop)  # no draft call, no hop
    assert float(folded.step_ms(8)) > float(base.step_ms(8)) + 2 * hop + 20  # 1.4x per token, times 8
    assert split.to_dict()["draft_hop_ms"] == pytest.approx(hop)


def test_batched_passes_are_priced_and_learned_as_batched():
    """A pass of eight sequences costs more than one alone, by what calibration measured; the live factor
    compares a batched pass with the batched price (so it stays 1 when the calibration holds), and what one
    sequence's drafting adds to the passes it shares is 0 alone."""
    base = CostModel(draft_ms_per_token=2.0, verify_ms_base=20.0, verify_ms_per_token=0.5,
                     verify_ms_per_sequence=1.0, batched_ms_per_token=0.4, draft_ms_per_sequence=0.3)
    assert base.verify_ms(2, 0, sequences=8, other_tokens=21) == pytest.approx(20 + 7 * 1.0 + 0.4 * (2 + 14))
    assert base.draft_ms(3, sequences=8) == pytest.approx(3 * (2.0 + 7 * 0.3))
    live = LiveCost(base)
    for _ in range(9):
        d, v = float(base.draft_ms(2, 8)), float(base.verify_ms(2, 0, 8, 21))
        live.observe(2, d, v, 0, d, v, sequences=8, batch_tokens=24)
    assert live.verify.value == pytest.approx(1.0) and live.draft.value == pytest.approx(1.0)
    assert live.shared_ms(3) == 0.0
    assert live.shared_ms(3, 0, 8, 21) == pytest.approx(3 * 0.4 + 3 * 0.3)


def test_what_a_sequence_drafting_adds_for_the_others_is_its_drafted_tokens_and_its_part_of_the_drafting_passes():
    """In a pass of eight: for the requests in its passes (`shared`), its γ tokens scored in the verify pass and one
    sequence more in each drafting pass it leads along with the others, a whole drafting pass beyond `led`; for
    requests on the same cores outside its passes (`alone`), the same tokens and its share of each drafting pass.
    One DraftingPrices prices every lead from one verify price, as LiveCost.shared_ms/alone_ms do."""
    base = CostModel(draft_ms_per_token=2.0, verify_ms_base=20.0, verify_ms_per_token=0.5,
                     verify_ms_per_sequence=1.0, batched_ms_per_token=0.4, draft_ms_per_sequence=0.3)
    live = LiveCost(base)
    drafted, share = 3 * 0.4, (2.0 + 7 * 0.3) / 8
    assert live.alone_ms(3, 0, 8, 21) == pytest.approx(drafted + 3 * share)
    assert live.alone_ms(3, 0, 8, 21, led=1) == pytest.approx(drafted + share + 2 * 2.0)
    assert live.shared_ms(3, 0, 8, 21, led=1) == pytest.approx(drafted + 0.3 + 2 * 2.0)
    prices = live.drafting_prices(np.arange(4), 0, 8, 21)
    assert prices.step == pytest.approx(live.step_ms(np.arange(4), 0, 8, 21))
    for led in (0, 1, None):
        assert prices.shared(led) == pytest.approx(live.shared_ms(np.arange(4), 0, 8, 21, led))
        assert prices.alone(led) == pytest.approx(live.alone_ms(np.arange(4), 0, 8, 21, led))


def test_passes_that_switch_to_float32_are_priced_on_the_float32_passes_not_the_bf16_line():
    """Where passes of `float32_from` positions or more compute in float32 (a CPU emulating bf16), such a
    batched verify pass costs what one sequence scoring as many tokens does (the measured curve, then the
    float32 slope), a smaller one the bf16 batched price; a drafting pass as wide is priced on the draft's
    float32 line. The AVX2 EPYC's fp16 shape, rounded: bf16 +180 ms a row, float32 about flat from 8 rows."""
    curve = (280.0, 520.0, 590.0, 770.0, 1250.0, 1250.0, 1320.0, 1210.0, 1250.0)  # 1..9 tokens, a switch at 8
    bf16 = dict(draft_ms_per_token=85.0, verify_ms_base=300.0, verify_ms_per_token=180.0, verify_curve=curve,
                verify_ms_per_sequence=184.0, draft_ms_per_sequence=70.0)
    base = CostModel(**bf16)
    wide = CostModel(**bf16, float32_from=8, float32_ms_per_token=5.0, draft_float32_from=8,
                     draft_float32_ms=(330.0, 4.0))
    flat = wide.verify_curve[-1]  # the isotonic fit of the curve's end
    assert wide.verify_ms(0, 0, sequences=4, other_tokens=3) == base.verify_ms(0, 0, 4, 3) == 280 + 3 * 184
    assert wide.verify_ms(0, 0, sequences=8, other_tokens=7) == pytest.approx(wide.verify_curve[7])
    assert wide.verify_ms(2, 0, sequences=8, other_tokens=21) == pytest.approx(flat + 5.0 * (24 - 9))
    assert base.verify_ms(2, 0, sequences=8, other_tokens=21) == pytest.approx(280 + 7 * 184 + 180 * 16)
    assert wide.verify_ms(12) == pytest.approx(flat + 5.0 * 4)  # one sequence beyond the curve: float32's slope
    assert wide.draft_ms(2, sequences=4) == base.draft_ms(2, sequences=4) == pytest.approx(2 * (85 + 3 * 70))
    assert wide.draft_ms(2, sequences=8) == pytest.approx(2 * 330 + 4.0 * 16)
    assert CostModel.from_dict(wide.to_dict()) == wide


def test_a_noisy_dip_in_the_measured_curve_never_makes_drafting_look_free():
    """Measured on a tiny model in CI: one token 8.0 ms, two 2.5 ms. Priced as measured, drafting one token
    (draft 3.8 ms) would cost -1.7 ms and a policy sure that nothing is accepted would draft."""
    cost = CostModel(draft_ms_per_token=3.8, verify_ms_base=3.0, verify_ms_per_token=0.4,
                     verify_curve=(8.0, 2.5, 3.5, 3.2, 3.6))
    assert all(b >= a for a, b in zip(cost.verify_curve, cost.verify_curve[1:]))
    assert sum(cost.verify_curve) == pytest.approx(8.0 + 2.5 + 3.5 + 3.2 + 3.6)  # a least-squares fit: same mean
    assert all(float(cost.step_ms(g)) - float(cost.step_ms(0)) >= cost.draft_ms_per_token * g for g in range(1, 6))
    monotone = (1.0, 2.0, 2.0, 3.0)
    assert CostModel(1.0, 1.0, 1.0, verify_curve=monotone).verify_curve == monotone


def test_the_drafts_catch_up_is_priced_beyond_what_a_drafting_step_feeds_and_not_learned_as_drafting():
    """A draft that lacks 66 tokens of the context (a 64-token prompt and two more) reads them first: 64 at
    the calibrated prefill price (the two a drafting step always feeds are in draft_ms_per_token). A step
    whose draft call was mostly that prefill does not move the drafting factor."""
    base = CostModel(draft_ms_per_token=80.0, verify_ms_base=250.0, verify_ms_per_token=5.0,
                     draft_prefill_ms_per_token=14.0)
    assert base.catch_up_ms(66) == pytest.approx(64 * 14.0)
    assert base.catch_up_ms(2) == 0.0 and base.catch_up_ms(0) == 0.0
    assert CostModel.from_dict(base.to_dict()) == base
    live = LiveCost(base)
    for _ in range(9):
        live.observe(1, 80.0 + base.catch_up_ms(40), 255.0, 0, 80.0 + base.catch_up_ms(40), 255.0, draft_behind=40)
    assert live.draft.value == pytest.approx(1.0) and live.verify.count == 9
    for _ in range(9):  # a slower draft (a neighbour) scales its catch-up too
        live.observe(1, 160.0, 255.0, 0, 160.0, 255.0, draft_behind=1)
    assert live.catch_up_ms(66) == pytest.approx(2 * 64 * 14.0)


def test_a_prompt_riding_in_the_verify_pass_teaches_neither_the_verify_cost_nor_the_load():
    """A new request's prompt read in the running requests' verify pass (speckv.workers.DEFAULT_PREFILL_CHUNK)
    makes that pass several times as long: the steps sharing it report the context it read (`verify_read`), and
    neither the verify curve nor the tokens a pass carries learn from it; the passes without one still teach."""
    from speckv.estimates import RequestEstimates, TierEstimates
    from speckv.policy import StepTiming

    base = CostModel(draft_ms_per_token=80.0, verify_ms_base=250.0, verify_ms_per_token=5.0,
                     verify_ms_per_sequence=20.0)
    tier = TierEstimates.calibrated(base)
    request = RequestEstimates(tier, greedy=True)
    plain = float(base.verify_ms(0, 100, 8, 7))
    for _ in range(9):  # eight sequences, one token each, and a 64-token prompt read beside them
        request.observe_step(0, StepTiming(0.0, plain * 3, 100, 1, 0.0, plain * 3, 8, 8 + 64, verify_read=64))
    assert tier.cost.verify.count == 0 and tier.cost.verify.value == 1.0
    assert tier.load.tokens.value == 8.0
    for _ in range(9):  # the same passes without the prompt, 10% slower than calibrated: learned
        request.observe_step(0, StepTiming(0.0, plain * 1.1, 100, 1, 0.0, plain * 1.1, 8, 8))
    assert tier.cost.verify.value == pytest.approx(1.1)


def test_waiting_in_a_replica_for_a_pass_is_not_learned_as_a_hop():
    """Under load a call waits in its replica for the cores or the batch: that is the load's time, and it goes
    with the load. Learned as a hop it would stay in every drafting step's price (target-only steps never
    call the draft to unlearn it)."""
    base = CostModel(draft_ms_per_token=50.0, verify_ms_base=130.0, verify_ms_per_token=2.0)
    live = LiveCost(base)
    for _ in range(9):  # loaded: every call waits 300 ms in its replica, 4 ms outside it
        d, v = float(base.draft_ms(2)), float(base.verify_ms(2))
        live.observe(2, d + 304, v + 304, 0, d, v, draft_waited_ms=300.0, verify_waited_ms=300.0)
    assert live.draft_hop.value == pytest.approx(4.0) and live.verify_hop.value == pytest.approx(4.0)


def test_a_hop_learned_under_load_is_gone_after_one_unloaded_call():
    """Waiting a replica cannot report (behind another request's pass on its event loop, or for a busy router
    loop) shows up outside the models. The hop is the floor of those times: under load it does not rise with
    the waits, and the first call after the load, a probe of a policy that stopped drafting, brings it back."""
    base = CostModel(draft_ms_per_token=50.0, verify_ms_base=130.0, verify_ms_per_token=2.0)
    live = LiveCost(base)
    d, v = float(base.draft_ms(2)), float(base.verify_ms(2))
    for wait in (320.0, 250.0, 410.0, 300.0, 280.0, 350.0, 330.0, 290.0, 305.0):  # loaded: waits of 250-410 ms
        live.observe(2, d + 4 + wait, v + 4 + wait, 0, d, v)
    assert live.draft_hop.value == pytest.approx(254.0)  # never below what every loaded call waited
    live.observe(1, float(base.draft_ms(1)) + 4, float(base.verify_ms(1)) + 4, 0, float(base.draft_ms(1)),
                 float(base.verify_ms(1)))  # the probe, unloaded
    assert live.draft_hop.value == pytest.approx(4.0) and live.verify_hop.value == pytest.approx(4.0)
    assert float(live.step_ms(1)) == pytest.approx(float(base.step_ms(1)) + 8.0)
    for _ in range(8):  # one slow call among unloaded ones moves nothing
        live.observe(1, float(base.draft_ms(1)) + 4, float(base.verify_ms(1)) + 4, 0, float(base.draft_ms(1)),
                     float(base.verify_ms(1)))
    live.observe(1, float(base.draft_ms(1)) + 500, float(base.verify_ms(1)) + 4, 0, float(base.draft_ms(1)),
                 float(base.verify_ms(1)))
    assert live.draft_hop.value == pytest.approx(4.0)


def test_one_call_that_waited_behind_a_wave_of_prefills_does_not_set_the_hop():
    """The first calls of a loaded server wait behind other requests' prefill passes, waiting a replica cannot
    see begin (measured: 13.9 s). Taken alone as the hop, it priced a target-only step at 16 s where a pass
    took 1.7 s; the calibration's hop (0: it times the models alone) stays in the floor for a window of calls."""
    base = CostModel(draft_ms_per_token=90.0, verify_ms_base=1600.0, verify_ms_per_token=150.0)
    live = LiveCost(base)
    d, v = float(base.draft_ms(1)), float(base.verify_ms(1))
    live.observe(1, d + 13906.0, v + 13906.0, 0, d, v)
    assert float(live.step_ms(0)) == pytest.approx(float(base.step_ms(0)))
    for _ in range(9):  # a hop every call pays is learned once a window of calls has shown it
        live.observe(1, d + 5.0, v + 5.0, 0, d, v)
    assert live.verify_hop.value == pytest.approx(5.0)


def test_a_fitted_line_never_has_a_negative_base_or_slope():
    """Three noisy single timings of a tiny model's ~1 ms passes (fresh-clone CI): unconstrained, the line through
    them had a verify base of -0.4 ms. Every coefficient is fitted non-negative, and a clean line is found as is."""
    noisy = CostModel.fit([0, 1, 2], [0.0] * 3, [0.2, 0.3, 3.1], [16] * 3)  # unconstrained: base -0.25
    assert noisy.verify_ms_base >= 0 and noisy.verify_ms_per_token >= 0
    assert float(noisy.verify_ms(0)) >= 0
    falling = CostModel.fit([0, 1, 2], [0.0] * 3, [3.0, 2.0, 1.0])
    assert falling.verify_ms_per_token == 0 and falling.verify_ms_base == pytest.approx(2.0)
    clean = CostModel.fit([0, 1, 2, 3], [0.0] * 4, [10.0, 12.0, 14.0, 16.0], [0, 0, 64, 64])
    assert clean.verify_ms_base == pytest.approx(10.0) and clean.verify_ms_per_token == pytest.approx(2.0)


def test_the_verify_curves_per_token_part_is_learned_apart_from_its_level():
    """Calibrated with a verify slope 4x too low, the live passes (10% noise each, γ 0..8, the whole machine
    1.5x slower from step 80 on: a neighbour) teach the per-token part and the level apart: after 160 steps
    the marginal token and the whole curve are right; with the level learned alone the curve is right only at
    the γ it saw most and the marginal token stays 4x too cheap. (The level itself is a median of the last 9
    noisy passes: within ±20%.)"""
    import numpy as np

    truth = CostModel(draft_ms_per_token=70.0, verify_ms_base=1900.0, verify_ms_per_token=120.0)
    calibrated = CostModel(draft_ms_per_token=70.0, verify_ms_base=1900.0, verify_ms_per_token=30.0)
    rng = np.random.default_rng(0)
    both, level_only = LiveCost(calibrated), LiveCost(calibrated, learn_shape=False)
    for step in range(160):
        gamma = int(rng.integers(0, 9))
        slow = 1.5 if step >= 80 else 1.0
        v = slow * float(truth.verify_ms(gamma)) * float(np.exp(rng.normal(0, 0.1)))
        for live in (both, level_only):
            live.observe(gamma, 0.0, v, 0, 0.0, v)
    shape = float(both.verify_ms(8)) / float(both.verify_ms(0))  # the level's own noise (a median of 9) cancels
    assert shape == pytest.approx(float(truth.verify_ms(8)) / float(truth.verify_ms(0)), rel=0.05)
    assert both.to_dict()["verify_token_factor"] == pytest.approx(4.0, rel=0.15)
    assert float(both.verify_ms(4)) == pytest.approx(1.5 * float(truth.verify_ms(4)), rel=0.2)
    level_only_marginal = (float(level_only.verify_ms(8)) - float(level_only.verify_ms(0))) / 8
    assert level_only_marginal < 0.5 * 1.5 * 120.0


def test_the_requests_of_one_pass_are_one_observation_of_the_token_factor():
    """Under load every request of a pass reports the pass. Three noise-free passes whose tokens say the slope is
    4x the calibration's are too few to fit (min_pairs); reported by eight requests each, they were 24 steps and
    the factor was refitted from them. The requests' contexts differ, so their calibrated fixed parts do: a pass
    is known by its time."""
    base = CostModel(draft_ms_per_token=10.0, verify_ms_base=350.0, verify_ms_per_token=11.0,
                     verify_ms_per_context_token=0.1)
    live = LiveCost(base)
    for gamma in (0, 2, 1):
        ms = 360.0 + 4 * 11.0 * 8 * gamma  # eight sequences drafting `gamma` each, tokens 4x as dear
        for request in range(8):
            live.observe(gamma, 40.0, ms, 64 + 8 * request, 40.0, ms, sequences=8, batch_tokens=8 * (gamma + 1))
    assert live.verify_tokens.value == 1.0


def test_a_lone_request_whose_passes_take_the_same_time_counts_each_of_them():
    """Alone, a pass is reported once: a replay's passes of one γ take the same time, and each is evidence (counted
    once by its time, a replayed slope 4x off was never corrected: tests/tools/test_shapes.py)."""
    base = CostModel(draft_ms_per_token=10.0, verify_ms_base=100.0, verify_ms_per_token=5.0)
    live = LiveCost(base)
    for step in range(64):
        gamma = step % 4
        ms = 100.0 + 20.0 * gamma  # the slope 4x the calibration's, no noise
        live.observe(gamma, 10.0 * gamma, ms, 0, 10.0 * gamma, ms)
    assert live.verify_tokens.value == pytest.approx(4.0)


def test_passes_that_barely_differ_in_tokens_leave_the_factor_as_it_was():
    """Target-only passes of eight and a one-token probe every tenth, 15% noise a pass, the calibration's shape
    true: the probes' token is 3% of a pass, too little to tell a slope from the noise, so the factor stays the
    calibration's (fitted regardless it swung past 2 in 42% of passes: scripts/token_factor_noise.py). Passes
    that draft 0-2 tokens a sequence together do resolve it, and it is learned."""
    import numpy as np

    rng = np.random.default_rng(0)
    factor, seen = TokenFactor(), []
    for p in range(200):
        tokens = 11.0 if p % 10 == 0 else 0.0
        factor.observe((350.0 + tokens) * float(np.exp(rng.normal(0, 0.15))), 350.0, tokens, shared=True)
        seen.append(factor.value)
    assert set(seen) == {1.0}
    steep = TokenFactor()
    for _ in range(200):
        tokens = 11.0 * 8 * int(rng.integers(0, 3))
        steep.observe((350.0 + 3 * tokens) * float(np.exp(rng.normal(0, 0.15))), 350.0, tokens, shared=True)
    assert steep.value == pytest.approx(3.0, rel=0.3)


def test_steps_that_all_score_alike_leave_the_calibrated_shape_as_it_is():
    """A fixed γ (or a policy that never drafts) says nothing of the slope: the level follows, the shape
    stays the calibration's."""
    base = CostModel(draft_ms_per_token=10.0, verify_ms_base=100.0, verify_ms_per_token=5.0)
    live = LiveCost(base)
    for _ in range(64):
        live.observe(4, 40.0, 240.0, 0, 40.0, 240.0)  # twice the calibrated 120 ms, at γ = 4 only
    assert live.verify_tokens.value == 1.0
    assert float(live.verify_ms(4)) == pytest.approx(240.0)
    assert float(live.verify_ms(0)) == pytest.approx(200.0)


def test_in_a_batched_pass_every_drafted_token_is_learned_at_the_same_per_token_price():
    """Batched, the per-token part is every token beyond one per sequence, this request's and the others' alike:
    with the calibrated batched price per token 4x too low, passes of 8 sequences (this one's γ and the others'
    tokens varying) teach one factor on all of them, and the pass is then priced right whatever it carries."""
    import numpy as np

    def model(per_token: float) -> CostModel:
        return CostModel(draft_ms_per_token=70.0, verify_ms_base=1900.0, verify_ms_per_token=per_token,
                         verify_ms_per_sequence=150.0, batched_ms_per_token=per_token)

    truth, live = model(120.0), LiveCost(model(30.0))
    rng = np.random.default_rng(0)
    for _ in range(64):
        gamma, others = int(rng.integers(0, 9)), int(rng.integers(7, 40))
        v = float(truth.verify_ms(gamma, 0, 8, others))
        live.observe(gamma, 0.0, v, 0, 0.0, v, sequences=8, batch_tokens=gamma + 1 + others)
    for gamma, others in ((0, 7), (8, 7), (0, 39), (8, 39)):
        assert float(live.verify_ms(gamma, 0, 8, others)) == pytest.approx(float(truth.verify_ms(gamma, 0, 8, others)),
                                                                         rel=0.02)


def test_the_draft_is_learned_against_the_drafting_passes_it_ran_not_the_verify_passes_batch():
    """Sixteen requests verify together, one of them drafts (a probe): its draft call ran one pass of one
    sequence. Predicted as γ passes carrying all sixteen, the draft looked 40% cheaper than calibrated after a
    few such calls (the AMX Xeon's fp16 shape: every request then drafted where none should)."""
    base = CostModel(draft_ms_per_token=68.0, verify_ms_base=167.0, verify_ms_per_token=0.0,
                     verify_ms_per_sequence=5.9, batched_ms_per_token=2.7, draft_ms_per_sequence=3.1)
    live = LiveCost(base)
    for _ in range(12):  # a lone run of one token, and (below) a batch's passes: 2 passes carrying 5 rows
        live.observe(1, 68.0, 260.0, 100, 68.0, 260.0, sequences=16, batch_tokens=17, draft_passes=1, draft_rows=1)
    assert live.draft.value == pytest.approx(1.0, abs=0.02)
    for _ in range(12):
        ms = base.drafting_passes_ms(2, 5)  # 2 · 68 + 3 · 3.1
        live.observe(2, ms, 270.0, 100, ms, 270.0, sequences=16, batch_tokens=21, draft_passes=2, draft_rows=5)
    assert live.draft.value == pytest.approx(1.0, abs=0.02)
    assert float(live.draft_ms(1, 16)) == pytest.approx(68.0 + 15 * 3.1, rel=0.02)


def test_a_probe_after_target_only_steps_teaches_the_drafts_cost():
    """A probe ends a stretch of target-only steps, so its draft first reads what the stretch emitted. Alone and
    within the calibration's prefill measurement, that call teaches the draft's factor with its read priced as
    calibrated: a calibration measured beside a neighbour (every draft call 4x its true time) is corrected by the
    probes, where before only consecutive drafting steps, which such prices never choose, could correct it. A
    longer read, or one in a pass of several (the others' reads are in its time), teaches nothing."""
    from speckv.cost_model import CATCH_UP_TAUGHT

    dear = CostModel(draft_ms_per_token=320.0, verify_ms_base=250.0, verify_ms_per_token=5.0,
                     draft_prefill_ms_per_token=12.0)  # measured beside a neighbour: 4x the draft's true times
    true = 80.0 + dear.catch_up_ms(20) / 4  # a one-token probe after 18 target-only steps, draft 4x faster
    alone = LiveCost(dear)
    alone.observe(1, true, 255.0, 0, true, 255.0, draft_behind=20)
    assert alone.draft.value == pytest.approx(0.25)
    assert alone.catch_up_ms(66) == pytest.approx(64 * 3.0)
    shared = LiveCost(dear)
    shared.observe(1, true, 255.0, 0, true, 255.0, sequences=4, batch_tokens=5, draft_behind=20)
    far = LiveCost(dear)
    far.observe(1, true, 255.0, 0, true, 255.0, draft_behind=CATCH_UP_TAUGHT + 1)
    assert shared.draft.count == far.draft.count == 0 and shared.draft.value == far.draft.value == 1.0


@pytest.mark.parametrize("float32", [False, True])
def test_one_number_is_priced_as_the_same_element_of_an_array(float32):
    """A decision prices one γ at a time in plain Python (speed) and several as an array: the same prices, past the
    measured curve, in batched passes and across a float32 switch."""
    base = CostModel(draft_ms_per_token=74.0, verify_ms_base=175.0, verify_ms_per_token=9.3,
                     verify_ms_per_context_token=0.01, verify_curve=(175.0, 181.0, 190.0, 204.0), curve_context_len=64,
                     verify_ms_per_sequence=12.5, batched_ms_per_token=8.0, draft_ms_per_sequence=5.0,
                     draft_prefill_ms_per_token=3.0, float32_from=9 if float32 else None, float32_ms_per_token=6.0,
                     draft_float32_from=4 if float32 else None, draft_float32_ms=(30.0, 11.0))
    live = LiveCost(base)
    live.observe(2, 200.0, 250.0, 64, 150.0, 230.0, sequences=3, batch_tokens=7, draft_passes=2, draft_rows=5)
    gammas = np.arange(12)
    for sequences, others in ((1, 0.0), (4, 3.0), (8, 13.5)):
        for ctx in (0, 64, 300):
            for cost in (base, live):
                as_array = cost.verify_ms(gammas, ctx, sequences, others)
                assert [cost.verify_ms(int(g), ctx, sequences, others) for g in gammas] == pytest.approx(as_array)
            assert [base.draft_ms(int(g), sequences) for g in gammas] == pytest.approx(base.draft_ms(gammas, sequences))
            assert [live.draft_ms(int(g), sequences) for g in gammas] == pytest.approx(live.draft_ms(gammas, sequences))
            rows = gammas * sequences
            assert ([base.drafting_passes_ms(int(g), int(r)) for g, r in zip(gammas, rows)]
                    == pytest.approx(base.drafting_passes_ms(gammas, rows)))
            for led in (None, 0, 3):
                prices = live.drafting_prices(gammas, ctx, sequences, others)
                assert ([live.drafting_prices(int(g), ctx, sequences, others).shared(led) for g in gammas]
                        == pytest.approx(prices.shared(led)))
                assert ([live.drafting_prices(int(g), ctx, sequences, others).alone(led) for g in gammas]
                        == pytest.approx(prices.alone(led)))

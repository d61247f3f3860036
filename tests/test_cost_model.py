"""What a step costs, followed online: the robust factor and the per-call hop."""

import pytest

from speckv.cost_model import CostModel, LiveCost, RobustScale


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

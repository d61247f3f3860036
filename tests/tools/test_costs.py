"""speckv.tools.costs: the cost model `speckv collect` and `speckv cost` write, which exact replay prices by."""

import pytest

from speckv.cost_model import CostModel, measured_curve
from speckv.tools.costs import cost_file_model, rows_cost_model

# fp16 computed in float32 on an AVX512-BF16 EPYC (results of `speckv collect`, thirty-first session): a one-token
# pass runs a kernel that several tokens do not, so it costs half what the line through every point says
FP32_ROWS = [{"context_len": c, "gamma": g, "draft_ms": 140.0 * g, "verify_ms": v}
             for c, points in ((64, (365.0, 763.0, 1043.0, 790.0, 942.0)), (512, (366.0, 720.0, 1057.0, 735.0, 872.0)))
             for g, v in zip((0, 1, 2, 4, 8), points)]


def test_replay_prices_a_step_by_the_measured_points_not_the_line():
    model = rows_cost_model(FP32_ROWS, {"tokens": 64, "ms": 413.0})
    assert model.verify_ms_base > 600  # the line: a target-only step at 640 ms
    assert model.verify_ms(0, 64) == pytest.approx(365.0)  # as measured
    assert model.verify_ms(1, 64) == pytest.approx(763.0)
    # a dip past γ = 2 is priced flat (a pass never costs less for scoring more), beyond the curve the line's slope
    assert model.verify_ms(2, 64) == model.verify_ms(4, 64) < 1043.0
    assert model.verify_ms(9, 64) == pytest.approx(model.verify_ms(8, 64) + model.verify_ms_per_token)
    assert model.draft_prefill_ms_per_token == pytest.approx(413.0 / 64)


def test_cost_files_written_before_the_curve_get_it_from_their_rows():
    line = CostModel.fit([r["gamma"] for r in FP32_ROWS], [r["draft_ms"] for r in FP32_ROWS],
                         [r["verify_ms"] for r in FP32_ROWS], [r["context_len"] for r in FP32_ROWS])
    old = cost_file_model({"rows": FP32_ROWS, "cost_model": line.to_dict()})
    assert old.verify_ms(0, 64) == pytest.approx(365.0) and old.curve_context_len == 64
    assert cost_file_model({"cost_model": line.to_dict()}).verify_ms(0, 64) == pytest.approx(line.verify_ms_base + 64 *
                                                                                           line.verify_ms_per_context_token)


def test_the_curve_interpolates_between_measured_points():
    assert measured_curve([(4, 30.0), (0, 10.0), (2, 30.0)]) == (10.0, 20.0, 30.0, 30.0, 30.0)
    assert measured_curve([(1, 20.0), (3, 40.0)]) == (20.0, 20.0, 30.0, 40.0)  # below the first point: its ms
    assert measured_curve([(0, 10.0)]) == ()

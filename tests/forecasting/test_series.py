"""Load series: aggregation of observed windows into planning windows."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from forecasting.series import (
    minute_counts_to_series,
    series_from_type_windows,
    step_of,
    weekend_mask,
)
from wattplan.domain import TypeWindow
from wattplan.errors import PlanInputError

T0 = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday


def _w(minutes: int, count: int, peak: float, rtype: str = "MS") -> TypeWindow:
    start = T0 + timedelta(minutes=minutes)
    return TypeWindow("svc", rtype, start, 300, count, 0, 0, peak, count / 300)


def test_planning_window_sums_counts_and_takes_the_highest_sub_window_peak() -> None:
    windows = [_w(0, 300, 2.0), _w(5, 600, 5.0), _w(10, 0, 0.0)]
    (s,) = series_from_type_windows(windows, T0, T0 + timedelta(minutes=30), 900)
    # First 900 s window: three observed 300 s windows, 900 requests.
    assert s.mean_rps[0] == pytest.approx(900 / 900)
    assert s.peak_rps[0] == 5.0
    # Second window: nothing observed -> missing, not zero.
    assert math.isnan(s.mean_rps[1]) and math.isnan(s.peak_rps[1])


def test_partly_observed_window_averages_over_the_observed_part_only() -> None:
    (s,) = series_from_type_windows([_w(0, 600, 3.0)], T0, T0 + timedelta(minutes=30), 1800)
    assert s.mean_rps[0] == pytest.approx(2.0)  # 600 requests over the 300 s observed


def test_pools_without_windows_come_back_all_missing() -> None:
    out = series_from_type_windows(
        [_w(0, 1, 1.0)], T0, T0 + timedelta(hours=1), 1800, pools=[("svc", "LL")]
    )
    assert [s.request_type for s in out] == ["LL", "MS"]
    assert np.isnan(out[0].mean_rps).all()


def test_window_length_that_does_not_divide_the_planning_window_is_refused() -> None:
    bad = TypeWindow("svc", "MS", T0, 420, 1, 0, 0, 1.0, 1.0)
    with pytest.raises(PlanInputError, match="does not divide"):
        series_from_type_windows([bad], T0, T0 + timedelta(hours=1), 1800)


def test_misaligned_range_is_refused() -> None:
    with pytest.raises(PlanInputError, match="not aligned"):
        series_from_type_windows([], T0 + timedelta(minutes=7), T0 + timedelta(hours=1), 1800)


def test_minute_counts_give_mean_and_one_minute_peak() -> None:
    first_minute = step_of(T0, 60) + 2  # starts 2 minutes into a 5-minute window
    counts = np.array([60.0, 120.0, 0.0, 30.0, 30.0, 30.0, 30.0, np.nan])
    s = minute_counts_to_series(counts, first_minute, 300, service="svc", request_type="SS")
    assert s.first_step == step_of(T0, 300)
    assert s.mean_rps[0] == pytest.approx((60 + 120 + 0) / 180)
    assert s.peak_rps[0] == pytest.approx(2.0)
    assert s.mean_rps[1] == pytest.approx(120 / 240)  # the NaN minute is not observed
    assert s.peak_rps[1] == pytest.approx(0.5)


def test_weekend_mask_knows_saturday_and_sunday() -> None:
    days = [T0 + timedelta(days=d) for d in range(7)]  # Monday .. Sunday
    mask = weekend_mask(np.array([step_of(d, 1800) for d in days]), 1800)
    assert mask.tolist() == [False] * 5 + [True, True]

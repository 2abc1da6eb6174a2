"""The persistence-of-peak forecaster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from forecasting.peak import ForecastSpec, forecast_peak
from wattplan.domain import TypeWindow
from wattplan.errors import PlanInputError

T0 = datetime(2023, 11, 16, 18, 0, tzinfo=UTC)


def _windows(peaks: list[float], step_s: int = 300) -> list[TypeWindow]:
    return [
        TypeWindow(
            "chat", "MM", T0 + timedelta(seconds=i * step_s), step_s, int(p * 100), 0, 0, p, p / 2
        )
        for i, p in enumerate(peaks)
    ]


def test_short_history_uses_last_window_peak_times_default_growth() -> None:
    history = _windows([1.0, 3.0, 2.0])
    f = forecast_peak(history, T0 + timedelta(minutes=15), 600, ForecastSpec(default_growth=1.5))
    assert f.peak_rate_rps == 3.0  # max of the last two 300 s steps
    assert f.planned_rate_rps == pytest.approx(4.5)
    assert "default_growth" in f.method


def test_long_history_uses_the_quantile_of_peak_growth() -> None:
    # Window peaks alternate so that next/previous ratios over 1-step windows are 2 and 0.5.
    history = _windows([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    spec = ForecastSpec(quantile=0.9, min_pairs=4)
    f = forecast_peak(history, T0 + timedelta(minutes=40), 300, spec)
    assert f.peak_rate_rps == 2.0
    # ratios: 2, .5, 2, .5, 2, .5, 2 -> the 0.9 quantile is 2.0
    assert f.planned_rate_rps == pytest.approx(4.0)
    assert f.method == "persistence_peak_q0.9"


def test_quiet_pool_forecasts_zero() -> None:
    f = forecast_peak(_windows([0.0] * 6), T0 + timedelta(minutes=30), 1800, ForecastSpec())
    assert f.planned_rate_rps == 0.0


def test_history_reaching_into_the_window_is_refused() -> None:
    with pytest.raises(PlanInputError, match="reaches into"):
        forecast_peak(_windows([1.0, 1.0]), T0 + timedelta(minutes=5), 300, ForecastSpec())

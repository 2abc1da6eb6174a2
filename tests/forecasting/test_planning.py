"""One planning run: bounded refits, forecasts from stored states, fallbacks that say so."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from forecasting.planning import due_for_refresh, plan_forecasts
from forecasting.selection import ForecastConfig
from forecasting.series import LoadSeries, step_start
from wattplan.domain import TypeWindow

DAY = 48


def _windows(s: LoadSeries) -> list[TypeWindow]:
    return [
        TypeWindow(
            s.service,
            s.request_type,
            step_start(s.first_step + i, s.window_s),
            s.window_s,
            round(m * s.window_s),
            0,
            0,
            float(p),
            float(m),
        )
        for i, (m, p) in enumerate(zip(s.mean_rps, s.peak_rps, strict=True))
        if np.isfinite(m)
    ]


def test_due_series_are_the_never_fitted_then_the_stalest_up_to_the_cap() -> None:
    keys = [("s", "MS", "mean"), ("s", "MS", "peak"), ("s", "SS", "mean")]

    class Old:
        refreshed_step = 10

    class Fresh:
        refreshed_step = 95

    states = {keys[0]: Fresh(), keys[1]: Old()}
    assert due_for_refresh(keys, states, 100, 48, 5) == [keys[2], keys[1]]  # type: ignore[arg-type]
    assert due_for_refresh(keys, states, 100, 48, 1) == [keys[2]]  # type: ignore[arg-type]


def test_run_refits_at_most_the_cap_and_the_rest_fall_back_with_a_reason(
    daily: Callable[..., LoadSeries],
) -> None:
    series = [daily(4, request_type=t, seed=i) for i, t in enumerate(("MS", "SS", "LL"))]
    windows = [w for s in series for w in _windows(s)]
    config = ForecastConfig(candidates=("fourier_arima", "persistence"))
    at = series[0].end_step
    result = plan_forecasts(windows, series, {}, at, config, max_refreshes=2)
    assert len(result.refreshed) == 2
    assert result.refreshed == (("svc", "LL", "mean"), ("svc", "LL", "peak"))
    by_type = {r.forecast.request_type: r for r in result.records}
    assert set(by_type) == {"MS", "SS", "LL"}
    assert by_type["LL"].fallback_reason is None
    assert by_type["LL"].forecast.method in ("fourier_arima", "persistence")
    assert by_type["LL"].backtest["peak"]["fourier_arima"]["residuals"] == DAY
    assert by_type["LL"].model_spec["peak"]["train_end_at"] == step_start(at, 1800).isoformat()
    for t in ("MS", "SS"):
        assert by_type[t].fallback_reason is not None
        assert by_type[t].fallback_reason.startswith("fallback: not fitted yet")
        assert by_type[t].forecast.method.startswith("persistence_peak")
    # The next run refits the next two series and keeps the first two states as they were.
    states = {(s.service, s.request_type, s.target): s for s in result.states}
    again = plan_forecasts(windows, series, states, at, config, max_refreshes=2)
    assert again.refreshed == (("svc", "MS", "mean"), ("svc", "MS", "peak"))


def test_planned_rate_is_at_least_the_point_forecasts(daily: Callable[..., LoadSeries]) -> None:
    s = daily(4)
    config = ForecastConfig(horizon=3)
    result = plan_forecasts(_windows(s), [s], {}, s.end_step, config, max_refreshes=2)
    assert [r.horizon_steps for r in result.records] == [1, 2, 3]
    for r in result.records:
        f = r.forecast
        assert f.planned_rate_rps >= f.peak_rate_rps >= f.mean_rate_rps > 0
        assert r.peak_quantiles["0.95"] <= f.planned_rate_rps + 1e-9
        assert r.calibration.startswith("mean: conformal")


def test_fallback_forecasts_further_ahead_persist_a_longer_span() -> None:
    # Too short for any model: the persistence-peak fallback. h windows ahead it persists
    # the peak of the last h + 1 windows (here a dip in the last window does not hide
    # the busier one before it).
    peaks = np.array([10.0, 12.0, 9.0, 11.0, 10.0, 30.0, 4.0])
    s = LoadSeries("svc", "MS", 1000, 1800, peaks / 2, peaks)
    config = ForecastConfig(horizon=3)
    result = plan_forecasts(_windows(s), [s], {}, s.end_step, config, max_refreshes=2)
    records = sorted(result.records, key=lambda r: r.horizon_steps)
    assert [r.horizon_steps for r in records] == [1, 2, 3]
    assert all(r.fallback_reason for r in records)
    assert [r.forecast.peak_rate_rps for r in records] == [4.0, 30.0, 30.0]
    planned = [r.forecast.planned_rate_rps for r in records]
    assert planned[0] >= 4.0 and planned[1] >= 30.0 and planned[2] >= 30.0

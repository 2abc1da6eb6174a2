"""Rolling-origin evaluation: nothing scored was fitted on, figures match a hand count."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from forecasting.evaluate import SELECTED, _Scores, evaluate, metrics, rolling_forecasts
from forecasting.selection import ForecastConfig
from forecasting.series import LoadSeries

DAY = 48
CONFIG = ForecastConfig(candidates=("fourier_arima", "ets", "persistence"))
MODELS = ("fourier_arima", "ets", "persistence", "weekly_template")


def test_no_forecast_is_made_from_parameters_fitted_on_its_window_or_later(
    daily: Callable[..., LoadSeries],
) -> None:
    s = daily(5)
    rolled = rolling_forecasts([s], CONFIG, models=MODELS)
    checked = 0
    for rows in rolled.table.values():
        for step, row in rows.items():
            for forecast in row.values():
                if forecast is not None and forecast.fitted_through is not None:
                    assert forecast.fitted_through <= step
                    checked += 1
    assert checked > 2 * 2 * DAY  # both targets, two statistical models, two scored days


def test_changing_the_future_changes_no_earlier_forecast(
    daily: Callable[..., LoadSeries], replaced: Callable[..., LoadSeries]
) -> None:
    s = daily(5)
    cut = 4 * DAY + 7  # in the middle of the last day
    mean, peak = s.mean_rps.copy(), s.peak_rps.copy()
    mean[cut:] *= 40.0
    peak[cut:] *= 40.0
    before = rolling_forecasts([s], CONFIG, models=MODELS).table
    after = rolling_forecasts([replaced(s, mean, peak)], CONFIG, models=MODELS).table
    compared = 0
    for key, rows in before.items():
        for step, row in rows.items():
            if step - s.first_step > cut:
                continue
            for model, forecast in row.items():
                other = after[key][step][model]
                if forecast is None:
                    assert other is None
                    continue
                assert other is not None
                assert other.point == pytest.approx(forecast.point, rel=1e-9)
                assert other.upper == pytest.approx(forecast.upper, rel=1e-9)
                compared += 1
    assert compared > 500


def test_report_scores_every_model_on_the_same_windows(daily: Callable[..., LoadSeries]) -> None:
    report = evaluate(
        [daily(5, request_type="MS"), daily(5, request_type="SS", seed=3)], CONFIG, models=MODELS
    )
    windows = {m: v["overall"]["windows"] for m, v in report["models"].items()}
    # Scoring starts once every model is calibrated: day 3 (fit on days 0-1, backtest day 2).
    assert report["calibrated"] and set(windows.values()) == {2 * 2 * DAY}
    assert set(report["models"][SELECTED]["per_type"]) == {"MS", "SS"}
    assert sum(report["selection_counts"].values()) > 0
    for figures in report["models"].values():
        assert 0.0 <= figures["overall"]["coverage_peak"] <= 1.0
        assert figures["overall"]["underprovision_rate"] == pytest.approx(
            1 - figures["overall"]["coverage_peak"], abs=1e-3
        )


def test_too_short_workload_is_scored_on_fallback_forecasts_only(
    daily: Callable[..., LoadSeries],
) -> None:
    report = evaluate([daily(0.5)], CONFIG, models=MODELS)
    assert not report["calibrated"]
    assert all(report["models"][m]["overall"]["windows"] == 0 for m in MODELS)
    selected = report["models"][SELECTED]["overall"]
    assert selected["windows"] == DAY // 2 - 1
    assert selected["fallback_windows"] == selected["windows"]


def test_metrics_match_a_hand_count() -> None:
    scores = _Scores(
        actual_mean=[1.0, 2.0, 0.0, 4.0],
        actual_peak=[2.0, 4.0, 0.0, 8.0],
        mean=[1.5, 2.0, 1.0, 2.0],
        peak=[1.0, 4.0, 0.0, 10.0],
        mean_upper=[2.0, 1.0, 1.0, 5.0],
        peak_upper=[3.0, 3.0, 0.5, 12.0],
        fallback=[False, False, True, False],
    )
    m = metrics([scores], 0.9)
    assert m["windows"] == 4
    assert m["peak_mape"] == pytest.approx(np.mean([0.5, 0.0, 0.25]), abs=1e-4)  # zero skipped
    assert m["peak_smape"] == pytest.approx(np.mean([2 / 3, 0.0, 0.0, 4 / 18]), abs=1e-4)
    assert m["mean_mape"] == pytest.approx(np.mean([0.5, 0.0, 0.5]), abs=1e-4)
    assert m["coverage_peak"] == 0.75 and m["underprovision_rate"] == 0.25
    assert m["coverage_mean"] == 0.75
    # Pinball at 0.9 of the upper quantile: under by 1 in window 2 -> 0.9; over: 0.1 x (1+.5+4).
    assert m["pinball_loss"] == pytest.approx((0.9 * 1 + 0.1 * (1 + 0.5 + 4)) / 4, abs=1e-4)
    assert m["underprovision_mean_shortfall"] == pytest.approx(0.25)
    assert m["fallback_windows"] == 1

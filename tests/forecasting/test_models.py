"""Model kinds: fit once, re-apply by filtering, never look ahead, survive odd series."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from forecasting.models import (
    MODEL_KINDS,
    STATISTICAL_KINDS,
    FittedModel,
    ModelFitError,
    ModelSpec,
    fit,
    predict,
)
from forecasting.series import LoadSeries
from wattplan.errors import PlanInputError

DAY = 48


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_predictions_never_read_the_window_they_predict_or_later(
    kind: str, daily: Callable[..., LoadSeries]
) -> None:
    s = daily(5)
    train_end = 3 * DAY
    fitted = fit(s.peak_rps[:train_end], s.first_step, s.window_s, ModelSpec(kind))
    base = predict(fitted, s.peak_rps, s.first_step, s.first_step + train_end).log_mean
    cut = train_end + 10
    poisoned = s.peak_rps.copy()
    poisoned[cut:] *= 50.0  # change the future of window `cut`
    again = predict(fitted, poisoned, s.first_step, s.first_step + train_end).log_mean
    k = cut - train_end
    np.testing.assert_allclose(again[: k + 1], base[: k + 1], rtol=1e-9)
    # The poison does reach later predictions (one day later for the seasonal baselines).
    assert not np.allclose(again[k + 1 :], base[k + 1 :])


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_stored_parameters_forecast_the_same_as_the_fit(
    kind: str, daily: Callable[..., LoadSeries]
) -> None:
    s = daily(3.5)
    fitted = fit(s.mean_rps, s.first_step, s.window_s, ModelSpec(kind))
    restored = FittedModel.from_dict(fitted.to_dict())
    a = predict(fitted, s.mean_rps, s.first_step, s.end_step, horizon=3)
    b = predict(restored, s.mean_rps, s.first_step, s.end_step, horizon=3)
    np.testing.assert_allclose(a.log_mean, b.log_mean)
    assert len(a.log_mean) == 3 and np.isfinite(a.rate()).all()


@pytest.mark.parametrize("kind", list(STATISTICAL_KINDS))
def test_statistical_models_on_a_daily_cycle_beat_persistence(
    kind: str, daily: Callable[..., LoadSeries]
) -> None:
    s = daily(5, amplitude=0.8, noise=0.02)
    train_end = 4 * DAY
    actual = np.log(s.mean_rps[train_end:])

    def error(k: str) -> float:
        fitted = fit(s.mean_rps[:train_end], s.first_step, s.window_s, ModelSpec(k))
        pred = predict(fitted, s.mean_rps, s.first_step, s.first_step + train_end)
        return float(np.mean(np.abs(pred.log_mean - actual)))

    assert error(kind) < error("persistence")


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_missing_windows_are_skipped_not_zeroed(
    kind: str, daily: Callable[..., LoadSeries]
) -> None:
    s = daily(4)
    values = s.peak_rps.copy()
    rng = np.random.default_rng(3)
    values[rng.choice(len(values), 30, replace=False)] = np.nan
    values[100:110] = np.nan  # a five-hour outage of the telemetry
    fitted = fit(values[: 3 * DAY], s.first_step, s.window_s, ModelSpec(kind))
    pred = predict(fitted, values, s.first_step, s.first_step + 3 * DAY, horizon=2)
    rates = pred.rate()
    assert np.isfinite(rates).all()
    # Nothing collapses to zero: forecasts stay within the series' range.
    assert rates.min() > 0.2 * np.nanmin(values) and rates.max() < 3 * np.nanmax(values)


@pytest.mark.parametrize("kind", list(STATISTICAL_KINDS))
def test_constant_or_too_short_series_raise_a_fit_error(kind: str) -> None:
    with pytest.raises(ModelFitError, match="constant"):
        fit(np.zeros(3 * DAY), 1000, 1800, ModelSpec(kind))
    with pytest.raises(ModelFitError, match="days of history"):
        fit(np.ones(DAY), 1000, 1800, ModelSpec(kind))


@pytest.mark.parametrize("kind", list(STATISTICAL_KINDS))
def test_sparse_series_fit_or_refuse_but_never_forecast_nonsense(kind: str) -> None:
    rng = np.random.default_rng(5)
    values = np.where(rng.random(4 * DAY) < 0.05, rng.exponential(0.01, 4 * DAY), 0.0)
    try:
        fitted = fit(values, 1000, 1800, ModelSpec(kind))
    except ModelFitError:
        return
    rates = predict(fitted, values, 1000, 1000 + len(values), horizon=4).rate()
    assert np.isfinite(rates).all() and (rates >= 0).all() and rates.max() < 1.0


def test_unknown_kind_is_refused_with_the_known_ones() -> None:
    with pytest.raises(PlanInputError, match="known: ets"):
        ModelSpec("prophet")


def test_weekly_template_uses_the_same_kind_of_day(daily: Callable[..., LoadSeries]) -> None:
    s = daily(12, noise=0.0, amplitude=0.0)
    values = s.mean_rps.copy()
    values[5 * DAY : 7 * DAY] = 5.0  # the weekend (days 5 and 6 from a Monday) is quieter
    fitted = fit(values[: 12 * DAY], s.first_step, s.window_s, ModelSpec("weekly_template"))
    # Day 12 is a Saturday: its template is the only earlier Saturday/Sunday level, 5.
    pred = predict(fitted, values, s.first_step, s.end_step, horizon=DAY).rate()
    assert pred == pytest.approx(np.full(DAY, 5.0))
    # Seasonal naive says "yesterday" (a Friday at 20).
    naive = fit(values, s.first_step, s.window_s, ModelSpec("seasonal_naive"))
    assert predict(naive, values, s.first_step, s.end_step, horizon=1).rate()[0] == (
        pytest.approx(20.0)
    )

"""Selection by rolling-origin backtest, conformal intervals, fallbacks for short series."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from forecasting.calibration import conformal_quantile
from forecasting.selection import ForecastConfig, forecast_state, refresh_state
from forecasting.series import LoadSeries

DAY = 48


def test_conformal_quantile_takes_the_finite_sample_rank() -> None:
    residuals = [float(x) for x in range(1, 101)]  # 1..100, shuffled order does not matter
    assert conformal_quantile(residuals[::-1], 0.95) == 96.0  # ceil(101 * 0.95) = 96th
    assert conformal_quantile(residuals, 0.05) == 5.0  # floor(101 * 0.05) = 5th
    assert conformal_quantile(residuals[:10], 0.95) is None  # rank 11 of 10: unknown
    assert conformal_quantile([math.nan, 1.0], 0.5) == 1.0


def test_periodic_series_selects_seasonal_naive_and_random_walk_selects_persistence(
    daily: Callable[..., LoadSeries], replaced: Callable[..., LoadSeries]
) -> None:
    config = ForecastConfig(candidates=("persistence", "seasonal_naive"))
    periodic = daily(4, noise=0.0, amplitude=0.6)
    state = refresh_state(None, periodic, "mean", periodic.end_step, config)
    assert state.selected == "seasonal_naive"
    rng = np.random.default_rng(2)
    walk = 20 * np.exp(np.cumsum(rng.normal(0, 0.1, len(periodic))))
    walking = replaced(periodic, walk, walk * 1.1)
    state = refresh_state(None, walking, "peak", walking.end_step, config)
    assert state.selected == "persistence"


def test_short_history_selects_nothing_and_says_why(daily: Callable[..., LoadSeries]) -> None:
    s = daily(0.5)
    state = refresh_state(None, s, "peak", s.end_step, ForecastConfig())
    assert state.selected is None
    assert "backtest residuals" in state.reason
    assert forecast_state(state, s, s.end_step, ForecastConfig()) is None


def test_two_days_fall_back_to_a_baseline_and_the_reason_says_fallback(
    daily: Callable[..., LoadSeries],
) -> None:
    s = daily(2)
    state = refresh_state(None, s, "peak", s.end_step, ForecastConfig())
    assert state.selected in ("persistence", "seasonal_naive", "weekly_template")
    assert state.reason.startswith("fallback: history of 2.00 days is too short")


def test_refresh_adds_only_out_of_sample_residuals(daily: Callable[..., LoadSeries]) -> None:
    s = daily(5)
    config = ForecastConfig(candidates=("fourier_arima", "persistence"))
    first = refresh_state(None, s, "mean", s.first_step + 3 * DAY, config)
    arima = first.candidate("fourier_arima")
    assert arima is not None and arima.fitted is not None
    assert arima.fitted.train_end_step == s.first_step + 3 * DAY
    before = len(arima.residuals)  # the initial backtest: day 2 from a fit on days 0-1
    assert before == DAY
    second = refresh_state(first, s, "mean", s.first_step + 4 * DAY, config)
    again = second.candidate("fourier_arima")
    assert again is not None and again.fitted is not None
    # Day 3 was forecast with the parameters fitted before it, then the model was refitted.
    assert len(again.residuals) == before + DAY
    assert again.residuals_end_step == s.first_step + 4 * DAY
    assert again.fitted.train_end_step == s.first_step + 4 * DAY


def test_conformal_upper_quantile_covers_about_q_of_new_windows(
    daily: Callable[..., LoadSeries],
) -> None:
    s = daily(14, noise=0.15, seed=9)
    config = ForecastConfig(candidates=("fourier_arima",), calibration_step=0.0)
    state = None
    hits = total = 0
    for day in range(3, 14):
        at = s.first_step + day * DAY
        state = refresh_state(state, s, "mean", at, config)
        if day < 4:
            continue
        for k in range(DAY):
            f = forecast_state(state, s, at + k, config)
            assert f is not None
            total += 1
            hits += s.mean_rps[at + k - s.first_step] <= f.quantiles[0.95][0]
    assert 0.91 <= hits / total <= 0.99, hits / total


def test_level_shift_is_followed_within_a_few_windows(
    daily: Callable[..., LoadSeries], replaced: Callable[..., LoadSeries]
) -> None:
    s = daily(6, noise=0.03)
    mean = s.mean_rps.copy()
    shift_at = 5 * DAY + 10
    mean[shift_at:] *= 3.0  # a client arrives and stays
    shifted = replaced(s, mean, mean * 1.2)
    config = ForecastConfig()
    state = refresh_state(None, shifted, "peak", shifted.first_step + 5 * DAY, config)
    assert state.selected is not None
    after = []
    for k in range(shift_at + 4, shift_at + 12):
        f = forecast_state(state, shifted, shifted.first_step + k, config)
        assert f is not None
        after.append(f.point[0] / shifted.peak_rps[k])
    assert all(0.7 < r < 1.3 for r in after), after


def test_burst_does_not_stick(
    daily: Callable[..., LoadSeries], replaced: Callable[..., LoadSeries]
) -> None:
    s = daily(6, noise=0.03)
    mean = s.mean_rps.copy()
    burst = 5 * DAY + 10
    mean[burst] *= 8.0  # one window of a flash crowd
    bursty = replaced(s, mean, mean * 1.2)
    config = ForecastConfig()
    state = refresh_state(None, bursty, "peak", bursty.first_step + 5 * DAY, config)
    ratios = []
    for k in range(burst + 3, burst + 8):
        f = forecast_state(state, bursty, bursty.first_step + k, config)
        assert f is not None
        ratios.append(f.point[0] / bursty.peak_rps[k])
    assert max(ratios) < 1.5, ratios


@pytest.mark.parametrize("share_nonzero", [0.0, 0.02, 0.3])
def test_sparse_series_always_get_a_finite_non_negative_forecast(
    share_nonzero: float,
    daily: Callable[..., LoadSeries],
    replaced: Callable[..., LoadSeries],
) -> None:
    s = daily(5)
    rng = np.random.default_rng(4)
    values = np.where(rng.random(len(s)) < share_nonzero, rng.exponential(0.05, len(s)), 0.0)
    sparse = replaced(s, values, values * 2)
    config = ForecastConfig()
    state = refresh_state(None, sparse, "peak", sparse.end_step, config)
    f = forecast_state(state, sparse, sparse.end_step, config)
    assert f is not None
    assert all(math.isfinite(x) and x >= 0 for x in (*f.point, *f.quantiles[0.95]))
    assert f.quantiles[0.95][0] >= f.point[0] - 1e-12
    if share_nonzero == 0.0:
        assert f.quantiles[0.95][0] == 0.0  # a quiet pool stays quiet

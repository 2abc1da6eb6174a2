"""Synthetic load series for the forecasting tests (seeded, so every run sees the same)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pytest

from forecasting.series import LoadSeries, step_of

WINDOW_S = 1800
DAY = 86400 // WINDOW_S
#: A Monday 00:00 UTC.
START = datetime(2024, 1, 1, tzinfo=UTC)


def daily_series(
    days: float,
    *,
    level: float = 20.0,
    amplitude: float = 0.5,
    noise: float = 0.05,
    seed: int = 1,
    request_type: str = "MS",
) -> LoadSeries:
    """A series with a daily cycle and multiplicative noise; peak = mean x 1.2 x noise."""
    rng = np.random.default_rng(seed)
    n = round(days * DAY)
    t = np.arange(n)
    mean = level * (1 + amplitude * np.sin(2 * np.pi * t / DAY)) * np.exp(rng.normal(0, noise, n))
    peak = mean * 1.2 * np.exp(np.abs(rng.normal(0, noise, n)))
    return LoadSeries("svc", request_type, step_of(START, WINDOW_S), WINDOW_S, mean, peak)


def with_values(series: LoadSeries, mean: np.ndarray, peak: np.ndarray) -> LoadSeries:
    """A copy of ``series`` with other arrays."""
    return LoadSeries(
        series.service, series.request_type, series.first_step, series.window_s, mean, peak
    )


@pytest.fixture
def daily() -> Callable[..., LoadSeries]:
    """Factory of :func:`daily_series`."""
    return daily_series


@pytest.fixture
def replaced() -> Callable[[LoadSeries, np.ndarray, np.ndarray], LoadSeries]:
    """Factory of :func:`with_values`."""
    return with_values

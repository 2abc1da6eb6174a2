"""First forecaster: persistence of the last window's peak, inflated by observed peak growth.

The planner sizes pools for the *peak* of the next window (DOMAIN.md section 5). This
forecaster predicts that peak as the last window's peak (persistence, the strongest naive
baseline at 10-30 minute horizons, DOMAIN.md section 9) times an upper quantile of how much
the peak grew from one window to the next over the history. statsmodels models replace it
in the forecasting issue; the interface stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from wattplan.domain import LoadForecast, TypeWindow
from wattplan.errors import PlanInputError


@dataclass(frozen=True)
class ForecastSpec:
    """How to forecast.

    Attributes:
        quantile: Upper quantile of the window-to-window peak growth used as headroom.
        min_pairs: Fewest (previous, next) window pairs needed to estimate that quantile.
        default_growth: Headroom factor used when the history holds fewer pairs.
    """

    quantile: float = 0.95
    min_pairs: int = 4
    default_growth: float = 1.25


def forecast_peak(
    history: Sequence[TypeWindow],
    window_start: datetime,
    window_s: int,
    spec: ForecastSpec,
) -> LoadForecast:
    """Forecast one pool's load for ``[window_start, window_start + window_s)``.

    Args:
        history: Observed windows of one (service, request type), all of one length that
            divides ``window_s``, ending at or before ``window_start``; gaps count as zero.
        window_start: Start of the forecast window.
        window_s: Length of the forecast window in seconds.
        spec: Forecast settings.

    Raises:
        PlanInputError: history mixes pools or window lengths, or reaches past window_start.
    """
    if not history:
        raise PlanInputError("forecast_peak needs at least one observed window")
    pools = {(w.service, w.request_type) for w in history}
    lengths = {w.window_s for w in history}
    if len(pools) != 1 or len(lengths) != 1:
        raise PlanInputError(f"history mixes pools {sorted(pools)} or window lengths {lengths}")
    step_s = lengths.pop()
    if window_s % step_s:
        raise PlanInputError(f"window_s={window_s} is not a multiple of the history's {step_s}")
    if any(w.window_start + timedelta(seconds=step_s) > window_start for w in history):
        raise PlanInputError("history reaches into the forecast window")
    service, request_type = pools.pop()

    # Dense series of per-step peaks and counts, oldest first, ending at window_start.
    first = min(w.window_start for w in history)
    steps = int((window_start - first).total_seconds()) // step_s
    peaks = np.zeros(steps)
    counts = np.zeros(steps)
    for w in history:
        i = int((w.window_start - first).total_seconds()) // step_s
        peaks[i] = w.peak_rate_rps
        counts[i] = w.request_count

    k = window_s // step_s
    last_peak = float(peaks[-k:].max())
    last_mean = float(counts[-k:].sum()) / (min(k, steps) * step_s)

    # Growth of the window peak from one window to the next, over every k-step alignment.
    ratios = [
        peaks[i : i + k].max() / peaks[i - k : i].max()
        for i in range(k, steps - k + 1)
        if peaks[i - k : i].max() > 0
    ]
    if len(ratios) >= spec.min_pairs:
        growth = max(1.0, float(np.quantile(ratios, spec.quantile)))
        method = f"persistence_peak_q{spec.quantile:g}"
    else:
        growth = spec.default_growth
        method = f"persistence_peak_default_growth_{spec.default_growth:g}"
    return LoadForecast(
        service=service,
        request_type=request_type,
        window_start=window_start,
        window_s=window_s,
        mean_rate_rps=last_mean,
        peak_rate_rps=last_peak,
        planned_rate_rps=last_peak * growth,
        quantile=spec.quantile,
        method=method,
    )

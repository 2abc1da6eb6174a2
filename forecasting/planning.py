"""One planning run's forecasts: refresh the series that are due, forecast every pool.

Pure: takes the observed windows and the stored series states, returns the forecasts to
store and the states that changed. The planning job (``wattplan.jobs.forecast_load``) does
the reading and writing.

Refits are the expensive part (about 0.1-0.4 s per statsmodels candidate per series on a
2-core machine), so a run refreshes at most ``max_refreshes`` series, those never fitted
first and then the stalest; every other series forecasts from its stored parameters by
filtering (milliseconds). A pool whose history is too short for any calibrated candidate
falls back to :func:`forecasting.peak.forecast_peak` (persistence of the last peak times a
quantile of peak growth; ``h`` windows ahead, over spans of ``h + 1`` windows), and its
stored forecast says so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from forecasting.peak import ForecastSpec, forecast_peak
from forecasting.selection import (
    ForecastConfig,
    SeriesForecast,
    SeriesState,
    forecast_state,
    refresh_state,
)
from forecasting.series import TARGETS, LoadSeries, step_start
from wattplan.domain import LoadForecast, TypeWindow

StateKey = tuple[str, str, str]  # (service, request type, target)


@dataclass(frozen=True)
class ForecastRecord:
    """A forecast of one pool for one window, with everything stored beside it.

    Attributes:
        forecast: What the planner reads (mean, peak, planned upper quantile of the peak).
        horizon_steps: Windows between the run and this window (1 = the next window).
        mean_quantiles: ``{level: rps}`` of the mean rate (empty for a fallback).
        peak_quantiles: ``{level: rps}`` of the peak rate.
        model_spec: Per target: the model kind, its parameters and the span it was fitted on.
        backtest: Per target: every candidate's backtest figures.
        calibration: How the intervals were made.
        fallback_reason: Why this is not a selected model's forecast (None when it is).
    """

    forecast: LoadForecast
    horizon_steps: int
    mean_quantiles: Mapping[str, float] = field(default_factory=dict)
    peak_quantiles: Mapping[str, float] = field(default_factory=dict)
    model_spec: Mapping[str, Any] = field(default_factory=dict)
    backtest: Mapping[str, Any] = field(default_factory=dict)
    calibration: str = ""
    fallback_reason: str | None = None


@dataclass(frozen=True)
class PlanningForecasts:
    """Result of one run: the forecasts and the series states to store."""

    records: tuple[ForecastRecord, ...]
    states: tuple[SeriesState, ...]
    refreshed: tuple[StateKey, ...]


def due_for_refresh(
    keys: Sequence[StateKey],
    states: Mapping[StateKey, SeriesState],
    at_step: int,
    refit_steps: int,
    max_refreshes: int,
) -> list[StateKey]:
    """The series to refresh now: never refreshed first, then the stalest, at most ``max``."""
    due = [k for k in keys if k not in states or at_step - states[k].refreshed_step >= refit_steps]
    due.sort(key=lambda k: (k in states, states[k].refreshed_step if k in states else 0, k))
    return due[: max(0, max_refreshes)]


def _spec_summary(state: SeriesState, f: SeriesForecast) -> dict[str, Any]:
    candidate = state.candidate(f.model)
    fitted = candidate.fitted if candidate else None
    out: dict[str, Any] = {
        "model": f.model,
        "selected": state.selected,
        "selection_reason": state.reason,
        "refreshed_at": step_start(state.refreshed_step, state.window_s).isoformat(),
    }
    if fitted is not None:
        out.update(
            spec=fitted.spec.to_dict(),
            params=dict(zip(fitted.param_names, fitted.params, strict=True)),
            log_offset=fitted.offset,
            train_start_at=step_start(fitted.train_start_step, state.window_s).isoformat(),
            train_end_at=step_start(fitted.train_end_step, state.window_s).isoformat(),
        )
    if candidate is not None:
        out["level_shift"] = candidate.shift
    return out


def _backtest(state: SeriesState, config: ForecastConfig) -> dict[str, Any]:
    last = config.steps(config.selection_days, state.window_s)
    return {c.kind: c.metrics(last) for c in state.candidates}


def _quantiles(f: SeriesForecast, h: int) -> dict[str, float]:
    return {f"{q:g}": values[h] for q, values in sorted(f.quantiles.items())}


def _fallback_records(
    history: Sequence[TypeWindow],
    at_step: int,
    window_s: int,
    config: ForecastConfig,
    reason: str,
) -> list[ForecastRecord]:
    window_start = step_start(at_step, window_s)
    spec = ForecastSpec(quantile=config.quantile)
    records = []
    for h in range(config.horizon):
        # h windows ahead, persistence reaches across h + 1 windows: the peak of the last
        # h + 1 windows, grown by the quantile of peak growth over spans that long.
        f = forecast_peak(history, window_start, (h + 1) * window_s, spec)
        start = window_start + timedelta(seconds=h * window_s)
        forecast = LoadForecast(
            f.service,
            f.request_type,
            start,
            window_s,
            f.mean_rate_rps,
            f.peak_rate_rps,
            f.planned_rate_rps,
            f.quantile,
            f.method,
        )
        records.append(
            ForecastRecord(
                forecast,
                h + 1,
                peak_quantiles={f"{config.quantile:g}": f.planned_rate_rps},
                model_spec={"peak": {"model": f.method}, "mean": {"model": "persistence"}},
                calibration=f"peak growth quantile ({f.method})",
                fallback_reason=reason,
            )
        )
    return records


def plan_forecasts(
    windows: Sequence[TypeWindow],
    series: Sequence[LoadSeries],
    states: Mapping[StateKey, SeriesState],
    at_step: int,
    config: ForecastConfig,
    *,
    max_refreshes: int,
) -> PlanningForecasts:
    """Forecasts of every pool for the ``config.horizon`` windows from ``at_step``.

    Args:
        windows: The observed windows (any length) the series were built from; the fallback
            reads them.
        series: Per-pool planning-window series ending at ``at_step``.
        states: Stored series states by (service, request type, target).
        at_step: Epoch step of the first window to forecast.
        config: Forecaster settings.
        max_refreshes: Most series refitted in this run.

    Returns:
        Records to store (one per pool and horizon step), every state (refreshed or not).
    """
    window_s = series[0].window_s if series else 0
    refit_steps = max(1, config.refit_s // window_s) if window_s else 1
    keys = [(s.service, s.request_type, t) for s in series for t in TARGETS]
    due = due_for_refresh(keys, states, at_step, refit_steps, max_refreshes)
    by_key = {(s.service, s.request_type): s for s in series}
    new_states = dict(states)
    for key in due:
        new_states[key] = refresh_state(states.get(key), by_key[key[:2]], key[2], at_step, config)
    raw: dict[tuple[str, str], list[TypeWindow]] = defaultdict(list)
    for w in windows:
        raw[(w.service, w.request_type)].append(w)
    records: list[ForecastRecord] = []
    for s in series:
        forecasts: dict[str, SeriesForecast] = {}
        reason = ""
        for target in TARGETS:
            state = new_states.get((s.service, s.request_type, target))
            f = forecast_state(state, s, at_step, config) if state else None
            if f is None:
                reason = state.reason if state else "not fitted yet (waiting for its turn to refit)"
                break
            forecasts[target] = f
        if len(forecasts) < len(TARGETS):
            if raw[s.key]:
                records += _fallback_records(
                    raw[s.key], at_step, window_s, config, f"fallback: {reason}"
                )
            continue
        mean, peak = forecasts["mean"], forecasts["peak"]
        mean_state = new_states[(s.service, s.request_type, "mean")]
        peak_state = new_states[(s.service, s.request_type, "peak")]
        reasons = [r for r in (mean.fallback_reason, peak.fallback_reason) if r]
        for reason_state in (mean_state, peak_state):
            if reason_state.reason.startswith("fallback"):
                reasons.append(f"{reason_state.target}: {reason_state.reason}")
        for h in range(config.horizon):
            point_peak = max(peak.point[h], mean.point[h])
            upper = peak.quantiles.get(config.quantile, peak.point)[h]
            forecast = LoadForecast(
                s.service,
                s.request_type,
                step_start(at_step + h, window_s),
                window_s,
                mean.point[h],
                point_peak,
                max(upper, point_peak),
                config.quantile,
                peak.model,
            )
            records.append(
                ForecastRecord(
                    forecast,
                    h + 1,
                    _quantiles(mean, h),
                    _quantiles(peak, h),
                    {
                        "mean": _spec_summary(mean_state, mean),
                        "peak": _spec_summary(peak_state, peak),
                    },
                    {
                        "mean": _backtest(mean_state, config),
                        "peak": _backtest(peak_state, config),
                    },
                    f"mean: {mean.calibration}; peak: {peak.calibration}",
                    "; ".join(reasons) or None,
                )
            )
    return PlanningForecasts(
        tuple(records),
        tuple(new_states[k] for k in sorted(new_states)),
        tuple(due),
    )

"""Rolling-origin evaluation of every model, the baselines and the per-series selection.

The evaluation replays what the planning DAG does, window by window:

- at every refit boundary (every ``refit_s``, aligned to the epoch: midnight UTC for a
  day) each series is refreshed (:func:`forecasting.selection.refresh_state`) from the
  windows **before** the boundary only;
- each window until the next boundary is forecast one step ahead from the stored
  parameters and the windows before it (the Kalman filter / baseline rule only reads the
  past; a test perturbs the future and checks that nothing scored changes);
- a window is scored against what arrived in it, once, for every model, with the quantile
  calibrated on residuals of earlier windows.

No scored window is ever in the data a scored forecast was fitted on. Scoring starts at the
first boundary where every model is fitted and calibrated (or, for a workload too short
for that, at the second window, with fallback forecasts only), so that all models are
scored on the same windows.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from forecasting.models import MODEL_KINDS, ModelFitError, predict, transform
from forecasting.peak import ForecastSpec, forecast_peak
from forecasting.selection import (
    ForecastConfig,
    SeriesState,
    forecast_state,
    interval_quantiles,
    level_shift,
    refresh_state,
    select,
)
from forecasting.series import TARGETS, LoadSeries
from wattplan.domain import TypeWindow

#: Name under which the per-series selection is reported.
SELECTED = "selected"


@dataclass
class _Scores:
    """Per-window forecasts and actuals of one (model, series), appended in time order."""

    actual_mean: list[float] = field(default_factory=list)
    actual_peak: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    peak: list[float] = field(default_factory=list)
    mean_upper: list[float] = field(default_factory=list)
    peak_upper: list[float] = field(default_factory=list)
    fallback: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class WindowForecast:
    """One model's forecast of one target for one window.

    ``fitted_through`` is the epoch step just after the data the model's parameters were
    fitted on (None for a baseline or the fallback, which fit nothing).
    """

    point: float
    upper: float
    fallback: bool = False
    fitted_through: int | None = None


#: Per (service, request type, target): per window step: {model: forecast or None}.
ForecastTable = dict[tuple[str, str, str], dict[int, dict[str, WindowForecast | None]]]


@dataclass
class RollingForecasts:
    """Every forecast the rolling origin made, and how long the refits took."""

    table: ForecastTable
    kinds: tuple[str, ...]
    selections: Counter[str]
    calibrated_from: int | None
    refresh_s: list[float]
    series_refresh_s: list[float]
    update_s: list[float]
    guarded: int = 0


def metrics(scores: Sequence[_Scores], q: float) -> dict[str, Any]:
    """Accuracy figures over the pooled windows of ``scores``.

    MAPE skips windows whose actual is 0 (undefined there); sMAPE counts a window where
    both are 0 as exact. Pinball loss is of the planned ``q`` quantile of the peak, in
    requests per second. The under-provisioning rate is the share of windows whose actual
    peak exceeds the planned quantile.
    """
    am = np.array([x for s in scores for x in s.actual_mean])
    ap = np.array([x for s in scores for x in s.actual_peak])
    fm = np.array([x for s in scores for x in s.mean])
    fp = np.array([x for s in scores for x in s.peak])
    um = np.array([x for s in scores for x in s.mean_upper])
    up = np.array([x for s in scores for x in s.peak_upper])
    fb = np.array([x for s in scores for x in s.fallback], dtype=bool)
    if not len(ap):
        return {"windows": 0}

    def mape(a: np.ndarray, f: np.ndarray) -> float | None:
        m = a > 0
        return _r(np.mean(np.abs(a[m] - f[m]) / a[m])) if m.any() else None

    def smape(a: np.ndarray, f: np.ndarray) -> float:
        den = np.abs(a) + np.abs(f)
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = np.where(den > 0, 2 * np.abs(a - f) / den, 0.0)
        return _r(np.mean(terms))

    diff = ap - up
    pinball = np.maximum(q * diff, (q - 1) * diff)
    under = ap > up
    shortfall = (ap[under] - up[under]) / np.maximum(ap[under], 1e-12)
    return {
        "windows": int(len(ap)),
        "mean_mape": mape(am, fm),
        "mean_smape": smape(am, fm),
        "peak_mape": mape(ap, fp),
        "peak_smape": smape(ap, fp),
        "peak_wape": _r(np.sum(np.abs(ap - fp)) / np.sum(ap)) if np.sum(ap) > 0 else None,
        "pinball_loss": _r(np.mean(pinball)),
        "pinball_loss_scaled": _r(np.sum(pinball) / np.sum(ap)) if np.sum(ap) > 0 else None,
        "coverage_peak": _r(np.mean(ap <= up)),
        "coverage_mean": _r(np.mean(am <= um)),
        "underprovision_rate": _r(np.mean(under)),
        "underprovision_mean_shortfall": _r(np.mean(shortfall)) if under.any() else 0.0,
        "planned_over_actual_peak": _r(np.sum(up) / np.sum(ap)) if np.sum(ap) > 0 else None,
        "fallback_windows": int(fb.sum()),
    }


def _r(x: Any) -> float:
    return round(float(x), 4)


def _timing(rolled: RollingForecasts, started: float, series: int) -> dict[str, Any]:
    """Seconds spent refitting (whole boundary, per series) and filtering (all series)."""
    out: dict[str, Any] = {"evaluate_s": round(time.perf_counter() - started, 2), "series": series}
    for name, values in (
        ("refit_all_series_s", rolled.refresh_s),
        ("refit_one_series_s", rolled.series_refresh_s),
        ("forecast_all_series_without_refit_s", rolled.update_s),
    ):
        if values:
            out[f"{name}_median"] = _r(np.median(values))
            out[f"{name}_max"] = _r(np.max(values))
    return out


def _fallback_forecast(
    series: LoadSeries, target: str, step: int, q: float
) -> WindowForecast | None:
    """What the planning job does without a selected model: forecasting.peak on the past."""
    history = series.until(step)
    windows = [
        TypeWindow(
            series.service,
            series.request_type,
            series.start_of(series.first_step + i),
            series.window_s,
            round(float(m) * series.window_s),
            0,
            0,
            float(p),
            float(m),
        )
        for i, (m, p) in enumerate(zip(history.mean_rps, history.peak_rps, strict=True))
        if math.isfinite(m) and math.isfinite(p)
    ]
    if not windows:
        return None
    f = forecast_peak(windows, series.start_of(step), series.window_s, ForecastSpec(quantile=q))
    if target == "mean":
        return WindowForecast(
            f.mean_rate_rps,
            f.mean_rate_rps * f.planned_rate_rps / max(f.peak_rate_rps, 1e-12),
            True,
        )
    return WindowForecast(f.peak_rate_rps, f.planned_rate_rps, True)


def _segment_forecasts(
    state: SeriesState,
    series: LoadSeries,
    target: str,
    start: int,
    end: int,
    config: ForecastConfig,
) -> tuple[dict[str, list[WindowForecast | None]], dict[str, np.ndarray]]:
    """One-step forecasts of every candidate for the windows ``start..end-1``, and their
    log residuals (NaN where the window is missing or the candidate made no forecast)."""
    values = series.until(end).values(target)
    n = end - start
    out: dict[str, list[WindowForecast | None]] = {}
    residuals: dict[str, np.ndarray] = {}
    for candidate in state.candidates:
        forecasts: list[WindowForecast | None] = [None] * n
        residuals[candidate.kind] = np.full(n, np.nan)
        if candidate.fitted is not None:
            try:
                pred = predict(candidate.fitted, values, series.first_step, start)
            except ModelFitError:
                pred = None
            if pred is not None:
                actual = transform(values[start - series.first_step :], candidate.fitted.offset)
                residuals[candidate.kind] = actual - pred.log_mean
                quantiles, how = interval_quantiles(
                    candidate, pred, config.quantile, config, np.ones(n)
                )
                point = pred.rate()
                through = (
                    candidate.fitted.train_end_step
                    if MODEL_KINDS[candidate.kind].statistical
                    else None
                )
                if quantiles:
                    upper = quantiles[config.quantile]
                    forecasts = [
                        WindowForecast(float(p), float(u), False, through)
                        for p, u in zip(point, upper, strict=True)
                    ]
        out[candidate.kind] = forecasts
    return out, residuals


def _selected_row(
    state: SeriesState,
    row: dict[str, WindowForecast | None],
    residuals: dict[str, np.ndarray],
    j: int,
    config: ForecastConfig,
) -> tuple[WindowForecast | None, bool]:
    """The selection's forecast of window ``j`` of a segment, with the level-shift guard of
    :func:`forecasting.selection.forecast_state` (persistence after ``shift_windows``
    windows in a row beyond the selected model's band). Returns it and whether the guard
    switched."""
    if state.selected is None:
        return None, False
    k = config.shift_windows
    candidate = state.candidate(state.selected)
    if k and j >= k and state.selected != "persistence" and candidate is not None:
        recent = residuals[state.selected][j - k : j]
        if level_shift(candidate, recent, config) and row.get("persistence") is not None:
            return row["persistence"], True
    return row.get(state.selected), False


def rolling_forecasts(
    series_list: Sequence[LoadSeries],
    config: ForecastConfig,
    *,
    models: Sequence[str] = tuple(MODEL_KINDS),
    progress: Callable[[str], None] | None = None,
) -> RollingForecasts:
    """Replay the planning job over the series: refresh at each boundary, then forecast
    every window up to the next boundary one step ahead, for every model and the selection.

    Args:
        series_list: The workload's series (one window length).
        config: Forecaster settings; ``config.candidates`` is what the selection picks from.
        models: Kinds forecast on their own (each also gets a residual buffer and intervals).
        progress: Called with a line of progress per refit boundary.
    """
    window_s = series_list[0].window_s
    kinds = tuple(dict.fromkeys([*models, *config.candidates]))
    all_config = replace(config, candidates=kinds, horizon=1)
    refit_steps = max(1, config.refit_s // window_s)
    first = min(s.first_step for s in series_list)
    end = max(s.end_step for s in series_list)
    boundaries = [b for b in range(first + 1, end) if b % refit_steps == 0]
    out = RollingForecasts(
        defaultdict(lambda: defaultdict(dict)), kinds, Counter(), None, [], [], []
    )
    states: dict[tuple[str, str, str], SeriesState] = {}
    for i, boundary in enumerate(boundaries):
        seg_end = boundaries[i + 1] if i + 1 < len(boundaries) else end
        t0 = time.perf_counter()
        all_ready = True
        for s in series_list:
            for target in TARGETS:
                key = (s.service, s.request_type, target)
                t1 = time.perf_counter()
                state = refresh_state(states.get(key), s, target, boundary, all_config)
                chosen, reason = select(
                    [c for c in state.candidates if c.kind in config.candidates],
                    config,
                    window_s,
                    len(s.until(boundary)),
                    target,
                )
                out.series_refresh_s.append(time.perf_counter() - t1)
                state = replace(state, selected=chosen, reason=reason)
                states[key] = state
                if chosen:
                    out.selections[chosen] += 1
                all_ready &= all(
                    c.fitted is not None and len(c.residuals) >= config.min_residuals
                    for c in state.candidates
                )
        out.refresh_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in series_list:
            for target in TARGETS:
                forecast_state(states[(s.service, s.request_type, target)], s, boundary, config)
        out.update_s.append(time.perf_counter() - t0)
        if all_ready and out.calibrated_from is None:
            out.calibrated_from = boundary
        for s in series_list:
            for target in TARGETS:
                key = (s.service, s.request_type, target)
                state = states[key]
                stop = min(seg_end, s.end_step)
                seg, residuals = _segment_forecasts(state, s, target, boundary, stop, config)
                for j, step in enumerate(range(boundary, stop)):
                    row = {k: seg[k][j] for k in kinds}
                    row[SELECTED], guarded = _selected_row(state, row, residuals, j, config)
                    out.guarded += guarded
                    out.table[key][step] = row
        if progress:
            progress(
                f"refit {i + 1}/{len(boundaries)} at window {boundary}: "
                f"{out.refresh_s[-1]:.2f} s for {len(series_list) * len(TARGETS)} series"
            )
    return out


def evaluate(
    series_list: Sequence[LoadSeries],
    config: ForecastConfig,
    *,
    models: Sequence[str] = tuple(MODEL_KINDS),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Rolling-origin evaluation of ``models`` and of the selection among ``config.candidates``.

    Args:
        series_list: The workload's series (one window length).
        config: Forecaster settings; ``config.candidates`` is what the selection picks from.
        models: Kinds scored on their own (each also gets a residual buffer and intervals).
        progress: Called with a line of progress per refit boundary.

    Returns:
        A JSON-serialisable report: per model (and ``selected``), overall and per request
        type; selection counts; timings; the scored span.
    """
    if not series_list:
        return {"error": "no series"}
    started = time.perf_counter()
    window_s = series_list[0].window_s
    first = min(s.first_step for s in series_list)
    rolled = rolling_forecasts(series_list, config, models=models, progress=progress)
    kinds, table, calibrated_from = rolled.kinds, rolled.table, rolled.calibrated_from
    one_service = len({x.service for x in series_list}) == 1
    score_from = calibrated_from if calibrated_from is not None else first + 1
    scores: dict[str, dict[str, _Scores]] = defaultdict(lambda: defaultdict(_Scores))
    for s in series_list:
        for step in range(max(score_from, s.first_step + 1), s.end_step):
            i = step - s.first_step
            am, ap = s.mean_rps[i], s.peak_rps[i]
            if not (math.isfinite(am) and math.isfinite(ap)):
                continue
            rows = {t: table[(s.service, s.request_type, t)].get(step, {}) for t in TARGETS}
            for model in (*kinds, SELECTED):
                fm, fp = rows["mean"].get(model), rows["peak"].get(model)
                if model == SELECTED:
                    fm = fm or _fallback_forecast(s, "mean", step, config.quantile)
                    fp = fp or _fallback_forecast(s, "peak", step, config.quantile)
                if fm is None or fp is None:
                    continue
                bucket = scores[model][
                    s.request_type if one_service else f"{s.service}/{s.request_type}"
                ]
                bucket.actual_mean.append(float(am))
                bucket.actual_peak.append(float(ap))
                bucket.mean.append(fm.point)
                # The planner never sizes below the point forecast of the peak or the mean.
                point_peak = max(fp.point, fm.point)
                bucket.peak.append(point_peak)
                bucket.mean_upper.append(fm.upper)
                bucket.peak_upper.append(max(fp.upper, point_peak))
                bucket.fallback.append(fm.fallback or fp.fallback)
    report_models = {}
    for model in (*kinds, SELECTED):
        per_type = {t: metrics([sc], config.quantile) for t, sc in sorted(scores[model].items())}
        report_models[model] = {
            "overall": metrics(list(scores[model].values()), config.quantile),
            "per_type": per_type,
        }
    return {
        "window_s": window_s,
        "quantile": config.quantile,
        "refit_every_windows": max(1, config.refit_s // window_s),
        "candidates": list(config.candidates),
        "scored_from_step": score_from,
        "calibrated": calibrated_from is not None,
        "models": report_models,
        "selection_counts": dict(rolled.selections.most_common()),
        "level_shift_switches": rolled.guarded,
        "timing": _timing(rolled, started, len(series_list) * len(TARGETS)),
    }

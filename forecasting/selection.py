"""Per-series model selection by rolling-origin backtest, and forecasts from the selection.

The state of one series (a pool's mean or peak) holds, per candidate model, its latest
fitted parameters and a buffer of **out-of-sample** one-step residuals. On each refresh
(every ``refit_s``, the schedule) every candidate:

1. extends its residual buffer with the forecasts its *previous* parameters would have
   made for the windows since then (those windows were not in that fit: a rolling origin);
   a candidate seen for the first time backtests instead: fit on the history minus the last
   ``backtest_days``, forecast those days one step at a time;
2. is refitted on the whole history.

The candidate with the lowest mean absolute log error over its recent residuals is
selected. Between refreshes a forecast only filters the newest windows through the stored
parameters. Upper quantiles come from the selected candidate's residuals
(:mod:`forecasting.calibration`). Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from forecasting.calibration import conformal_quantile, gaussian_quantile
from forecasting.models import (
    BASELINE_KINDS,
    MODEL_KINDS,
    STATISTICAL_KINDS,
    FittedModel,
    ModelFitError,
    ModelSpec,
    Prediction,
    fit,
    predict,
    season_steps,
    to_rate,
    transform,
)
from forecasting.series import LoadSeries
from wattplan.errors import PlanInputError

#: Candidates selected among by default: the statsmodels kinds and the three baselines.
DEFAULT_CANDIDATES: tuple[str, ...] = STATISTICAL_KINDS + BASELINE_KINDS


@dataclass(frozen=True)
class ForecastConfig:
    """How the forecaster fits, selects and calibrates.

    Attributes:
        quantile: Upper quantile of the peak the planner sizes for.
        candidates: Model kinds to select among, in tie-break order.
        refit_s: How often each series is refitted and its model re-selected.
        backtest_days: Span of the first backtest of a candidate with no residuals yet.
        calibration_days: Most recent residuals kept per candidate (interval calibration).
        selection_days: Most recent residuals the selection score averages.
        min_residuals: Fewest residuals to calibrate an interval or select a candidate.
        horizon: Windows forecast ahead in each planning run.
        options: Per-kind options, e.g. ``{"fourier_arima": {"daily_order": 3}}``.
        selection_metric: Selection score per target (see :meth:`CandidateState.score`);
            by default both by the point forecast's mean absolute log error (on ServeGen
            the pinball loss selected worse peaks and no better quantiles).
        calibration_step: Step per window of the adaptive correction of the upper
            quantile's level (0 turns it off).
        shift_windows: When this many windows in a row (since the last refit) fall beyond
            the selected model's band on one side, the forecast switches to persistence
            until the next refit (0 turns the guard off).
    """

    quantile: float = 0.95
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    refit_s: int = 86400
    backtest_days: float = 1.0
    calibration_days: float = 7.0
    selection_days: float = 7.0
    min_residuals: int = 24
    horizon: int = 1
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    selection_metric: Mapping[str, str] = field(
        default_factory=lambda: {"mean": "male", "peak": "male"}
    )
    calibration_step: float = 0.01
    shift_windows: int = 3

    def __post_init__(self) -> None:
        problems = []
        if not 0.5 <= self.quantile < 1:
            problems.append(f"quantile={self.quantile} must be in [0.5, 1)")
        unknown = [c for c in self.candidates if c not in MODEL_KINDS]
        if unknown or not self.candidates:
            problems.append(
                f"candidates {list(self.candidates)}: unknown {unknown}; known: "
                f"{', '.join(MODEL_KINDS)}"
            )
        if self.refit_s <= 0 or self.horizon < 1 or self.min_residuals < 1:
            problems.append("refit_s, horizon and min_residuals must be positive")
        if min(self.backtest_days, self.calibration_days, self.selection_days) <= 0:
            problems.append("backtest, calibration and selection spans must be positive")
        if problems:
            raise PlanInputError("forecast config: " + "; ".join(problems))

    def spec(self, kind: str) -> ModelSpec:
        """The spec of one candidate kind."""
        return ModelSpec(kind, dict(self.options.get(kind, {})))

    def steps(self, days: float, window_s: int) -> int:
        """Windows in ``days`` days (at least one)."""
        return max(1, round(days * season_steps(window_s)))


@dataclass(frozen=True)
class CandidateState:
    """One candidate of one series.

    Attributes:
        kind: Model kind.
        fitted: Latest parameters, or None when the last fit failed (see ``error``).
        residuals: Out-of-sample one-step log residuals (actual minus forecast), oldest
            first, from fits that never saw those windows.
        residuals_end_step: The residuals cover windows before this epoch step.
        error: Why the last fit failed, if it did.
        shift: Adaptive correction added to the level of the conformal upper quantile
            (see :func:`track_shift`).
    """

    kind: str
    fitted: FittedModel | None
    residuals: tuple[float, ...] = ()
    residuals_end_step: int = 0
    error: str | None = None
    shift: float = 0.0

    def score(self, last: int, metric: str = "male", q: float = 0.95) -> float:
        """Backtest score over the ``last`` residuals, lower is better (inf when none).

        ``male``: mean absolute log error of the point forecast. ``pinball``: pinball loss
        (log scale) of the conformal ``q`` quantile calibrated on all the residuals, i.e.
        of what the planner would have provisioned.
        """
        recent = np.asarray(self.residuals[-last:], dtype=float)
        if not recent.size:
            return math.inf
        if metric == "male":
            return float(np.mean(np.abs(recent)))
        if metric == "pinball":
            upper = conformal_quantile(self.residuals, q)
            if upper is None:
                return math.inf
            diff = recent - upper
            return float(np.mean(np.maximum(q * diff, (q - 1) * diff)))
        raise PlanInputError(f"unknown selection metric {metric!r}; use male or pinball")

    def metrics(self, last: int) -> dict[str, Any]:
        """Backtest figures stored with the model and each forecast."""
        r = np.asarray(self.residuals, dtype=float)
        recent = r[-last:]
        return {
            "residuals": int(r.size),
            "male": float(np.mean(np.abs(recent))) if recent.size else None,
            "bias_log": float(np.mean(recent)) if recent.size else None,
            "rmse_log": float(np.sqrt(np.mean(recent**2))) if recent.size else None,
            "error": self.error,
        }


@dataclass(frozen=True)
class SeriesState:
    """Fitted candidates and the selection of one (service, request type, target).

    Attributes:
        service: Pool's service.
        request_type: Pool's request type.
        target: ``"mean"`` or ``"peak"``.
        window_s: Window length of the series.
        refreshed_step: Epoch step of the last refresh (refit and selection).
        candidates: One state per candidate kind.
        selected: Kind selected at the last refresh, None when no candidate qualified.
        reason: Why the selection is what it is (fallbacks say so here).
    """

    service: str
    request_type: str
    target: str
    window_s: int
    refreshed_step: int
    candidates: tuple[CandidateState, ...]
    selected: str | None
    reason: str

    def candidate(self, kind: str) -> CandidateState | None:
        """The state of one candidate kind, if present."""
        return next((c for c in self.candidates if c.kind == kind), None)


@dataclass(frozen=True)
class SeriesForecast:
    """Forecast of one target of one pool for the windows from ``first_step``.

    Attributes:
        target: ``"mean"`` or ``"peak"``.
        first_step: Epoch step of the first forecast window.
        model: Kind that made the forecast.
        point: Point forecast (rate) per window.
        quantiles: ``{q: rate per window}`` for the configured quantile, its mirror and 0.5.
        calibration: How the intervals were made (``conformal n=...`` or ``model sd``).
        fallback_reason: Set when the forecast is not the selected model's.
    """

    target: str
    first_step: int
    model: str
    point: tuple[float, ...]
    quantiles: Mapping[float, tuple[float, ...]]
    calibration: str
    fallback_reason: str | None = None


def values_until(series: LoadSeries, target: str, at_step: int) -> np.ndarray:
    """The target's values before ``at_step``; a history that ends earlier is padded with
    missing windows up to it."""
    history = series.until(at_step)
    values = history.values(target)
    if history.end_step < at_step:
        values = np.concatenate([values, np.full(at_step - history.end_step, np.nan)])
    return values


def residuals_between(
    fitted: FittedModel, values: np.ndarray, first_step: int, start_step: int, end_step: int
) -> list[float]:
    """Log residuals of ``fitted``'s one-step forecasts for the observed windows in a span.

    Only ``values`` before ``end_step`` are read.
    """
    start_step = max(start_step, first_step)
    if end_step <= start_step:
        return []
    history = values[: end_step - first_step]
    pred = predict(fitted, history, first_step, start_step)
    actual = transform(history[start_step - first_step :], fitted.offset)
    r = actual - pred.log_mean
    return [float(x) for x in r if math.isfinite(x)]


def _refresh_candidate(
    previous: CandidateState | None,
    kind: str,
    values: np.ndarray,
    first_step: int,
    at_step: int,
    config: ForecastConfig,
    window_s: int,
) -> CandidateState:
    spec = config.spec(kind)
    residuals = list(previous.residuals) if previous else []
    shift = previous.shift if previous else 0.0
    if previous is not None and previous.fitted is not None:
        start = max(previous.residuals_end_step, previous.fitted.train_end_step)
        new: list[float] = []
        # When the old parameters cannot be applied to this history, keep what we had.
        with contextlib.suppress(ModelFitError):
            new = residuals_between(previous.fitted, values, first_step, start, at_step)
        shift = track_shift(previous, new, config)
        residuals += new
    elif not residuals:
        origin = at_step - config.steps(config.backtest_days, window_s)
        if origin > first_step:
            try:
                first_fit = fit(values[: origin - first_step], first_step, window_s, spec)
                residuals = residuals_between(first_fit, values, first_step, origin, at_step)
            except ModelFitError:
                residuals = []
    keep = config.steps(config.calibration_days, window_s)
    try:
        fitted: FittedModel | None = fit(values, first_step, window_s, spec)
        error = None
    except ModelFitError as exc:
        fitted, error = None, str(exc)
    return CandidateState(kind, fitted, tuple(residuals[-keep:]), at_step, error, shift)


def track_shift(previous: CandidateState, new: Sequence[float], config: ForecastConfig) -> float:
    """Adaptive conformal correction of the upper quantile's level after the windows seen.

    For each new residual in turn: ``shift += step * (miss - (1 - q))``, where ``miss`` says
    the actual exceeded the upper quantile planned with the previous buffer at level
    ``q + shift``. Misses raise the level, hits lower it, so that coverage tracks ``q``
    even when errors drift (Gibbs and Candes 2021, adaptive conformal inference). The
    level stays within ``[q - 0.2, 0.999]``.
    """
    if not new or config.calibration_step <= 0:
        return previous.shift
    upper = upper_residual(previous.residuals, previous.shift, config.quantile)
    if upper is None:
        return previous.shift
    shift = previous.shift
    for r in new:
        miss = 1.0 if r > upper else 0.0
        shift += config.calibration_step * (miss - (1 - config.quantile))
    return float(min(max(shift, -0.2), 0.999 - config.quantile))


def upper_residual(residuals: Sequence[float], shift: float, q: float) -> float | None:
    """Conformal residual quantile at level ``q + shift`` (the largest residual when the
    level asks for more than the buffer holds)."""
    level = min(max(q + shift, 0.5), 0.999)
    r = conformal_quantile(residuals, level)
    if r is None and residuals:
        finite = [x for x in residuals if math.isfinite(x)]
        return max(finite) if finite else None
    return r


def refresh_state(
    previous: SeriesState | None,
    series: LoadSeries,
    target: str,
    at_step: int,
    config: ForecastConfig,
) -> SeriesState:
    """Refit every candidate on the history before ``at_step`` and re-select.

    Args:
        previous: The series' state from the last refresh (None the first time).
        series: The pool's history; only windows before ``at_step`` are read.
        target: ``"mean"`` or ``"peak"``.
        at_step: Epoch step of the refresh (the planning window about to be forecast).
        config: Forecaster settings.
    """
    values = values_until(series, target, at_step)
    window_s = series.window_s
    candidates = tuple(
        _refresh_candidate(
            previous.candidate(kind) if previous else None,
            kind,
            values,
            series.first_step,
            at_step,
            config,
            window_s,
        )
        for kind in config.candidates
    )
    selected, reason = select(candidates, config, window_s, len(values), target)
    return SeriesState(
        series.service,
        series.request_type,
        target,
        window_s,
        at_step,
        candidates,
        selected,
        reason,
    )


def select(
    candidates: Sequence[CandidateState],
    config: ForecastConfig,
    window_s: int,
    n: int,
    target: str = "peak",
) -> tuple[str | None, str]:
    """Pick the eligible candidate with the lowest backtest score; say why.

    Args:
        candidates: Candidate states of one series.
        config: Forecaster settings.
        window_s: Window length of the series.
        n: Windows of history (for the fallback message).
        target: ``"mean"`` or ``"peak"`` (chooses the score).

    Returns:
        ``(kind or None, reason)``.
    """
    last = config.steps(config.selection_days, window_s)
    metric = config.selection_metric.get(target, "male")
    eligible = [
        c for c in candidates if c.fitted is not None and len(c.residuals) >= config.min_residuals
    ]
    if not eligible:
        days = n / season_steps(window_s)
        return None, (
            f"no candidate has {config.min_residuals} backtest residuals yet (history "
            f"{days:.2f} days; models need {_days_needed(config):g})"
        )
    best = min(
        eligible,
        key=lambda c: (c.score(last, metric, config.quantile), config.candidates.index(c.kind)),
    )
    statistical = [k for k in config.candidates if k in STATISTICAL_KINDS]
    ready = [c.kind for c in eligible if c.kind in STATISTICAL_KINDS]
    if best.kind in BASELINE_KINDS and statistical and not ready:
        days = n / season_steps(window_s)
        reason = (
            f"fallback: history of {days:.2f} days is too short for {', '.join(statistical)} "
            f"(they need {_days_needed(config):g}); {best.kind} had the lowest backtest error"
        )
    else:
        reason = f"lowest backtest {metric} over the last {last} windows"
    return best.kind, reason


def _days_needed(config: ForecastConfig) -> float:
    """History a statistical candidate needs before it can be selected."""
    return max(MODEL_KINDS[k].min_days for k in config.candidates) + config.backtest_days


def interval_quantiles(
    candidate: CandidateState,
    pred: Prediction,
    q: float,
    config: ForecastConfig,
    steps_ahead: np.ndarray,
) -> tuple[dict[float, np.ndarray], str]:
    """Quantiles (rates) of a prediction: conformal from the candidate's residuals, else the
    model's own Gaussian sd, else none.

    The residuals are one-step errors; ``h`` steps ahead they are widened by ``sqrt(h)``.

    Args:
        candidate: The candidate that made ``pred`` (its residual buffer calibrates).
        pred: The prediction.
        q: Upper quantile; ``1 - q`` and the median come with it.
        config: Forecaster settings (``min_residuals``).
        steps_ahead: Steps ahead of each predicted window (1 for a one-step forecast).

    Returns:
        ``({level: rates}, how)``; ``({}, "none")`` when neither source is available.
    """
    levels = sorted({q, round(1 - q, 10), 0.5})
    widen = np.sqrt(np.maximum(np.asarray(steps_ahead, dtype=float), 1.0))
    out: dict[float, np.ndarray] = {}
    if len(candidate.residuals) >= config.min_residuals:
        for level in levels:
            r = (
                upper_residual(candidate.residuals, candidate.shift, q)
                if level == q
                else conformal_quantile(candidate.residuals, level)
            )
            if r is None:
                break
            out[level] = to_rate(pred.log_mean + r * widen, pred.offset)
        else:
            return _clip(out), f"conformal n={len(candidate.residuals)}"
    sd = pred.log_sd
    if not (np.isfinite(sd).all() and len(sd)):
        return {}, "none"
    for level in levels:
        z = gaussian_quantile(1.0, level) or 0.0
        out[level] = to_rate(pred.log_mean + z * sd, pred.offset)
    return _clip(out), "model sd"


def _clip(quantiles: dict[float, np.ndarray]) -> dict[float, np.ndarray]:
    return {k: np.maximum(v, 0.0) for k, v in quantiles.items()}


def forecast_state(
    state: SeriesState,
    series: LoadSeries,
    at_step: int,
    config: ForecastConfig,
    *,
    kind: str | None = None,
) -> SeriesForecast | None:
    """Forecast ``config.horizon`` windows from ``at_step`` with the stored parameters.

    Filters the history before ``at_step`` through the selected candidate's parameters (no
    refit). When that candidate cannot forecast this history, the next best calibrated
    candidate does, and the forecast says so.

    Args:
        state: The series' state.
        series: The pool's history; only windows before ``at_step`` are read.
        at_step: First window to forecast.
        config: Forecaster settings.
        kind: Forecast with this candidate instead of the selection (evaluation).

    Returns:
        The forecast, or None when no candidate can forecast (nothing selected).
    """
    values = values_until(series, state.target, at_step)
    last = config.steps(config.selection_days, state.window_s)
    order = [kind] if kind else ([state.selected] if state.selected else [])
    order += [
        c.kind
        for c in sorted(
            state.candidates,
            key=lambda c: c.score(
                last, config.selection_metric.get(state.target, "male"), config.quantile
            ),
        )
        if c.kind not in order and len(c.residuals) >= config.min_residuals
    ]
    fallback: str | None = None
    for name in order:
        candidate = state.candidate(name)
        if candidate is None or candidate.fitted is None:
            fallback = f"{name} has no fitted parameters"
            if kind:
                return None
            continue
        guard_from = at_step
        if not kind and config.shift_windows and name != "persistence":
            guard_from = max(
                at_step - config.shift_windows, candidate.fitted.train_end_step, series.first_step
            )
        try:
            pred = predict(
                candidate.fitted, values, series.first_step, guard_from, horizon=config.horizon
            )
        except ModelFitError as exc:
            fallback = f"{name} could not forecast: {exc}"
            if kind:
                return None
            continue
        k = at_step - guard_from
        if k:
            actual = transform(values[guard_from - series.first_step :], candidate.fitted.offset)
            side = level_shift(candidate, actual - pred.log_mean[:k], config)
            pred = Prediction(at_step, pred.log_mean[k:], pred.log_sd[k:], pred.offset)
            persistence = state.candidate("persistence")
            if side and persistence is not None and persistence.fitted is not None:
                shifted = forecast_state(state, series, at_step, config, kind="persistence")
                if shifted is not None:
                    return replace(
                        shifted,
                        fallback_reason=f"level shift: the last {k} windows were all {side} "
                        f"{name}'s {config.quantile:g} band; persistence until the next refit",
                    )
        quantiles, how = interval_quantiles(
            candidate, pred, config.quantile, config, np.arange(1, config.horizon + 1)
        )
        point = pred.rate()
        return SeriesForecast(
            state.target,
            at_step,
            name,
            tuple(map(float, point)),
            {q: tuple(map(float, v)) for q, v in quantiles.items()},
            how,
            None if name == state.selected or kind else f"{fallback}; used {name}",
        )
    return None


def level_shift(
    candidate: CandidateState, recent: np.ndarray, config: ForecastConfig
) -> str | None:
    """``"above"`` or ``"below"`` when every recent residual lies beyond the candidate's
    conformal band on that side (a level shift the model has not caught up with), else None.

    ``recent`` holds the log residuals of the last ``config.shift_windows`` windows; a
    missing window (NaN) never counts as beyond.
    """
    if len(recent) < max(1, config.shift_windows):
        return None
    upper = conformal_quantile(candidate.residuals, config.quantile)
    lower = conformal_quantile(candidate.residuals, 1 - config.quantile)
    if upper is not None and bool(np.all(recent > upper)):
        return "above"
    if lower is not None and bool(np.all(recent < lower)):
        return "below"
    return None


def replace_selection(state: SeriesState, kind: str) -> SeriesState:
    """A copy of ``state`` with another selection (tests and manual overrides)."""
    if state.candidate(kind) is None:
        raise PlanInputError(f"{kind} is not a candidate of this series")
    return replace(state, selected=kind, reason=f"set to {kind}")

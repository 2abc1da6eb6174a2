"""Forecast models as data: a spec names a kind, ``fit`` turns history into parameters,
``predict`` applies fixed parameters to any (longer) history.

Every model works on ``z = log(rate + offset)``: rates are positive, their daily swing is
multiplicative, and bursts weigh less in logs. ``offset`` (5% of the training mean, at
least half a request per window) keeps quiet windows finite. Parameters are plain floats so
that they can be stored in PostgreSQL and re-applied later without refitting: between
refits a planning run only *filters* the newest windows through the stored parameters
(Kalman filter for the statsmodels kinds), which takes milliseconds per series.

Kinds (see :data:`MODEL_KINDS`):

- ``ets``: additive-error exponential smoothing with a daily seasonal state (statsmodels
  state-space ``ExponentialSmoothing``), its initial state computed from the first two
  days (a heuristic initialisation that, unlike statsmodels' own, reads nothing later).
- ``fourier_arima``: regression on daily Fourier terms (and a weekend indicator and weekly
  terms once the history holds enough of them) with ARMA(1,1) errors (statsmodels
  ``SARIMAX``): no long seasonal lags. The regression is fitted by least squares first.
- ``stl_arima``: robust STL decomposition; the last day's seasonal profile is frozen at fit
  time and an ARMA(1,1) with constant models the seasonally adjusted series.
- baselines ``persistence`` (last window), ``seasonal_naive`` (same window yesterday) and
  ``weekly_template`` (DynamoLLM: median of the same slot on the same kind of day, weekday
  or weekend, over the last weeks). They need no fit.

statsmodels objects never leave this module.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forecasting.series import weekend_mask
from wattplan.errors import PlanInputError


class ModelFitError(RuntimeError):
    """A model could not be fitted to a series (too short, constant, or the optimiser failed).

    Internal to the forecaster: callers fall back to another candidate and record the reason.
    """


@dataclass(frozen=True)
class ModelSpec:
    """What to fit: a registered kind and its options (JSON-serialisable values)."""

    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise PlanInputError(
                f"unknown forecast model {self.kind!r}; known: {', '.join(sorted(MODEL_KINDS))}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"kind": self.kind, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(str(data["kind"]), dict(data.get("options") or {}))


@dataclass(frozen=True)
class FittedModel:
    """Parameters of one fitted model; everything needed to forecast again later.

    Attributes:
        spec: What was fitted.
        window_s: Window length of the series it was fitted on.
        offset: Offset of the log transform.
        params: Estimated parameters (empty for baselines).
        param_names: Their names, as statsmodels reports them.
        extra: Other fitted arrays, e.g. the frozen seasonal profile of ``stl_arima``
            (indexed by window of the day) or the exogenous terms in use.
        train_start_step: First epoch step of the training data.
        train_end_step: Epoch step just after the training data.
    """

    spec: ModelSpec
    window_s: int
    offset: float
    params: tuple[float, ...]
    param_names: tuple[str, ...]
    extra: Mapping[str, tuple[float, ...]]
    train_start_step: int
    train_end_step: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form (floats stay floats; NaN never occurs in a fitted model)."""
        return {
            "spec": self.spec.to_dict(),
            "window_s": self.window_s,
            "offset": self.offset,
            "params": list(self.params),
            "param_names": list(self.param_names),
            "extra": {k: list(v) for k, v in self.extra.items()},
            "train_start_step": self.train_start_step,
            "train_end_step": self.train_end_step,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FittedModel:
        """Inverse of :meth:`to_dict`."""
        return cls(
            ModelSpec.from_dict(data["spec"]),
            int(data["window_s"]),
            float(data["offset"]),
            tuple(float(p) for p in data["params"]),
            tuple(str(n) for n in data["param_names"]),
            {str(k): tuple(float(x) for x in v) for k, v in (data.get("extra") or {}).items()},
            int(data["train_start_step"]),
            int(data["train_end_step"]),
        )


@dataclass(frozen=True)
class Prediction:
    """Predictions of ``z`` for consecutive epoch steps from ``first_step``.

    Each value uses only the observations before its own step (one step ahead where the
    previous window is observed, further ahead across missing or future windows).
    ``log_sd`` is the model's own standard error (NaN for the baselines).
    """

    first_step: int
    log_mean: np.ndarray
    log_sd: np.ndarray
    offset: float

    def rate(self) -> np.ndarray:
        """Point forecasts back on the rate scale (never negative)."""
        return to_rate(self.log_mean, self.offset)


# --- helpers --------------------------------------------------------------------------------


def season_steps(window_s: int) -> int:
    """Windows per day.

    Raises:
        PlanInputError: the window does not divide the day.
    """
    if window_s <= 0 or 86400 % window_s:
        raise PlanInputError(f"window_s={window_s} must divide the day (86400 s)")
    return 86400 // window_s


def log_offset(values: np.ndarray, window_s: int) -> float:
    """Offset of the log transform: 5% of the mean rate, at least half a request per window."""
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if finite.size else 0.0
    return max(0.05 * mean, 0.5 / window_s)


def transform(values: np.ndarray, offset: float) -> np.ndarray:
    """``log(values + offset)``; NaN stays NaN, negative rates are clipped to zero."""
    return np.log(np.maximum(values, 0.0) + offset)


def to_rate(z: np.ndarray, offset: float) -> np.ndarray:
    """Inverse of :func:`transform`; rates within rounding of zero become exactly zero."""
    rate = np.exp(z) - offset
    return np.where(rate > 1e-9 * offset, rate, 0.0)


def _interpolate(z: np.ndarray) -> np.ndarray:
    """Fill NaN by linear interpolation between observed neighbours (edges: nearest)."""
    out = z.copy()
    missing = np.isnan(out)
    if missing.any() and (~missing).any():
        out[missing] = np.interp(np.flatnonzero(missing), np.flatnonzero(~missing), out[~missing])
    return out


def _fourier(steps: np.ndarray, period: int, order: int, shift: int = 0) -> list[np.ndarray]:
    phase = 2 * np.pi * ((steps + shift) % period) / period
    cols = []
    for k in range(1, order + 1):
        cols += [np.sin(k * phase), np.cos(k * phase)]
    return cols


def _silenced(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with statsmodels' convergence warnings silenced (the backtest judges fits)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return wrapper


def _check_trainable(z: np.ndarray, need: int, kind: str) -> None:
    observed = np.isfinite(z)
    if observed.sum() < need:
        raise ModelFitError(
            f"{kind} needs {need} observed windows, the history has {observed.sum()}"
        )
    if np.nanstd(z) < 1e-9:
        raise ModelFitError(f"{kind}: the series is constant over its history")


# --- kinds ----------------------------------------------------------------------------------

FitFn = Callable[
    [np.ndarray, np.ndarray, int, Mapping[str, Any]],
    tuple[tuple[float, ...], tuple[str, ...], dict[str, tuple[float, ...]]],
]
PredictFn = Callable[["FittedModel", np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ModelKind:
    """A registered model kind.

    Attributes:
        name: Registry key.
        statistical: Whether parameters are estimated (False: a baseline).
        min_days: Days of history its fit needs.
        fit: ``(z, steps, window_s, options) -> (params, names, extra)``.
        predict: ``(fitted, z, steps, start) -> (mean, sd)`` for indices ``start..``.
        describe: One line for reports.
    """

    name: str
    statistical: bool
    min_days: float
    fit: FitFn
    predict: PredictFn
    describe: str


def _exog(steps: np.ndarray, window_s: int, extra: Mapping[str, tuple[float, ...]]) -> np.ndarray:
    """Regressors of ``fourier_arima`` (an intercept first) as recorded in ``extra['exog']``.

    ``extra['exog']`` is ``(daily_order, weekend, weekly_order)``.
    """
    daily, weekend, weekly = (int(x) for x in extra["exog"])
    season = season_steps(window_s)
    cols = [np.ones(len(steps)), *_fourier(steps, season, daily)]
    if weekend:
        cols.append(weekend_mask(steps, window_s).astype(float))
    if weekly:
        # Shift so that phase 0 is Monday 00:00 (epoch day 0 was a Thursday).
        cols += _fourier(steps, 7 * season, weekly, shift=3 * season)
    return np.column_stack(cols)


def _arma(e: np.ndarray, order: tuple[int, ...], trend: str) -> Any:
    """ARMA errors model (scale concentrated out: one parameter fewer to search)."""
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    return SARIMAX(e, order=order, trend=trend, concentrate_scale=True)


def _order(options: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(int(x) for x in options.get("order", (1, 0, 1)))


@_silenced
def _fit_fourier_arima(
    z: np.ndarray, steps: np.ndarray, window_s: int, options: Mapping[str, Any]
) -> tuple[tuple[float, ...], tuple[str, ...], dict[str, tuple[float, ...]]]:
    # Two stages (regression with ARMA errors): the Fourier/weekend coefficients by least
    # squares, then ARMA(1,1) on what they leave. A joint likelihood search over all of
    # them took ~6 s per series on this machine; this takes ~0.1 s.
    season = season_steps(window_s)
    _check_trainable(z, 2 * season, "fourier_arima")
    observed = np.isfinite(z)
    weekend = weekend_mask(steps, window_s)
    # A weekend indicator is identifiable only with a whole day of each kind observed.
    use_weekend = min((observed & weekend).sum(), (observed & ~weekend).sum()) >= season
    weekly = int(options.get("weekly_order", 2)) if observed.sum() >= 14 * season else 0
    exog: tuple[float, ...] = (float(options.get("daily_order", 3)), float(use_weekend), weekly)
    extra = {"exog": exog}
    x = _exog(steps, window_s, extra)
    try:
        beta = np.linalg.lstsq(x[observed], z[observed], rcond=None)[0]
        model = _arma(z - x @ beta, _order(options), "n")
        result = model.fit(disp=False, maxiter=int(options.get("maxiter", 50)))
    except (ValueError, np.linalg.LinAlgError) as exc:
        raise ModelFitError(f"fourier_arima: {exc}") from exc
    names = tuple(f"beta_{k}" for k in range(len(beta))) + tuple(model.param_names)
    params = tuple(map(float, beta)) + tuple(map(float, result.params))
    return params, names, extra


@_silenced
def _predict_fourier_arima(
    fitted: FittedModel, z: np.ndarray, steps: np.ndarray, start: int
) -> tuple[np.ndarray, np.ndarray]:
    x = _exog(steps, fitted.window_s, fitted.extra)
    beta = np.asarray(fitted.params[: x.shape[1]])
    regression = x @ beta
    model = _arma(z - regression, _order(fitted.spec.options), "n")
    result = model.filter(np.asarray(fitted.params[x.shape[1] :]))
    pred = result.get_prediction(start=start, end=len(z) - 1)
    mean = np.asarray(pred.predicted_mean) + regression[start:]
    return mean, np.sqrt(np.asarray(pred.var_pred_mean))


def _ets_model(z: np.ndarray, season: int) -> Any:
    """The ETS model on ``z`` with its initial state from the first two days only.

    statsmodels' own "heuristic" initialisation reads up to five seasons, which would let a
    prediction see windows after it; this one (mean level of day one, mean within-day
    profile of days one and two) reads the head and nothing else.
    """
    from statsmodels.tsa.statespace.exponential_smoothing import ExponentialSmoothing

    head = _interpolate(z[: 2 * season]).reshape(2, season)
    profile = (head - head.mean(axis=1, keepdims=True)).mean(axis=0)
    profile -= profile.mean()
    return ExponentialSmoothing(
        z,
        seasonal=season,
        initialization_method="known",
        initial_level=float(head[0].mean()),
        initial_seasonal=profile[::-1],  # statsmodels orders the seasonal state newest first
    )


@_silenced
def _fit_ets(
    z: np.ndarray, steps: np.ndarray, window_s: int, options: Mapping[str, Any]
) -> tuple[tuple[float, ...], tuple[str, ...], dict[str, tuple[float, ...]]]:
    season = season_steps(window_s)
    _check_trainable(z, 2 * season, "ets")
    if np.isfinite(z[: 2 * season]).sum() < season:
        raise ModelFitError("ets: the first two days are mostly missing")
    try:
        model = _ets_model(z, season)
        result = model.fit(disp=False, maxiter=int(options.get("maxiter", 50)))
    except (ValueError, np.linalg.LinAlgError) as exc:
        raise ModelFitError(f"ets: {exc}") from exc
    params = tuple(map(float, result.params))
    if not all(math.isfinite(p) for p in params):
        raise ModelFitError("ets: the optimiser returned non-finite parameters")
    return params, tuple(model.param_names), {}


@_silenced
def _predict_ets(
    fitted: FittedModel, z: np.ndarray, steps: np.ndarray, start: int
) -> tuple[np.ndarray, np.ndarray]:
    season = season_steps(fitted.window_s)
    if start < 2 * season or np.isfinite(z[: 2 * season]).sum() < season:
        raise ModelFitError("ets: needs two days observed before the first prediction")
    result = _ets_model(z, season).filter(np.asarray(fitted.params))
    pred = result.get_prediction(start=start, end=len(z) - 1)
    return np.asarray(pred.predicted_mean), np.sqrt(np.asarray(pred.var_pred_mean))


@_silenced
def _fit_stl_arima(
    z: np.ndarray, steps: np.ndarray, window_s: int, options: Mapping[str, Any]
) -> tuple[tuple[float, ...], tuple[str, ...], dict[str, tuple[float, ...]]]:
    from statsmodels.tsa.seasonal import STL

    season = season_steps(window_s)
    _check_trainable(z, 2 * season, "stl_arima")
    filled = _interpolate(z)
    try:
        decomposition = STL(filled, period=season, robust=True).fit()
        seasonal = np.asarray(decomposition.seasonal)
        profile = np.zeros(season)
        tail = np.arange(len(z) - season, len(z))
        profile[steps[tail] % season] = seasonal[tail]
        adjusted = z - profile[steps % season]  # gaps stay gaps for the Kalman filter
        model = _arma(adjusted, _order(options), "c")
        result = model.fit(disp=False, maxiter=int(options.get("maxiter", 50)))
    except (ValueError, np.linalg.LinAlgError) as exc:
        raise ModelFitError(f"stl_arima: {exc}") from exc
    return (
        tuple(map(float, result.params)),
        tuple(model.param_names),
        {"seasonal_profile": tuple(map(float, profile))},
    )


@_silenced
def _predict_stl_arima(
    fitted: FittedModel, z: np.ndarray, steps: np.ndarray, start: int
) -> tuple[np.ndarray, np.ndarray]:

    season = season_steps(fitted.window_s)
    profile = np.asarray(fitted.extra["seasonal_profile"])[steps % season]
    result = _arma(z - profile, _order(fitted.spec.options), "c").filter(np.asarray(fitted.params))
    pred = result.get_prediction(start=start, end=len(z) - 1)
    mean = np.asarray(pred.predicted_mean) + profile[start:]
    return mean, np.sqrt(np.asarray(pred.var_pred_mean))


def _no_fit(
    z: np.ndarray, steps: np.ndarray, window_s: int, options: Mapping[str, Any]
) -> tuple[tuple[float, ...], tuple[str, ...], dict[str, tuple[float, ...]]]:
    if not np.isfinite(z).any():
        raise ModelFitError("no observed window in the history")
    return (), (), {}


def _last_observed(z: np.ndarray) -> np.ndarray:
    """``out[i]`` = the last observed value before index ``i`` (NaN if none)."""
    idx = np.where(np.isfinite(z), np.arange(len(z)), -1)
    last = np.maximum.accumulate(idx)
    prev = np.concatenate([[-1], last[:-1]])
    out = np.full(len(z), np.nan)
    ok = prev >= 0
    out[ok] = z[prev[ok]]
    return out


def _predict_persistence(
    fitted: FittedModel, z: np.ndarray, steps: np.ndarray, start: int
) -> tuple[np.ndarray, np.ndarray]:
    mean = _last_observed(z)[start:]
    return mean, np.full(len(mean), np.nan)


def _predict_seasonal_naive(
    fitted: FittedModel, z: np.ndarray, steps: np.ndarray, start: int
) -> tuple[np.ndarray, np.ndarray]:
    season = season_steps(fitted.window_s)
    fallback = _last_observed(z)
    pred = np.full(len(z), np.nan)
    for i in range(start, len(z)):
        j = i - season
        if j >= 0 and np.isfinite(z[j]):
            pred[i] = z[j]
        elif j >= start and np.isfinite(pred[j]):
            pred[i] = pred[j]  # yesterday was itself forecast (horizon over a day, or a gap)
        else:
            pred[i] = fallback[i]
    mean = pred[start:]
    return mean, np.full(len(mean), np.nan)


def _predict_weekly_template(
    fitted: FittedModel, z: np.ndarray, steps: np.ndarray, start: int
) -> tuple[np.ndarray, np.ndarray]:
    season = season_steps(fitted.window_s)
    weeks = int(fitted.spec.options.get("weeks", 4))
    kinds = weekend_mask(steps, fitted.window_s)
    lags = np.arange(1, 7 * weeks + 1) * season
    idx = np.arange(start, len(z))[:, None] - lags[None, :]
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    values = np.where(valid, z[safe], np.nan)
    same_kind = valid & (kinds[safe] == kinds[start:, None])
    values = np.where(same_kind, values, np.nan)
    any_seen = np.isfinite(values).any(axis=1)
    mean = np.full(len(z) - start, np.nan)
    if any_seen.any():
        mean[any_seen] = np.nanmedian(values[any_seen], axis=1)
    if not any_seen.all():
        naive, _ = _predict_seasonal_naive(fitted, z, steps, start)
        mean[~any_seen] = naive[~any_seen]
    return mean, np.full(len(mean), np.nan)


#: Registered model kinds by name.
MODEL_KINDS: dict[str, ModelKind] = {
    k.name: k
    for k in (
        ModelKind(
            "ets",
            True,
            2.0,
            _fit_ets,
            _predict_ets,
            "exponential smoothing, additive daily seasonal state, initialised from days 1-2",
        ),
        ModelKind(
            "fourier_arima",
            True,
            2.0,
            _fit_fourier_arima,
            _predict_fourier_arima,
            "least-squares daily Fourier terms (weekend/weekly when seen) + ARMA(1,1) errors",
        ),
        ModelKind(
            "stl_arima",
            True,
            2.0,
            _fit_stl_arima,
            _predict_stl_arima,
            "robust STL (daily), frozen seasonal profile + ARMA(1,1) on the adjusted series",
        ),
        ModelKind(
            "persistence",
            False,
            0.0,
            _no_fit,
            _predict_persistence,
            "baseline: the last observed window",
        ),
        ModelKind(
            "seasonal_naive",
            False,
            1.0,
            _no_fit,
            _predict_seasonal_naive,
            "baseline: the same window yesterday",
        ),
        ModelKind(
            "weekly_template",
            False,
            1.0,
            _no_fit,
            _predict_weekly_template,
            "baseline (DynamoLLM): median of the same slot on the same kind of day (4 weeks)",
        ),
    )
}

#: The statistical kinds (what the issue calls models, as opposed to baselines).
STATISTICAL_KINDS: tuple[str, ...] = tuple(k for k, v in MODEL_KINDS.items() if v.statistical)
#: The baseline kinds.
BASELINE_KINDS: tuple[str, ...] = tuple(k for k, v in MODEL_KINDS.items() if not v.statistical)


# --- public functions -----------------------------------------------------------------------


def fit(values: np.ndarray, first_step: int, window_s: int, spec: ModelSpec) -> FittedModel:
    """Fit ``spec`` to a rate series (NaN = missing) whose index 0 is ``first_step``.

    Leading missing windows are ignored.

    Raises:
        ModelFitError: the series is too short or degenerate for this kind, or the fit failed.
    """
    kind = MODEL_KINDS[spec.kind]
    observed = np.flatnonzero(np.isfinite(values))
    if observed.size == 0:
        raise ModelFitError(f"{spec.kind}: no observed window in the history")
    lead = int(observed[0])
    values = values[lead:]
    first_step += lead
    season = season_steps(window_s)
    if len(values) < kind.min_days * season:
        raise ModelFitError(
            f"{spec.kind} needs {kind.min_days:g} days of history, it has "
            f"{len(values) / season:.2f}"
        )
    offset = log_offset(values, window_s)
    steps = np.arange(first_step, first_step + len(values))
    params, names, extra = kind.fit(transform(values, offset), steps, window_s, spec.options)
    return FittedModel(
        spec, window_s, offset, params, names, extra, first_step, first_step + len(values)
    )


def predict(
    fitted: FittedModel,
    values: np.ndarray,
    first_step: int,
    start_step: int,
    horizon: int = 0,
) -> Prediction:
    """Apply fixed parameters to a history and predict from ``start_step`` onwards.

    Predictions cover ``start_step .. first_step + len(values) + horizon - 1``: for an
    observed step, the forecast made just before it; for the ``horizon`` steps after the
    history, forecasts 1..horizon steps ahead. No prediction uses a value at or after its
    own step.

    Args:
        fitted: The model.
        values: Rates from ``first_step`` on (NaN = missing).
        first_step: Epoch step of ``values[0]``.
        start_step: First step to predict (within the history or just after it).
        horizon: Steps to forecast past the end of the history.

    Raises:
        ModelFitError: the history is too short to initialise the model's state.
    """
    if fitted.window_s <= 0:
        raise PlanInputError("fitted model has no window length")
    end_step = first_step + len(values) + horizon
    if not first_step <= start_step <= first_step + len(values):
        raise PlanInputError(
            f"start_step {start_step} outside the history {first_step}..{first_step + len(values)}"
        )
    observed = np.flatnonzero(np.isfinite(values[: start_step - first_step]))
    if observed.size == 0:
        raise ModelFitError(f"{fitted.spec.kind}: nothing observed before the first prediction")
    lead = int(observed[0])
    z = np.concatenate([transform(values[lead:], fitted.offset), np.full(horizon, np.nan)])
    base = first_step + lead
    steps = np.arange(base, end_step)
    mean, sd = MODEL_KINDS[fitted.spec.kind].predict(fitted, z, steps, start_step - base)
    mean = np.asarray(mean, dtype=float)
    if not np.isfinite(mean).all():
        raise ModelFitError(f"{fitted.spec.kind}: non-finite predictions")
    return Prediction(start_step, mean, np.asarray(sd, dtype=float), fitted.offset)

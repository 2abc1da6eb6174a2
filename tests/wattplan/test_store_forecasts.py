"""Forecast model states and detailed forecasts round-trip through real PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest
import sqlalchemy as sa

from forecasting.planning import plan_forecasts
from forecasting.selection import ForecastConfig, forecast_state, refresh_state
from forecasting.series import LoadSeries, step_of, step_start
from wattplan import store
from wattplan.domain import TypeWindow

WINDOW_S = 1800
DAY = 48
START = datetime(2024, 1, 1, tzinfo=UTC)
CONFIG = ForecastConfig(candidates=("fourier_arima", "persistence", "weekly_template"))


def _series(days: int = 4, request_type: str = "MS") -> LoadSeries:
    rng = np.random.default_rng(11)
    n = days * DAY
    mean = 10 * (1.5 + np.sin(2 * np.pi * np.arange(n) / DAY)) * np.exp(rng.normal(0, 0.1, n))
    mean[30:33] = np.nan  # a gap survives the round trip too
    return LoadSeries("chat", request_type, step_of(START, WINDOW_S), WINDOW_S, mean, mean * 1.3)


def _windows(s: LoadSeries) -> list[TypeWindow]:
    return [
        TypeWindow(
            s.service,
            s.request_type,
            step_start(s.first_step + i, WINDOW_S),
            WINDOW_S,
            round(m * WINDOW_S),
            0,
            0,
            float(p),
            float(m),
        )
        for i, (m, p) in enumerate(zip(s.mean_rps, s.peak_rps, strict=True))
        if np.isfinite(m)
    ]


def test_series_states_round_trip_and_forecast_the_same(engine: sa.Engine) -> None:
    s = _series()
    states = [refresh_state(None, s, t, s.end_step, CONFIG) for t in ("mean", "peak")]
    states[1] = replace(
        states[1],
        candidates=tuple(
            replace(c, shift=0.0125) if c.kind == "persistence" else c for c in states[1].candidates
        ),
    )
    with engine.begin() as conn:
        assert store.write_forecast_states(conn, "demo", states) == 6
    with engine.connect() as conn:
        read = store.read_forecast_states(conn, "demo", WINDOW_S)
    assert set(read) == {("chat", "MS", "mean"), ("chat", "MS", "peak")}
    for original in states:
        back = read[(original.service, original.request_type, original.target)]
        assert back.selected == original.selected and back.reason == original.reason
        assert back.refreshed_step == original.refreshed_step
        for a in original.candidates:
            b = back.candidate(a.kind)
            assert b is not None
            assert b.residuals == pytest.approx(a.residuals)
            assert (b.residuals_end_step, b.error, b.shift) == (
                a.residuals_end_step,
                a.error,
                a.shift,
            )
            assert (b.fitted.to_dict() if b.fitted else None) == (
                a.fitted.to_dict() if a.fitted else None
            )
        f1 = forecast_state(original, s, s.end_step, CONFIG)
        f2 = forecast_state(back, s, s.end_step, CONFIG)
        assert f1 is not None and f2 is not None
        assert f2.point == pytest.approx(f1.point) and f2.quantiles == f1.quantiles


def test_writing_states_twice_leaves_one_row_per_candidate(engine: sa.Engine) -> None:
    s = _series()
    state = refresh_state(None, s, "peak", s.end_step, CONFIG)
    for _ in range(2):
        with engine.begin() as conn:
            store.write_forecast_states(conn, "demo", [state])
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT model, selected FROM forecast_models ORDER BY model")
        ).all()
    assert [r.model for r in rows] == sorted(CONFIG.candidates)
    assert sum(r.selected for r in rows) == 1


def test_forecast_records_store_intervals_model_and_backtest_idempotently(
    engine: sa.Engine,
) -> None:
    s, short = _series(), _series(days=1, request_type="LL")
    result = plan_forecasts(
        _windows(s) + _windows(short), [s, short], {}, s.end_step, CONFIG, max_refreshes=4
    )
    made_at = step_start(s.end_step, WINDOW_S)
    for _ in range(2):
        with engine.begin() as conn:
            store.write_forecast_records(conn, "demo", result.records, made_at)
    with engine.connect() as conn:
        planner_view = store.read_forecasts(conn, "demo", made_at, WINDOW_S)
        details = {
            d["request_type"]: d
            for d in store.read_forecast_details(conn, "demo", made_at, WINDOW_S)
        }
        count = conn.execute(sa.text("SELECT count(*) FROM load_forecasts")).scalar()
    assert count == 2
    assert sorted(f.request_type for f in planner_view) == ["LL", "MS"]
    ms = details["MS"]
    assert ms["fallback_reason"] is None
    assert ms["method"] in CONFIG.candidates
    assert set(ms["peak_quantiles"]) == {"0.05", "0.5", "0.95"}
    assert ms["planned_rate_rps"] >= ms["peak_quantiles"]["0.95"] - 1e-9
    assert ms["model_spec"]["peak"]["train_end_at"] == made_at.isoformat()
    assert set(ms["backtest"]["peak"]) == set(CONFIG.candidates)
    assert ms["made_at"] == made_at and ms["horizon_steps"] == 1
    ll = details["LL"]
    assert ll["fallback_reason"].startswith("fallback: no candidate has 24 backtest residuals")
    assert ll["method"].startswith("persistence_peak")


def test_a_newer_forecast_of_a_window_replaces_the_older_whatever_its_method(
    engine: sa.Engine,
) -> None:
    s = _series()
    result = plan_forecasts(_windows(s), [s], {}, s.end_step, CONFIG, max_refreshes=2)
    window = step_start(s.end_step, WINDOW_S)
    (record,) = result.records
    older = replace(record, forecast=replace(record.forecast, method="older_method"))
    with engine.begin() as conn:
        store.write_forecast_records(conn, "demo", [older], step_start(s.end_step - 1, WINDOW_S))
        store.write_forecast_records(conn, "demo", [record], window)
        # An older run replayed late does not replace the newer forecast.
        store.write_forecast_records(conn, "demo", [older], step_start(s.end_step - 1, WINDOW_S))
    with engine.connect() as conn:
        methods = conn.execute(sa.text("SELECT method FROM load_forecasts")).scalars().all()
    assert methods == [record.forecast.method]

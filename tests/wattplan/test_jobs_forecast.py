"""The planning job's forecast step against real PostgreSQL: states in, forecasts out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import sqlalchemy as sa

from wattplan import jobs, store
from wattplan.domain import TypeWindow
from wattplan.ingest_requests import replace_type_windows
from wattplan.settings import Settings

WINDOW_S = 1800
START = datetime(2024, 1, 1, tzinfo=UTC)
DAYS = 4


def _load_history(engine: sa.Engine) -> datetime:
    rng = np.random.default_rng(8)
    n = DAYS * 48
    windows = []
    for rtype, level in (("MS", 20.0), ("SS", 3.0)):
        mean = level * (1.5 + np.sin(2 * np.pi * np.arange(n) / 48)) * rng.lognormal(0, 0.1, n)
        for i in range(n):
            if rtype == "SS" and 60 <= i < 64:
                continue  # a telemetry gap: these windows were never ingested
            windows.append(
                TypeWindow(
                    "chat",
                    rtype,
                    START + timedelta(seconds=i * WINDOW_S),
                    WINDOW_S,
                    round(mean[i] * WINDOW_S),
                    0,
                    0,
                    float(mean[i] * 1.3),
                    float(mean[i]),
                )
            )
    end = START + timedelta(days=DAYS)
    with engine.begin() as conn:
        replace_type_windows(conn, windows, START, end, WINDOW_S, ["chat"])
    return end


def _settings(database_url: str, refits: int) -> Settings:
    return Settings(
        database_url=database_url,
        window_s=WINDOW_S,
        ingest_window_s=WINDOW_S,
        forecast_refits_per_run=refits,
    )


def _rows(engine: sa.Engine, sql: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql))]


def test_forecast_load_fits_selects_and_stores_forecasts_the_planner_reads(
    engine: sa.Engine, database_url: str
) -> None:
    at = _load_history(engine)
    settings = _settings(database_url, refits=4)
    assert jobs.forecast_load(engine, settings, at) == 2
    with engine.connect() as conn:
        planner = {f.request_type: f for f in store.read_forecasts(conn, "demo", at, WINDOW_S)}
        details = {
            d["request_type"]: d for d in store.read_forecast_details(conn, "demo", at, WINDOW_S)
        }
    assert set(planner) == {"MS", "SS"}
    for rtype, f in planner.items():
        d = details[rtype]
        assert d["fallback_reason"] is None, d["fallback_reason"]
        assert f.planned_rate_rps >= f.peak_rate_rps >= f.mean_rate_rps > 0
        assert f.quantile == 0.95 and d["made_at"] == at
        assert d["model_spec"]["peak"]["model"] == f.method
    models = _rows(
        engine,
        "SELECT target, count(*), sum(selected::int) FROM forecast_models GROUP BY target",
    )
    assert sorted(models) == [("mean", 12, 2), ("peak", 12, 2)]

    # Same window again: nothing is due, nothing changes.
    before = _rows(engine, "SELECT * FROM load_forecasts ORDER BY service, request_type")
    states = _rows(engine, "SELECT model, refreshed_at, residuals FROM forecast_models ORDER BY 1")
    assert jobs.forecast_load(engine, settings, at) == 2
    assert _rows(engine, "SELECT * FROM load_forecasts ORDER BY service, request_type") == before
    assert (
        _rows(engine, "SELECT model, refreshed_at, residuals FROM forecast_models ORDER BY 1")
        == states
    )


def test_series_waiting_for_their_refit_turn_fall_back_and_say_so(
    engine: sa.Engine, database_url: str
) -> None:
    at = _load_history(engine)
    jobs.forecast_load(engine, _settings(database_url, refits=1), at)
    with engine.connect() as conn:
        details = {
            d["request_type"]: d for d in store.read_forecast_details(conn, "demo", at, WINDOW_S)
        }
    assert details["MS"]["fallback_reason"].startswith("fallback: not fitted yet")
    assert details["MS"]["method"].startswith("persistence_peak")
    assert details["SS"]["fallback_reason"].startswith("fallback: not fitted yet")
    # The next window refits the next series in line (never fitted first).
    later = at + timedelta(seconds=WINDOW_S)
    jobs.forecast_load(engine, _settings(database_url, refits=1), later)
    refreshed = _rows(
        engine, "SELECT DISTINCT service, request_type, target, refreshed_at FROM forecast_models"
    )
    assert sorted(refreshed) == [("chat", "MS", "mean", at), ("chat", "MS", "peak", later)]

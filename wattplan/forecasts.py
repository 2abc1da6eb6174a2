"""``wattplan forecast evaluate`` and ``wattplan forecast bench``.

``evaluate`` runs the rolling-origin evaluation (:mod:`forecasting.evaluate`) on a bundled
workload or a user's file and checks the issue's targets. ``bench`` times the planning
job itself (``jobs.forecast_load``: read windows and states from PostgreSQL, refit the due
series, forecast, write) over consecutive windows of the ServeGen workload, on a
throwaway database.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, TextIO

import numpy as np
import sqlalchemy as sa

from forecasting.evaluate import SELECTED, evaluate
from forecasting.models import MODEL_KINDS
from forecasting.selection import DEFAULT_CANDIDATES, ForecastConfig
from forecasting.series import step_start
from wattplan import db
from wattplan.domain import TypeWindow
from wattplan.errors import ConfigError, PlanInputError
from wattplan.settings import Settings
from wattplan.workloads import default_window_s, describe_series, load_workload

#: The issue's targets on the bundled ServeGen days.
PEAK_MAPE_RATIO_TARGET = 0.85
COVERAGE_TARGET = (0.93, 0.97)


def _progress(stream: TextIO) -> Callable[[str], None]:
    def say(message: str) -> None:
        print(message, file=stream, flush=True)

    return say


def check_targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's two targets, computed from an evaluation report."""
    models = report["models"]
    selected = models[SELECTED]["overall"]
    template = models.get("weekly_template", {}).get("overall", {})
    ratio = None
    if selected.get("peak_mape") is not None and template.get("peak_mape"):
        ratio = round(selected["peak_mape"] / template["peak_mape"], 4)
    coverage = selected.get("coverage_peak")
    return {
        "peak_mape_selected_over_weekly_template": ratio,
        "peak_mape_ratio_target": PEAK_MAPE_RATIO_TARGET,
        "peak_mape_ratio_met": ratio is not None and ratio <= PEAK_MAPE_RATIO_TARGET,
        "coverage_selected": coverage,
        "coverage_target": list(COVERAGE_TARGET),
        "coverage_met": coverage is not None
        and COVERAGE_TARGET[0] <= coverage <= COVERAGE_TARGET[1],
    }


def _config(
    settings: Settings, quantile: float | None, candidates: Sequence[str]
) -> ForecastConfig:
    try:
        return ForecastConfig(
            quantile=settings.forecast_quantile if quantile is None else quantile,
            candidates=tuple(candidates or settings.forecast_candidates or DEFAULT_CANDIDATES),
            refit_s=settings.forecast_refit_s,
        )
    except PlanInputError as exc:
        raise ConfigError(str(exc)) from exc


def run_evaluation(
    settings: Settings,
    workload: str,
    *,
    window_s: int | None = None,
    quantile: float | None = None,
    candidates: Sequence[str] = (),
    seed: int = 0,
    stream: TextIO = sys.stderr,
) -> dict[str, Any]:
    """Load a workload, evaluate every model and the selection, check the targets.

    Raises:
        InputDataError: the workload cannot be read.
        ConfigError: bad quantile or candidate names.
    """
    say = _progress(stream)
    window_s = window_s or default_window_s(workload)
    config = _config(settings, quantile, candidates)
    say(f"loading workload {workload} at {window_s}-second windows ...")
    w = load_workload(workload, settings.data_dir, window_s, seed=seed)
    say(f"{len(w.series)} series; rolling-origin evaluation, refit every {config.refit_s} s ...")
    report = evaluate(w.series, config, models=tuple(MODEL_KINDS), progress=say)
    first = report["scored_from_step"]
    return {
        "workload": w.name,
        "source": w.source,
        "grouping": w.grouping,
        "series": describe_series(w.series),
        "notes": list(w.notes),
        "scored_from": step_start(first, window_s).isoformat(),
        **report,
        "targets": check_targets(report),
    }


def format_evaluation(result: dict[str, Any]) -> str:
    """A short plain-text table of the evaluation (overall figures per model)."""
    cols = (
        "windows",
        "peak_mape",
        "peak_smape",
        "mean_mape",
        "pinball_loss",
        "coverage_peak",
        "underprovision_rate",
    )
    lines = [
        f"workload {result['workload']}: {len(result['series'])} series, windows of "
        f"{result['window_s']} s, q={result['quantile']}, scored from {result['scored_from']}",
        f"{'model':16s}" + "".join(f"{c:>20s}" for c in cols),
    ]
    for name, figures in result["models"].items():
        overall = figures["overall"]
        lines.append(
            f"{name:16s}"
            + "".join(f"{'-' if overall.get(c) is None else overall.get(c):>20}" for c in cols)
        )
    t = result["targets"]
    lines.append(
        f"selected/weekly_template peak MAPE = {t['peak_mape_selected_over_weekly_template']} "
        f"(target <= {t['peak_mape_ratio_target']}: "
        f"{'met' if t['peak_mape_ratio_met'] else 'NOT met'}); "
        f"coverage {t['coverage_selected']} (target {t['coverage_target']}: "
        f"{'met' if t['coverage_met'] else 'NOT met'})"
    )
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


# --- bench ----------------------------------------------------------------------------------


def _windows_of(series: Sequence[Any], window_s: int) -> list[TypeWindow]:
    rows = []
    for s in series:
        for i in range(len(s)):
            mean, peak = s.mean_rps[i], s.peak_rps[i]
            if not (np.isfinite(mean) and np.isfinite(peak)):
                continue
            rows.append(
                TypeWindow(
                    s.service,
                    s.request_type,
                    step_start(s.first_step + i, window_s),
                    window_s,
                    round(float(mean) * window_s),
                    0,
                    0,
                    float(peak),
                    float(mean),
                )
            )
    return rows


def run_bench(
    settings: Settings,
    *,
    runs: int = 48,
    start_day: int = 7,
    stream: TextIO = sys.stderr,
) -> dict[str, Any]:
    """Time ``jobs.forecast_load`` for ``runs`` consecutive planning windows of ServeGen.

    Loads the bundled ServeGen series as observed 30-minute windows into a throwaway
    database (the configured server, else the embedded one), starts with no stored model,
    and runs the planning job for each window from day ``start_day`` on, as the DAG would.
    """
    from wattplan import jobs, store

    say = _progress(stream)
    window_s = settings.window_s
    w = load_workload("servegen", settings.data_dir, window_s)
    windows = _windows_of(w.series, window_s)
    if settings.database_url:
        base_url = settings.database_url
    else:
        say("starting the embedded PostgreSQL ...")
        base_url = db.resolve_urls(settings).wattplan
    name = f"wattplan_fbench_{uuid.uuid4().hex[:10]}"
    db.ensure_database(base_url, name)
    url = db.with_database(base_url, name)
    bench_settings = replace(settings, database_url=url, ingest_window_s=window_s)
    first = min(s.first_step for s in w.series)
    per_run: list[float] = []
    refits: list[int] = []
    fallbacks: list[int] = []
    try:
        with db.connect(url) as engine:
            db.upgrade(engine)
            with engine.begin() as conn:
                from wattplan.ingest_requests import replace_type_windows

                replace_type_windows(
                    conn,
                    windows,
                    step_start(first, window_s),
                    step_start(max(s.end_step for s in w.series), window_s),
                    window_s,
                    sorted({s.service for s in w.series}),
                )
            start = step_start(first, window_s) + timedelta(days=start_day)
            for k in range(runs):
                at = start + timedelta(seconds=k * window_s)
                t0 = time.perf_counter()
                jobs.forecast_load(engine, bench_settings, at)
                per_run.append(time.perf_counter() - t0)
                with engine.connect() as conn:
                    details = store.read_forecast_details(conn, settings.cluster, at, window_s)
                    refits.append(
                        int(
                            conn.execute(
                                sa.text(
                                    "SELECT count(DISTINCT (service, request_type, target))"
                                    " FROM forecast_models WHERE refreshed_at = :at"
                                ),
                                {"at": at},
                            ).scalar()
                            or 0
                        )
                    )
                fallbacks.append(sum(1 for d in details if d["fallback_reason"]))
                say(
                    f"run {k + 1}/{runs} at {at.isoformat()}: {per_run[-1]:.2f} s, "
                    f"{refits[-1]} refits"
                )
    finally:
        admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()
    with_refits = [t for t, r in zip(per_run, refits, strict=True) if r]
    return {
        "workload": "servegen",
        "pools": len(w.series),
        "series": 2 * len(w.series),
        "runs": runs,
        "window_s": window_s,
        "refits_per_run_cap": settings.forecast_refits_per_run,
        "run_s_max": round(max(per_run), 3),
        "run_s_median": round(statistics.median(per_run), 3),
        "run_s_max_with_refits": round(max(with_refits), 3) if with_refits else None,
        "run_s_median_without_refits": round(
            statistics.median([t for t, r in zip(per_run, refits, strict=True) if not r]), 3
        )
        if len(with_refits) < len(per_run)
        else None,
        "refits": refits,
        "fallback_pools_per_run": fallbacks,
        "seconds_per_run": [round(t, 3) for t in per_run],
    }

"""Job functions: one per DAG task. Each takes its time window from the caller (the run's
data interval), reads what it needs from PostgreSQL, calls the pure core, writes results,
and returns a small key (a count, a plan id).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from forecasting.peak import ForecastSpec, forecast_peak
from optimizer.inputs import PlanInputs, SolverOptions
from optimizer.solve import solve_layout
from wattplan import db, store
from wattplan.domain import Layout, Plan, PlanStatus, digest
from wattplan.errors import InputDataError, PlanInputError
from wattplan.ingest_requests import RequestSource, load_request_logs
from wattplan.settings import Settings

log = logging.getLogger(__name__)


def engine_for(settings: Settings) -> Engine:
    """Engine on wattplan's database (starting the embedded server when none is configured)."""
    url = settings.database_url or db.resolve_urls(settings, stop_at_exit=False).wattplan
    return db.create_engine(url)


# --- reference data -------------------------------------------------------------------------


def load_reference_data(engine: Engine, settings: Settings) -> dict[str, int]:
    """Upsert the profile table, the zone's carbon intensity and prices, and GPU prices.

    Bad rows in the reference files go to ``rejected_rows``; the counts returned are rows
    loaded per table.
    """
    from profiles import load_profiles  # local: only this job needs the CSV reader
    from wattplan.ingest_reference import (
        load_carbon_intensity,
        load_electricity_prices,
        load_gpu_prices,
    )

    zone = settings.carbon_zone
    carbon_dir = settings.data_dir / "electricitymaps-carbon-intensity" / zone
    price_dir = settings.data_dir / "sustain-cluster-electricity-prices" / zone
    carbon_files = sorted(carbon_dir.glob("*/*.csv"))
    price_files = sorted(price_dir.glob("*/*.csv"))
    gpu_file = settings.data_dir / "fsdl-cloud-gpu-prices" / "cloud-gpus.csv"
    if not carbon_files:
        raise InputDataError(f"no carbon-intensity files for zone {zone} under {carbon_dir}")
    counts = {}
    with engine.begin() as conn:
        counts["profiles"] = store.write_profiles(conn, load_profiles(settings.profiles_path))
        counts["carbon_hours"] = sum(
            load_carbon_intensity(conn, f).rows_loaded for f in carbon_files
        )
        counts["price_hours"] = sum(
            load_electricity_prices(conn, f, zone).rows_loaded for f in price_files
        )
        counts["gpu_prices"] = load_gpu_prices(conn, gpu_file).rows_loaded
    return counts


# --- requests -------------------------------------------------------------------------------


def request_sources(settings: Settings) -> list[RequestSource]:
    """The configured request-log sources (format from the file: Azure CSV or JSONL)."""
    return [RequestSource(service, Path(path)) for service, path in settings.request_sources]


def ingest_requests(engine: Engine, settings: Settings, start: datetime, end: datetime) -> int:
    """Load the request logs of ``[start, end)`` and aggregate them into type windows.

    Re-running an interval leaves identical rows (the interval is replaced in one
    transaction); the run's row accounting lands in ``ingest_runs``.

    Returns:
        Requests loaded for the interval.
    """
    with engine.begin() as conn:
        result = load_request_logs(
            conn, request_sources(settings), start, end, window_s=settings.ingest_window_s
        )
    log.info(
        "request logs %s..%s: read %d, loaded %d, rejected %d",
        start,
        end,
        result.rows_read,
        result.rows_loaded,
        result.rows_rejected,
    )
    return result.rows_loaded


def ingest_gpu_telemetry(engine: Engine, settings: Settings, start: datetime, end: datetime) -> int:
    """Load the GPU samples of ``[start, end)`` from the collectors' closed spool files.

    Per-instance energy (from NVML energy-counter deltas) and power land in
    ``instance_windows``; the loader records the run's row accounting in ``ingest_runs``
    and applies the partition retention even when there are no files. A missing spool
    folder means no collector writes here: nothing to read.

    Returns:
        Samples loaded for the interval.
    """
    from wattplan.ingest_gpu import list_complete_files, load_gpu_telemetry

    spool = settings.gpu_spool_dir
    files = list_complete_files(spool, start, end) if spool.is_dir() else []
    with engine.begin() as conn:
        result = load_gpu_telemetry(
            conn,
            files,
            start,
            end,
            window_s=settings.ingest_window_s,
            retention_days=settings.telemetry_retention_days,
        )
    log.info(
        "gpu telemetry %s..%s from %d file(s) in %s: read %d, loaded %d, rejected %d",
        start,
        end,
        len(files),
        spool,
        result.rows_read,
        result.rows_loaded,
        result.rows_rejected,
    )
    return result.rows_loaded


# --- forecasts ------------------------------------------------------------------------------


def forecast_load(engine: Engine, settings: Settings, window_start: datetime) -> int:
    """Forecast every pool's load for the window starting at ``window_start``.

    Uses the history of the last ``history_s`` seconds; ``made_at`` is ``window_start`` (the
    run's data-interval end), never the wall clock.
    """
    spec = ForecastSpec(quantile=settings.forecast_quantile)
    history_start = window_start - timedelta(seconds=settings.history_s)
    with engine.begin() as conn:
        windows = store.read_type_windows(
            conn, history_start, window_start, settings.ingest_window_s
        )
        by_pool = defaultdict(list)
        for w in windows:
            by_pool[(w.service, w.request_type)].append(w)
        forecasts = [
            forecast_peak(history, window_start, settings.window_s, spec)
            for _, history in sorted(by_pool.items())
        ]
        store.write_forecasts(conn, settings.cluster, forecasts, made_at=window_start)
    log.info("forecast %d pools for %s from %d windows", len(forecasts), window_start, len(windows))
    return len(forecasts)


# --- planning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanContext:
    """Grid and price figures the plan was made with, and where each came from."""

    carbon_g_per_kwh: float
    electricity_usd_per_mwh: float
    gpu_usd_per_hour: float
    notes: tuple[str, ...]


def _plan_context(
    conn: sa.Connection, settings: Settings, start: datetime, end: datetime
) -> PlanContext:
    notes = []
    zone = settings.carbon_zone
    carbon = store.read_hourly_mean(
        conn, "grid_carbon_intensities", "carbon_intensity_g_per_kwh", zone, start, end
    )
    if carbon is None:
        carbon = (
            store.read_median(conn, "grid_carbon_intensities", "carbon_intensity_g_per_kwh", zone)
            or 0.0
        )
        notes.append(
            f"no carbon record for {zone} in the window: used the zone's median {carbon:.1f} g/kWh"
        )
    price = store.read_hourly_mean(
        conn, "electricity_prices", "price_usd_per_mwh", zone, start, end
    )
    if price is None:
        price = store.read_median(conn, "electricity_prices", "price_usd_per_mwh", zone) or 0.0
        notes.append(
            f"no electricity price for {zone} in the window: used the zone's median "
            f"{price:.2f} $/MWh"
        )
    gpu_price = store.read_gpu_price(conn, settings.gpu_type)
    if gpu_price is None:
        gpu_price = 0.0
        notes.append(f"no GPU price for {settings.gpu_type}: GPU cost counted as 0")
    return PlanContext(carbon, price, gpu_price, tuple(notes))


def propose_plan(engine: Engine, settings: Settings, window_start: datetime) -> str:
    """Solve the layout for ``[window_start, window_start + window_s)`` and store it as proposed.

    The plan id is derived from (cluster, window, input digest): re-running with the same
    inputs returns the same id and stores nothing new.

    Raises:
        PlanInputError: no forecasts or profiles for the window.
        InfeasiblePlanError: the forecast load does not fit the inventory.
    """
    window_end = window_start + timedelta(seconds=settings.window_s)
    with engine.begin() as conn:
        forecasts = store.read_forecasts(conn, settings.cluster, window_start, settings.window_s)
        profiles = store.read_profiles(conn, settings.profile_version)
        current_plan_id, current = store.read_applied_layout(
            conn, settings.cluster, before=window_start
        )
        context = _plan_context(conn, settings, window_start, window_end)
    if not profiles:
        raise PlanInputError(
            f"no profiles of version {settings.profile_version!r} in the database: run the "
            "reference_data DAG (or set WATTPLAN_PROFILE_VERSION)"
        )
    if not forecasts:
        raise PlanInputError(
            f"no forecasts for cluster {settings.cluster!r} window {window_start.isoformat()}: "
            "run the forecast task (or the telemetry_ingest DAG) first"
        )
    inputs = PlanInputs(
        window_s=settings.window_s,
        demand_rps={(f.service, f.request_type): f.planned_rate_rps for f in forecasts},
        mean_rps={
            (f.service, f.request_type): min(f.mean_rate_rps, f.planned_rate_rps) for f in forecasts
        },
        service_models=dict(settings.service_models),
        profiles=tuple(profiles),
        gpu_inventory={settings.gpu_type: settings.gpu_inventory},
        current=current,
        carbon_g_per_kwh=context.carbon_g_per_kwh,
        electricity_usd_per_mwh=context.electricity_usd_per_mwh,
        gpu_usd_per_hour={settings.gpu_type: context.gpu_usd_per_hour},
        startup_s=settings.startup_s,
        solver=SolverOptions(
            time_limit_s=settings.solver_time_limit_s, mip_gap=settings.solver_mip_gap
        ),
    )
    input_digest = digest(
        {
            "demand": sorted((k[0], k[1], round(v, 9)) for k, v in inputs.demand_rps.items()),
            "mean": sorted((k[0], k[1], round(v, 9)) for k, v in inputs.mean_rps.items()),
            "profiles": [(p.version, p.config.key, p.request_type) for p in profiles],
            "current": sorted(current.instances_by_slot().items()),
            "inventory": sorted(inputs.gpu_inventory.items()),
            "context": context,
            "solver": inputs.solver,
            "startup_s": inputs.startup_s,
        }
    )
    plan_id = f"{settings.cluster}-{window_start:%Y%m%dT%H%MZ}-{input_digest[:10]}"
    solution = solve_layout(inputs)
    solver_record = dict(solution.solver)
    solver_record.update(
        input_digest=input_digest,
        profile_version=settings.profile_version,
        base_plan_id=current_plan_id,
        carbon_g_per_kwh=context.carbon_g_per_kwh,
        electricity_usd_per_mwh=context.electricity_usd_per_mwh,
        gpu_usd_per_hour=context.gpu_usd_per_hour,
        notes=list(context.notes),
    )
    plan = Plan(
        plan_id,
        settings.cluster,
        window_start,
        settings.window_s,
        solution.layout,
        solution.prediction,
        solver_record,
    )
    with engine.begin() as conn:
        new = store.write_plan(conn, plan, created_at=window_start)
    log.info(
        "plan %s %s: %d GPUs, %.1f kWh predicted",
        plan_id,
        "stored" if new else "already stored",
        plan.prediction.gpus,
        plan.prediction.energy_kwh,
    )
    return plan_id


def decide_approval(engine: Engine, settings: Settings, plan_id: str, at: datetime) -> bool:
    """Apply the approval policy: with ``auto_approve`` the plan is approved and recorded.

    Without it the plan stays proposed for a person (``wattplan plan approve``).
    Returns whether the plan may be pushed.
    """
    with engine.begin() as conn:
        _, status = store.read_plan(conn, plan_id)
        if status in (PlanStatus.APPROVED, PlanStatus.APPLIED):
            return True
        if status is not PlanStatus.PROPOSED or not settings.auto_approve:
            log.info("plan %s is %s and needs a person's approval", plan_id, status.value)
            return False
        store.record_approval(
            conn, plan_id, "approved", "policy:auto_approve", at, "WATTPLAN_AUTO_APPROVE=true"
        )
        store.set_plan_status(conn, plan_id, PlanStatus.APPROVED, at, "auto-approved by policy")
    return True


def record_decision(
    engine: Engine, plan_id: str, decision: str, decided_by: str, at: datetime, comment: str = ""
) -> None:
    """Record a person's approve/reject decision on a proposed plan."""
    if decision not in ("approved", "rejected"):
        raise ValueError(f"decision must be approved or rejected, not {decision!r}")
    with engine.begin() as conn:
        _, status = store.read_plan(conn, plan_id)
        if status is not PlanStatus.PROPOSED:
            raise ValueError(
                f"plan {plan_id} is {status.value}, only a proposed plan can be decided"
            )
        store.record_approval(conn, plan_id, decision, decided_by, at, comment)
        store.set_plan_status(
            conn, plan_id, PlanStatus(decision), at, f"{decision} by {decided_by}"
        )


def load_plan(engine: Engine, plan_id: str) -> tuple[Plan, PlanStatus]:
    """A stored plan and its status."""
    with engine.connect() as conn:
        return store.read_plan(conn, plan_id)


def record_applied(
    engine: Engine,
    settings: Settings,
    plan_id: str,
    reported_plan_id: str | None,
    reported: Layout,
    at: datetime,
) -> bool:
    """Store what the cluster reports and mark the plan applied when it matches the plan.

    Returns whether the cluster runs exactly the plan's layout.
    """
    with engine.begin() as conn:
        plan, _ = store.read_plan(conn, plan_id)
        _, before = store.read_applied_layout(conn, settings.cluster, before=at)
        store.write_applied_state(conn, settings.cluster, at, reported_plan_id, reported)
        matches = reported.instances_by_slot() == plan.layout.instances_by_slot()
        if matches:
            store.write_reconfiguration_events(
                conn, settings.cluster, plan_id, before, reported, at, settings.startup_s
            )
            store.set_plan_status(
                conn, plan_id, PlanStatus.APPLIED, at, "cluster reports the plan's layout"
            )
        else:
            store.set_plan_status(
                conn, plan_id, PlanStatus.FAILED, at, "cluster layout differs from the plan"
            )
    return matches

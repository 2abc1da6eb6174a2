"""Readers and writers of wattplan's tables. Values always go in as bound parameters.

Every writer is idempotent: natural keys with upsert, or replace-the-interval in the
caller's transaction, so a re-run leaves identical rows.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.engine import Connection

from telemetry.reference import GpuPrice, HourlyValue
from wattplan.bulk import IngestResult
from wattplan.domain import (
    Layout,
    LayoutItem,
    LoadForecast,
    Plan,
    PlanPrediction,
    PlanStatus,
    Profile,
    ServingConfig,
    TypeWindow,
)


def _table(name: str, *columns: str) -> sa.TableClause:
    # Columns named here as jsonb bind Python dicts/lists as JSON documents.
    json_columns = {"solver", "layout"}
    return sa.table(
        name, *(sa.column(c, JSONB) if c in json_columns else sa.column(c) for c in columns)
    )


def _json_safe(value: object) -> object:
    """A JSON-serialisable copy (dates and other objects become strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


FORECASTS = _table(
    "load_forecasts",
    "cluster",
    "service",
    "request_type",
    "window_start_at",
    "window_s",
    "method",
    "made_at",
    "mean_rate_rps",
    "peak_rate_rps",
    "planned_rate_rps",
    "quantile",
)
PROFILES = _table(
    "profiles",
    "version",
    "config_key",
    "request_type",
    "model",
    "gpu_type",
    "tp",
    "power_cap_w",
    "clock_mhz",
    "capacity_rps",
    "idle_power_w",
    "power_at_capacity_w",
    "ttft_p99_s",
    "tbt_p99_s",
    "ttft_slo_s",
    "tbt_slo_s",
    "source",
)
CARBON = _table(
    "grid_carbon_intensities",
    "zone",
    "hour_at",
    "carbon_intensity_g_per_kwh",
    "lifecycle_g_per_kwh",
)
PRICES = _table("electricity_prices", "zone", "hour_at", "price_usd_per_mwh")
GPU_PRICES = _table("gpu_prices", "gpu_type", "provider", "offer", "price_usd_per_gpu_hour")

_BATCH = 5000


def _upsert(
    conn: Connection, table: sa.TableClause, rows: Sequence[dict], keys: Sequence[str]
) -> int:
    """Insert rows; on a natural-key conflict overwrite the other columns. Returns row count."""
    if not rows:
        return 0
    for start in range(0, len(rows), _BATCH):
        batch = rows[start : start + _BATCH]
        stmt = insert(table).values(batch)
        others = {c: stmt.excluded[c] for c in batch[0] if c not in keys}
        stmt = (
            stmt.on_conflict_do_update(index_elements=list(keys), set_=others)
            if others
            else stmt.on_conflict_do_nothing(index_elements=list(keys))
        )
        conn.execute(stmt)
    return len(rows)


# --- requests -------------------------------------------------------------------------------


def read_type_windows(
    conn: Connection, start: datetime, end: datetime, window_s: int
) -> list[TypeWindow]:
    """Windows of length ``window_s`` starting in ``[start, end)``, oldest first."""
    result = conn.execute(
        sa.text(
            "SELECT service, request_type, window_start_at, window_s, request_count, input_tokens,"
            " output_tokens, peak_rate_rps, mean_rate_rps, ttft_p50_s, ttft_p99_s, tbt_p50_s,"
            " tbt_p99_s FROM request_type_windows"
            " WHERE window_s = :w AND window_start_at >= :start AND window_start_at < :end"
            " ORDER BY service, request_type, window_start_at"
        ),
        {"w": window_s, "start": start, "end": end},
    )
    return [TypeWindow(*row) for row in result]


# --- forecasts ------------------------------------------------------------------------------


def write_forecasts(
    conn: Connection, cluster: str, forecasts: Iterable[LoadForecast], made_at: datetime
) -> int:
    """Upsert forecasts keyed by (cluster, service, type, window, method)."""
    rows = [
        {
            "cluster": cluster,
            "service": f.service,
            "request_type": f.request_type,
            "window_start_at": f.window_start,
            "window_s": f.window_s,
            "method": f.method,
            "made_at": made_at,
            "mean_rate_rps": f.mean_rate_rps,
            "peak_rate_rps": f.peak_rate_rps,
            "planned_rate_rps": f.planned_rate_rps,
            "quantile": f.quantile,
        }
        for f in forecasts
    ]
    keys = ("cluster", "service", "request_type", "window_start_at", "window_s", "method")
    return _upsert(conn, FORECASTS, rows, keys)


def read_forecasts(
    conn: Connection, cluster: str, window_start: datetime, window_s: int
) -> list[LoadForecast]:
    """The newest forecast per pool for one window."""
    result = conn.execute(
        sa.text(
            "SELECT DISTINCT ON (service, request_type) service, request_type, window_start_at,"
            " window_s, mean_rate_rps, peak_rate_rps, planned_rate_rps, quantile, method"
            " FROM load_forecasts WHERE cluster = :c AND window_start_at = :ws AND window_s = :w"
            " ORDER BY service, request_type, made_at DESC, method"
        ),
        {"c": cluster, "ws": window_start, "w": window_s},
    )
    return [LoadForecast(*row) for row in result]


# --- profiles -------------------------------------------------------------------------------


def write_profiles(conn: Connection, profiles: Iterable[Profile]) -> int:
    """Upsert profiles keyed by (version, config key, request type)."""
    rows = [
        {
            "version": p.version,
            "config_key": p.config.key,
            "request_type": p.request_type,
            "model": p.config.model,
            "gpu_type": p.config.gpu_type,
            "tp": p.config.tp,
            "power_cap_w": p.config.power_cap_w,
            "clock_mhz": p.config.clock_mhz,
            "capacity_rps": p.capacity_rps,
            "idle_power_w": p.idle_power_w,
            "power_at_capacity_w": p.power_at_capacity_w,
            "ttft_p99_s": p.ttft_p99_s,
            "tbt_p99_s": p.tbt_p99_s,
            "ttft_slo_s": p.ttft_slo_s,
            "tbt_slo_s": p.tbt_slo_s,
            "source": p.source,
        }
        for p in profiles
    ]
    return _upsert(conn, PROFILES, rows, ("version", "config_key", "request_type"))


def read_profiles(conn: Connection, version: str) -> list[Profile]:
    """All profiles of one version."""
    result = conn.execute(
        sa.text(
            "SELECT model, gpu_type, tp, power_cap_w, clock_mhz, request_type, capacity_rps,"
            " idle_power_w, power_at_capacity_w, ttft_p99_s, tbt_p99_s, ttft_slo_s, tbt_slo_s,"
            " version, source FROM profiles WHERE version = :v ORDER BY config_key, request_type"
        ),
        {"v": version},
    )
    return [Profile(ServingConfig(r[0], r[1], r[2], r[3], r[4]), *r[5:]) for r in result.all()]


# --- carbon and prices ----------------------------------------------------------------------


def write_carbon_intensities(conn: Connection, values: Iterable[HourlyValue]) -> int:
    """Upsert hourly grid carbon intensity keyed by (zone, hour)."""
    rows = [
        {
            "zone": v.zone,
            "hour_at": v.hour_at,
            "carbon_intensity_g_per_kwh": v.value,
            "lifecycle_g_per_kwh": v.lifecycle_value,
        }
        for v in values
    ]
    return _upsert(conn, CARBON, rows, ("zone", "hour_at"))


def write_electricity_prices(conn: Connection, values: Iterable[HourlyValue]) -> int:
    """Upsert hourly electricity prices keyed by (zone, hour)."""
    rows = [{"zone": v.zone, "hour_at": v.hour_at, "price_usd_per_mwh": v.value} for v in values]
    return _upsert(conn, PRICES, rows, ("zone", "hour_at"))


def write_gpu_prices(conn: Connection, prices: Iterable[GpuPrice]) -> int:
    """Upsert GPU prices keyed by (GPU type, provider, offer)."""
    rows = [
        {
            "gpu_type": p.gpu_type,
            "provider": p.provider,
            "offer": p.offer,
            "price_usd_per_gpu_hour": p.price_usd_per_gpu_hour,
        }
        for p in prices
    ]
    return _upsert(conn, GPU_PRICES, rows, ("gpu_type", "provider", "offer"))


def read_hourly_mean(
    conn: Connection, table: str, column: str, zone: str, start: datetime, end: datetime
) -> float | None:
    """Mean of an hourly series over the hours overlapping ``[start, end)``; None if none."""
    if (table, column) not in {
        ("grid_carbon_intensities", "carbon_intensity_g_per_kwh"),
        ("electricity_prices", "price_usd_per_mwh"),
    }:
        raise ValueError(f"unknown hourly series {table}.{column}")
    value = conn.execute(
        sa.text(
            f"SELECT avg({column}) FROM {table} WHERE zone = :z"  # noqa: S608 (names allow-listed)
            " AND hour_at > :start - interval '1 hour' AND hour_at < :end"
        ),
        {"z": zone, "start": start, "end": end},
    ).scalar()
    return None if value is None else float(value)


def read_median(conn: Connection, table: str, column: str, zone: str) -> float | None:
    """Median of a zone's whole hourly series (fallback when the window has no record)."""
    values = conn.execute(
        sa.text(f"SELECT {column} FROM {table} WHERE zone = :z"),
        {"z": zone},  # noqa: S608
    ).scalars()
    data = list(values)
    return statistics.median(data) if data else None


def read_gpu_price(conn: Connection, gpu_type: str) -> float | None:
    """Median on-demand price of one GPU-hour of a GPU type across providers."""
    data = list(
        conn.execute(
            sa.text("SELECT price_usd_per_gpu_hour FROM gpu_prices WHERE gpu_type = :g"),
            {"g": gpu_type},
        ).scalars()
    )
    return statistics.median(data) if data else None


# --- plans ----------------------------------------------------------------------------------


def write_plan(conn: Connection, plan: Plan, created_at: datetime) -> bool:
    """Store a proposed plan and its items; a plan id that exists is left as it is.

    Returns whether the plan was new.
    """
    p = plan.prediction
    inserted: sa.Row[tuple[str]] | None = conn.execute(
        insert(
            _table(
                "plans",
                "plan_id",
                "cluster",
                "window_start_at",
                "window_s",
                "status",
                "created_at",
                "status_changed_at",
                "predicted_energy_kwh",
                "predicted_carbon_g",
                "predicted_cost_usd",
                "gpus",
                "peak_power_w",
                "min_slo_headroom",
                "instances_started",
                "instances_stopped",
                "solver",
            )
        )
        .values(
            plan_id=plan.plan_id,
            cluster=plan.cluster,
            window_start_at=plan.window_start,
            window_s=plan.window_s,
            status=PlanStatus.PROPOSED.value,
            created_at=created_at,
            status_changed_at=created_at,
            predicted_energy_kwh=p.energy_kwh,
            predicted_carbon_g=p.carbon_g,
            predicted_cost_usd=p.cost_usd,
            gpus=p.gpus,
            peak_power_w=p.peak_power_w,
            min_slo_headroom=p.min_slo_headroom,
            instances_started=p.instances_started,
            instances_stopped=p.instances_stopped,
            solver=_json_safe(plan.solver),
        )
        .on_conflict_do_nothing(index_elements=["plan_id"])
        .returning(sa.column("plan_id"))
    ).first()
    if inserted is None:  # the plan id exists: same window and inputs were planned already
        return False
    rows = [
        {
            "plan_id": plan.plan_id,
            "service": i.service,
            "request_type": i.request_type,
            "config_key": i.config.key,
            "model": i.config.model,
            "gpu_type": i.config.gpu_type,
            "tp": i.config.tp,
            "power_cap_w": i.config.power_cap_w,
            "clock_mhz": i.config.clock_mhz,
            "instances": i.instances,
            "load_rps": i.load_rps,
        }
        for i in plan.layout.items
    ]
    if rows:
        conn.execute(
            sa.text(
                "INSERT INTO plan_items (plan_id, service, request_type, config_key, model,"
                " gpu_type, tp, power_cap_w, clock_mhz, instances, load_rps) VALUES (:plan_id,"
                " :service, :request_type, :config_key, :model, :gpu_type, :tp, :power_cap_w,"
                " :clock_mhz, :instances, :load_rps)"
            ),
            rows,
        )
    return True


def read_plan(conn: Connection, plan_id: str) -> tuple[Plan, PlanStatus]:
    """Load a stored plan and its status; KeyError when unknown."""
    row = conn.execute(
        sa.text(
            "SELECT cluster, window_start_at, window_s, status, predicted_energy_kwh,"
            " predicted_carbon_g, predicted_cost_usd, gpus, peak_power_w, min_slo_headroom,"
            " instances_started, instances_stopped, solver FROM plans WHERE plan_id = :p"
        ),
        {"p": plan_id},
    ).one_or_none()
    if row is None:
        raise KeyError(f"no plan {plan_id!r}")
    items = conn.execute(
        sa.text(
            "SELECT service, request_type, model, gpu_type, tp, power_cap_w, clock_mhz,"
            " instances, load_rps FROM plan_items WHERE plan_id = :p"
            " ORDER BY service, request_type, config_key"
        ),
        {"p": plan_id},
    ).all()
    layout = Layout(
        tuple(
            LayoutItem(i[0], i[1], ServingConfig(i[2], i[3], i[4], i[5], i[6]), i[7], i[8])
            for i in items
        )
    )
    prediction = PlanPrediction(*row[4:12])
    plan = Plan(plan_id, row[0], row[1], row[2], layout, prediction, dict(row[12]))
    return plan, PlanStatus(row[3])


def set_plan_status(
    conn: Connection, plan_id: str, status: PlanStatus, at: datetime, reason: str | None = None
) -> None:
    """Move a plan to ``status`` (recording when and why)."""
    conn.execute(
        sa.text(
            "UPDATE plans SET status = :s, status_changed_at = :at, status_reason = :r"
            " WHERE plan_id = :p"
        ),
        {"s": status.value, "at": at, "r": reason, "p": plan_id},
    )


def record_approval(
    conn: Connection, plan_id: str, decision: str, decided_by: str, at: datetime, comment: str
) -> None:
    """Record who decided what about a plan, and when (idempotent per plan and time)."""
    conn.execute(
        insert(
            _table("plan_approvals", "plan_id", "decided_at", "decided_by", "decision", "comment")
        )
        .values(
            plan_id=plan_id,
            decided_at=at,
            decided_by=decided_by,
            decision=decision,
            comment=comment,
        )
        .on_conflict_do_nothing(index_elements=["plan_id", "decided_at"])
    )


def write_applied_state(
    conn: Connection, cluster: str, observed_at: datetime, plan_id: str | None, layout: Layout
) -> None:
    """Record the layout the cluster reported, keyed by (cluster, observed_at)."""
    payload = [
        {
            "service": i.service,
            "request_type": i.request_type,
            "model": i.config.model,
            "gpu_type": i.config.gpu_type,
            "tp": i.config.tp,
            "power_cap_w": i.config.power_cap_w,
            "clock_mhz": i.config.clock_mhz,
            "instances": i.instances,
        }
        for i in layout.items
    ]
    stmt = insert(
        _table("applied_cluster_states", "cluster", "observed_at", "plan_id", "gpus", "layout")
    ).values(
        cluster=cluster,
        observed_at=observed_at,
        plan_id=plan_id,
        gpus=layout.gpus,
        layout=payload,
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["cluster", "observed_at"],
            set_={
                "plan_id": stmt.excluded.plan_id,
                "gpus": stmt.excluded.gpus,
                "layout": stmt.excluded.layout,
            },
        )
    )


def read_applied_layout(
    conn: Connection, cluster: str, before: datetime | None = None
) -> tuple[str | None, Layout]:
    """The newest recorded layout of a cluster, observed strictly before ``before`` if given.

    Strictly: a re-run of a window must see the layout that was in force before its first
    run, not the one that run applied, so that its inputs (and plan id) stay the same.
    """
    row = conn.execute(
        sa.text(
            "SELECT plan_id, layout FROM applied_cluster_states WHERE cluster = :c"
            " AND (CAST(:before AS timestamptz) IS NULL OR observed_at < :before)"
            " ORDER BY observed_at DESC LIMIT 1"
        ),
        {"c": cluster, "before": before},
    ).one_or_none()
    if row is None:
        return None, Layout()
    items = tuple(
        LayoutItem(
            i["service"],
            i["request_type"],
            ServingConfig(i["model"], i["gpu_type"], i["tp"], i["power_cap_w"], i["clock_mhz"]),
            i["instances"],
        )
        for i in row[1]
    )
    return row[0], Layout(items)


def write_reconfiguration_events(
    conn: Connection,
    cluster: str,
    plan_id: str,
    before: Layout,
    after: Layout,
    at: datetime,
    startup_s: float,
) -> int:
    """Record instance starts and stops between two layouts (idempotent per plan and slot)."""
    old, new = before.instances_by_slot(), after.instances_by_slot()
    rows = []
    for key in sorted(set(old) | set(new)):
        delta = new.get(key, 0) - old.get(key, 0)
        if delta:
            rows.append(
                {
                    "cluster": cluster,
                    "plan_id": plan_id,
                    "service": key[0],
                    "request_type": key[1],
                    "config_key": key[2],
                    "action": "start" if delta > 0 else "stop",
                    "instances": abs(delta),
                    "occurred_at": at,
                    "overhead_s": startup_s if delta > 0 else 0.0,
                }
            )
    table = _table(
        "reconfiguration_events",
        "cluster",
        "plan_id",
        "service",
        "request_type",
        "config_key",
        "action",
        "instances",
        "occurred_at",
        "overhead_s",
    )
    return _upsert(
        conn, table, rows, ("plan_id", "service", "request_type", "config_key", "action")
    )


def window_end(start: datetime, window_s: int) -> datetime:
    """End of a window."""
    return start + timedelta(seconds=window_s)


def record_ingest_run(
    conn: Connection, source_kind: str, start: datetime, end: datetime, result: IngestResult
) -> None:
    """Record one ingest run's row accounting (re-running the interval overwrites it)."""
    stmt = insert(
        _table(
            "ingest_runs",
            "source_kind",
            "interval_start_at",
            "interval_end_at",
            "rows_read",
            "rows_loaded",
            "rows_rejected",
            "files",
        )
    ).values(
        source_kind=source_kind,
        interval_start_at=start,
        interval_end_at=end,
        rows_read=result.rows_read,
        rows_loaded=result.rows_loaded,
        rows_rejected=result.rows_rejected,
        files=sa.cast(sa.literal(json.dumps(sorted(result.files))), JSONB),
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["source_kind", "interval_start_at", "interval_end_at"],
            set_={
                "rows_read": stmt.excluded.rows_read,
                "rows_loaded": stmt.excluded.rows_loaded,
                "rows_rejected": stmt.excluded.rows_rejected,
                "files": stmt.excluded.files,
            },
        )
    )

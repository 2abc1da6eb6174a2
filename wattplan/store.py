"""Readers and writers of wattplan's tables. Values always go in as bound parameters.

Every writer is idempotent: natural keys with upsert, or replace-the-interval in the
caller's transaction, so a re-run leaves identical rows.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.engine import Connection

from forecasting.models import FittedModel
from forecasting.planning import ForecastRecord
from forecasting.selection import CandidateState, SeriesState
from forecasting.series import step_of, step_start
from profiles.table import LoadPoint, ProfileRecord
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
    json_columns = {"solver", "layout", "power_curve", "load_points", "policy", "diff"}
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
    "spp",
    "kvp",
    "power_curve",
    "load_points",
    "ttft_p50_s",
    "tbt_p50_s",
    "energy_per_request_j",
    "method",
)
PROFILE_VERSIONS = _table(
    "profile_versions", "version", "description", "source_file", "source_sha256", "row_count"
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


def _profile_row(profile: Profile, points: Sequence[LoadPoint] | None, method: str) -> dict:
    config = profile.config
    return {
        "version": profile.version,
        "config_key": config.key,
        "request_type": profile.request_type,
        "model": config.model,
        "gpu_type": config.gpu_type,
        "tp": config.tp,
        "spp": config.spp,
        "kvp": config.kvp,
        "power_cap_w": config.power_cap_w,
        "clock_mhz": config.clock_mhz,
        "capacity_rps": profile.capacity_rps,
        "idle_power_w": profile.idle_power_w,
        "power_at_capacity_w": profile.power_at_capacity_w,
        "power_curve": [list(point) for point in profile.power_curve],
        "load_points": None if points is None else [asdict(point) for point in points],
        "ttft_p99_s": profile.ttft_p99_s,
        "tbt_p99_s": profile.tbt_p99_s,
        "ttft_p50_s": profile.ttft_p50_s,
        "tbt_p50_s": profile.tbt_p50_s,
        "ttft_slo_s": profile.ttft_slo_s,
        "tbt_slo_s": profile.tbt_slo_s,
        "energy_per_request_j": profile.energy_per_request_j,
        "method": method,
        "source": profile.source,
    }


def write_profiles(conn: Connection, profiles: Iterable[Profile], method: str = "manual") -> int:
    """Upsert bare profiles (no per-load latencies) keyed by (version, config key, type)."""
    rows = [_profile_row(p, None, method) for p in profiles]
    return _upsert(conn, PROFILES, rows, ("version", "config_key", "request_type"))


def write_profile_records(conn: Connection, records: Iterable[ProfileRecord]) -> int:
    """Upsert profile records (with their load points and method) keyed by (version, config
    key, request type)."""
    rows = [_profile_row(r.profile, r.points, r.method) for r in records]
    return _upsert(conn, PROFILES, rows, ("version", "config_key", "request_type"))


def write_profile_version(
    conn: Connection,
    version: str,
    description: str,
    source_file: str,
    source_sha256: str,
    row_count: int,
) -> int:
    """Upsert the description of one profile version (where its rows came from)."""
    row = {
        "version": version,
        "description": description,
        "source_file": source_file,
        "source_sha256": source_sha256,
        "row_count": row_count,
    }
    return _upsert(conn, PROFILE_VERSIONS, [row], ("version",))


def _curve(value: object, idle_w: float, capacity_rps: float, full_w: float) -> tuple:
    """The stored power curve, or the two-point line of a row written without one."""
    if not value:
        return ((0.0, idle_w), (capacity_rps, full_w))
    return tuple((float(r), float(w)) for r, w in value)  # type: ignore[attr-defined]


def read_profiles(conn: Connection, version: str) -> list[Profile]:
    """All profiles of one version."""
    result = conn.execute(
        sa.text(
            "SELECT model, gpu_type, tp, power_cap_w, clock_mhz, spp, kvp, request_type,"
            " capacity_rps, idle_power_w, power_at_capacity_w, power_curve, ttft_p99_s,"
            " tbt_p99_s, ttft_slo_s, tbt_slo_s, version, source, ttft_p50_s, tbt_p50_s"
            " FROM profiles WHERE version = :v ORDER BY config_key, request_type"
        ),
        {"v": version},
    )
    return [
        Profile(
            config=ServingConfig(
                r.model, r.gpu_type, r.tp, r.power_cap_w, r.clock_mhz, r.spp, r.kvp
            ),
            request_type=r.request_type,
            capacity_rps=r.capacity_rps,
            power_curve=_curve(
                r.power_curve, r.idle_power_w, r.capacity_rps, r.power_at_capacity_w
            ),
            ttft_p99_s=r.ttft_p99_s,
            tbt_p99_s=r.tbt_p99_s,
            ttft_slo_s=r.ttft_slo_s,
            tbt_slo_s=r.tbt_slo_s,
            version=r.version,
            source=r.source,
            ttft_p50_s=r.ttft_p50_s,
            tbt_p50_s=r.tbt_p50_s,
        )
        for r in result.all()
    ]


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
                "degraded",
                "policy",
                "diff",
                "instances_resharded",
                "clock_changes",
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
            degraded=plan.degraded,
            policy=_json_safe(plan.policy),
            diff=_json_safe(plan.diff),
            instances_resharded=p.instances_resharded,
            clock_changes=p.clock_changes,
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
            "spp": i.config.spp,
            "kvp": i.config.kvp,
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
                " gpu_type, tp, spp, kvp, power_cap_w, clock_mhz, instances, load_rps) VALUES"
                " (:plan_id, :service, :request_type, :config_key, :model, :gpu_type, :tp, :spp,"
                " :kvp, :power_cap_w, :clock_mhz, :instances, :load_rps)"
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
            " instances_started, instances_stopped, instances_resharded, clock_changes, solver,"
            " degraded, policy, diff FROM plans WHERE plan_id = :p"
        ),
        {"p": plan_id},
    ).one_or_none()
    if row is None:
        raise KeyError(f"no plan {plan_id!r}")
    items = conn.execute(
        sa.text(
            "SELECT service, request_type, model, gpu_type, tp, power_cap_w, clock_mhz,"
            " instances, load_rps, spp, kvp FROM plan_items WHERE plan_id = :p"
            " ORDER BY service, request_type, config_key"
        ),
        {"p": plan_id},
    ).all()
    layout = Layout(
        tuple(
            LayoutItem(
                i[0], i[1], ServingConfig(i[2], i[3], i[4], i[5], i[6], i[9], i[10]), i[7], i[8]
            )
            for i in items
        )
    )
    prediction = PlanPrediction(*row[4:14])
    plan = Plan(
        plan_id,
        row[0],
        row[1],
        row[2],
        layout,
        prediction,
        dict(row[14]),
        degraded=bool(row[15]),
        policy=dict(row[16]),
        diff=dict(row[17]),
    )
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


def lock_plan_status(conn: Connection, plan_id: str) -> PlanStatus:
    """Lock a plan's row until the transaction ends and return its status.

    Deciding, recording and pushing a plan all start here, so two runs of the same window
    (or a person answering while a newer plan supersedes) take turns.

    Raises:
        KeyError: the plan does not exist.
    """
    status = conn.execute(
        sa.text("SELECT status FROM plans WHERE plan_id = :p FOR UPDATE"), {"p": plan_id}
    ).scalar_one_or_none()
    if status is None:
        raise KeyError(f"no plan {plan_id!r}")
    return PlanStatus(status)


def supersede_proposals(conn: Connection, newer: Plan, at: datetime) -> list[str]:
    """Mark the cluster's unanswered plans for ``newer``'s window or earlier superseded.

    Returns:
        The ids of the plans marked, oldest window first.
    """
    rows = conn.execute(
        sa.text(
            "UPDATE plans SET status = 'superseded', status_changed_at = :at,"
            " status_reason = :r WHERE cluster = :c AND status = 'proposed'"
            " AND window_start_at <= :w AND plan_id <> :p"
            " RETURNING window_start_at, plan_id"
        ),
        {
            "at": at,
            "r": f"superseded by the newer plan {newer.plan_id} while unanswered",
            "c": newer.cluster,
            "w": newer.window_start,
            "p": newer.plan_id,
        },
    ).all()
    return [plan_id for _, plan_id in sorted((row[0], row[1]) for row in rows)]


def read_decided_plan_since(conn: Connection, plan: Plan) -> str | None:
    """Another plan of ``plan``'s cluster, for its window or a later one, that was approved
    or applied: if there is one, ``plan`` must not reach the cluster.
    """
    return conn.execute(
        sa.text(
            "SELECT plan_id FROM plans WHERE cluster = :c AND plan_id <> :p"
            " AND window_start_at >= :w AND status IN ('approved', 'applied')"
            " ORDER BY window_start_at DESC, plan_id LIMIT 1"
        ),
        {"c": plan.cluster, "p": plan.plan_id, "w": plan.window_start},
    ).scalar_one_or_none()


def read_approvals(conn: Connection, plan_id: str) -> list[tuple[datetime, str, str, str]]:
    """A plan's recorded decisions, oldest first: (decided_at, decided_by, decision, comment)."""
    return [
        (row[0], row[1], row[2], row[3] or "")
        for row in conn.execute(
            sa.text(
                "SELECT decided_at, decided_by, decision, comment FROM plan_approvals"
                " WHERE plan_id = :p ORDER BY decided_at, decided_by"
            ),
            {"p": plan_id},
        ).tuples()
    ]


def read_plan_summaries(conn: Connection, limit: int = 100) -> list[dict[str, object]]:
    """The newest plans (by window), each with its figures and decisions, for listings."""
    rows = conn.execute(
        sa.text(
            "SELECT p.plan_id, p.cluster, p.window_start_at, p.window_s, p.status,"
            " p.status_reason, p.gpus, p.predicted_energy_kwh, p.predicted_carbon_g,"
            " p.predicted_cost_usd, p.min_slo_headroom,"
            " (SELECT string_agg(a.decision || ' by ' || a.decided_by, ', '"
            "  ORDER BY a.decided_at) FROM plan_approvals a WHERE a.plan_id = p.plan_id)"
            " AS decisions"
            " FROM plans p ORDER BY p.window_start_at DESC, p.plan_id LIMIT :n"
        ),
        {"n": limit},
    ).mappings()
    return [dict(row) for row in rows]


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
            "spp": i.config.spp,
            "kvp": i.config.kvp,
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
            ServingConfig(
                i["model"],
                i["gpu_type"],
                i["tp"],
                i["power_cap_w"],
                i["clock_mhz"],
                i.get("spp", 1),
                i.get("kvp", 1),
            ),
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


# --- forecast models and detailed forecasts (migration 006) ---------------------------------


def write_forecast_records(
    conn: Connection, cluster: str, records: Iterable[ForecastRecord], made_at: datetime
) -> int:
    """Store forecasts with their intervals, model, backtest and fallback reason.

    Each record replaces every forecast of its (pool, window) made at or before ``made_at``,
    whatever its method, and is not stored when a newer one exists, so that a window holds
    its newest forecast and a re-run leaves identical rows. Returns the records given.
    """
    rows = [
        {
            "cluster": cluster,
            "service": r.forecast.service,
            "request_type": r.forecast.request_type,
            "window_start_at": r.forecast.window_start,
            "window_s": r.forecast.window_s,
            "method": r.forecast.method,
            "made_at": made_at,
            "mean_rate_rps": r.forecast.mean_rate_rps,
            "peak_rate_rps": r.forecast.peak_rate_rps,
            "planned_rate_rps": r.forecast.planned_rate_rps,
            "quantile": r.forecast.quantile,
            "horizon_steps": r.horizon_steps,
            "mean_quantiles": json.dumps(_json_safe(dict(r.mean_quantiles))),
            "peak_quantiles": json.dumps(_json_safe(dict(r.peak_quantiles))),
            "model_spec": json.dumps(_json_safe(dict(r.model_spec))),
            "backtest": json.dumps(_json_safe(dict(r.backtest))),
            "calibration": r.calibration,
            "fallback_reason": r.fallback_reason,
        }
        for r in records
    ]
    for row in rows:
        conn.execute(
            sa.text(
                "DELETE FROM load_forecasts WHERE cluster = :cluster AND service = :service"
                " AND request_type = :request_type AND window_start_at = :window_start_at"
                " AND window_s = :window_s AND made_at <= :made_at"
            ),
            row,
        )
    if rows:
        # Insert unless a newer forecast of the window is already stored.
        conn.execute(
            sa.text(
                "INSERT INTO load_forecasts (cluster, service, request_type, window_start_at,"
                " window_s, method, made_at, mean_rate_rps, peak_rate_rps, planned_rate_rps,"
                " quantile, horizon_steps, mean_quantiles, peak_quantiles, model_spec, backtest,"
                " calibration, fallback_reason) SELECT :cluster, :service, :request_type,"
                " :window_start_at, :window_s, :method, :made_at, :mean_rate_rps, :peak_rate_rps,"
                " :planned_rate_rps, :quantile, :horizon_steps, CAST(:mean_quantiles AS jsonb),"
                " CAST(:peak_quantiles AS jsonb), CAST(:model_spec AS jsonb),"
                " CAST(:backtest AS jsonb), :calibration, :fallback_reason"
                " WHERE NOT EXISTS (SELECT 1 FROM load_forecasts WHERE cluster = :cluster"
                " AND service = :service AND request_type = :request_type"
                " AND window_start_at = :window_start_at AND window_s = :window_s"
                " AND made_at > :made_at)"
                " ON CONFLICT (cluster, service, request_type, window_start_at, window_s, method)"
                " DO NOTHING"
            ),
            rows,
        )
    return len(rows)


def read_forecast_details(
    conn: Connection, cluster: str, window_start: datetime, window_s: int
) -> list[dict[str, object]]:
    """Every stored column of the newest forecast per pool for one window."""
    result = conn.execute(
        sa.text(
            "SELECT DISTINCT ON (service, request_type) service, request_type, window_start_at,"
            " window_s, method, made_at, mean_rate_rps, peak_rate_rps, planned_rate_rps,"
            " quantile, horizon_steps, mean_quantiles, peak_quantiles, model_spec, backtest,"
            " calibration, fallback_reason FROM load_forecasts"
            " WHERE cluster = :c AND window_start_at = :ws AND window_s = :w"
            " ORDER BY service, request_type, made_at DESC, method"
        ),
        {"c": cluster, "ws": window_start, "w": window_s},
    )
    return [dict(row._mapping) for row in result]


def write_forecast_states(conn: Connection, cluster: str, states: Iterable[SeriesState]) -> int:
    """Replace the stored candidates of each series with ``states`` (one row per candidate).

    Returns rows written.
    """
    rows = []
    for s in states:
        conn.execute(
            sa.text(
                "DELETE FROM forecast_models WHERE cluster = :c AND service = :s"
                " AND request_type = :t AND target = :g"
            ),
            {"c": cluster, "s": s.service, "t": s.request_type, "g": s.target},
        )
        last = 7 * 86400 // s.window_s
        for c in s.candidates:
            fitted = c.fitted
            rows.append(
                {
                    "cluster": cluster,
                    "service": s.service,
                    "request_type": s.request_type,
                    "target": s.target,
                    "model": c.kind,
                    "window_s": s.window_s,
                    "refreshed_at": step_start(s.refreshed_step, s.window_s),
                    "fitted": json.dumps(fitted.to_dict()) if fitted else None,
                    "fit_error": c.error,
                    "train_start_at": step_start(fitted.train_start_step, s.window_s)
                    if fitted
                    else None,
                    "train_end_at": step_start(fitted.train_end_step, s.window_s)
                    if fitted
                    else None,
                    "residuals": json.dumps(list(c.residuals)),
                    "residuals_end_at": step_start(c.residuals_end_step, s.window_s),
                    "level_shift": c.shift,
                    "selected": c.kind == s.selected,
                    "selection_reason": s.reason,
                    "metrics": json.dumps(_json_safe(c.metrics(last))),
                }
            )
    if rows:
        conn.execute(
            sa.text(
                "INSERT INTO forecast_models (cluster, service, request_type, target, model,"
                " window_s, refreshed_at, fitted, fit_error, train_start_at, train_end_at,"
                " residuals, residuals_end_at, level_shift, selected, selection_reason, metrics)"
                " VALUES (:cluster, :service, :request_type, :target, :model, :window_s,"
                " :refreshed_at, CAST(:fitted AS jsonb), :fit_error, :train_start_at,"
                " :train_end_at, CAST(:residuals AS jsonb), :residuals_end_at, :level_shift,"
                " :selected, :selection_reason, CAST(:metrics AS jsonb))"
            ),
            rows,
        )
    return len(rows)


def read_forecast_states(
    conn: Connection, cluster: str, window_s: int
) -> dict[tuple[str, str, str], SeriesState]:
    """Stored series states of a cluster at one window length, by (service, type, target)."""
    result = conn.execute(
        sa.text(
            "SELECT service, request_type, target, model, refreshed_at, fitted, fit_error,"
            " residuals, residuals_end_at, level_shift, selected, selection_reason"
            " FROM forecast_models WHERE cluster = :c AND window_s = :w"
            " ORDER BY service, request_type, target, model"
        ),
        {"c": cluster, "w": window_s},
    )
    grouped: dict[tuple[str, str, str], list[sa.Row]] = {}
    for row in result:
        grouped.setdefault((row.service, row.request_type, row.target), []).append(row)
    states = {}
    for key, rows in grouped.items():
        candidates = tuple(
            CandidateState(
                r.model,
                FittedModel.from_dict(r.fitted) if r.fitted else None,
                tuple(float(x) for x in r.residuals),
                step_of(r.residuals_end_at, window_s),
                r.fit_error,
                float(r.level_shift),
            )
            for r in rows
        )
        selected = next((r.model for r in rows if r.selected), None)
        states[key] = SeriesState(
            key[0],
            key[1],
            key[2],
            window_s,
            step_of(rows[0].refreshed_at, window_s),
            candidates,
            selected,
            rows[0].selection_reason or "",
        )
    return states


# --- reports --------------------------------------------------------------------------------


def write_cluster_site(
    conn: Connection, cluster: str, zone: str, window_s: int, profile_version: str
) -> None:
    """Upsert the report settings of one cluster (``cluster_sites``).

    The zone, telemetry window and profile version are overwritten; ``node_pattern`` (which
    nodes are the cluster's, default all) is left as an operator set it.
    """
    stmt = insert(_table("cluster_sites", "cluster", "zone", "window_s", "profile_version")).values(
        cluster=cluster, zone=zone, window_s=window_s, profile_version=profile_version
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["cluster"],
            set_={
                "zone": stmt.excluded.zone,
                "window_s": stmt.excluded.window_s,
                "profile_version": stmt.excluded.profile_version,
            },
        )
    )

"""Job functions: one per DAG task. Each takes its time window from the caller (the run's
data interval), reads what it needs from PostgreSQL, calls the pure core, writes results,
and returns a small key (a count, a plan id).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from forecasting.planning import plan_forecasts
from forecasting.selection import DEFAULT_CANDIDATES, ForecastConfig
from forecasting.series import series_from_type_windows, step_of, step_start
from optimizer.inputs import (
    ObjectiveWeights,
    PlanInputs,
    PowerDomain,
    Reconfiguration,
    SolverOptions,
    sized_demand_rps,
)
from optimizer.solve import Solution, solve_layout
from profiles.table import ProfileRecord, load_profile_records
from wattplan import db, store
from wattplan.approval import (
    AUTO,
    HUMAN,
    ApprovalPolicy,
    Prices,
    Verdict,
    approval_body,
    approval_subject,
    decide,
    evaluate_layout,
    plan_is_degraded,
)
from wattplan.changes import LayoutChange, describe_change
from wattplan.domain import Layout, LoadForecast, Plan, PlanStatus, Profile, digest
from wattplan.errors import CapacityShortfallError, ConfigError, InputDataError, PlanInputError
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
        counts["profiles"] = load_profile_table(conn, settings.profiles_path)
        counts["carbon_hours"] = sum(
            load_carbon_intensity(conn, f).rows_loaded for f in carbon_files
        )
        counts["price_hours"] = sum(
            load_electricity_prices(conn, f, zone).rows_loaded for f in price_files
        )
        counts["gpu_prices"] = load_gpu_prices(conn, gpu_file).rows_loaded
    return counts


def load_profile_table(conn: sa.Connection, path: Path) -> int:
    """Upsert every record of one profile CSV and describe each version it holds.

    Returns:
        Rows written.

    Raises:
        InputDataError: The file is unreadable or malformed (nothing is written).
    """
    records = load_profile_records(path)
    digest_hex = hashlib.sha256(path.read_bytes()).hexdigest()
    by_version: dict[str, list[ProfileRecord]] = defaultdict(list)
    for record in records:
        by_version[record.profile.version].append(record)
    for version, rows in sorted(by_version.items()):
        methods = sorted({r.method for r in rows})
        store.write_profile_version(
            conn,
            version,
            f"{len(rows)} {'/'.join(methods)} profiles from {path.name}",
            path.name,
            digest_hex,
            len(rows),
        )
    return store.write_profile_records(conn, records)


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


def ingest_clock_changes(engine: Engine, settings: Settings, start: datetime, end: datetime) -> int:
    """Load the clock changes of ``[start, end)`` from the agents' closed event files.

    Returns:
        Events loaded for the interval.
    """
    from telemetry.clock_events import list_clock_files
    from wattplan.ingest_clock import load_clock_changes

    files = list_clock_files(settings.clock_spool_dir)
    with engine.begin() as conn:
        result = load_clock_changes(conn, files, start, end)
    log.info(
        "clock changes %s..%s from %d file(s): read %d, loaded %d, rejected %d",
        start,
        end,
        len(files),
        result.rows_read,
        result.rows_loaded,
        result.rows_rejected,
    )
    return result.rows_loaded


# --- forecasts ------------------------------------------------------------------------------


def forecast_config(settings: Settings) -> ForecastConfig:
    """The forecaster's settings from wattplan's.

    Raises:
        ConfigError: ``WATTPLAN_FORECAST_CANDIDATES`` names an unknown model.
    """
    candidates = settings.forecast_candidates or DEFAULT_CANDIDATES
    try:
        return ForecastConfig(
            quantile=settings.forecast_quantile,
            candidates=tuple(candidates),
            refit_s=settings.forecast_refit_s,
            horizon=settings.forecast_horizon,
        )
    except PlanInputError as exc:
        raise ConfigError(f"forecast settings (WATTPLAN_FORECAST_*): {exc}") from exc


def forecast_load(engine: Engine, settings: Settings, window_start: datetime) -> int:
    """Forecast every pool's load for the window starting at ``window_start``.

    Reads the last ``history_s`` of observed windows and the stored model states; refits
    at most ``forecast_refits_per_run`` series that are due (``forecast_refit_s``), forecasts
    every pool from its selected model (a pool with too short a history falls back to
    persistence of its peak, and the stored forecast says why), and stores forecasts and
    states. ``made_at`` is ``window_start`` (the run's data-interval end), never the wall
    clock. Returns the number of pools forecast.
    """
    config = forecast_config(settings)
    window_s = settings.window_s
    at_step = step_of(window_start, window_s)
    history_start = step_start(at_step - max(1, settings.history_s // window_s), window_s)
    started = time.perf_counter()
    with engine.begin() as conn:
        windows = store.read_type_windows(
            conn, history_start, window_start, settings.ingest_window_s
        )
        states = store.read_forecast_states(conn, settings.cluster, window_s)
    pools = sorted({(w.service, w.request_type) for w in windows})
    series = series_from_type_windows(windows, history_start, window_start, window_s, pools)
    result = plan_forecasts(
        windows,
        series,
        states,
        at_step,
        config,
        max_refreshes=settings.forecast_refits_per_run,
    )
    refreshed = set(result.refreshed)
    with engine.begin() as conn:
        store.write_forecast_states(
            conn,
            settings.cluster,
            [s for s in result.states if (s.service, s.request_type, s.target) in refreshed],
        )
        store.write_forecast_records(conn, settings.cluster, result.records, made_at=window_start)
    fallbacks = sum(1 for r in result.records if r.fallback_reason)
    log.info(
        "forecast %d pools for %s from %d windows: %d series refitted, %d fallback forecasts "
        "(%.2f s)",
        len(pools),
        window_start,
        len(windows),
        len(refreshed),
        fallbacks,
        time.perf_counter() - started,
    )
    return len({(r.forecast.service, r.forecast.request_type) for r in result.records})


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


def plan_inputs(
    settings: Settings,
    forecasts: list[LoadForecast],
    profiles: list[Profile],
    current: Layout,
    context: PlanContext,
) -> PlanInputs:
    """The optimizer's inputs for one window from settings, forecasts and reference data.

    The cluster is one power domain (``WATTPLAN_POWER_BUDGET_W``; none when 0) holding the
    whole inventory of ``WATTPLAN_GPU_TYPE``. Re-shard and clock-change times are capped at
    the start-up time (a cheaper way never costs more than a cold start). Each pool is sized
    for its planned rate over ``WATTPLAN_TARGET_UTILIZATION`` (planning headroom).
    """
    inventory = {settings.gpu_type: settings.gpu_inventory}
    domains = (
        (
            PowerDomain(
                settings.cluster,
                settings.power_budget_w,
                inventory,
                settings.power_oversubscription,
            ),
        )
        if settings.power_budget_w > 0
        else ()
    )
    reshard_s = min(settings.reshard_s, settings.startup_s)
    weights = {name: float(value) for name, value in settings.objective_weights}
    return PlanInputs(
        window_s=settings.window_s,
        demand_rps={
            (f.service, f.request_type): sized_demand_rps(
                f.planned_rate_rps, settings.target_utilization
            )
            for f in forecasts
        },
        mean_rps={
            (f.service, f.request_type): min(f.mean_rate_rps, f.planned_rate_rps) for f in forecasts
        },
        service_models=dict(settings.service_models),
        profiles=tuple(profiles),
        gpu_inventory=inventory,
        current=current,
        carbon_g_per_kwh=context.carbon_g_per_kwh,
        electricity_usd_per_mwh=context.electricity_usd_per_mwh,
        gpu_usd_per_hour={settings.gpu_type: context.gpu_usd_per_hour},
        reconfiguration=Reconfiguration(
            startup_s=settings.startup_s,
            reshard_s=reshard_s,
            clock_change_s=min(settings.clock_change_s, reshard_s),
            hysteresis=settings.hysteresis,
            max_changes=settings.max_changes,
        ),
        power_domains=domains,
        weights=ObjectiveWeights(
            energy_kwh=weights.get("energy_kwh", 0.0),
            carbon_kg=weights.get("carbon_kg", 0.0),
            cost_usd=weights.get("cost_usd", 0.0),
        ),
        solver=SolverOptions(
            time_limit_s=settings.solver_time_limit_s,
            mip_gap=settings.solver_mip_gap,
            clock_mode=settings.clock_mode,
        ),
    )


def propose_plan(engine: Engine, settings: Settings, window_start: datetime) -> str:
    """Solve the layout for ``[window_start, window_start + window_s)`` and store it as proposed.

    The plan id is derived from (cluster, window, input digest): re-running with the same
    inputs returns the same id and stores nothing new.

    When the forecast load does not fit (inventory, power budget or change cap), the best
    degraded plan is stored instead, marked ``degraded``: it is never auto-approved.

    Raises:
        PlanInputError: no forecasts or profiles for the window, or invalid inputs.
        CapacityShortfallError: the load does not fit and no degraded plan was found in time.
        SolverError: HiGHS found no layout within the time limit.
    """
    window_end = window_start + timedelta(seconds=settings.window_s)
    with engine.begin() as conn:
        forecasts = store.read_forecasts(conn, settings.cluster, window_start, settings.window_s)
        profiles = [
            p
            for p in store.read_profiles(conn, settings.profile_version)
            if p.config.gpu_type == settings.gpu_type  # the planner's inventory holds one type
        ]
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
    inputs = plan_inputs(settings, forecasts, profiles, current, context)
    input_digest = digest(
        {
            "demand": sorted((k[0], k[1], round(v, 9)) for k, v in inputs.demand_rps.items()),
            "mean": sorted((k[0], k[1], round(v, 9)) for k, v in inputs.mean_rps.items()),
            "profiles": [(p.version, p.config.key, p.request_type) for p in profiles],
            "current": sorted(current.instances_by_slot().items()),
            "inventory": sorted(inputs.gpu_inventory.items()),
            "context": context,
            "solver": inputs.solver,
            "startup_s": inputs.reconfiguration.startup_s,
            "reconfiguration": inputs.reconfiguration,
            "power_domains": [
                (d.name, d.budget_w, d.oversubscription) for d in inputs.power_domains
            ],
            "weights": inputs.weights,
        }
    )
    plan_id = f"{settings.cluster}-{window_start:%Y%m%dT%H%MZ}-{input_digest[:10]}"
    try:
        solution = solve_layout(inputs)
    except CapacityShortfallError as exc:
        if exc.degraded is None:
            raise
        log.warning("plan %s is degraded (needs a person's approval): %s", plan_id, exc)
        assert isinstance(exc.degraded, Solution)
        solution = exc.degraded
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
        degraded=solution.degraded,
        policy=solution.policy,
        diff=solution.diff,
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


# --- approval -------------------------------------------------------------------------------

#: Route of a plan that must not be pushed (applied, rejected, superseded, past its window).
SKIP = "skip"


@dataclass(frozen=True)
class ApprovalDecision:
    """What :func:`decide_approval` decided, and what a person is shown if one must decide.

    Attributes:
        plan_id: The plan.
        route: ``auto`` (approved, push it), ``human`` (ask a person) or ``skip`` (do not push).
        rule: The policy rule, or why the plan is skipped (``already_applied``, ...).
        reason: One sentence for logs and the person.
        subject: Headline of the approval request (``human`` only).
        body: Markdown of the approval request (``human`` only).
    """

    plan_id: str
    route: str
    rule: str
    reason: str
    subject: str = ""
    body: str = ""


def plan_version(plan: Plan) -> int:
    """The version the cluster agent orders plans by: the window start in Unix seconds.

    Later windows have higher versions, so an old plan that arrives late is refused (409).
    """
    return int(plan.window_start.timestamp())


def _window_end(plan: Plan) -> datetime:
    return plan.window_start + timedelta(seconds=plan.window_s)


def _stale_reason(conn: sa.Connection, plan: Plan, at: datetime) -> str | None:
    """Why ``plan`` can no longer reach the cluster at ``at``, or None if it still can."""
    if at >= _window_end(plan):
        return (
            f"its window ended at {_window_end(plan).isoformat()} before it could be pushed "
            f"(at {at.isoformat()}); the current layout stays"
        )
    other = store.read_decided_plan_since(conn, plan)
    if other is not None:
        return f"plan {other} for the same or a later window was already approved or applied"
    return None


def _approval_request(
    conn: sa.Connection,
    settings: Settings,
    plan: Plan,
    change: LayoutChange,
    verdict: Verdict,
    current: Layout,
    current_plan_id: str | None,
) -> tuple[str, str]:
    forecasts = store.read_forecasts(conn, plan.cluster, plan.window_start, plan.window_s)
    version = str(plan.solver.get("profile_version") or settings.profile_version)
    profiles = {(p.config.key, p.request_type): p for p in store.read_profiles(conn, version)}
    prices = Prices.from_solver_record(plan.solver)
    figures = {
        name: evaluate_layout(
            layout,
            peak_rps={(f.service, f.request_type): f.planned_rate_rps for f in forecasts},
            mean_rps={
                (f.service, f.request_type): min(f.mean_rate_rps, f.planned_rate_rps)
                for f in forecasts
            },
            profiles=profiles,
            window_s=plan.window_s,
            prices=prices,
        )
        for name, layout in (("current", current), ("plan", plan.layout))
    }
    body = approval_body(
        plan,
        change,
        verdict,
        current=figures["current"],
        planned=figures["plan"],
        prices=prices,
        timeout_s=settings.approval_timeout_s,
        current_plan_id=current_plan_id,
    )
    return approval_subject(plan), body


def decide_approval(
    engine: Engine, settings: Settings, plan_id: str, at: datetime
) -> ApprovalDecision:
    """Apply the approval policy to a stored plan.

    A plan already applied, rejected or superseded is skipped (a second run of a window
    pushes nothing). A proposed plan whose window has passed, or that a plan for the same or
    a later window already replaced, is marked superseded and skipped. Otherwise every older
    unanswered plan of the cluster is marked superseded by this one, and the policy
    (:func:`wattplan.approval.decide`) compares the plan with the cluster's current layout:
    approved by policy (recorded in ``plan_approvals`` as ``policy:<rule>``), or left
    proposed for a person, with the request's subject and Markdown body.

    Args:
        engine: wattplan's database.
        settings: Settings (the policy).
        plan_id: The plan.
        at: The run's time (its data-interval end): when the policy decides.

    Returns:
        The decision.

    Raises:
        KeyError: the plan does not exist.
    """
    policy = ApprovalPolicy.from_settings(settings)
    with engine.begin() as conn:
        status = store.lock_plan_status(conn, plan_id)
        plan, _ = store.read_plan(conn, plan_id)
        if status is PlanStatus.APPROVED:
            return ApprovalDecision(plan_id, AUTO, "already_approved", "approved before this run")
        if status is not PlanStatus.PROPOSED:
            return ApprovalDecision(
                plan_id, SKIP, f"already_{status.value}", f"the plan is {status.value}"
            )
        stale = _stale_reason(conn, plan, at)
        if stale is not None:
            store.set_plan_status(conn, plan_id, PlanStatus.SUPERSEDED, at, stale)
            return ApprovalDecision(plan_id, SKIP, "superseded", stale)
        for old in store.supersede_proposals(conn, plan, at):
            log.info("plan %s superseded by %s while unanswered", old, plan_id)
        current_plan_id, current = store.read_applied_layout(
            conn, plan.cluster, before=plan.window_start
        )
        change = describe_change(current, plan.layout)
        verdict = decide(policy, change, degraded=plan_is_degraded(plan))
        if verdict.auto:
            store.record_approval(
                conn, plan_id, "approved", f"policy:{verdict.rule}", at, verdict.reason
            )
            store.set_plan_status(conn, plan_id, PlanStatus.APPROVED, at, verdict.reason)
            log.info("plan %s approved by policy (%s): %s", plan_id, verdict.rule, verdict.reason)
            return ApprovalDecision(plan_id, AUTO, verdict.rule, verdict.reason)
        store.set_plan_status(
            conn, plan_id, PlanStatus.PROPOSED, at, f"awaiting a person: {verdict.reason}"
        )
        subject, body = _approval_request(
            conn, settings, plan, change, verdict, current, current_plan_id
        )
    log.info("plan %s needs a person (%s): %s", plan_id, verdict.rule, verdict.reason)
    return ApprovalDecision(plan_id, HUMAN, verdict.rule, verdict.reason, subject, body)


def record_decision(
    engine: Engine,
    plan_id: str,
    decision: str,
    decided_by: str,
    at: datetime,
    comment: str = "",
    *,
    late_ok: bool = False,
) -> PlanStatus:
    """Record a person's approve/reject decision on a plan.

    A proposed plan moves to ``approved`` or ``rejected``. With ``late_ok`` an answer to a
    plan that is no longer proposed (superseded while the person read it, say) is still
    recorded, noting the plan's status, and changes nothing.

    Args:
        engine: wattplan's database.
        plan_id: The plan.
        decision: ``approved`` or ``rejected``.
        decided_by: Who decided (a user name, ``airflow:timeout``, ...).
        at: When.
        comment: Why, or where the answer came from.
        late_ok: Record an answer to a plan that is no longer proposed instead of raising.

    Returns:
        The plan's status afterwards.

    Raises:
        ValueError: ``decision`` is not approved/rejected, or the plan is not proposed (and
            not ``late_ok``).
        KeyError: the plan does not exist.
    """
    if decision not in ("approved", "rejected"):
        raise ValueError(f"decision must be approved or rejected, not {decision!r}")
    with engine.begin() as conn:
        status = store.lock_plan_status(conn, plan_id)
        if status is PlanStatus.PROPOSED:
            store.record_approval(conn, plan_id, decision, decided_by, at, comment)
            new = PlanStatus(decision)
            store.set_plan_status(conn, plan_id, new, at, f"{decision} by {decided_by}")
            return new
        if not late_ok:
            raise ValueError(
                f"plan {plan_id} is {status.value}, only a proposed plan can be decided"
            )
        note = f"answer arrived when the plan was {status.value}: it changes nothing"
        store.record_approval(
            conn, plan_id, decision, decided_by, at, f"{comment}; {note}" if comment else note
        )
        log.warning("plan %s: %s by %s, but %s", plan_id, decision, decided_by, note)
        return status


def record_response(
    engine: Engine,
    plan_id: str,
    response: Mapping[str, object] | None,
    at: datetime,
    run_id: str = "",
) -> bool:
    """Record the answer of the Airflow approval task and say whether to push the plan.

    Args:
        engine: wattplan's database.
        plan_id: The plan.
        response: ``{"chosen": "Approve" | "Reject", "user": name or None, "responded_at":
            ISO time, "timed_out": bool}`` as the approval task stores it; ``None`` when the
            task did not run its answer (approved by policy, or marked success by hand in
            Airflow, which counts as an approval by ``airflow:marked-success``).
        at: When the answer is recorded (used when the response carries no time).
        run_id: The Airflow run that asked, for the record.

    Returns:
        Whether the plan is approved (and may be pushed).
    """
    where = f"Airflow run {run_id}" if run_id else "Airflow"
    if response is None:
        with engine.connect() as conn:
            _, status = store.read_plan(conn, plan_id)
        if status is not PlanStatus.PROPOSED:
            return status is PlanStatus.APPROVED
        status = record_decision(
            engine,
            plan_id,
            "approved",
            "airflow:marked-success",
            at,
            f"the approval task was marked success in {where}",
            late_ok=True,
        )
        return status is PlanStatus.APPROVED
    chosen = str(response.get("chosen"))
    timed_out = bool(response.get("timed_out"))
    user = response.get("user")
    responded_at = response.get("responded_at")
    when = datetime.fromisoformat(responded_at) if isinstance(responded_at, str) else at
    if timed_out:
        decided_by, comment = "airflow:timeout", f"no answer before the timeout in {where}"
    else:
        decided_by, comment = str(user or "airflow:unknown-user"), f"answered {chosen} in {where}"
    decision = "approved" if chosen == "Approve" and not timed_out else "rejected"
    status = record_decision(engine, plan_id, decision, decided_by, when, comment, late_ok=True)
    return status is PlanStatus.APPROVED


def check_push(engine: Engine, plan_id: str, at: datetime) -> str | None:
    """Say whether an approved plan may be pushed now.

    Only an approved plan goes out, once: an applied plan is not pushed again. An approved
    plan whose window has ended, or that a plan for the same or a later window replaced, is
    marked superseded instead.

    Args:
        engine: wattplan's database.
        plan_id: The plan.
        at: The run's clock (see ``dags/plan_cluster.py``).

    Returns:
        ``None`` when the plan may be pushed, else why not.
    """
    with engine.begin() as conn:
        status = store.lock_plan_status(conn, plan_id)
        if status is not PlanStatus.APPROVED:
            return f"plan {plan_id} is {status.value}; only an approved plan is pushed"
        plan, _ = store.read_plan(conn, plan_id)
        stale = _stale_reason(conn, plan, at)
        if stale is not None:
            store.set_plan_status(conn, plan_id, PlanStatus.SUPERSEDED, at, stale)
            return f"plan {plan_id} is not pushed: {stale}"
    return None


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

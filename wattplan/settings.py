"""One settings object, read from the environment once and passed down explicitly."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from wattplan.errors import ConfigError

#: Repository root: where ``sql/``, ``dags/``, ``plugins/`` and ``data/`` live.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{key}={raw!r} is not a number; set it to e.g. {default}") from exc


def _pairs(env: Mapping[str, str], key: str, default: str) -> tuple[tuple[str, str], ...]:
    """Parse ``name=value;name=value`` (``,`` also separates)."""
    raw = env.get(key) or default
    pairs = []
    for part in re.split(r"[;,]", raw):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"{key}: {part!r} is not name=value (example: {default})")
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = (env.get(key) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}={raw!r} is not a boolean; use true or false")


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{key}={raw!r} is not an integer; set it to e.g. {default}") from exc


@dataclass(frozen=True)
class Settings:
    """Runtime configuration.

    Attributes:
        database_url: SQLAlchemy URL of the wattplan database; ``None`` starts the embedded
            PostgreSQL in ``state_dir / "pgdata"``.
        airflow_database_url: URL of Airflow's metadata database; ``None`` uses a database
            named ``airflow`` on the same server.
        state_dir: Folder for the embedded database, Airflow home, logs, PIDs and reports.
        data_dir: Folder of the bundled datasets.
        cluster: Name of the serving cluster this deployment plans for.
        window_s: Length of one planning window in seconds.
        ingest_window_s: Length of one telemetry ingestion interval in seconds.
        gpu_inventory: GPUs of the planned GPU type available to the cluster.
        gpu_type: The GPU type planned for.
        forecast_quantile: Upper quantile of the forecast peak rate the planner sizes for.
        target_utilization: Planning headroom: each pool gets SLO capacity for its planned
            rate divided by this (1: planned exactly at SLO capacity).
        carbon_zone: Electricity Maps zone id for carbon intensity and prices.
        solver_time_limit_s: Wall-clock limit handed to HiGHS.
        solver_mip_gap: Relative MIP gap at which HiGHS stops.
        request_sources: (service, Azure-format trace path) pairs the ingest DAG reads.
        service_models: (service, model) pairs: which model serves each service.
        profiles_path: Profile table (CSV) loaded as reference data.
        profile_version: Version of the stored profiles the planner uses.
        history_s: How far back the forecaster looks.
        startup_s: Cold-start time of one instance (powered, not serving).
        auto_approve: Approve proposed plans without a person (demo and tests), except
            degraded plans and large changes, which always go to a person.
        auto_approve_clock_only: Approve plans that only retune clocks or power caps of
            running instances.
        auto_approve_max_instance_changes: Approve plans that start plus stop at most this
            many instances (0: none).
        approval_large_change_instances: A plan that starts plus stops more instances than
            this always needs a person, whatever the other approval settings say.
        approval_timeout_s: How long the approval task waits for a person; no answer in
            time rejects the plan (the current layout stays). Default 900 s, or one window
            when windows are shorter.
        cluster_conn_id: Airflow Connection of the serving cluster's agent.
        gpu_spool_dir: Folder where node collectors leave closed GPU telemetry files.
        telemetry_retention_days: Daily GPU telemetry partitions older than this are dropped.
        clock_spool_dir: Folder where cluster agents leave closed clock-change event files.
        forecast_refit_s: How often each forecast series is refitted and its model re-selected.
        forecast_refits_per_run: Most series (pool x mean/peak) refitted in one planning run;
            the others forecast from stored parameters.
        forecast_candidates: Model kinds the forecaster selects among (empty: all).
        forecast_horizon: Planning windows forecast ahead in each run.
        reports_dir: Folder for plan reports and the daily report plots (PNG + HTML).
        reshard_s: Downtime of a TP change on the same GPUs (capped at ``startup_s``).
        clock_change_s: Time a locked-clock or power-cap change takes.
        hysteresis: Transition costs count this many times in the objective (>= 1).
        max_changes: At most this many instances started plus stopped per window (``None``:
            no cap; WATTPLAN_MAX_CHANGES empty).
        power_budget_w: Power budget of the cluster's power domain (0: no power row).
        power_oversubscription: Factor on ``power_budget_w`` the plan's peak may reach.
        clock_mode: ``envelope`` (the instance loop sets clocks) or ``explicit``.
        objective_weights: (term, weight) pairs of the optimizer's objective.
    """

    database_url: str | None = None
    airflow_database_url: str | None = None
    state_dir: Path = PROJECT_ROOT / ".wattplan"
    data_dir: Path = PROJECT_ROOT / "data"
    cluster: str = "demo"
    window_s: int = 1800
    ingest_window_s: int = 300
    gpu_inventory: int = 256
    gpu_type: str = "H100-80GB"
    forecast_quantile: float = 0.95
    target_utilization: float = 0.85
    carbon_zone: str = "US-CAL-CISO"
    solver_time_limit_s: float = 20.0
    solver_mip_gap: float = 0.01
    request_sources: tuple[tuple[str, str], ...] = ()
    service_models: tuple[tuple[str, str], ...] = ()
    profiles_path: Path = PROJECT_ROOT / "data" / "profiles" / "v1.csv"
    profile_version: str = "v1"
    history_s: int = 14 * 86400
    startup_s: float = 420.0
    auto_approve: bool = False
    auto_approve_clock_only: bool = True
    auto_approve_max_instance_changes: int = 0
    approval_large_change_instances: int = 64
    approval_timeout_s: int = 900
    cluster_conn_id: str = "wattplan_cluster_default"
    gpu_spool_dir: Path = PROJECT_ROOT / ".wattplan" / "spool" / "gpu"
    telemetry_retention_days: int = 30
    clock_spool_dir: Path = PROJECT_ROOT / ".wattplan" / "spool" / "clock"
    forecast_refit_s: int = 86400
    forecast_refits_per_run: int = 2
    forecast_candidates: tuple[str, ...] = ()
    forecast_horizon: int = 1
    reports_dir: Path = PROJECT_ROOT / ".wattplan" / "reports"
    reshard_s: float = 90.0
    clock_change_s: float = 0.08
    hysteresis: float = 1.0
    max_changes: int | None = None
    power_budget_w: float = 0.0
    power_oversubscription: float = 1.0
    clock_mode: str = "envelope"
    objective_weights: tuple[tuple[str, str], ...] = (("energy_kwh", "1"),)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``WATTPLAN_*`` environment variables.

        Args:
            env: Mapping to read instead of ``os.environ`` (tests).

        Raises:
            ConfigError: a value is malformed or out of range.
        """
        env = os.environ if env is None else env
        data_dir = Path(env.get("WATTPLAN_DATA_DIR") or (PROJECT_ROOT / "data")).resolve()
        azure = data_dir / "azure-llm-inference-2023"
        default_sources = (
            f"conversation={azure / 'AzureLLMInferenceTrace_conv.csv'};"
            f"code={azure / 'AzureLLMInferenceTrace_code.csv'}"
        )
        state_dir = Path(env.get("WATTPLAN_STATE_DIR") or (PROJECT_ROOT / ".wattplan"))
        window_s = _int(env, "WATTPLAN_WINDOW_S", 1800)
        settings = cls(
            database_url=env.get("WATTPLAN_DATABASE_URL") or None,
            airflow_database_url=env.get("WATTPLAN_AIRFLOW_DATABASE_URL") or None,
            state_dir=state_dir.resolve(),
            data_dir=data_dir,
            cluster=env.get("WATTPLAN_CLUSTER") or "demo",
            window_s=window_s,
            ingest_window_s=_int(env, "WATTPLAN_INGEST_WINDOW_S", 300),
            gpu_inventory=_int(env, "WATTPLAN_GPU_INVENTORY", 256),
            gpu_type=env.get("WATTPLAN_GPU_TYPE") or "H100-80GB",
            forecast_quantile=_float(env, "WATTPLAN_FORECAST_QUANTILE", 0.95),
            target_utilization=_float(env, "WATTPLAN_TARGET_UTILIZATION", 0.85),
            carbon_zone=env.get("WATTPLAN_CARBON_ZONE") or "US-CAL-CISO",
            solver_time_limit_s=_float(env, "WATTPLAN_SOLVER_TIME_LIMIT_S", 20.0),
            solver_mip_gap=_float(env, "WATTPLAN_SOLVER_MIP_GAP", 0.01),
            request_sources=_pairs(env, "WATTPLAN_REQUEST_SOURCES", default_sources),
            service_models=_pairs(
                env, "WATTPLAN_SERVICE_MODELS", "conversation=llama2-70b;code=llama2-70b"
            ),
            profiles_path=Path(
                env.get("WATTPLAN_PROFILES_PATH") or (data_dir / "profiles" / "v1.csv")
            ).resolve(),
            profile_version=env.get("WATTPLAN_PROFILE_VERSION") or "v1",
            history_s=_int(env, "WATTPLAN_HISTORY_S", 14 * 86400),
            startup_s=_float(env, "WATTPLAN_STARTUP_S", 420.0),
            auto_approve=_bool(env, "WATTPLAN_AUTO_APPROVE", False),
            auto_approve_clock_only=_bool(env, "WATTPLAN_AUTO_APPROVE_CLOCK_ONLY", True),
            auto_approve_max_instance_changes=_int(
                env, "WATTPLAN_AUTO_APPROVE_MAX_INSTANCE_CHANGES", 0
            ),
            approval_large_change_instances=_int(
                env, "WATTPLAN_APPROVAL_LARGE_CHANGE_INSTANCES", 64
            ),
            approval_timeout_s=_int(env, "WATTPLAN_APPROVAL_TIMEOUT_S", min(900, window_s)),
            cluster_conn_id=env.get("WATTPLAN_CLUSTER_CONN_ID") or "wattplan_cluster_default",
            gpu_spool_dir=Path(
                env.get("WATTPLAN_GPU_SPOOL_DIR") or (state_dir / "spool" / "gpu")
            ).resolve(),
            telemetry_retention_days=_int(env, "WATTPLAN_TELEMETRY_RETENTION_DAYS", 30),
            clock_spool_dir=Path(
                env.get("WATTPLAN_CLOCK_SPOOL_DIR") or (state_dir / "spool" / "clock")
            ).resolve(),
            forecast_refit_s=_int(env, "WATTPLAN_FORECAST_REFIT_S", 86400),
            forecast_refits_per_run=_int(env, "WATTPLAN_FORECAST_REFITS_PER_RUN", 2),
            forecast_candidates=tuple(
                c.strip()
                for c in (env.get("WATTPLAN_FORECAST_CANDIDATES") or "").split(",")
                if c.strip()
            ),
            forecast_horizon=_int(env, "WATTPLAN_FORECAST_HORIZON", 1),
            reports_dir=Path(env.get("WATTPLAN_REPORTS_DIR") or (state_dir / "reports")).resolve(),
            reshard_s=_float(env, "WATTPLAN_RESHARD_S", 90.0),
            clock_change_s=_float(env, "WATTPLAN_CLOCK_CHANGE_S", 0.08),
            hysteresis=_float(env, "WATTPLAN_HYSTERESIS", 1.0),
            max_changes=(
                _int(env, "WATTPLAN_MAX_CHANGES", 0) if env.get("WATTPLAN_MAX_CHANGES") else None
            ),
            power_budget_w=_float(env, "WATTPLAN_POWER_BUDGET_W", 0.0),
            power_oversubscription=_float(env, "WATTPLAN_POWER_OVERSUBSCRIPTION", 1.0),
            clock_mode=env.get("WATTPLAN_CLOCK_MODE") or "envelope",
            objective_weights=_pairs(env, "WATTPLAN_OBJECTIVE_WEIGHTS", "energy_kwh=1"),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming every out-of-range value."""
        problems = []
        if self.window_s <= 0 or self.window_s % 60:
            problems.append(f"WATTPLAN_WINDOW_S={self.window_s} must be a positive multiple of 60")
        if self.ingest_window_s <= 0 or self.window_s % max(self.ingest_window_s, 1):
            problems.append(
                f"WATTPLAN_INGEST_WINDOW_S={self.ingest_window_s} must be positive and divide "
                f"WATTPLAN_WINDOW_S={self.window_s}"
            )
        if self.gpu_inventory <= 0:
            problems.append(f"WATTPLAN_GPU_INVENTORY={self.gpu_inventory} must be positive")
        if not 0.5 <= self.forecast_quantile < 1.0:
            problems.append(
                f"WATTPLAN_FORECAST_QUANTILE={self.forecast_quantile} must be in [0.5, 1)"
            )
        if self.solver_time_limit_s <= 0:
            problems.append("WATTPLAN_SOLVER_TIME_LIMIT_S must be positive")
        if not 0 <= self.solver_mip_gap < 1:
            problems.append("WATTPLAN_SOLVER_MIP_GAP must be in [0, 1)")
        if self.history_s < self.window_s:
            problems.append("WATTPLAN_HISTORY_S must be at least one planning window")
        if self.forecast_refit_s < self.window_s:
            problems.append("WATTPLAN_FORECAST_REFIT_S must be at least one planning window")
        if self.forecast_refits_per_run < 0 or self.forecast_horizon < 1:
            problems.append(
                "WATTPLAN_FORECAST_REFITS_PER_RUN must be >= 0 and WATTPLAN_FORECAST_HORIZON >= 1"
            )
        if self.telemetry_retention_days < 1:
            problems.append("WATTPLAN_TELEMETRY_RETENTION_DAYS must be at least 1")
        if self.startup_s < 0:
            problems.append("WATTPLAN_STARTUP_S must be >= 0")
        problems += self._optimizer_problems()
        if self.auto_approve_max_instance_changes < 0:
            problems.append("WATTPLAN_AUTO_APPROVE_MAX_INSTANCE_CHANGES must be >= 0")
        if self.approval_large_change_instances < self.auto_approve_max_instance_changes:
            problems.append(
                f"WATTPLAN_APPROVAL_LARGE_CHANGE_INSTANCES={self.approval_large_change_instances}"
                " must be at least WATTPLAN_AUTO_APPROVE_MAX_INSTANCE_CHANGES="
                f"{self.auto_approve_max_instance_changes}"
            )
        if not 0 < self.approval_timeout_s <= self.window_s:
            problems.append(
                f"WATTPLAN_APPROVAL_TIMEOUT_S={self.approval_timeout_s} must be positive and at "
                f"most one planning window (WATTPLAN_WINDOW_S={self.window_s}): a plan is useless "
                "once its window has passed"
            )
        services = {name for name, _ in self.request_sources}
        missing = services - {name for name, _ in self.service_models}
        if missing:
            problems.append(
                f"services {sorted(missing)} have no model in WATTPLAN_SERVICE_MODELS "
                "(example: conversation=llama2-70b)"
            )
        if problems:
            raise ConfigError("; ".join(problems))

    def _optimizer_problems(self) -> list[str]:
        problems = []
        for key, value in (
            ("WATTPLAN_RESHARD_S", self.reshard_s),
            ("WATTPLAN_CLOCK_CHANGE_S", self.clock_change_s),
            ("WATTPLAN_POWER_BUDGET_W", self.power_budget_w),
        ):
            if value < 0:
                problems.append(f"{key}={value} must be >= 0")
        if not 0.5 <= self.target_utilization <= 1:
            problems.append(
                f"WATTPLAN_TARGET_UTILIZATION={self.target_utilization} must be in [0.5, 1]"
            )
        if self.hysteresis < 1:
            problems.append(f"WATTPLAN_HYSTERESIS={self.hysteresis} must be >= 1")
        if self.max_changes is not None and self.max_changes < 0:
            problems.append(f"WATTPLAN_MAX_CHANGES={self.max_changes} must be >= 0")
        if self.power_oversubscription <= 0:
            problems.append("WATTPLAN_POWER_OVERSUBSCRIPTION must be > 0")
        if self.clock_mode not in ("envelope", "explicit"):
            problems.append(f"WATTPLAN_CLOCK_MODE={self.clock_mode!r} must be envelope or explicit")
        terms = ("energy_kwh", "carbon_kg", "cost_usd")
        for name, weight in self.objective_weights:
            if name not in terms:
                problems.append(f"WATTPLAN_OBJECTIVE_WEIGHTS: unknown term {name!r} ({terms})")
            try:
                float(weight)
            except ValueError:
                problems.append(f"WATTPLAN_OBJECTIVE_WEIGHTS: {name}={weight!r} is not a number")
        return problems

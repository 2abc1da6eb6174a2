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
        carbon_zone: Electricity Maps zone id for carbon intensity and prices.
        solver_time_limit_s: Wall-clock limit handed to HiGHS.
        solver_mip_gap: Relative MIP gap at which HiGHS stops.
        request_sources: (service, Azure-format trace path) pairs the ingest DAG reads.
        service_models: (service, model) pairs: which model serves each service.
        profiles_path: Profile table (CSV) loaded as reference data.
        profile_version: Version of the stored profiles the planner uses.
        history_s: How far back the forecaster looks.
        startup_s: Cold-start time of one instance (powered, not serving).
        auto_approve: Approve every proposed plan without a person (demo and tests).
        cluster_conn_id: Airflow Connection of the serving cluster's agent.
        gpu_spool_dir: Folder where node collectors leave closed GPU telemetry files.
        telemetry_retention_days: Daily GPU telemetry partitions older than this are dropped.
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
    carbon_zone: str = "US-CAL-CISO"
    solver_time_limit_s: float = 20.0
    solver_mip_gap: float = 0.01
    request_sources: tuple[tuple[str, str], ...] = ()
    service_models: tuple[tuple[str, str], ...] = ()
    profiles_path: Path = PROJECT_ROOT / "data" / "profiles" / "v0.csv"
    profile_version: str = "v0"
    history_s: int = 7200
    startup_s: float = 420.0
    auto_approve: bool = False
    cluster_conn_id: str = "wattplan_cluster_default"
    gpu_spool_dir: Path = PROJECT_ROOT / ".wattplan" / "spool" / "gpu"
    telemetry_retention_days: int = 30

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
        settings = cls(
            database_url=env.get("WATTPLAN_DATABASE_URL") or None,
            airflow_database_url=env.get("WATTPLAN_AIRFLOW_DATABASE_URL") or None,
            state_dir=state_dir.resolve(),
            data_dir=data_dir,
            cluster=env.get("WATTPLAN_CLUSTER") or "demo",
            window_s=_int(env, "WATTPLAN_WINDOW_S", 1800),
            ingest_window_s=_int(env, "WATTPLAN_INGEST_WINDOW_S", 300),
            gpu_inventory=_int(env, "WATTPLAN_GPU_INVENTORY", 256),
            gpu_type=env.get("WATTPLAN_GPU_TYPE") or "H100-80GB",
            forecast_quantile=_float(env, "WATTPLAN_FORECAST_QUANTILE", 0.95),
            carbon_zone=env.get("WATTPLAN_CARBON_ZONE") or "US-CAL-CISO",
            solver_time_limit_s=_float(env, "WATTPLAN_SOLVER_TIME_LIMIT_S", 20.0),
            solver_mip_gap=_float(env, "WATTPLAN_SOLVER_MIP_GAP", 0.01),
            request_sources=_pairs(env, "WATTPLAN_REQUEST_SOURCES", default_sources),
            service_models=_pairs(
                env, "WATTPLAN_SERVICE_MODELS", "conversation=llama2-70b;code=llama2-70b"
            ),
            profiles_path=Path(
                env.get("WATTPLAN_PROFILES_PATH") or (data_dir / "profiles" / "v0.csv")
            ).resolve(),
            profile_version=env.get("WATTPLAN_PROFILE_VERSION") or "v0",
            history_s=_int(env, "WATTPLAN_HISTORY_S", 7200),
            startup_s=_float(env, "WATTPLAN_STARTUP_S", 420.0),
            auto_approve=_bool(env, "WATTPLAN_AUTO_APPROVE", False),
            cluster_conn_id=env.get("WATTPLAN_CLUSTER_CONN_ID") or "wattplan_cluster_default",
            gpu_spool_dir=Path(
                env.get("WATTPLAN_GPU_SPOOL_DIR") or (state_dir / "spool" / "gpu")
            ).resolve(),
            telemetry_retention_days=_int(env, "WATTPLAN_TELEMETRY_RETENTION_DAYS", 30),
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
        if self.telemetry_retention_days < 1:
            problems.append("WATTPLAN_TELEMETRY_RETENTION_DAYS must be at least 1")
        if self.startup_s < 0:
            problems.append("WATTPLAN_STARTUP_S must be >= 0")
        services = {name for name, _ in self.request_sources}
        missing = services - {name for name, _ in self.service_models}
        if missing:
            problems.append(
                f"services {sorted(missing)} have no model in WATTPLAN_SERVICE_MODELS "
                "(example: conversation=llama2-70b)"
            )
        if problems:
            raise ConfigError("; ".join(problems))

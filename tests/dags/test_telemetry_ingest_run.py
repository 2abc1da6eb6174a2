"""telemetry_ingest end to end with dag.test(): exact intervals, idempotent re-runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from telemetry.clock_events import ClockChange, ClockEventLog
from telemetry.gpu import spool_file_name
from telemetry.gpu_spool import SPOOL_HEADER, format_spool_line
from wattplan import db
from wattplan.settings import PROJECT_ROOT

END = datetime(2023, 11, 16, 18, 40, tzinfo=UTC)


def _run(run_after: datetime) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / "telemetry_ingest.py"))
    dag_run = bag.get_dag("telemetry_ingest").test(logical_date=run_after)
    assert dag_run.state == DagRunState.SUCCESS


def _snapshot(engine: sa.Engine) -> dict[str, list]:
    queries = {
        "request_logs": "SELECT * FROM request_logs ORDER BY source, line_no",
        "windows": "SELECT * FROM request_type_windows ORDER BY 1, 2, 3, 4",
        "gpu": "SELECT gpu_uuid, sampled_at, energy_mj FROM gpu_telemetry ORDER BY 1, 2",
        "clocks": "SELECT instance_id, changed_at, to_mhz, reason FROM clock_changes ORDER BY 1, 2",
        "instance_windows": "SELECT instance_id, window_start_at, energy_j, mean_power_w"
        " FROM instance_windows ORDER BY 1, 2",
        "runs": "SELECT source_kind, interval_start_at, interval_end_at, rows_read,"
        " rows_loaded, rows_rejected FROM ingest_runs ORDER BY 1, 2",
    }
    with engine.connect() as conn:
        return {k: conn.execute(sa.text(q)).all() for k, q in queries.items()}


def _write_spool(folder: Path) -> None:
    """Two GPUs of one instance sampled every second, 18:30-18:50, at 400 W each, in the
    collector's spool format."""
    folder.mkdir(parents=True)
    first = END - timedelta(minutes=10)
    lines = [SPOOL_HEADER]
    for k in range(20 * 60):
        at = first + timedelta(seconds=k)
        for index in (0, 1):
            record = {
                "gpu_uuid": f"GPU-test-{index}",
                "sampled_at": at,
                "node": "node-a",
                "gpu_index": index,
                "instance_id": "inst-1",
                "energy_mj": 10_000_000 + k * 400_000,
                "power_w": 400.0,
                "sm_clock_mhz": 1980,
                "memory_clock_mhz": 2619,
                "power_limit_w": 700.0,
            }
            lines.append(format_spool_line(record))
    (folder / spool_file_name("node-a", first)).write_text("\n".join(lines) + "\n")


def _write_clock_events(folder: Path) -> None:
    """The clock loop of inst-1 lowers the clock in the interval and raises it again; one
    change falls in the interval before."""
    log = ClockEventLog(folder, "node-a")
    for minutes, to_mhz, reason in ((-7, 1800, "lower"), (-4, 1410, "lower"), (-1, 1980, "raise")):
        log.append(
            ClockChange(
                "inst-1",
                END + timedelta(minutes=minutes),
                "node-a",
                None,
                to_mhz,
                reason,
                "clock-loop",
            )
        )
    log.close()


def test_ingest_dag_loads_exactly_its_interval_and_reruns_change_nothing(
    database_url: str, airflow_db: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WATTPLAN_DATABASE_URL", database_url)
    _write_spool(tmp_path / "spool")
    monkeypatch.setenv("WATTPLAN_GPU_SPOOL_DIR", str(tmp_path / "spool"))
    _write_clock_events(tmp_path / "clock")
    monkeypatch.setenv("WATTPLAN_CLOCK_SPOOL_DIR", str(tmp_path / "clock"))
    with db.connect(database_url) as engine:
        db.upgrade(engine)
        _run(END)
        first = _snapshot(engine)
        _run(END)
        assert _snapshot(engine) == first

        start = END - timedelta(minutes=5)
        arrivals = [row.arrived_at for row in first["request_logs"]]
        assert arrivals and all(start <= t < END for t in arrivals)
        runs = [r for r in first["runs"] if r.source_kind == "request_logs"]
        assert [(r.interval_start_at, r.interval_end_at) for r in runs] == [(start, END)]
        assert runs[0].rows_read == runs[0].rows_loaded + runs[0].rows_rejected
        assert runs[0].rows_loaded == len(arrivals)
        # Every (service, type) gets a window row, quiet ones included.
        assert len(first["windows"]) == 2 * 9

        # GPU samples of exactly the interval; 2 GPUs x 400 W x 300 s = 240 kJ.
        assert len(first["gpu"]) == 2 * 300
        assert all(start <= row.sampled_at < END for row in first["gpu"])
        [window] = first["instance_windows"]
        assert window.energy_j == pytest.approx(2 * 400 * 300)
        assert window.mean_power_w == pytest.approx(800.0)

        # The clock loop's changes of the interval, with their reasons.
        assert [(c.to_mhz, c.reason) for c in first["clocks"]] == [(1410, "lower"), (1980, "raise")]

        # The next interval adds its own rows and leaves the first interval's alone.
        _run(END + timedelta(minutes=5))
        second = _snapshot(engine)
        kept = [r for r in second["request_logs"] if r.arrived_at < END]
        assert kept == first["request_logs"]
        # requests, GPU telemetry and clock changes
        assert len(second["runs"]) == len(first["runs"]) + 3

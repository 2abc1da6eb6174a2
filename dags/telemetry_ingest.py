"""telemetry_ingest: load exactly one data interval of telemetry into PostgreSQL.

Three independent tasks: request logs (Azure CSV / JSONL sources), GPU telemetry (closed
files from the node collectors' spool folder) and clock changes (closed event files of the
cluster agents' clock loop and power guard). Each takes its window from the run's data
interval and calls one job; re-running an interval replaces it, so rows stay identical.
Backfill: ``airflow backfill create --dag-id telemetry_ingest --from-date ... --to-date ...``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, task

from wattplan.timefmt import cron_for_interval

INGEST_WINDOW_S = int(os.environ.get("WATTPLAN_INGEST_WINDOW_S") or 300)


@dag(
    dag_id="telemetry_ingest",
    schedule=CronDataIntervalTimetable(cron_for_interval(INGEST_WINDOW_S), timezone="UTC"),
    start_date=pendulum.datetime(2023, 11, 16, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["wattplan", "telemetry"],
    default_args={"owner": "wattplan", "retries": 2, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
)
def telemetry_ingest() -> None:
    """Ingest one interval: request logs into type windows, GPU samples into instance windows."""

    @task
    def ingest_requests(data_interval_start=None, data_interval_end=None) -> int:  # type: ignore[no-untyped-def]
        from wattplan import jobs
        from wattplan.settings import Settings

        settings = Settings.from_env()
        engine = jobs.engine_for(settings)
        try:
            return jobs.ingest_requests(engine, settings, data_interval_start, data_interval_end)
        finally:
            engine.dispose()

    @task
    def ingest_gpu_telemetry(data_interval_start=None, data_interval_end=None) -> int:  # type: ignore[no-untyped-def]
        from wattplan import jobs
        from wattplan.settings import Settings

        settings = Settings.from_env()
        engine = jobs.engine_for(settings)
        try:
            return jobs.ingest_gpu_telemetry(
                engine, settings, data_interval_start, data_interval_end
            )
        finally:
            engine.dispose()

    @task
    def ingest_clock_changes(data_interval_start=None, data_interval_end=None) -> int:  # type: ignore[no-untyped-def]
        from wattplan import jobs
        from wattplan.settings import Settings

        settings = Settings.from_env()
        engine = jobs.engine_for(settings)
        try:
            return jobs.ingest_clock_changes(
                engine, settings, data_interval_start, data_interval_end
            )
        finally:
            engine.dispose()

    ingest_requests()
    ingest_gpu_telemetry()
    ingest_clock_changes()


telemetry_ingest()

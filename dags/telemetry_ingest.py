"""telemetry_ingest: load exactly one data interval of request logs into PostgreSQL.

Thin adapter: the task takes its window from the run's data interval and calls one job.
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
    """Ingest request logs of one interval and aggregate them into request-type windows."""

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

    ingest_requests()


telemetry_ingest()

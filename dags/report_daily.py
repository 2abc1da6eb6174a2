"""report_daily: refresh the report views, then render the day's plots (PNG + one HTML page).

One run per UTC day. A run whose data interval is ``[D, D+1)`` records the cluster's site
(zone, telemetry window, profile version) from the settings, refreshes the materialized
report views, and renders the plots of the ``days`` days up to and including ``D`` into
``WATTPLAN_REPORTS_DIR/daily/D/``. The last telemetry of a day may land after the run: the
next day's run refreshes and redraws it (each page covers several days).
"""

from __future__ import annotations

from datetime import UTC, timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, task


def _settings_and_engine():  # type: ignore[no-untyped-def]
    from wattplan import jobs
    from wattplan.settings import Settings

    settings = Settings.from_env()
    return settings, jobs.engine_for(settings)


@dag(
    dag_id="report_daily",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2023, 11, 16, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["wattplan", "reports"],
    params={"days": Param(14, type="integer", minimum=1, description="days each page covers")},
    default_args={"owner": "wattplan", "retries": 1, "retry_delay": timedelta(minutes=2)},
    doc_md=__doc__,
)
def report_daily() -> None:
    """Refresh the report views and render the plots."""

    @task
    def refresh_views() -> dict[str, int]:
        from wattplan import reporting

        settings, engine = _settings_and_engine()
        try:
            return reporting.refresh_reports(engine, settings)
        finally:
            engine.dispose()

    @task
    def render_plots(data_interval_start=None, params=None) -> str:  # type: ignore[no-untyped-def]
        from wattplan import reporting

        settings, engine = _settings_and_engine()
        try:
            day = data_interval_start.astimezone(UTC).date()
            page = reporting.render_daily_report(engine, settings, day, int(params["days"]))
        finally:
            engine.dispose()
        return str(page)

    refresh_views() >> render_plots()


report_daily()

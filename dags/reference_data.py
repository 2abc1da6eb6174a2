"""reference_data: load profiles, grid carbon intensity, electricity and GPU prices.

Idempotent upserts from the bundled (or configured) files; daily.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task


@dag(
    dag_id="reference_data",
    schedule="@daily",
    start_date=pendulum.datetime(2023, 11, 16, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["wattplan", "reference"],
    default_args={"owner": "wattplan", "retries": 1, "retry_delay": timedelta(minutes=1)},
    doc_md=__doc__,
)
def reference_data() -> None:
    """Upsert the reference tables the planner reads."""

    @task
    def load_reference_data() -> dict[str, int]:
        from wattplan import jobs
        from wattplan.settings import Settings

        settings = Settings.from_env()
        engine = jobs.engine_for(settings)
        try:
            return jobs.load_reference_data(engine, settings)
        finally:
            engine.dispose()

    load_reference_data()


reference_data()

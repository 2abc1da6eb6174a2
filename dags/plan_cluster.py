"""plan_cluster: forecast -> optimize -> store (proposed) -> approve -> push -> verify -> record.

One run per planning window. A run whose data interval is ``[start, end)`` plans the next
window ``[end, end + window)`` from what was observed up to ``end``; nothing reads the wall
clock. Plan ids derive from (cluster, window, inputs), so a re-run never makes a second plan.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, task

from wattplan.timefmt import cron_for_interval

WINDOW_S = int(os.environ.get("WATTPLAN_WINDOW_S") or 1800)
CLUSTER_CONN_ID = os.environ.get("WATTPLAN_CLUSTER_CONN_ID") or "wattplan_cluster_default"


def _settings_and_engine():  # type: ignore[no-untyped-def]
    from wattplan import jobs
    from wattplan.settings import Settings

    settings = Settings.from_env()
    return settings, jobs.engine_for(settings)


@dag(
    dag_id="plan_cluster",
    schedule=CronDataIntervalTimetable(cron_for_interval(WINDOW_S), timezone="UTC"),
    start_date=pendulum.datetime(2023, 11, 16, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["wattplan", "planning"],
    default_args={"owner": "wattplan", "retries": 2, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
)
def plan_cluster() -> None:
    """Plan the next window's layout and push it once approved."""

    @task
    def forecast_load(data_interval_end=None) -> int:  # type: ignore[no-untyped-def]
        from wattplan import jobs

        settings, engine = _settings_and_engine()
        try:
            return jobs.forecast_load(engine, settings, data_interval_end)
        finally:
            engine.dispose()

    @task
    def propose_plan(data_interval_end=None) -> str:  # type: ignore[no-untyped-def]
        from wattplan import jobs

        settings, engine = _settings_and_engine()
        try:
            return jobs.propose_plan(engine, settings, data_interval_end)
        finally:
            engine.dispose()

    @task.short_circuit
    def approve_plan(plan_id: str, data_interval_end=None) -> bool:  # type: ignore[no-untyped-def]
        from wattplan import jobs

        settings, engine = _settings_and_engine()
        try:
            return jobs.decide_approval(engine, settings, plan_id, data_interval_end)
        finally:
            engine.dispose()

    @task(multiple_outputs=True)
    def push_plan(plan_id: str) -> dict:
        from airflow.sdk.exceptions import AirflowFailException
        from wattplan_executor.codec import layout_to_dict
        from wattplan_executor.exceptions import ClusterPermanentError
        from wattplan_executor.hooks import ServingClusterHook
        from wattplan_executor.operators import push_layout

        from wattplan import jobs

        _, engine = _settings_and_engine()
        try:
            plan, _ = jobs.load_plan(engine, plan_id)
        finally:
            engine.dispose()
        try:
            result = push_layout(ServingClusterHook(CLUSTER_CONN_ID), plan_id, plan.layout)
        except ClusterPermanentError as exc:  # refusals are final: no retry
            raise AirflowFailException(f"plan {plan_id}: {exc}") from exc
        # The sensor accepts a push that had nothing to send when the cluster runs this layout.
        return {**result, "desired": layout_to_dict(plan.layout)}

    @task
    def record_applied(plan_id: str, data_interval_end=None) -> bool:  # type: ignore[no-untyped-def]
        from wattplan_executor.hooks import ServingClusterHook

        from wattplan import jobs

        settings, engine = _settings_and_engine()
        try:
            reported_plan_id, layout = ServingClusterHook(CLUSTER_CONN_ID).get_layout()
            return jobs.record_applied(
                engine, settings, plan_id, reported_plan_id, layout, data_interval_end
            )
        finally:
            engine.dispose()

    from wattplan_executor.operators import PlanAppliedSensor

    plan_id = propose_plan()
    approved = approve_plan(plan_id)
    pushed = push_plan(plan_id)
    applied = PlanAppliedSensor(
        task_id="wait_until_applied",
        plan_id=plan_id,
        serving_cluster_conn_id=CLUSTER_CONN_ID,
        desired=pushed["desired"],
        poke_interval=2,
        timeout=600,
    )
    forecast_load() >> plan_id
    approved >> pushed >> applied >> record_applied(plan_id)


plan_cluster()

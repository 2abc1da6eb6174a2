"""plan_cluster: forecast -> optimize -> store (proposed) -> approve -> push -> verify -> record.

One run per planning window. A run whose data interval is ``[start, end)`` plans the next
window ``[end, end + window)`` from what was observed up to ``end``; nothing reads the wall
clock. Plan ids derive from (cluster, window, inputs), so a re-run never makes a second plan.

Approval: ``decide_approval`` applies the approval policy (``WATTPLAN_AUTO_APPROVE*``,
``WATTPLAN_APPROVAL_*``). A plan the policy approves goes straight to ``record_approval`` and
the push. Otherwise ``approve_plan`` asks a person in the UI's *Required Actions* (a table of
each pool before -> after and the estimated energy, carbon, cost and SLO headroom against the
current layout): *Approve* -> ``record_approval`` -> push; *Reject*, or no answer within
``WATTPLAN_APPROVAL_TIMEOUT_S``, -> ``record_rejection`` and the current layout stays. Every
decision lands in ``plan_approvals``. A plan already applied, superseded by a newer one, or
whose window has passed is skipped; the push checks again right before it sends.

The run's clock: a decision or push at wall time *t* counts as happening at
``data_interval_end + (t - run_after)``. For a scheduled run ``run_after`` is the interval end,
so this is *t*; for a replayed run (``dag.test`` over past data) it maps the time the run took
onto the replayed day, so an approval that came an hour late is late in a replay too.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, task

from wattplan.timefmt import cron_for_interval

WINDOW_S = int(os.environ.get("WATTPLAN_WINDOW_S") or 1800)
CLUSTER_CONN_ID = os.environ.get("WATTPLAN_CLUSTER_CONN_ID") or "wattplan_cluster_default"
APPROVAL_TIMEOUT_S = int(os.environ.get("WATTPLAN_APPROVAL_TIMEOUT_S") or min(900, WINDOW_S))


def _run_clock(data_interval_end, ti, dag_run):  # type: ignore[no-untyped-def]
    """The run's time now (see the module docstring)."""
    elapsed = ti.start_date - (dag_run.run_after or ti.start_date)
    return data_interval_end + max(elapsed, timedelta(0))


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

    @task.branch
    def decide_approval(plan_id: str, data_interval_end=None, ti=None):  # type: ignore[no-untyped-def]
        from wattplan import jobs

        settings, engine = _settings_and_engine()
        try:
            decision = jobs.decide_approval(engine, settings, plan_id, data_interval_end)
        finally:
            engine.dispose()
        if decision.route == "human":
            ti.xcom_push(key="subject", value=decision.subject)
            ti.xcom_push(key="body", value=decision.body)
            return "approve_plan"
        if decision.route == "auto":
            return "record_approval"
        print(f"plan {plan_id} is not pushed: {decision.reason}")
        return None  # skips everything downstream

    @task(trigger_rule="none_failed_min_one_success")
    def record_approval(plan_id: str, ti=None, dag_run=None) -> bool:  # type: ignore[no-untyped-def]
        from airflow.sdk.exceptions import AirflowSkipException
        from wattplan_executor.approval import RESPONSE_KEY

        from wattplan import jobs

        response = ti.xcom_pull(task_ids="approve_plan", key=RESPONSE_KEY)
        _, engine = _settings_and_engine()
        try:
            approved = jobs.record_response(
                engine, plan_id, response, ti.start_date, dag_run.run_id
            )
        finally:
            engine.dispose()
        if not approved:
            raise AirflowSkipException(f"plan {plan_id} is not approved (see plan_approvals)")
        return True

    @task
    def record_rejection(plan_id: str, ti=None, dag_run=None) -> None:  # type: ignore[no-untyped-def]
        from wattplan_executor.approval import RESPONSE_KEY

        from wattplan import jobs

        response = ti.xcom_pull(task_ids="approve_plan", key=RESPONSE_KEY)
        if response is None:  # approve_plan was marked success by hand: an approval
            return
        _, engine = _settings_and_engine()
        try:
            jobs.record_response(engine, plan_id, response, ti.start_date, dag_run.run_id)
        finally:
            engine.dispose()

    @task(multiple_outputs=True)
    def push_plan(plan_id: str, data_interval_end=None, ti=None, dag_run=None) -> dict:  # type: ignore[no-untyped-def]
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
        from wattplan_executor.codec import layout_to_dict
        from wattplan_executor.exceptions import ClusterPermanentError
        from wattplan_executor.hooks import ServingClusterHook
        from wattplan_executor.operators import push_layout

        from wattplan import jobs

        _, engine = _settings_and_engine()
        try:
            why_not = jobs.check_push(engine, plan_id, _run_clock(data_interval_end, ti, dag_run))
            if why_not is not None:
                raise AirflowSkipException(why_not)
            plan, _ = jobs.load_plan(engine, plan_id)
        finally:
            engine.dispose()
        try:
            result = push_layout(
                ServingClusterHook(CLUSTER_CONN_ID),
                plan_id,
                plan.layout,
                jobs.plan_version(plan),
                plan.policy or None,
            )
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

    from wattplan_executor.approval import PlanApprovalOperator
    from wattplan_executor.operators import PlanAppliedSensor

    plan_id = propose_plan()
    decision = decide_approval(plan_id)
    asked = PlanApprovalOperator(
        task_id="approve_plan",
        subject="{{ ti.xcom_pull(task_ids='decide_approval', key='subject') }}",
        body="{{ ti.xcom_pull(task_ids='decide_approval', key='body') }}",
        response_timeout=timedelta(seconds=APPROVAL_TIMEOUT_S),
        on_approve="record_approval",
        on_reject="record_rejection",
    )
    approved = record_approval(plan_id)
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
    decision >> [asked, approved]
    asked >> [approved, record_rejection(plan_id)]
    approved >> pushed >> applied >> record_applied(plan_id)


plan_cluster()

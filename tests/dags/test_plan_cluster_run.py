"""End to end through the real DAGs with dag.test(): reference data, ingest, plan, push."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa

from wattplan.airflow_env import cluster_connection
from wattplan.settings import PROJECT_ROOT

T0 = datetime(2023, 11, 16, 18, 15, tzinfo=UTC)


@pytest.fixture
def loop_env(
    database_url: str, airflow_db: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str]]:
    from agent.server import run_in_thread

    token = "test-token"
    base_url, stop = run_in_thread(cluster="demo", token=token, gpu_capacity=256)
    monkeypatch.setenv("WATTPLAN_DATABASE_URL", database_url)
    monkeypatch.setenv("WATTPLAN_AUTO_APPROVE", "true")
    # The first plan starts a whole fleet: not a "large change" here (no person answers).
    monkeypatch.setenv("WATTPLAN_APPROVAL_LARGE_CHANGE_INSTANCES", "100000")
    monkeypatch.setenv("AIRFLOW_CONN_WATTPLAN_CLUSTER_DEFAULT", cluster_connection(base_url, token))
    from wattplan import db

    with db.connect(database_url) as engine:
        db.upgrade(engine)
    try:
        yield base_url, token
    finally:
        stop()


def _run(dag_id: str, run_after: datetime) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / f"{dag_id}.py"))
    dag_run = bag.get_dag(dag_id).test(logical_date=run_after)
    assert dag_run.state == DagRunState.SUCCESS, f"{dag_id} at {run_after}: {dag_run.state}"


def test_plan_cluster_pushes_an_approved_plan_to_the_agent(
    loop_env: tuple[str, str], database_url: str
) -> None:
    base_url, token = loop_env
    _run("reference_data", datetime(2023, 11, 16, tzinfo=UTC))
    for k in range(1, 4):  # 18:15-18:30 in three 5-minute intervals
        _run("telemetry_ingest", T0 + timedelta(minutes=5 * k))
    window_start = datetime(2023, 11, 16, 18, 30, tzinfo=UTC)
    _run("plan_cluster", window_start)

    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        plans = conn.execute(sa.text("SELECT plan_id, status, window_start_at FROM plans")).all()
        approvals = conn.execute(sa.text("SELECT decided_by, decision FROM plan_approvals")).all()
        items = conn.execute(
            sa.text("SELECT service, request_type, tp, instances FROM plan_items")
        ).all()
        applied = conn.execute(sa.text("SELECT plan_id, gpus FROM applied_cluster_states")).all()
    assert len(plans) == 1
    plan_id, status, planned_start = plans[0]
    assert status == "applied"
    assert planned_start == window_start
    assert approvals == [("policy:auto_approve", "approved")]
    assert items, "the plan serves the observed load with at least one instance"

    layout = httpx.get(
        f"{base_url}/v1/layout", headers={"Authorization": f"Bearer {token}"}, timeout=5
    ).json()
    assert layout["plan_id"] == plan_id
    assert sorted(
        (i["service"], i["request_type"], i["tp"], i["instances"]) for i in layout["items"]
    ) == sorted(items)
    assert applied == [(plan_id, layout["gpus"])]

    # A re-run of the same window makes no second plan and changes nothing on the cluster.
    _run("plan_cluster", window_start)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM plans")).scalar() == 1
        assert conn.execute(sa.text("SELECT status FROM plans")).scalar() == "applied"
    engine.dispose()
    assert os.environ["WATTPLAN_DATABASE_URL"] == database_url

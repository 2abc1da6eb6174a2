"""Fault tests of the plan lifecycle: real dag.test() runs of plan_cluster, real PostgreSQL,
the reference agent over real HTTP on loopback."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

SUCCESS, FAILED, SKIPPED = "success", "failed", "skipped"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_approval_timeout_rejects_the_plan_and_pushes_nothing(
    plan_env: sa.Engine, agents: Any, monkeypatch: pytest.MonkeyPatch, lc: Any
) -> None:
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    base_url = agents()
    lc.connect_cluster(monkeypatch, base_url)
    monkeypatch.setenv("WATTPLAN_APPROVAL_TIMEOUT_S", "2")
    assert lc.load_plan_cluster().get_task("approve_plan").response_timeout.total_seconds() == 2

    # The scheduler enforces the response timeout; dag.test() has no scheduler, so its
    # timeout sweep runs beside the test run, as the scheduler's loop would run it.
    sweeper = SchedulerJobRunner(job=Job())
    stop = False

    def sweep() -> None:
        while not stop:
            sweeper.check_awaiting_input_timeouts()
            time.sleep(0.5)

    background = lc.Background(sweep)
    try:
        dag_run = lc.run_plan_cluster()
    finally:
        stop = True
        background.join()
    states = lc.task_states(dag_run)
    assert str(dag_run.state) == SUCCESS
    assert (states["approve_plan"], states["record_rejection"]) == (SUCCESS, SUCCESS)
    assert states["record_approval"] == states["push_plan"] == SKIPPED
    ((plan_id, status),) = lc.plan_rows(plan_env)
    assert status == "rejected"
    assert lc.approval_rows(plan_env) == [(plan_id, "airflow:timeout", "rejected")]
    assert lc.agent_get(base_url, "/v1/layout")["plan_id"] is None
    assert lc.agent_get(base_url, "/v1/journal")["entries"] == []


def test_agent_down_during_the_push_is_retried_and_the_plan_applied_once(
    plan_env: sa.Engine, agents: Any, monkeypatch: pytest.MonkeyPatch, lc: Any
) -> None:
    monkeypatch.setenv("WATTPLAN_AUTO_APPROVE", "true")
    port = free_port()
    lc.connect_cluster(monkeypatch, f"http://127.0.0.1:{port}", backoff_s=0.5, max_attempts=8)

    def agent_comes_up_late() -> float:
        # Nobody listens on the port until the plan is approved and the push has begun.
        lc.wait_for(lambda: "approved" in [s for _, s in lc.plan_rows(plan_env)])
        time.sleep(2.0)
        agents(port=port)
        return time.time()

    background = lc.Background(agent_comes_up_late)
    dag_run = lc.run_plan_cluster()
    agent_up_at = background.join()
    assert str(dag_run.state) == SUCCESS, lc.task_states(dag_run)
    push = dag_run.get_task_instance("push_plan")
    assert push.try_number == 1  # the hook's own retries carried it, not Airflow's
    assert push.start_date.timestamp() < agent_up_at - 1.0

    ((plan_id, status),) = lc.plan_rows(plan_env)
    assert status == "applied"
    base_url = f"http://127.0.0.1:{port}"
    layout = lc.agent_get(base_url, "/v1/layout")
    assert layout["plan_id"] == plan_id
    journal = lc.agent_get(base_url, "/v1/journal", plan_id=plan_id)["entries"]
    started = sum(item["instances"] for item in layout["items"])
    assert [e["kind"] for e in journal] == ["start"] * started  # each instance started once
    assert len({e["instance_id"] for e in journal}) == started


def test_stale_plan_is_refused_with_409_and_not_applied(
    plan_env: sa.Engine, agents: Any, monkeypatch: pytest.MonkeyPatch, lc: Any
) -> None:
    monkeypatch.setenv("WATTPLAN_AUTO_APPROVE", "true")
    base_url = agents()
    lc.connect_cluster(monkeypatch, base_url)
    # The cluster already took a plan of a later window (a higher version).
    later = int(lc.WINDOW.timestamp()) + 3600
    httpx.post(
        f"{base_url}/v1/plans/later-plan/changes",
        json={"version": later, "base_plan_id": None, "changes": []},
        headers={"Authorization": f"Bearer {lc.TOKEN}"},
    ).raise_for_status()

    dag_run = lc.run_plan_cluster()
    assert str(dag_run.state) == FAILED
    push = dag_run.get_task_instance("push_plan")
    assert (str(push.state), push.try_number) == (FAILED, 1)  # no retry of a refusal
    assert lc.agent_get(base_url, "/v1/layout")["plan_id"] == "later-plan"
    assert lc.agent_get(base_url, "/v1/journal")["entries"] == []
    ((_, status),) = lc.plan_rows(plan_env)
    assert status == "approved"  # approved, never applied


def test_wrong_token_fails_the_push_at_once(
    plan_env: sa.Engine, agents: Any, monkeypatch: pytest.MonkeyPatch, lc: Any
) -> None:
    monkeypatch.setenv("WATTPLAN_AUTO_APPROVE", "true")
    base_url = agents()
    lc.connect_cluster(monkeypatch, base_url, token="not-the-token")
    dag_run = lc.run_plan_cluster()
    push = dag_run.get_task_instance("push_plan")
    assert (str(push.state), push.try_number) == (FAILED, 1)
    assert lc.agent_get(base_url, "/v1/layout")["plan_id"] is None


def test_malformed_plan_is_refused_with_422_and_changes_nothing(
    agents: Any, monkeypatch: pytest.MonkeyPatch, lc: Any
) -> None:
    from wattplan_executor.exceptions import ClusterInvalidError
    from wattplan_executor.hooks import ServingClusterHook

    base_url = agents()
    lc.connect_cluster(monkeypatch, base_url)
    hook = ServingClusterHook(max_attempts=5, sleep=lambda s: pytest.fail("a 422 was retried"))
    good = {
        "service": "chat",
        "request_type": "SS",
        "model": "llama2-70b",
        "gpu_type": "H100-80GB",
        "tp": 4,
        "power_cap_w": 490,
        "clock_mhz": None,
        "instances": 1,
    }
    for bad in ({**good, "tp": 3}, {**good, "instances": -2}, {**good, "gpus": 9}):
        with pytest.raises(ClusterInvalidError, match="HTTP 422"):
            hook.push_changes("p1", None, [good, bad], 1)
    assert lc.agent_get(base_url, "/v1/status")["plan_version"] == 0
    assert lc.agent_get(base_url, "/v1/layout")["gpus"] == 0


def test_duplicate_run_for_one_window_makes_one_plan_and_one_push(
    plan_env: sa.Engine, agents: Any, monkeypatch: pytest.MonkeyPatch, lc: Any
) -> None:
    monkeypatch.setenv("WATTPLAN_AUTO_APPROVE", "true")
    base_url = agents()
    lc.connect_cluster(monkeypatch, base_url)
    first = lc.run_plan_cluster()
    assert str(first.state) == SUCCESS
    journal = lc.agent_get(base_url, "/v1/journal")["entries"]
    assert journal

    second = lc.run_plan_cluster()
    assert str(second.state) == SUCCESS
    states = lc.task_states(second)
    assert states["push_plan"] == states["record_approval"] == SKIPPED
    ((plan_id, status),) = lc.plan_rows(plan_env)
    assert status == "applied"
    assert lc.approval_rows(plan_env) == [(plan_id, "policy:auto_approve", "approved")]
    assert lc.agent_get(base_url, "/v1/journal")["entries"] == journal
    assert lc.agent_get(base_url, "/v1/status")["plan_version"] == int(lc.WINDOW.timestamp())

"""A person answers the approval through Airflow's REST API, against a running api-server.

The api-server runs as its own process on the tests' Airflow metadata database, with a
user and password (SimpleAuthManager), exactly as an operator's script would reach it.
The DAG runs with dag.test() in this process: its approval task parks in
``awaiting_input``, and the api-server's answer resumes it (as the Required Actions page
would). Answers are sent 2 s after the task parks (answering within ~0.3 s of parking was
seen to fail under the scheduler; a few seconds later always worked).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa

USER = "operator"


class AirflowApi:
    """A logged-in client of the api-server's public REST API."""

    def __init__(self, base_url: str, password: str, plans_db_url: str) -> None:
        self.base_url = base_url
        self.plans_db_url = plans_db_url  # what the api-server's plans page reads
        token = httpx.post(
            f"{base_url}/auth/token", json={"username": USER, "password": password}, timeout=10
        )
        token.raise_for_status()
        self.client = httpx.Client(
            base_url=f"{base_url}/api/v2",
            headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            timeout=10,
        )

    def waiting(self, dag_id: str = "plan_cluster") -> list[dict[str, Any]]:
        """Approval requests nobody answered yet ([] while the api-server is too busy)."""
        try:
            response = self.client.get(
                f"/dags/{dag_id}/dagRuns/~/hitlDetails", params={"response_received": "false"}
            )
        except httpx.TransportError:  # a slow answer on a busy machine: poll again
            return []
        response.raise_for_status()
        return list(response.json()["hitl_details"])

    def answer(self, detail: dict[str, Any], option: str) -> dict[str, Any]:
        ti = detail["task_instance"]
        url = (
            f"/dags/{ti['dag_id']}/dagRuns/{quote(ti['dag_run_id'], safe='')}/taskInstances/"
            f"{ti['task_id']}/{ti['map_index']}/hitlDetails"
        )
        for attempt in range(3):
            try:
                response = self.client.patch(
                    url, json={"chosen_options": [option], "params_input": {}}
                )
            except httpx.TransportError:
                if attempt == 2:
                    raise
                time.sleep(2.0)
                continue
            response.raise_for_status()
            return dict(response.json())
        raise AssertionError("unreachable")


def _end_waiting_run(engine_url: str) -> None:
    """If the simulated person failed, fail the parked approval task in the metadata
    database so that dag.test() (which waits for an answer without a timeout) returns."""
    engine = sa.create_engine(engine_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE task_instance SET state = 'failed' "
                    "WHERE task_id = 'approve_plan' AND state = 'awaiting_input'"
                )
            )
    finally:
        engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def api(
    airflow_db: None, server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowApi]:
    """An ``airflow api-server`` process on the tests' metadata database; its plans page
    reads a wattplan database of its own."""
    from wattplan import db

    plans_db = f"wattplan_rest_{secrets.token_hex(6)}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{plans_db}"'))
    plans_db_url = db.with_database(server_url, plans_db)
    with db.connect(plans_db_url) as engine:
        db.upgrade(engine)
    folder = tmp_path_factory.mktemp("api-server")
    password = secrets.token_urlsafe(12)
    (folder / "passwords.json").write_text(json.dumps({USER: password}))
    port = _free_port()
    env = {
        **os.environ,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(folder / "passwords.json"),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "WATTPLAN_DATABASE_URL": plans_db_url,
    }
    airflow = str(Path(sys.executable).with_name("airflow"))
    log_path = folder / "api-server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [airflow, "api-server", "-H", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{base_url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "api-server did not come up in 120 s"
            time.sleep(0.5)
        yield AirflowApi(base_url, password, plans_db_url)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{plans_db}" WITH (FORCE)'))
        admin.dispose()


def _parked(api: AirflowApi, lc: Any) -> dict[str, Any]:
    """The approval request once its task is parked (the request is written a moment
    before the task instance's state turns to ``awaiting_input``: wait for both)."""

    def parked() -> list[dict[str, Any]]:
        return [d for d in api.waiting() if d["task_instance"]["state"] == "awaiting_input"]

    (detail,) = lc.wait_for(parked, timeout_s=180, every_s=0.5)
    assert detail["task_instance"]["task_id"] == "approve_plan"
    time.sleep(2.0)
    return detail


def test_person_approves_through_the_rest_api_and_the_plan_reaches_the_agent(
    api: AirflowApi, plan_env: sa.Engine, agents: Any, monkeypatch: pytest.MonkeyPatch, lc: Any
) -> None:
    base_url = agents()
    lc.connect_cluster(monkeypatch, base_url)  # default policy: a new fleet needs a person

    def operator() -> tuple[dict[str, Any], dict[str, Any]]:
        detail = _parked(api, lc)
        return detail, api.answer(detail, "Approve")

    background = lc.Background(
        operator,
        on_error=lambda: _end_waiting_run(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]),
    )
    dag_run = lc.run_plan_cluster()
    detail, answer = background.join()

    assert detail["options"] == ["Approve", "Reject"] and detail["defaults"] == ["Reject"]
    assert detail["subject"].startswith("Approve plan demo-20231116T1830Z-")
    assert "| pool | now | plan | change |" in detail["body"]
    assert "| GPUs | 0 |" in detail["body"]
    assert (answer["responded_by"]["name"], answer["chosen_options"]) == (USER, ["Approve"])

    assert str(dag_run.state) == "success", lc.task_states(dag_run)
    ((plan_id, status),) = lc.plan_rows(plan_env)
    assert status == "applied"
    assert lc.approval_rows(plan_env) == [(plan_id, USER, "approved")]
    assert lc.agent_get(base_url, "/v1/layout")["plan_id"] == plan_id


def test_plan_superseded_while_waiting_is_not_pushed_even_if_approved_later(
    api: AirflowApi, plan_env: sa.Engine, agents: Any, monkeypatch: pytest.MonkeyPatch, lc: Any
) -> None:
    from wattplan import jobs, store
    from wattplan.settings import Settings

    base_url = agents()
    lc.connect_cluster(monkeypatch, base_url)

    def newer_plan_then_late_approval() -> str:
        detail = _parked(api, lc)
        ((old_id, _),) = lc.plan_rows(plan_env)
        # The next window's plan arrives (as the next run would store it) and is decided.
        old, _ = jobs.load_plan(plan_env, old_id)
        newer = replace(
            old, plan_id="demo-newer", window_start=old.window_start + timedelta(minutes=30)
        )
        with plan_env.begin() as conn:
            store.write_plan(conn, newer, created_at=newer.window_start)
        decision = jobs.decide_approval(
            plan_env, Settings.from_env(), "demo-newer", newer.window_start
        )
        assert decision.route == "human"
        api.answer(detail, "Approve")  # the person answers the old request anyway
        return old_id

    background = lc.Background(
        newer_plan_then_late_approval,
        on_error=lambda: _end_waiting_run(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]),
    )
    dag_run = lc.run_plan_cluster()
    old_id = background.join()

    states = lc.task_states(dag_run)
    assert states["approve_plan"] == "success"
    assert states["record_approval"] == states["push_plan"] == "skipped"
    assert dict(lc.plan_rows(plan_env)) == {old_id: "superseded", "demo-newer": "proposed"}
    assert lc.approval_rows(plan_env) == [(old_id, USER, "approved")]  # recorded, no effect
    assert lc.agent_get(base_url, "/v1/layout")["plan_id"] is None
    assert lc.agent_get(base_url, "/v1/journal")["entries"] == []


def test_plans_page_is_served_by_the_api_server_behind_the_login(api: AirflowApi) -> None:
    from wattplan import db, store
    from wattplan.domain import Layout, Plan, PlanPrediction

    plan = Plan(
        "page-plan-1",
        "demo",
        datetime(2023, 11, 16, 18, 30, tzinfo=UTC),
        1800,
        Layout(),
        PlanPrediction(1.0, 200.0, 10.0, 0, 0.0, 1.0),
    )
    with db.connect(api.plans_db_url) as engine, engine.begin() as conn:
        store.write_plan(conn, plan, created_at=plan.window_start)
    assert httpx.get(f"{api.base_url}/wattplan/", timeout=10).status_code == 401
    page = httpx.get(f"{api.base_url}/wattplan/", headers=api.client.headers, timeout=10)
    assert page.status_code == 200
    assert "page-plan-1" in page.text and '<td class="proposed">proposed</td>' in page.text

"""Fixtures for plan_cluster runs: a fresh wattplan database with reference data and 15
minutes of request telemetry (18:15-18:30 UTC of the bundled Azure trace), agents on
loopback, and a runner that parses the DAG with the test's environment and runs it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from wattplan.settings import PROJECT_ROOT

#: The data interval end of the planned run: the plan is for 18:30-19:00.
WINDOW = datetime(2023, 11, 16, 18, 30, tzinfo=UTC)
TOKEN = "lifecycle-token"


@pytest.fixture
def plan_env(
    database_url: str, airflow_db: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[sa.Engine]:
    """wattplan's database, migrated, with the inputs of the 18:30 plan; default policy."""
    from wattplan import db, jobs
    from wattplan.settings import Settings

    monkeypatch.setenv("WATTPLAN_DATABASE_URL", database_url)
    for name in ("WATTPLAN_AUTO_APPROVE", "WATTPLAN_APPROVAL_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    # A first plan starts a whole fleet; with WATTPLAN_AUTO_APPROVE it must not count as a
    # large change, or the run would wait for a person that no test sends.
    monkeypatch.setenv("WATTPLAN_APPROVAL_LARGE_CHANGE_INSTANCES", "100000")
    with db.connect(database_url) as engine:
        db.upgrade(engine)
        settings = Settings.from_env()
        jobs.load_reference_data(engine, settings)
        start = WINDOW - timedelta(minutes=15)
        while start < WINDOW:
            jobs.ingest_requests(engine, settings, start, start + timedelta(minutes=5))
            start += timedelta(minutes=5)
        yield engine


@pytest.fixture
def agents() -> Iterator[Callable[..., str]]:
    """Start agents on loopback (``port=`` to pick one); all stop at teardown."""
    from agent.server import run_in_thread

    stops: list[Callable[..., None]] = []

    def start(**kwargs: Any) -> str:
        base_url, stop = run_in_thread(
            **{"cluster": "demo", "token": TOKEN, "gpu_capacity": 256, **kwargs}
        )
        stops.append(stop)
        return base_url

    yield start
    for stop in stops:
        stop()


def connect_cluster(
    monkeypatch: pytest.MonkeyPatch, base_url: str, token: str = TOKEN, **extra: Any
) -> None:
    """Point the DAG's cluster Connection at ``base_url`` (fast retries unless ``extra``)."""
    scheme, _, rest = base_url.partition("://")
    host, _, port = rest.partition(":")
    conn = {
        "conn_type": "http",
        "host": host,
        "port": int(port),
        "schema": scheme,
        "password": token,
        "extra": {"backoff_s": 0.2, **extra},
    }
    monkeypatch.setenv("AIRFLOW_CONN_WATTPLAN_CLUSTER_DEFAULT", json.dumps(conn))


def agent_get(base_url: str, path: str, **params: Any) -> Any:
    response = httpx.get(
        f"{base_url}{path}",
        params=params,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )
    response.raise_for_status()
    return response.json()


def load_plan_cluster() -> Any:
    """Parse dags/plan_cluster.py now, so it sees the test's environment."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / "plan_cluster.py"))
    assert bag.import_errors == {}
    return bag.get_dag("plan_cluster")


def run_plan_cluster(logical_date: datetime = WINDOW, **kwargs: Any) -> Any:
    """One ``dag.test()`` of plan_cluster; returns the DagRun (any final state)."""
    return load_plan_cluster().test(logical_date=logical_date, **kwargs)


def task_states(dag_run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def plan_rows(engine: sa.Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [
            (row[0], row[1])
            for row in conn.execute(sa.text("SELECT plan_id, status FROM plans ORDER BY 1"))
        ]


def approval_rows(engine: sa.Engine) -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        return [
            (row[0], row[1], row[2])
            for row in conn.execute(
                sa.text("SELECT plan_id, decided_by, decision FROM plan_approvals ORDER BY 1, 2")
            )
        ]


class Background:
    """Run a function in a thread while dag.test() (which needs the main thread) runs."""

    def __init__(
        self, target: Callable[[], Any], on_error: Callable[[], Any] | None = None
    ) -> None:
        """``on_error`` runs if ``target`` raises: it must let the DAG run end (a run that
        waits for a person would otherwise wait forever), and the error reaches join()."""
        self.result: Any = None
        self.error: BaseException | None = None
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[], Any]) -> None:
        try:
            self.result = target()
        except BaseException as exc:  # reported to the test by join()
            self.error = exc
            if self._on_error is not None:
                self._on_error()

    def join(self, timeout_s: float = 60) -> Any:
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        return self.result


def wait_for(condition: Callable[[], Any], timeout_s: float = 120, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(every_s)


@pytest.fixture
def lc() -> Any:
    """The helpers above (test modules cannot import a conftest under importlib mode)."""
    import sys

    return sys.modules[__name__]

"""Test fixtures: a real PostgreSQL (``WATTPLAN_TEST_DATABASE_URL`` or an embedded server),
a fresh database per test, and Airflow configured on that server before Airflow is imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from wattplan import db
from wattplan.settings import PROJECT_ROOT

_STATE: dict[str, str] = {}


def _admin_engine(url: str) -> sa.Engine:
    return sa.create_engine(url, isolation_level="AUTOCOMMIT")


def _create_database(server_url: str, name: str) -> str:
    engine = _admin_engine(server_url)
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return db.with_database(server_url, name)


def _drop_database(server_url: str, name: str) -> None:
    engine = _admin_engine(server_url)
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def pytest_configure(config: pytest.Config) -> None:
    """Start (or pick) the PostgreSQL server and point Airflow at it before any import."""
    tmp = Path(tempfile.mkdtemp(prefix="wpt-"))
    _STATE["tmp"] = str(tmp)
    server_url = os.environ.get("WATTPLAN_TEST_DATABASE_URL")
    if not server_url:
        server_url = db.start_embedded(tmp / "pg", stop_at_exit=True)
    _STATE["server_url"] = server_url
    airflow_db = f"airflow_test_{uuid.uuid4().hex[:10]}"
    _STATE["airflow_db"] = airflow_db
    airflow_url = _create_database(server_url, airflow_db)
    os.environ.update(
        {
            "AIRFLOW_HOME": str(tmp / "airflow"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_url,
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "WATTPLAN_STATE_DIR": str(tmp / "state"),
        }
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    """Drop the Airflow test database and remove the temporary folder."""
    airflow_settings = sys.modules.get("airflow.settings")
    if airflow_settings is not None and hasattr(airflow_settings, "dispose_orm"):
        airflow_settings.dispose_orm()  # close Airflow's pooled connections before the drop
    if "server_url" in _STATE:
        with contextlib.suppress(sa.exc.OperationalError):
            _drop_database(_STATE["server_url"], _STATE["airflow_db"])
    shutil.rmtree(_STATE.get("tmp", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def server_url() -> str:
    """URL of the PostgreSQL server the tests use."""
    return _STATE["server_url"]


@pytest.fixture
def database_url(server_url: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"wattplan_test_{uuid.uuid4().hex[:12]}"
    url = _create_database(server_url, name)
    try:
        yield url
    finally:
        _drop_database(server_url, name)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """Engine on a fresh database with every migration applied."""
    with db.connect(database_url) as eng:
        db.upgrade(eng)
        yield eng


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Migrate Airflow's metadata database once per session (for ``dag.test()``)."""
    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run(
        [str(airflow), "db", "migrate"], capture_output=True, text=True, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

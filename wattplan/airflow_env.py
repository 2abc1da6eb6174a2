"""Airflow configuration for a local deployment on wattplan's state folder, as environment."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from wattplan.db import DatabaseUrls
from wattplan.settings import PROJECT_ROOT, Settings

API_HOST = "127.0.0.1"
API_PORT = 8080


def _secrets(home: Path) -> dict[str, str]:
    """JWT and API secrets shared by every Airflow component; made once, kept in the state."""
    path = home / "secrets.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    values = {"jwt": secrets.token_hex(32), "api": secrets.token_hex(32)}
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    path.chmod(0o600)
    return values


def cluster_connection(base_url: str, token: str) -> str:
    """Airflow Connection (JSON form) for the serving cluster's agent at ``base_url``."""
    scheme, _, rest = base_url.partition("://")
    host, _, port = rest.rstrip("/").partition(":")
    return json.dumps(
        {
            "conn_type": "http",
            "host": host,
            "port": int(port or 80),
            "schema": scheme,
            "password": token,
        }
    )


def airflow_environment(settings: Settings, urls: DatabaseUrls) -> dict[str, str]:
    """Environment variables that point Airflow at wattplan's DAGs, plugins and database."""
    home = settings.state_dir / "airflow"
    keys = _secrets(home)
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": urls.airflow,
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{API_HOST}:{API_PORT}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt"],
        "AIRFLOW__API__SECRET_KEY": keys["api"],
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "WATTPLAN_DATABASE_URL": urls.wattplan,
        "WATTPLAN_STATE_DIR": str(settings.state_dir),
    }

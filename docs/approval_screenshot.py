"""Take the README's screenshot of a plan waiting for approval in Airflow's UI.

Runs, on a scratch database of the PostgreSQL server at ``--server`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``): reference data and 15 minutes of the
bundled Azure trace are loaded, a reference agent and an ``airflow api-server`` (login
disabled) start on free loopback ports, and ``plan_cluster`` runs for 18:30 UTC with
``dag.test()`` under the default approval policy, so its approval task waits for a person.
While it waits, headless Chromium (``apt-get install -y chromium``) renders the run's
Required Actions page into ``--out``; then the plan is approved through the REST API, the run
finishes, and everything started is stopped and the scratch databases dropped.

    .venv/bin/python docs/approval_screenshot.py --out docs/img/approval.png
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
WINDOW = datetime(2023, 11, 16, 18, 30, tzinfo=UTC)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:  # noqa: PLR0915 - a linear script
    """Parse the arguments, take the screenshot; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "approval.png")
    parser.add_argument("--size", default="1500,1250", help="window size W,H")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        parser.error("no chromium on PATH: apt-get install -y chromium")

    import sqlalchemy as sa

    tmp = Path(tempfile.mkdtemp(prefix="wp-shot-"))
    names = {k: f"wp_shot_{k}_{uuid.uuid4().hex[:8]}" for k in ("wattplan", "airflow")}
    admin = sa.create_engine(args.server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    base = args.server.rsplit("/", 1)[0]
    api_port, token = _port(), secrets.token_urlsafe(12)
    os.environ.update(
        {
            "AIRFLOW_HOME": str(tmp / "airflow"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"{base}/{names['airflow']}",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
            "WATTPLAN_DATABASE_URL": f"{base}/{names['wattplan']}",
            "WATTPLAN_STATE_DIR": str(tmp / "state"),
        }
    )
    procs: list[subprocess.Popen[bytes]] = []
    stop_agent = None
    try:
        from agent.server import run_in_thread
        from wattplan import db, jobs
        from wattplan.airflow_env import cluster_connection
        from wattplan.settings import Settings

        airflow = str(Path(sys.executable).with_name("airflow"))
        subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True)
        settings = Settings.from_env()
        with db.connect(os.environ["WATTPLAN_DATABASE_URL"]) as engine:
            db.upgrade(engine)
            jobs.load_reference_data(engine, settings)
            start = WINDOW - timedelta(minutes=15)
            while start < WINDOW:
                jobs.ingest_requests(engine, settings, start, start + timedelta(minutes=5))
                start += timedelta(minutes=5)
        agent_url, stop_agent = run_in_thread(cluster="demo", token=token, gpu_capacity=256)
        os.environ["AIRFLOW_CONN_WATTPLAN_CLUSTER_DEFAULT"] = cluster_connection(agent_url, token)
        env = {
            **os.environ,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # local screenshot only
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
        }
        log = (tmp / "api-server.log").open("w")
        procs.append(
            subprocess.Popen(
                [airflow, "api-server", "-H", "127.0.0.1", "-p", str(api_port), "-w", "1"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        import httpx

        api = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{api}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
            if time.monotonic() > deadline:
                raise RuntimeError(f"api-server did not start; see {tmp / 'api-server.log'}")

        outcome: dict[str, object] = {}

        def operator() -> None:
            try:
                while True:
                    got = httpx.get(
                        f"{api}/api/v2/dags/plan_cluster/dagRuns/~/hitlDetails",
                        params={"response_received": "false"},
                        timeout=10,
                    ).json()["hitl_details"]
                    if got:
                        break
                    time.sleep(0.5)
                ti = got[0]["task_instance"]
                run_id = quote(ti["dag_run_id"], safe="")
                page = f"{api}/dags/plan_cluster/runs/{run_id}/tasks/approve_plan/required_actions"
                time.sleep(2)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                shot = subprocess.run(
                    [
                        chromium,
                        "--headless=new",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--hide-scrollbars",
                        f"--window-size={args.size}",
                        "--virtual-time-budget=20000",
                        f"--screenshot={args.out}",
                        page,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=180,
                )
                outcome["screenshot"] = (shot.returncode, shot.stderr[-500:], page)
                httpx.patch(
                    f"{api}/api/v2/dags/plan_cluster/dagRuns/{run_id}/taskInstances/"
                    "approve_plan/-1/hitlDetails",
                    json={"chosen_options": ["Approve"], "params_input": {}},
                    timeout=10,
                ).raise_for_status()
            except Exception as exc:  # reported below
                outcome["error"] = repr(exc)

        threading.Thread(target=operator, daemon=True).start()
        from airflow.dag_processing.dagbag import DagBag

        dag = DagBag(dag_folder=str(ROOT / "dags" / "plan_cluster.py")).get_dag("plan_cluster")
        run = dag.test(logical_date=WINDOW)
        print(json.dumps({"run": str(run.state), **{k: str(v) for k, v in outcome.items()}}))
        return 0 if args.out.exists() and "error" not in outcome else 1
    finally:
        if stop_agent is not None:
            stop_agent()
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        from airflow import settings as airflow_settings

        airflow_settings.dispose_orm()
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

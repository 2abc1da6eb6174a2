"""Run Airflow's UI on wattplan's local state: api-server, scheduler and dag-processor as
separate processes with recorded PIDs (``airflow standalone`` orphans its children).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from wattplan import db
from wattplan.airflow_env import API_HOST, API_PORT, airflow_environment
from wattplan.errors import WattplanError
from wattplan.settings import Settings

COMPONENTS = {
    "api-server": ["api-server", "-H", API_HOST, "-p", str(API_PORT), "-w", "1"],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
}


def _run_dir(settings: Settings) -> Path:
    path = settings.state_dir / "airflow" / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids(settings: Settings) -> dict[str, int]:
    found = {}
    for name in COMPONENTS:
        pid_file = _run_dir(settings) / f"{name}.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().strip())
            if _alive(pid):
                found[name] = pid
    return found


def start(settings: Settings) -> int:
    """Start the embedded database (if needed) and the three Airflow components."""
    running = _pids(settings)
    if running:
        print(f"already running: {json.dumps(running)}; `wattplan airflow stop` first")
        return 1
    urls = db.resolve_urls(settings, stop_at_exit=False)
    with db.connect(urls.wattplan) as engine:
        db.upgrade(engine)
    env = dict(os.environ)
    env.update(airflow_environment(settings, urls))
    env.setdefault("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")  # local use only
    airflow = str(Path(sys.executable).with_name("airflow"))
    run_dir = _run_dir(settings)
    with (run_dir / "db-migrate.log").open("w") as log:
        if subprocess.run([airflow, "db", "migrate"], env=env, stdout=log, stderr=log).returncode:
            raise WattplanError(f"airflow db migrate failed; see {run_dir / 'db-migrate.log'}")
    for name, args in COMPONENTS.items():
        log = (run_dir / f"{name}.log").open("a")
        proc = subprocess.Popen(
            [airflow, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        (run_dir / f"{name}.pid").write_text(str(proc.pid))
        print(f"started {name} (pid {proc.pid}, log {run_dir / (name + '.log')})", flush=True)
    url = f"http://{API_HOST}:{API_PORT}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=2):
                print(f"Airflow UI: {url} (login disabled for local use); stop: make airflow-stop")
                return 0
        except OSError:
            time.sleep(1)
    print(f"the api-server did not answer within 90 s; see {run_dir}", file=sys.stderr)
    return 1


def stop(settings: Settings) -> int:
    """Stop the Airflow components (process groups) and the embedded database."""
    for name, pid in _pids(settings).items():
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        print(f"stopped {name} (pid {pid})")
    for pid_file in _run_dir(settings).glob("*.pid"):
        pid_file.unlink()
    if not settings.database_url and db.stop_embedded(db.embedded_pgdata(settings)):
        print("stopped the embedded PostgreSQL")
    return 0


def status(settings: Settings) -> int:
    """Print which components run; exit 0 when all do."""
    running = _pids(settings)
    for name in COMPONENTS:
        print(f"{name}: {'running, pid ' + str(running[name]) if name in running else 'stopped'}")
    return 0 if len(running) == len(COMPONENTS) else 1

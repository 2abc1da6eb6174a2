"""Static checks of the container deployment: docker-compose.yml, the Dockerfile, the init SQL.

No Docker engine runs where the tests run, so these parse the files and check that the
pieces fit together (services, health checks, volumes, shared settings, paths that exist).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
INIT_SQL = ROOT / "docker" / "initdb" / "01-airflow-db.sql"

AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
)
LONG_RUNNING_AIRFLOW = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor")
BUILT_SERVICES = (*AIRFLOW_SERVICES, "cluster-agent")
LONG_RUNNING = ("postgres", *LONG_RUNNING_AIRFLOW, "cluster-agent")
REQUIRED_SERVICES = ("postgres", *BUILT_SERVICES)

AIRFLOW_DB_URL = "postgresql+psycopg2://wattplan:wattplan@postgres:5432/airflow"
WATTPLAN_DB_URL = "postgresql+psycopg2://wattplan:wattplan@postgres:5432/wattplan"
COMMON_AIRFLOW_ENV = {
    "WATTPLAN_DATABASE_URL": WATTPLAN_DB_URL,
    "WATTPLAN_AIRFLOW_DATABASE_URL": AIRFLOW_DB_URL,
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": AIRFLOW_DB_URL,
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_FOLDER": "/opt/wattplan/dags",
    "AIRFLOW__CORE__PLUGINS_FOLDER": "/opt/wattplan/plugins",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://airflow-apiserver:8080/execution/",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
}
#: Settings that every component must share but that come from the caller's environment.
SECRET_ENV_KEYS = ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY")
#: ``${NAME:-default}`` or ``${NAME}``: Compose interpolation of a variable.
INTERPOLATED = re.compile(r"^\$\{[A-Z][A-Z0-9_]*(:?-[^}]*)?\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as stream:
        document = yaml.safe_load(stream)
    assert isinstance(document, dict), "docker-compose.yml must be a mapping"
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile_lines() -> list[str]:
    """Dockerfile instructions, one per entry, with continuation lines joined."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def _commands(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def _published_container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split(":")[-1].split("/")[0]))
    return ports


def _named_volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Named volumes a service mounts, as ``{volume: target}`` (bind mounts excluded)."""
    mounts = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            if entry.get("type", "volume") == "volume":
                mounts[entry["source"]] = entry["target"]
            continue
        source, target = str(entry).split(":")[:2]
        if not source.startswith((".", "/", "~", "$")):
            mounts[source] = target
    return mounts


def _bind_mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Bind mounts a service uses, as ``{host path: (target, mode)}``."""
    mounts = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, str) and entry.startswith("./"):
            source, target, *mode = entry.split(":")
            mounts[source] = (target, mode[0] if mode else "rw")
    return mounts


def test_compose_file_uses_the_compose_spec_without_a_version_key(compose):
    assert "version" not in compose
    assert set(REQUIRED_SERVICES) <= set(compose["services"])


@pytest.mark.parametrize("name", REQUIRED_SERVICES)
def test_every_required_service_is_defined(services, name):
    assert name in services, f"docker-compose.yml lacks the {name} service"


@pytest.mark.parametrize("name", BUILT_SERVICES)
def test_airflow_services_and_agent_build_from_the_project_dockerfile(services, name):
    build = services[name]["build"]
    context = build if isinstance(build, str) else build["context"]
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert context == "."
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE


def test_postgres_runs_the_official_postgres_16_image_and_is_not_built(services):
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "build" not in postgres
    assert _env(postgres) == {
        "POSTGRES_USER": "wattplan",
        "POSTGRES_PASSWORD": "wattplan",
        "POSTGRES_DB": "wattplan",
    }


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_every_long_running_service_has_a_healthcheck_test(services, name):
    healthcheck = services[name].get("healthcheck")
    assert healthcheck, f"{name} has no healthcheck"
    test = healthcheck["test"]
    assert test and test not in (["NONE"], "NONE")
    if isinstance(test, list):
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test must start CMD/CMD-SHELL"
        assert len(test) > 1


@pytest.mark.parametrize(
    ("name", "probe"),
    [
        ("postgres", "pg_isready"),
        ("airflow-apiserver", "http://localhost:8080/api/v2/monitor/health"),
        ("airflow-scheduler", "airflow jobs check --job-type SchedulerJob --local"),
        ("airflow-dag-processor", "airflow jobs check --job-type DagProcessorJob --local"),
        ("cluster-agent", "http://localhost:8765/healthz"),
    ],
)
def test_each_healthcheck_probes_what_its_service_serves(services, name, probe):
    assert probe in _healthcheck_text(services[name])


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("airflow-apiserver", "airflow api-server"),
        ("airflow-scheduler", "airflow scheduler"),
        ("airflow-dag-processor", "airflow dag-processor"),
        ("airflow-init", "airflow db migrate"),
        ("airflow-init", "wattplan db upgrade"),
        (
            "cluster-agent",
            "wattplan agent --host 0.0.0.0 --port 8765 --cluster demo --gpu-capacity 256 "
            "--state-path /var/lib/wattplan-agent/state.json",
        ),
    ],
)
def test_each_service_runs_its_command(services, name, command):
    assert command in _commands(services[name])


def test_airflow_init_runs_once_and_is_not_restarted(services):
    init = services["airflow-init"]
    assert init["restart"] == "no"
    assert "healthcheck" not in init
    assert "airflow-init" not in init.get("depends_on", {}), "airflow-init must not wait on itself"


def test_named_volumes_are_declared_at_top_level_and_all_used(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for service in services.values():
        used |= set(_named_volume_mounts(service))
    assert used, "no service mounts a named volume"
    assert used <= declared, f"mounted but not declared: {sorted(used - declared)}"
    assert declared <= used, f"declared but never mounted: {sorted(declared - used)}"


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("postgres", "/var/lib/postgresql/data"),
        ("airflow-apiserver", "/opt/airflow/logs"),
        ("airflow-scheduler", "/opt/airflow/logs"),
        ("airflow-dag-processor", "/opt/airflow/logs"),
        ("cluster-agent", "/var/lib/wattplan-agent"),
    ],
)
def test_state_that_must_survive_a_restart_lives_on_a_named_volume(services, name, target):
    assert target in _named_volume_mounts(services[name]).values()


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_each_airflow_service_has_the_common_environment(services, name):
    env = _env(services[name])
    for key, value in COMMON_AIRFLOW_ENV.items():
        assert env.get(key) == value, f"{name}: {key}={env.get(key)!r}, expected {value!r}"
    assert 1 <= int(env["AIRFLOW__CORE__PARALLELISM"]) <= 16


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_secrets_come_from_variables_with_development_defaults(services, name):
    env = _env(services[name])
    for key in SECRET_ENV_KEYS:
        assert INTERPOLATED.match(env.get(key, "")), f"{name}: {key} must be ${{VAR:-default}}"


def test_all_airflow_services_share_identical_secrets(services):
    secrets = {
        tuple(_env(services[name])[key] for key in SECRET_ENV_KEYS) for name in AIRFLOW_SERVICES
    }
    assert len(secrets) == 1


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_cluster_connection_points_at_the_agent_with_the_agents_token(services, name):
    raw = _env(services[name])["AIRFLOW_CONN_WATTPLAN_CLUSTER_DEFAULT"]
    conn = json.loads(raw)
    assert conn["conn_type"] == "http"
    assert conn["host"] == "cluster-agent"
    assert int(conn["port"]) == 8765
    assert conn["password"] == _env(services["cluster-agent"])["WATTPLAN_AGENT_TOKEN"]
    assert INTERPOLATED.match(conn["password"])


@pytest.mark.parametrize("name", LONG_RUNNING_AIRFLOW)
def test_airflow_services_wait_for_healthy_postgres_and_completed_init(services, name):
    depends_on = services[name]["depends_on"]
    assert depends_on["postgres"]["condition"] == "service_healthy"
    assert depends_on["airflow-init"]["condition"] == "service_completed_successfully"


def test_airflow_init_waits_for_healthy_postgres(services):
    assert services["airflow-init"]["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", LONG_RUNNING_AIRFLOW)
def test_dags_and_plugins_are_mounted_read_only_where_airflow_looks(services, name):
    binds = _bind_mounts(services[name])
    env = _env(services[name])
    assert binds["./dags"] == (env["AIRFLOW__CORE__DAGS_FOLDER"], "ro")
    assert binds["./plugins"] == (env["AIRFLOW__CORE__PLUGINS_FOLDER"], "ro")
    for source in binds:
        assert (ROOT / source).is_dir(), f"{name} mounts missing folder {source}"


@pytest.mark.parametrize(("name", "port"), [("airflow-apiserver", 8080), ("cluster-agent", 8765)])
def test_api_server_and_agent_ports_are_published(services, name, port):
    assert port in _published_container_ports(services[name])


def test_agent_token_comes_from_a_variable(services):
    assert INTERPOLATED.match(_env(services["cluster-agent"])["WATTPLAN_AGENT_TOKEN"])


def test_postgres_init_script_creates_the_airflow_database(services):
    binds = _bind_mounts(services["postgres"])
    assert binds["./docker/initdb"][0] == "/docker-entrypoint-initdb.d"
    sql = INIT_SQL.read_text(encoding="utf-8")
    statements = [s.strip() for s in re.sub(r"--[^\n]*", "", sql).split(";") if s.strip()]
    assert any(re.fullmatch(r"(?i)create\s+database\s+\"?airflow\"?", s) for s in statements)


def test_dockerfile_starts_from_python_311_slim(dockerfile_lines):
    assert dockerfile_lines[0] == "FROM python:3.11-slim"


def test_dockerfile_installs_the_project_editable_with_the_pinned_constraints(dockerfile_lines):
    runs = [line for line in dockerfile_lines if line.startswith("RUN ")]
    project_installs = [line for line in runs if re.search(r"pip install .*-e \.(\s|$)", line)]
    assert project_installs, "the project must be installed editable (pip install -e .)"
    assert all("-c constraints.txt" in line for line in project_installs)
    for line in runs:
        if re.search(r"pip install .*-r ", line):
            assert "-c constraints.txt" in line, "every dependency install must be pinned"


def test_dockerfile_installs_from_opt_wattplan_so_project_root_is_there(dockerfile_lines):
    workdirs = [line.split(None, 1)[1] for line in dockerfile_lines if line.startswith("WORKDIR ")]
    assert workdirs and workdirs[-1] == "/opt/wattplan"


def test_dockerfile_runs_as_the_non_root_airflow_user(dockerfile_lines):
    assert any(
        "useradd" in line and "--uid 50000" in line and "airflow" in line
        for line in dockerfile_lines
    )
    users = [line.split(None, 1)[1] for line in dockerfile_lines if line.startswith("USER ")]
    assert users and users[-1] == "airflow"
    assert any(
        "AIRFLOW_HOME=/opt/airflow" in line for line in dockerfile_lines if line.startswith("ENV ")
    )


def test_every_path_the_dockerfile_copies_exists_in_the_repo(dockerfile_lines):
    sources = []
    for line in dockerfile_lines:
        if line.startswith("COPY "):
            args = [a for a in line.split()[1:] if not a.startswith("--")]
            sources += args[:-1]
    assert sources, "the Dockerfile copies nothing"
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"the Dockerfile copies paths that do not exist: {missing}"
    for folder in ("wattplan", "sql", "data", "dags", "plugins"):
        assert f"{folder}/" in sources, f"the Dockerfile does not copy {folder}/"


def test_every_packaged_module_is_copied_into_the_image(dockerfile_lines):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = pyproject["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    copied = " ".join(line for line in dockerfile_lines if line.startswith("COPY "))
    assert setuptools["packages"], "pyproject lists no packages"
    for package in setuptools["packages"]:
        folder = package_dir.get(package, package).split("/")[0]
        assert f" {folder}/" in copied, f"pyproject packages {package} but the image lacks it"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    entries = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    for entry in (".venv", ".wattplan", ".git"):
        assert entry in entries
    assert entries & {"__pycache__", "**/__pycache__"}

"""Every DAG file imports cleanly and quickly; every DAG has tags, retries and a schedule."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

from wattplan.settings import PROJECT_ROOT

DAG_FILES = sorted((PROJECT_ROOT / "dags").glob("*.py"))


@pytest.fixture(scope="module")
def dagbag(airflow_db: None) -> DagBag:
    return DagBag(dag_folder=str(PROJECT_ROOT / "dags"))


def test_every_dag_file_imports_without_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}
    assert {"telemetry_ingest", "plan_cluster", "reference_data"} <= set(dagbag.dag_ids)


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: Path(p).name)
def test_dag_file_parses_quickly(path: Path) -> None:
    started = time.perf_counter()
    bag = DagBag(dag_folder=str(path))
    took = time.perf_counter() - started
    assert bag.import_errors == {}
    assert took < 5.0, f"{path.name} took {took:.1f} s to parse: keep top-level imports light"


def test_every_dag_has_tags_retries_and_an_explicit_schedule(dagbag: DagBag) -> None:
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert "wattplan" in dag.tags
        assert dag.schedule is not None, f"{dag_id} has no explicit schedule"
        for task in dag.tasks:
            assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


def test_dag_files_do_not_import_heavy_modules_at_top_level() -> None:
    heavy = ("pyomo", "statsmodels", "pandas", "optimizer", "forecasting", "wattplan.jobs")
    for path in DAG_FILES:
        top_level = [
            line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))
        ]
        for line in top_level:
            assert not any(name in line for name in heavy), f"{path.name}: {line}"


def test_plan_cluster_runs_one_at_a_time(dagbag: DagBag) -> None:
    assert dagbag.get_dag("plan_cluster").max_active_runs == 1

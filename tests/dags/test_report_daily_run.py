"""report_daily end to end with dag.test(): the views are refreshed from the data in
PostgreSQL and the day's plots land in WATTPLAN_REPORTS_DIR as valid PNGs and one page."""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa

from wattplan import db
from wattplan.settings import PROJECT_ROOT


def _plots_test_module() -> ModuleType:
    """The sample data and PNG checks of tests/wattplan/test_report_plots.py."""
    path = Path(__file__).parents[1] / "wattplan" / "test_report_plots.py"
    spec = importlib.util.spec_from_file_location("report_plots_sample", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_daily_refreshes_the_views_and_renders_the_day(
    database_url: str, airflow_db: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    sample = _plots_test_module()
    with db.connect(database_url) as engine:
        db.upgrade(engine)
        with engine.begin() as conn:
            sample.write_sample_days(conn, days=2)
    for key, value in {
        "WATTPLAN_DATABASE_URL": database_url,
        "WATTPLAN_CLUSTER": sample.CLUSTER,
        "WATTPLAN_CARBON_ZONE": sample.ZONE,
        "WATTPLAN_INGEST_WINDOW_S": "300",
        "WATTPLAN_REPORTS_DIR": str(tmp_path / "reports"),
    }.items():
        monkeypatch.setenv(key, value)

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / "report_daily.py"))
    assert bag.import_errors == {}
    day = sample.DAY0 + timedelta(days=1)
    run_after = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
    dag_run = bag.get_dag("report_daily").test(logical_date=run_after)
    assert dag_run.state == DagRunState.SUCCESS

    folder = tmp_path / "reports" / "daily" / f"{day:%Y-%m-%d}"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([*sample.report_plots.PLOTS, "index.html"])
    for name in sample.report_plots.PLOTS:
        sample.assert_png_with_content((folder / name).read_bytes(), name)
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            site = conn.execute(sa.text("SELECT cluster, zone, window_s FROM cluster_sites")).all()
            days = conn.execute(
                sa.text("SELECT count(DISTINCT day) FROM report_slot_windows WHERE cluster = :c"),
                {"c": sample.CLUSTER},
            ).scalar()
    finally:
        engine.dispose()
    assert site == [(sample.CLUSTER, sample.ZONE, 300)]
    assert days == 2

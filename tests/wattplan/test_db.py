"""Migrations against a real PostgreSQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from wattplan import db
from wattplan.errors import MigrationError

EXPECTED_TABLES = {
    "request_logs",
    "request_type_windows",
    "gpu_telemetry",
    "load_forecasts",
    "profiles",
    "plans",
    "plan_items",
    "plan_approvals",
    "applied_cluster_states",
    "reconfiguration_events",
    "grid_carbon_intensities",
    "electricity_prices",
    "gpu_prices",
    "rejected_rows",
    "schema_migrations",
}


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_creates_the_first_schema_and_records_it(database_url: str) -> None:
    with db.connect(database_url) as engine:
        applied = db.upgrade(engine)
        assert applied == [m.name for m in db.discover_migrations()]
        assert _tables(engine) >= EXPECTED_TABLES
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT version, checksum FROM schema_migrations")).all()
        assert [r.version for r in rows] == list(range(1, len(applied) + 1))


def test_second_upgrade_is_a_noop(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT * FROM schema_migrations ORDER BY version")).all()
    assert db.upgrade(engine) == []
    with engine.connect() as conn:
        after = conn.execute(sa.text("SELECT * FROM schema_migrations ORDER BY version")).all()
    assert before == after


def test_edited_applied_migration_is_refused(engine: sa.Engine, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(db.SQL_DIR, sql_dir)
    first = sorted(sql_dir.glob("001_*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        db.upgrade(engine, sql_dir)


def test_new_migration_is_applied_once(engine: sa.Engine, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(db.SQL_DIR, sql_dir)
    version = len(db.discover_migrations()) + 1
    (sql_dir / f"{version:03d}_add_notes.sql").write_text(
        "CREATE TABLE IF NOT EXISTS notes (note_id integer PRIMARY KEY);"
    )
    assert db.upgrade(engine, sql_dir) == [f"{version:03d}_add_notes.sql"]
    assert db.upgrade(engine, sql_dir) == []
    assert "notes" in _tables(engine)


def test_gap_in_migration_numbers_is_refused(tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("SELECT 1;")
    (tmp_path / "003_c.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="expected 002"):
        db.discover_migrations(tmp_path)


def test_badly_named_migration_is_refused(tmp_path: Path) -> None:
    (tmp_path / "1-init.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="NNN_lower_snake"):
        db.discover_migrations(tmp_path)


def test_failed_migration_leaves_nothing_behind(engine: sa.Engine, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(db.SQL_DIR, sql_dir)
    version = len(db.discover_migrations()) + 1
    (sql_dir / f"{version:03d}_broken.sql").write_text(
        "CREATE TABLE half_done (x integer); SELECT no_such_column FROM half_done;"
    )
    with pytest.raises(MigrationError, match=f"{version:03d}_broken.sql failed"):
        db.upgrade(engine, sql_dir)
    assert "half_done" not in _tables(engine)
    with engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT max(version) FROM schema_migrations")).scalar()
    assert versions == version - 1

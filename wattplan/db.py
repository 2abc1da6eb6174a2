"""The database edge: connection URLs, the embedded PostgreSQL, and migrations.

Only this module (and the writers in ``wattplan.store``) open connections; the optimizer,
forecasting and telemetry parsing never do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from wattplan.errors import DatabaseError, MigrationError
from wattplan.settings import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)

SQL_DIR = PROJECT_ROOT / "sql"
WATTPLAN_DB = "wattplan"
AIRFLOW_DB = "airflow"
_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
#: Arbitrary constant key for pg_advisory_xact_lock so two migrators never interleave.
_MIGRATION_LOCK_KEY = 7_263_001


@dataclass(frozen=True)
class DatabaseUrls:
    """Where wattplan's and Airflow's databases live."""

    wattplan: str
    airflow: str
    embedded_pgdata: Path | None = None


def embedded_pgdata(settings: Settings) -> Path:
    """Data folder of the embedded PostgreSQL."""
    return settings.state_dir / "pgdata"


def start_embedded(pgdata: Path, *, stop_at_exit: bool) -> str:
    """Start (or attach to) the embedded PostgreSQL in ``pgdata`` and return its server URL.

    Args:
        pgdata: Data folder; created and initialised on first use.
        stop_at_exit: Stop the server when this process exits (unless another process still
            holds it); ``False`` leaves it running for ``wattplan db stop``.
    """
    pgserver = _import_pgserver()
    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop" if stop_at_exit else None)
    except Exception as exc:  # pgserver raises plain subprocess errors
        raise DatabaseError(
            f"could not start the embedded PostgreSQL in {pgdata} ({exc}); see {pgdata}/log "
            "or set WATTPLAN_DATABASE_URL to an existing server"
        ) from exc
    return str(server.get_uri())


def _import_pgserver():  # type: ignore[no-untyped-def]
    """Import pgserver (heavy; only when no external database is configured)."""
    # pgserver (platformdirs) warns when XDG_RUNTIME_DIR is unset; give it a private one.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(tempfile.gettempdir()) / f"wattplan-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        runtime.chmod(0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    import pgserver

    return pgserver


def stop_embedded(pgdata: Path) -> bool:
    """Stop the embedded PostgreSQL in ``pgdata``; return whether one was running."""
    if not (pgdata / "postmaster.pid").exists():
        return False
    pgserver = _import_pgserver()
    pgserver.get_server(pgdata, cleanup_mode="stop").cleanup()
    return True


def with_database(url: str, database: str) -> str:
    """Return ``url`` pointing at another database on the same server."""
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def ensure_database(server_url: str, database: str) -> None:
    """Create ``database`` on the server of ``server_url`` unless it exists."""
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": database}
            ).scalar()
            if not exists:
                conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
                log.info("created database %s", database)
    except sa.exc.OperationalError as exc:
        raise DatabaseError(f"cannot reach PostgreSQL at {_safe(server_url)}: {exc.orig}") from exc
    finally:
        engine.dispose()


def resolve_urls(settings: Settings, *, stop_at_exit: bool = True) -> DatabaseUrls:
    """Resolve (and where needed start and create) wattplan's and Airflow's databases.

    With ``WATTPLAN_DATABASE_URL`` unset, starts the embedded server in the state folder and
    uses databases ``wattplan`` and ``airflow`` on it. Airflow's database defaults to one
    named ``airflow`` on the same server as wattplan's.
    """
    pgdata: Path | None = None
    if settings.database_url:
        wattplan_url = settings.database_url
    else:
        pgdata = embedded_pgdata(settings)
        server_url = start_embedded(pgdata, stop_at_exit=stop_at_exit)
        wattplan_url = with_database(server_url, WATTPLAN_DB)
        ensure_database(server_url, WATTPLAN_DB)
    airflow_url = settings.airflow_database_url or with_database(wattplan_url, AIRFLOW_DB)
    if not settings.airflow_database_url:
        ensure_database(wattplan_url, AIRFLOW_DB)
    return DatabaseUrls(wattplan=wattplan_url, airflow=airflow_url, embedded_pgdata=pgdata)


def create_engine(url: str) -> Engine:
    """SQLAlchemy engine with the project's defaults (psycopg 3 driver for plain URLs)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed, pool_pre_ping=True)


@contextmanager
def connect(url: str) -> Iterator[Engine]:
    """Engine for ``url`` that is disposed on exit."""
    engine = create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text, stored when it is applied."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover_migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    """Read ``NNN_name.sql`` files in version order; reject gaps, duplicates and odd names."""
    migrations = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path} is not named NNN_lower_snake.sql")
        migrations.append(Migration(int(match.group(1)), path.name, path.read_text()))
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migration {migration.name} has version {migration.version}, expected "
                f"{expected:03d}: versions must run 001, 002, ... without gaps or repeats"
            )
    return migrations


def upgrade(engine: Engine, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply pending migrations in order, all in one transaction under an advisory lock.

    Returns the names applied (empty when the schema is current). Raises
    :class:`MigrationError` when an applied file was edited afterwards.
    """
    migrations = discover_migrations(sql_dir)
    applied_now = []
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        conn.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        done = {
            row.version: row
            for row in conn.execute(
                sa.text("SELECT version, name, checksum FROM schema_migrations")
            )
        }
        for migration in migrations:
            previous = done.get(migration.version)
            if previous is not None:
                if previous.checksum != migration.checksum:
                    raise MigrationError(
                        f"{migration.name} changed after it was applied (checksum "
                        f"{previous.checksum[:12]} in the database, {migration.checksum[:12]} on "
                        "disk): add a new numbered migration instead of editing an applied one"
                    )
                continue
            log.info("applying migration %s", migration.name)
            # Straight to the driver without parameters, so a literal % in the SQL (format()
            # in a DO block) is not taken for a placeholder; same transaction as `conn`.
            try:
                with conn.connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
                    cursor.execute(migration.sql)
            except Exception as exc:  # the driver's own error types (psycopg or psycopg2)
                raise MigrationError(
                    f"migration {migration.name} failed and nothing was applied: {exc}"
                ) from exc
            conn.execute(
                sa.text(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (:v, :n, :c)"
                ),
                {"v": migration.version, "n": migration.name, "c": migration.checksum},
            )
            applied_now.append(migration.name)
    return applied_now


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)

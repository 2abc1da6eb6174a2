"""The report views at run time: refreshing them, the read-only role for BI tools, and the
daily report job (refresh, then plots) that the ``report_daily`` DAG and ``wattplan report``
call.

The views themselves are SQL (``sql/007_reports.sql``; rules in ``docs/reports.md``). Two of
them are materialized and hold the per-window work; :func:`refresh_report_views` brings them
up to date, the plain views follow.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from wattplan import store
from wattplan.errors import ConfigError, DatabaseError, InputDataError
from wattplan.settings import Settings

log = logging.getLogger(__name__)

#: Materialized report views, in the order they must be refreshed (the second reads the first).
MATERIALIZED_VIEWS: tuple[str, ...] = ("report_slot_windows", "report_pool_windows")
#: Name of the read-only role ``wattplan report grant-role`` creates by default.
DEFAULT_REPORT_ROLE = "wattplan_report"
#: Sub-folder of the reports folder that holds one folder of plots per reported day.
DAILY_FOLDER = "daily"
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def report_relations(conn: Connection) -> list[str]:
    """Names of the report views (plain and materialized) in the current schema, sorted."""
    return list(
        conn.execute(
            sa.text(
                "SELECT c.relname FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = current_schema() AND c.relkind IN ('v', 'm')"
                " AND c.relname LIKE 'report\\_%' ORDER BY c.relname"
            )
        ).scalars()
    )


def write_cluster_site(conn: Connection, settings: Settings) -> None:
    """Record this deployment's cluster for the views: its zone, window and profile version.

    Raises:
        ConfigError: the telemetry window does not divide an hour (the views bin by hour).
    """
    if settings.ingest_window_s <= 0 or 3600 % settings.ingest_window_s:
        raise ConfigError(
            f"WATTPLAN_INGEST_WINDOW_S={settings.ingest_window_s} must divide 3600 for the "
            "hourly reports (e.g. 300)"
        )
    store.write_cluster_site(
        conn,
        settings.cluster,
        settings.carbon_zone,
        settings.ingest_window_s,
        settings.profile_version,
    )


def refresh_report_views(conn: Connection) -> list[str]:
    """Refresh the materialized report views in dependency order; return their names.

    A populated view is refreshed ``CONCURRENTLY`` (readers keep the old rows meanwhile).
    """
    populated = {
        str(row[0]): bool(row[1])
        for row in conn.execute(
            sa.text(
                "SELECT matviewname, ispopulated FROM pg_matviews"
                " WHERE schemaname = current_schema() AND matviewname = ANY(:names)"
            ),
            {"names": list(MATERIALIZED_VIEWS)},
        )
    }
    missing = [name for name in MATERIALIZED_VIEWS if name not in populated]
    if missing:
        raise DatabaseError(
            f"materialized views {missing} are missing: run `wattplan db upgrade` first"
        )
    quote = conn.dialect.identifier_preparer.quote
    # The planner cannot estimate the generated window grid and the layouts' JSON items, so
    # its cost runs into the millions: on three days of sample data (PostgreSQL 15) JIT
    # compilation took 6.9 s of the 7.2 s the slot view's query ran (EXPLAIN ANALYZE).
    conn.execute(sa.text("SET LOCAL jit = off"))
    for name in MATERIALIZED_VIEWS:
        mode = " CONCURRENTLY" if populated[name] else ""
        conn.execute(sa.text(f"REFRESH MATERIALIZED VIEW{mode} {quote(name)}"))
        log.info("refreshed %s", name)
    return list(MATERIALIZED_VIEWS)


@dataclass(frozen=True)
class RoleGrant:
    """What :func:`grant_report_role` did."""

    role: str
    created: bool
    relations: tuple[str, ...]


def grant_report_role(conn: Connection, role: str = DEFAULT_REPORT_ROLE) -> RoleGrant:
    """Create (NOLOGIN, if missing) a role that may read the report views and nothing else.

    Grants CONNECT on the database, USAGE on the schema and SELECT on every ``report_*``
    view; revokes whatever else the role held on the schema's tables. Re-run it after a
    migration adds report views. Log in through a login role that is a member, e.g.
    ``CREATE ROLE grafana LOGIN PASSWORD '...' IN ROLE wattplan_report``.

    Raises:
        ConfigError: ``role`` is not a plain lower-case SQL identifier.
        DatabaseError: the connected user may not create roles or grant.
    """
    if not _ROLE_NAME.fullmatch(role):
        raise ConfigError(
            f"role name {role!r} must be lower-case letters, digits and _ (e.g. wattplan_report)"
        )
    quote = conn.dialect.identifier_preparer.quote
    exists = conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
    database, schema = conn.execute(sa.text("SELECT current_database(), current_schema()")).one()
    relations = report_relations(conn)
    if not relations:
        raise DatabaseError("no report_* views in this database: run `wattplan db upgrade` first")
    statements = [] if exists else [f"CREATE ROLE {quote(role)} NOLOGIN"]
    statements += [
        f"GRANT CONNECT ON DATABASE {quote(database)} TO {quote(role)}",
        f"GRANT USAGE ON SCHEMA {quote(schema)} TO {quote(role)}",
        f"REVOKE CREATE ON SCHEMA {quote(schema)} FROM {quote(role)}",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {quote(schema)} FROM {quote(role)}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {quote(schema)} FROM {quote(role)}",
        # BI queries on the plain views over the window grid: JIT costs seconds, saves nothing
        f"ALTER ROLE {quote(role)} SET jit = off",
    ]
    statements += [f"GRANT SELECT ON {quote(name)} TO {quote(role)}" for name in relations]
    try:
        with conn.begin_nested():
            for statement in statements:
                conn.execute(sa.text(statement))
    except sa.exc.ProgrammingError as exc:
        raise DatabaseError(
            f"could not set up role {role!r} ({exc.orig}): connect as a user with CREATEROLE "
            "who owns the report views, or create the role yourself and re-run"
        ) from exc
    return RoleGrant(role, not exists, tuple(relations))


# --- jobs -----------------------------------------------------------------------------------


def refresh_reports(engine: Engine, settings: Settings) -> dict[str, int]:
    """Record the cluster's site and refresh the materialized views (one transaction).

    Returns:
        Rows per materialized view after the refresh.
    """
    with engine.begin() as conn:
        write_cluster_site(conn, settings)
        names = refresh_report_views(conn)
        quote = conn.dialect.identifier_preparer.quote
        counts = {
            name: int(conn.execute(sa.text(f"SELECT count(*) FROM {quote(name)}")).scalar_one())
            for name in names
        }
    log.info("report views refreshed: %s", counts)
    return counts


def daily_folder(settings: Settings, day: date) -> Path:
    """Folder of the plots reported for ``day``."""
    return settings.reports_dir / DAILY_FOLDER / f"{day:%Y-%m-%d}"


def latest_daily_folder(settings: Settings) -> Path | None:
    """The newest day's plot folder that holds a rendered page, or None."""
    root = settings.reports_dir / DAILY_FOLDER
    folders = sorted(p.parent for p in root.glob("*/index.html")) if root.is_dir() else []
    return folders[-1] if folders else None


def last_reported_day(engine: Engine, settings: Settings) -> date:
    """The last UTC day with report rows for the cluster (after a refresh).

    Raises:
        InputDataError: the views hold nothing for the cluster yet.
    """
    with engine.connect() as conn:
        day = conn.execute(
            sa.text("SELECT max(day) FROM report_slot_windows WHERE cluster = :c"),
            {"c": settings.cluster},
        ).scalar()
    if day is None:
        raise InputDataError(
            f"the report views hold nothing for cluster {settings.cluster!r}: ingest telemetry "
            "and apply a plan first (`wattplan demo`), then `wattplan report refresh`"
        )
    return day  # type: ignore[no-any-return]


def render_daily_report(engine: Engine, settings: Settings, day: date, days: int = 14) -> Path:
    """Render the plots and the HTML page for the ``days`` days up to and including ``day``.

    Reads the report views as they are (refresh first); writes into
    :func:`daily_folder`. Returns the HTML page's path.
    """
    from wattplan import report_plots  # matplotlib: only when rendering

    if days < 1:
        raise ConfigError(f"days={days} must be at least 1")
    end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
    start = end - timedelta(days=days)
    with engine.connect() as conn:
        data = report_plots.read_report_data(conn, settings.cluster, start, end)
    rendered = report_plots.render_report(data, daily_folder(settings, day))
    log.info("report for %s: %s", day, ", ".join(str(p) for p in rendered.files))
    return rendered.html

"""Bulk loading with PostgreSQL COPY (psycopg 3), inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Connection

from telemetry.lines import RejectedRow


@dataclass(frozen=True)
class IngestResult:
    """Row accounting of one ingest run: ``rows_read == rows_loaded + rows_rejected``."""

    rows_read: int
    rows_loaded: int
    rows_rejected: int
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rows_read != self.rows_loaded + self.rows_rejected:
            raise ValueError(
                f"row accounting broken: read {self.rows_read} != loaded {self.rows_loaded} "
                f"+ rejected {self.rows_rejected}"
            )

    def __add__(self, other: IngestResult) -> IngestResult:
        return IngestResult(
            self.rows_read + other.rows_read,
            self.rows_loaded + other.rows_loaded,
            self.rows_rejected + other.rows_rejected,
            self.files + other.files,
        )


def copy_rows(
    conn: Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> int:
    """COPY ``rows`` into ``table`` (``columns`` in order) in the connection's transaction.

    Returns the number of rows written. Values are adapted by psycopg (None -> NULL).
    """
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    )
    raw = conn.connection.dbapi_connection
    if not isinstance(raw, psycopg.Connection):
        raise TypeError(
            f"copy_rows needs the psycopg (3) driver, not {type(raw).__name__}: create the "
            "engine with wattplan.db.create_engine or a postgresql+psycopg:// URL"
        )
    count = 0
    with raw.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def upsert_rejected_rows(
    conn: Connection, rejected: Sequence[RejectedRow], source_kind: str
) -> int:
    """Upsert rejected lines into ``rejected_rows`` keyed by (source, line_no).

    Staged with COPY in a temporary table, then one ``INSERT ... ON CONFLICT DO UPDATE``;
    in the caller's transaction. Returns the number of rows written.
    """
    if not rejected:
        return 0
    conn.execute(
        sa.text(
            "CREATE TEMP TABLE IF NOT EXISTS wattplan_rejects_stage (source text, line_no"
            " integer, raw text, reason text, source_kind text) ON COMMIT DROP"
        )
    )
    conn.execute(sa.text("DELETE FROM wattplan_rejects_stage"))
    copy_rows(
        conn,
        "wattplan_rejects_stage",
        ("source", "line_no", "raw", "reason", "source_kind"),
        ((r.source, r.line_no, r.raw, r.reason, source_kind) for r in rejected),
    )
    conn.execute(
        sa.text(
            "INSERT INTO rejected_rows (source, line_no, raw, reason, source_kind)"
            " SELECT DISTINCT ON (source, line_no) source, line_no, raw, reason, source_kind"
            " FROM wattplan_rejects_stage ORDER BY source, line_no"
            " ON CONFLICT (source, line_no) DO UPDATE SET raw = excluded.raw,"
            " reason = excluded.reason, source_kind = excluded.source_kind"
        )
    )
    return len(rejected)

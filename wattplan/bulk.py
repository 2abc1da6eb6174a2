"""Bulk loading with PostgreSQL COPY (psycopg 3), inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import Connection


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

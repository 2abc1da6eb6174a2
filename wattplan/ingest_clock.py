"""Load clock-change events of one interval into ``clock_changes``, with row accounting.

The database edge for :mod:`telemetry.clock_events`: in the caller's transaction, the
interval's stored events of the nodes found in the files are replaced by the files'
events of ``[start, end)``, rejected lines attributed to the interval are upserted into
``rejected_rows`` (``source_kind`` ``clock_changes``), and the run is recorded in
``ingest_runs``. An event repeated in another file is rejected (the first one read is
kept). Re-running an interval with the same files leaves identical rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from telemetry.clock_events import ClockChange, format_clock_line, parse_clock_file
from telemetry.lines import RejectedRow
from wattplan import store
from wattplan.bulk import IngestResult, copy_rows, upsert_rejected_rows

SOURCE_KIND = "clock_changes"
COLUMNS = (
    "instance_id",
    "changed_at",
    "node",
    "from_mhz",
    "to_mhz",
    "reason",
    "controller",
    "source",
    "service",
    "request_type",
)


def load_clock_changes(
    conn: Connection, files: Sequence[Path], start: datetime, end: datetime
) -> IngestResult:
    """Load the events of ``[start, end)`` from ``files`` (see the module docstring).

    Raises:
        InputDataError: a file is missing or unreadable.
        ValueError: the interval is naive or empty.
    """
    if start.tzinfo is None or end.tzinfo is None or not start < end:
        raise ValueError(f"interval {start}..{end} must be aware and non-empty")
    rows: list[tuple[ClockChange, str]] = []
    rejected: list[RejectedRow] = []
    seen: set[tuple[str, datetime]] = set()
    nodes: set[str] = set()
    for path in sorted(files):
        parsed = parse_clock_file(path)
        nodes.update(c.node for c in parsed.changes)
        for change, line_no in zip(parsed.changes, parsed.line_nos, strict=True):
            if not start <= change.changed_at < end:
                continue
            key = (change.instance_id, change.changed_at)
            if key in seen:
                rejected.append(
                    RejectedRow(
                        path.name,
                        line_no,
                        format_clock_line(change),
                        "duplicate: this event was already read from another file",
                        change.changed_at,
                    )
                )
                continue
            seen.add(key)
            rows.append((change, path.name))
        rejected.extend(
            r for r in parsed.rejected if r.attributed_at is None or start <= r.attributed_at < end
        )
    if nodes:
        conn.execute(
            sa.text(
                "DELETE FROM clock_changes WHERE node = ANY(:nodes)"
                " AND changed_at >= :start AND changed_at < :end"
            ),
            {"nodes": sorted(nodes), "start": start, "end": end},
        )
    loaded = copy_rows(
        conn,
        "clock_changes",
        COLUMNS,
        (
            (
                c.instance_id,
                c.changed_at,
                c.node,
                c.from_mhz,
                c.to_mhz,
                c.reason,
                c.controller,
                f,
                c.service,
                c.request_type,
            )
            for c, f in rows
        ),
    )
    upsert_rejected_rows(conn, rejected, SOURCE_KIND)
    result = IngestResult(
        rows_read=loaded + len(rejected),
        rows_loaded=loaded,
        rows_rejected=len(rejected),
        files=tuple(str(p) for p in sorted(files)),
    )
    store.record_ingest_run(conn, SOURCE_KIND, start, end, result)
    return result

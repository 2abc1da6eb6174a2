"""Loading clock-change events into the real PostgreSQL: interval, idempotency, rejects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from telemetry.clock_events import ClockChange, ClockEventLog, format_clock_line
from wattplan.ingest_clock import load_clock_changes

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def change(seconds: float, node: str = "node-a", **kw: object) -> ClockChange:
    values: dict[str, object] = {
        "instance_id": f"{node}-inst",
        "changed_at": T0 + timedelta(seconds=seconds),
        "node": node,
        "from_mhz": 1980,
        "to_mhz": 1410,
        "reason": "lower",
        "controller": "clock-loop",
    }
    values.update(kw)
    return ClockChange(**values)  # type: ignore[arg-type]


def write(folder: Path, node: str, seconds: list[float]) -> Path:
    log = ClockEventLog(folder, node)
    for s in seconds:
        log.append(change(s, node))
    closed = log.close()
    assert closed is not None
    return closed


def rows(engine: sa.Engine, query: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(query))]


def test_an_interval_loads_its_events_and_reruns_leave_identical_rows(
    engine: sa.Engine, tmp_path: Path
) -> None:
    files = [write(tmp_path, "node-a", [10, 200, 400]), write(tmp_path, "node-b", [20, 310])]
    end = T0 + timedelta(seconds=300)
    dumps = []
    for _ in range(2):
        with engine.begin() as conn:
            result = load_clock_changes(conn, files, T0, end)
        dumps.append(rows(engine, "SELECT * FROM clock_changes ORDER BY 1, 2"))
    assert dumps[0] == dumps[1] and len(dumps[0]) == 3
    assert (result.rows_read, result.rows_loaded, result.rows_rejected) == (3, 3, 0)
    assert rows(engine, "SELECT rows_read, rows_loaded FROM ingest_runs") == [(3, 3)]


def test_a_repeat_in_another_file_and_bad_lines_are_rejected_not_lost(
    engine: sa.Engine, tmp_path: Path
) -> None:
    first = write(tmp_path, "node-a", [10, 20])
    other = tmp_path / "clock-node-a-20260301T120015.000000Z.jsonl"
    other.write_text(format_clock_line(change(20)) + "\n{broken\n")
    with engine.begin() as conn:
        result = load_clock_changes(conn, [first, other], T0, T0 + timedelta(seconds=60))
    assert (result.rows_read, result.rows_loaded, result.rows_rejected) == (4, 2, 2)
    stored = rows(engine, "SELECT line_no, reason FROM rejected_rows ORDER BY line_no")
    assert [r[0] for r in stored] == [1, 2]
    assert "duplicate" in stored[0][1] and "not valid JSON" in stored[1][1]
    assert rows(engine, "SELECT DISTINCT source_kind FROM rejected_rows") == [("clock_changes",)]

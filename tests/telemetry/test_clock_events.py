"""Clock-change event files: written atomically, parsed without ever failing on content."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from telemetry.clock_events import (
    ClockChange,
    ClockEventLog,
    file_first_time,
    format_clock_line,
    list_clock_files,
    parse_clock_file,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def change(seconds: float, to_mhz: int = 1410, **kw: object) -> ClockChange:
    values: dict[str, object] = {
        "instance_id": "llama70b-a",
        "changed_at": T0 + timedelta(seconds=seconds),
        "node": "gpu-node-7",
        "from_mhz": 1980,
        "to_mhz": to_mhz,
        "reason": "lower",
        "controller": "clock-loop",
    }
    values.update(kw)
    return ClockChange(**values)  # type: ignore[arg-type]


def test_the_log_rotates_hourly_and_only_closed_files_are_listed(tmp_path: Path) -> None:
    log = ClockEventLog(tmp_path, "gpu-node-7", rotate_s=3600)
    assert log.append(change(0)) is None
    assert log.append(change(5, from_mhz=1410, to_mhz=1980, reason="deadline")) is None
    assert list_clock_files(tmp_path) == []  # still being written
    closed = log.append(change(3600, from_mhz=None))
    assert closed is not None and list_clock_files(tmp_path) == [closed]
    assert file_first_time(closed) == T0
    last = log.close()
    assert last is not None and len(list_clock_files(tmp_path)) == 2
    parsed = parse_clock_file(closed)
    assert parsed.changes == (change(0), change(5, from_mhz=1410, to_mhz=1980, reason="deadline"))
    assert parsed.line_nos == (1, 2) and parsed.rejected == () and parsed.rows_read == 2


def test_bad_lines_are_rejected_with_reasons_and_counted(tmp_path: Path) -> None:
    good = format_clock_line(change(1))
    lines = [
        good,
        "not json",
        good.replace('"to_mhz":1410', '"to_mhz":-5'),
        good.replace("clock-loop", "someone"),
        good.replace("2026-03-01T12:00:01.000000Z", "2026-03-01T12:00:01"),
        "",
        good,  # a repeat
        '{"instance_id": "x y"}',
        "\udcff".encode("utf-8", "surrogateescape").decode("latin-1"),
    ]
    path = tmp_path / "clock-n-20260301T120000.000000Z.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    parsed = parse_clock_file(path)
    reasons = [r.reason for r in parsed.rejected]
    assert len(parsed.changes) == 1 and parsed.rows_read == 8 == 1 + len(reasons)
    assert "not valid JSON" in reasons[0]
    assert "to_mhz" in reasons[1] and "controller" in reasons[2] and "time zone" in reasons[3]
    assert "duplicate" in reasons[4]
    assert all(r.attributed_at == T0 + timedelta(seconds=1) for r in parsed.rejected)

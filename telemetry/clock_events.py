"""Clock-change events of the serving side: the file format, its parser and its writer.

The instance clock loop (:mod:`agent.clock_control`) and the power guard
(:mod:`agent.power_guard`) record every clock they set: which instance, when, from which
clock to which, why, and which controller decided. The agent appends them as JSON lines to
``clock-<node>-<first event UTC>.jsonl.part`` in a spool folder and renames a file to
``.jsonl`` once closed (hourly), exactly as the GPU collector hands over its files; the
ingest DAG loads closed files into ``clock_changes``.

One event per line::

    {"instance_id": "llama70b-a", "changed_at": "2026-03-01T12:00:05.000000Z",
     "node": "gpu-node-7", "from_mhz": 1980, "to_mhz": 1410, "reason": "lower",
     "controller": "clock-loop"}

``from_mhz`` is null when the previous clock is unknown (the first event after a start).
Optional ``service`` and ``request_type`` name the instance's pool (the agent writes them;
reports count changes per pool and window with them).
Bad lines are rejected with a reason (nothing raised, nothing dropped silently), as for the
other telemetry formats (docs/telemetry.md).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from telemetry.lines import RejectCollector, RejectedRow, decode_line, is_blank, open_lines

#: Who set a clock.
CONTROLLERS = ("clock-loop", "power-guard", "plan", "restore")
#: Highest clock accepted (MHz); GPUs top out near 2 GHz.
MAX_CLOCK_MHZ = 10_000
SUFFIX = ".jsonl"
PART_SUFFIX = ".part"
_NAME = re.compile(r"[A-Za-z0-9_.:/@+-]{1,256}")
_FILE_TIME = "%Y%m%dT%H%M%S.%fZ"
_FILE_NAME = re.compile(r"clock-(.+)-([0-9]{8}T[0-9]{6}\.[0-9]{6}Z)\.jsonl")


@dataclass(frozen=True)
class ClockChange:
    """One clock an instance was set to (a row of ``clock_changes``)."""

    instance_id: str
    changed_at: datetime
    node: str
    from_mhz: int | None
    to_mhz: int
    reason: str
    controller: str
    service: str | None = None
    request_type: str | None = None


@dataclass(frozen=True)
class ParsedClockFile:
    """``rows_read == len(changes) + len(rejected)``; blank lines are not rows.

    ``line_nos[i]`` is the line of ``changes[i]``; each rejected row's ``attributed_at`` is
    set as :class:`~telemetry.lines.RejectedRow` describes.
    """

    changes: tuple[ClockChange, ...]
    line_nos: tuple[int, ...]
    rejected: tuple[RejectedRow, ...]
    rows_read: int


class _Bad(ValueError):
    pass


def format_clock_line(change: ClockChange) -> str:
    """One event as its JSON line (no newline).

    Raises:
        ValueError: the time is naive.
    """
    if change.changed_at.tzinfo is None:
        raise ValueError("changed_at must be aware (UTC)")
    obj: dict[str, Any] = {
        "instance_id": change.instance_id,
        "changed_at": change.changed_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "node": change.node,
        "from_mhz": change.from_mhz,
        "to_mhz": change.to_mhz,
        "reason": change.reason,
        "controller": change.controller,
    }
    if change.service is not None:
        obj["service"] = change.service
    if change.request_type is not None:
        obj["request_type"] = change.request_type
    return json.dumps(obj, separators=(",", ":"))


def parse_clock_file(path: Path) -> ParsedClockFile:
    """Parse one closed event file; bad lines become rejected rows.

    Raises:
        InputDataError: the file is missing or unreadable.
    """
    changes: list[ClockChange] = []
    line_nos: list[int] = []
    rejects = RejectCollector(path.name)
    rows = 0
    seen: set[tuple[str, datetime]] = set()
    for line_no, data in open_lines(path, "clock-change file"):
        if is_blank(data):
            continue
        rows += 1
        try:
            change = _change(json.loads(decode_line(data), parse_constant=_no_constant))
            key = (change.instance_id, change.changed_at)
            if key in seen:
                raise _Bad(f"duplicate: {key[0]} at {key[1].isoformat()} was already read")
            seen.add(key)
        except (ValueError, RecursionError) as exc:
            rejects.reject(line_no, data, _reason(exc))
            continue
        rejects.seen(change.changed_at)
        changes.append(change)
        line_nos.append(line_no)
    return ParsedClockFile(tuple(changes), tuple(line_nos), tuple(rejects.rows), rows)


def _reason(exc: Exception) -> str:
    if isinstance(exc, _Bad):
        return str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg})"
    return f"not a clock-change event ({str(exc)[:120]})"


def _no_constant(name: str) -> float:
    raise _Bad(f"{name} is not a number JSON allows")


def _change(obj: Any) -> ClockChange:
    if not isinstance(obj, dict):
        raise _Bad(f"not a JSON object but {type(obj).__name__}")
    at_text = obj.get("changed_at")
    if not isinstance(at_text, str):
        raise _Bad("changed_at is missing or not a string")
    try:
        at = datetime.fromisoformat(at_text)
    except ValueError:
        raise _Bad(f"changed_at {at_text[:40]!r} is not an ISO 8601 time") from None
    if at.utcoffset() is None:
        raise _Bad(f"changed_at {at_text[:40]!r} has no time zone")
    controller = obj.get("controller")
    if controller not in CONTROLLERS:
        raise _Bad(f"controller {str(controller)[:40]!r} is not one of {', '.join(CONTROLLERS)}")
    reason = obj.get("reason")
    if not isinstance(reason, str) or not 0 < len(reason) <= 64 or not reason.isprintable():
        raise _Bad("reason must be 1-64 printable characters")
    return ClockChange(
        instance_id=_name(obj, "instance_id"),
        changed_at=at.astimezone(UTC),
        node=_name(obj, "node"),
        from_mhz=_clock(obj, "from_mhz", required=False),
        to_mhz=_clock(obj, "to_mhz", required=True),  # type: ignore[arg-type]
        reason=reason,
        controller=controller,
        service=_name(obj, "service") if obj.get("service") is not None else None,
        request_type=_name(obj, "request_type") if obj.get("request_type") is not None else None,
    )


def _name(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _Bad(f"{key} must be 1-256 characters of [A-Za-z0-9_.:/@+-]")
    return value


def _clock(obj: dict[str, Any], key: str, *, required: bool) -> int | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if type(value) is not int or not 0 < value <= MAX_CLOCK_MHZ:
        raise _Bad(f"{key} must be an integer clock in (0, {MAX_CLOCK_MHZ}] MHz, not {value!r}")
    return value


def list_clock_files(spool_dir: Path) -> list[Path]:
    """Closed event files in ``spool_dir`` (never ``.part``), sorted; [] if it is missing."""
    if not spool_dir.is_dir():
        return []
    return sorted(p for p in spool_dir.glob(f"clock-*{SUFFIX}") if p.is_file())


def file_first_time(path: Path) -> datetime | None:
    """Time of the first event of a file, from its name (None: not a standard name)."""
    match = _FILE_NAME.fullmatch(path.name)
    if match is None:
        return None
    return datetime.strptime(match.group(2), _FILE_TIME).replace(tzinfo=UTC)


class ClockEventLog:
    """Appends events to ``clock-<node>-<first>.jsonl.part`` and closes files atomically
    (flush, fsync, rename) every ``rotate_s`` seconds of event time and on :meth:`close`."""

    def __init__(self, spool_dir: Path, node: str, rotate_s: float = 3600.0) -> None:
        if not _NAME.fullmatch(node):
            raise ValueError(f"node {node!r} must be 1-256 characters of [A-Za-z0-9_.:/@+-]")
        self.spool_dir, self.node, self.rotate_s = spool_dir, node, rotate_s
        self._handle: IO[bytes] | None = None
        self._part: Path | None = None
        self._first: datetime | None = None
        spool_dir.mkdir(parents=True, exist_ok=True)

    def append(self, change: ClockChange) -> Path | None:
        """Write one event; returns the file closed to make room, if any."""
        closed = None
        if (
            self._first is not None
            and (change.changed_at - self._first).total_seconds() >= self.rotate_s
        ):
            closed = self.close()
        if self._handle is None:
            name = f"clock-{self.node.replace('/', '_')}-{change.changed_at:{_FILE_TIME}}{SUFFIX}"
            self._part = self.spool_dir / (name + PART_SUFFIX)
            self._handle = self._part.open("ab")
            self._first = change.changed_at
        self._handle.write((format_clock_line(change) + "\n").encode())
        self._handle.flush()
        return closed

    def close(self) -> Path | None:
        """Close the current file (fsync, atomic rename); returns its final path."""
        if self._handle is None or self._part is None:
            return None
        handle, part = self._handle, self._part
        self._handle = self._part = self._first = None
        os.fsync(handle.fileno())
        handle.close()
        final = part.with_name(part.name[: -len(PART_SUFFIX)])
        os.replace(part, final)
        return final


def changes_in(changes: Sequence[ClockChange], start: datetime, end: datetime) -> list[ClockChange]:
    """The events of ``[start, end)``."""
    return [c for c in changes if start <= c.changed_at < end]

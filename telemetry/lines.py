"""Reading input files line by line without ever failing on their content.

Shared by the telemetry parsers: a file is read as bytes, split into physical lines, and each
line is decoded on its own, so one line of binary garbage or a wrong encoding rejects that
line only. Rejected lines keep a printable copy of what was read (bad bytes escaped, NUL
removed) so nothing is lost and everything can be stored in PostgreSQL text columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from wattplan.errors import InputDataError

#: Longest raw text kept for a rejected line; longer lines keep their head and a note.
MAX_RAW_CHARS = 8192
#: Largest value a PostgreSQL ``integer`` column holds.
INT32_MAX = 2**31 - 1

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """An input line that could not be used, kept with the reason so nothing is lost.

    Attributes:
        source: Name of the file (or stream) the line came from.
        line_no: 1-based data line number within the source (see docs/formats.md).
        raw: Printable copy of the line: invalid UTF-8 escaped as ``\\xNN``, NUL removed,
            capped at :data:`MAX_RAW_CHARS` characters.
        reason: Why the line was rejected, in words.
        attributed_at: The time the line is accounted to: its own timestamp when that could
            be read, else that of the nearest readable line before it (after it, at the start
            of a file); None when the file has no readable timestamp at all. Loaders use it
            to count each rejected line in exactly one interval.
    """

    source: str
    line_no: int
    raw: str
    reason: str
    attributed_at: datetime | None = None


def printable(data: bytes | str, limit: int = MAX_RAW_CHARS) -> str:
    """A copy of ``data`` safe to show and to store in a text column.

    Invalid UTF-8 bytes become ``\\xNN`` escapes, NUL characters are removed, lone
    surrogates are escaped, and text longer than ``limit`` characters is cut with a note of
    how much was left out.
    """
    if isinstance(data, bytes):
        text = data.decode("utf-8", "backslashreplace")
    else:
        text = data.encode("utf-8", "backslashreplace").decode("utf-8")
    text = text.replace("\x00", "")
    if len(text) > limit:
        text = f"{text[:limit]}... [{len(text) - limit} more characters]"
    return text


def decode_line(data: bytes) -> str:
    """The UTF-8 text of one line.

    Raises:
        ValueError: the line holds NUL bytes or is not valid UTF-8 (the message names the
            first bad byte).
    """
    if b"\x00" in data:
        raise ValueError("line contains NUL bytes (binary data?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1]
        raise ValueError(
            f"not valid UTF-8 at byte {exc.start} ({bad!r}): re-encode the file as UTF-8"
        ) from None


def open_lines(path: Path, what: str) -> Iterator[tuple[int, bytes]]:
    """Physical lines of a file as ``(1-based line number, bytes without line ending)``.

    The file is opened before this returns, so a missing or unreadable file fails here and
    not at the first iteration. A UTF-8 byte-order mark at the start is dropped.

    Args:
        path: The file.
        what: What the file is, for the error message (``"request log"``).

    Raises:
        InputDataError: the file cannot be opened (missing, a folder, no permission).
    """
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputDataError(
            f"cannot open {what} {path}: {exc.strerror or exc}; check the path"
        ) from exc
    return _lines(handle, path, what)


def _lines(handle, path: Path, what: str) -> Iterator[tuple[int, bytes]]:  # type: ignore[no-untyped-def]
    with handle:
        try:
            for line_no, data in enumerate(handle, start=1):
                if line_no == 1 and data.startswith(_BOM):
                    data = data[len(_BOM) :]
                yield line_no, data.rstrip(b"\r\n")
        except OSError as exc:
            raise InputDataError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def is_blank(data: bytes) -> bool:
    """Whether a line holds only whitespace (such lines are not rows and are not counted)."""
    return not data.strip()


def line_key(data: bytes) -> bytes:
    """A 128-bit digest of a line without surrounding whitespace, to find repeated lines.

    Kept instead of the line itself so a file of millions of lines stays small in memory.
    """
    return hashlib.blake2b(data.strip(), digest_size=16).digest()


def finite_float(text: str, name: str) -> float:
    """Parse a finite decimal number.

    Raises:
        ValueError: the text is not a number, or is NaN or infinite.
    """
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{name} {text.strip()!r} is not a finite number")
    return value


@dataclass
class RejectCollector:
    """Collects rejected lines of one source and attributes each to a time.

    Call :meth:`seen` with every timestamp read (of good and bad lines alike) in line order,
    and :meth:`reject` for every bad line; :attr:`rows` then holds the rejected rows with
    ``attributed_at`` set as :class:`RejectedRow` describes.
    """

    source: str
    rows: list[RejectedRow] = field(default_factory=list)
    _last_at: datetime | None = None
    _pending: list[int] = field(default_factory=list)

    def seen(self, at: datetime) -> None:
        """Record a timestamp read at the current line."""
        self._last_at = at
        if self._pending:
            for index in self._pending:
                self.rows[index] = dataclasses.replace(self.rows[index], attributed_at=at)
            self._pending.clear()

    def within(self, start: datetime | None, end: datetime | None) -> tuple[RejectedRow, ...]:
        """Rejected rows attributed to ``[start, end)`` (None bounds are open), or to no time."""
        return tuple(
            r
            for r in self.rows
            if r.attributed_at is None
            or (
                (start is None or r.attributed_at >= start)
                and (end is None or r.attributed_at < end)
            )
        )

    def reject(
        self, line_no: int, raw: bytes | str, reason: str, at: datetime | None = None
    ) -> None:
        """Reject one line; ``at`` is its own timestamp when that could be read."""
        if at is not None:
            self.seen(at)
        attributed = at if at is not None else self._last_at
        if attributed is None:
            self._pending.append(len(self.rows))
        self.rows.append(RejectedRow(self.source, line_no, printable(raw), reason, attributed))

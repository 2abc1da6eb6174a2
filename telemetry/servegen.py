"""ServeGen (Alibaba Cloud Model Studio) per-client workload files -> workload rates.

ServeGen publishes, per anonymised client, a per-window fit of its arrival process
(``chunk-<client>-trace.csv``) and 6-hourly token-length distributions
(``chunk-<client>-dataset.json``); see data/servegen-alibaba/SOURCE.md and docs/formats.md.

ServeGen's timestamps are seconds since 00:00 of "day 0"; the release names no calendar
date, weekday or time zone (its examples only read 64800 s as 18:00). wattplan places day 0
at a configurable instant, by default :data:`SERVEGEN_DAY0` = 2024-01-01T00:00Z, a Monday,
chosen so that ServeGen day ``d`` lands on a stable weekday; it is a convention, not a fact
about the data.

Pure: parsers read one file and never raise on a row's content; :func:`workload_rates`
joins rates with token means.
"""

from __future__ import annotations

import ast
import bisect
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from telemetry.lines import (
    RejectCollector,
    RejectedRow,
    decode_line,
    finite_float,
    is_blank,
    open_lines,
)
from wattplan.errors import InputDataError

#: Default instant of ServeGen's day 0, 00:00 (a Monday; the data names no date).
SERVEGEN_DAY0 = datetime(2024, 1, 1, tzinfo=UTC)
#: Length of one ServeGen rate window.
SERVEGEN_WINDOW_S = 600

_FILE = re.compile(r"(?P<client>.+)-(?:trace\.csv|dataset\.json)")
_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_CONTENT_ERRORS = (
    ValueError,
    TypeError,
    SyntaxError,
    ArithmeticError,
    RecursionError,
    MemoryError,
)
#: Largest timestamp accepted (100 years of seconds), so every row maps to a datetime.
MAX_TIMESTAMP_S = 100 * 366 * 86400


@dataclass(frozen=True, slots=True)
class RateWindow:
    """One 10-minute window of one client's arrival process, as ServeGen fitted it.

    ``cv``, ``pattern``, ``shape`` and ``scale`` are None in windows without traffic
    (ServeGen writes ``0,0,,0,0`` there).
    """

    client: str
    line_no: int
    timestamp_s: int
    rate_rps: float
    cv: float | None
    pattern: str | None
    shape: float | None
    scale: float | None


@dataclass(frozen=True, slots=True)
class TokenWindow:
    """Mean input and output tokens of one client's 6-hour dataset window."""

    client: str
    timestamp_s: int
    mean_input_tokens: float
    mean_output_tokens: float


@dataclass(frozen=True)
class ParsedRates:
    """Rows of one trace file; ``rows_read == len(rows) + len(rejected)``."""

    rows: tuple[RateWindow, ...]
    rejected: tuple[RejectedRow, ...]
    rows_read: int


@dataclass(frozen=True)
class ParsedTokenWindows:
    """Windows of one dataset file; ``rows_read == len(windows) + len(rejected)``."""

    windows: tuple[TokenWindow, ...]
    rejected: tuple[RejectedRow, ...]
    rows_read: int


@dataclass(frozen=True, slots=True)
class WorkloadRate:
    """One row of ``workload_rates``."""

    workload: str
    client: str
    window_start_at: datetime
    window_s: int
    rate_rps: float
    cv: float | None
    pattern: str | None
    mean_input_tokens: float | None
    mean_output_tokens: float | None


def client_of(path: Path) -> str:
    """Client name of a ServeGen file: ``chunk-61-trace.csv`` -> ``chunk-61``."""
    match = _FILE.fullmatch(path.name)
    return match.group("client") if match else path.stem


def _timestamp(text: str) -> int:
    t = text.strip()
    if not (t.isascii() and t.isdigit()):
        raise ValueError(f"timestamp {t[:32]!r} is not a whole number of seconds >= 0")
    value = int(t)
    if value > MAX_TIMESTAMP_S:
        raise ValueError(f"timestamp {value} s is more than 100 years after day 0")
    return value


def parse_rate_trace(
    path: Path, *, client: str | None = None, source: str | None = None
) -> ParsedRates:
    """Read a ``chunk-<client>-trace.csv`` (no header: timestamp, rate, cv, pattern, shape, scale).

    Never raises on a line's content: a wrong field count, a non-numeric, NaN, infinite or
    negative value, an odd pattern name, invalid UTF-8 or a timestamp seen before become
    rejected rows. Line numbers are physical lines; blank lines are not counted.

    Args:
        path: The CSV file.
        client: Client name; defaults to the one in the file name.
        source: Name stored with rejected rows; defaults to the file name.

    Raises:
        InputDataError: the file cannot be opened.
    """
    client = client or client_of(path)
    rejects = RejectCollector(source or path.name)
    rows: list[RateWindow] = []
    seen: dict[int, int] = {}
    rows_read = 0
    for line_no, data in open_lines(path, "ServeGen trace"):
        if is_blank(data):
            continue
        rows_read += 1
        try:
            fields = decode_line(data).strip().split(",")
            if len(fields) != 6:
                raise ValueError(f"expected 6 fields, got {len(fields)}")
            timestamp_s = _timestamp(fields[0])
            rate = finite_float(fields[1], "rate")
            cv = finite_float(fields[2], "cv")
            pattern = fields[3].strip()
            shape = finite_float(fields[4], "shape")
            scale = finite_float(fields[5], "scale")
            if rate < 0 or cv < 0:
                raise ValueError(f"rate {rate} and cv {cv} must be >= 0")
            if pattern and not _PATTERN.fullmatch(pattern):
                raise ValueError(f"pattern {pattern[:32]!r} is not a distribution name")
            first = seen.setdefault(timestamp_s, line_no)
            if first != line_no:
                raise ValueError(f"timestamp {timestamp_s} already on line {first}")
        except _CONTENT_ERRORS as exc:
            rejects.reject(line_no, data, str(exc) or type(exc).__name__)
            continue
        fitted = bool(pattern)
        rows.append(
            RateWindow(
                client,
                line_no,
                timestamp_s,
                rate,
                cv if fitted else None,
                pattern or None,
                shape if fitted else None,
                scale if fitted else None,
            )
        )
    return ParsedRates(tuple(rows), tuple(rejects.rows), rows_read)


def distribution_mean(literal: Any, name: str) -> float:
    """Mean of a ServeGen distribution ``{token_count: probability}``.

    The value is the dict, or its Python literal text (read with :func:`ast.literal_eval`,
    which evaluates literals only, never code). Probabilities are normalised by their sum.

    Raises:
        ValueError: not such a dict, empty, or with negative, non-finite or zero-sum values.
    """
    pdf = ast.literal_eval(literal) if isinstance(literal, str) else literal
    if not isinstance(pdf, dict) or not pdf:
        raise ValueError(f"{name} is not a non-empty {{tokens: probability}} dict")
    total = weighted = 0.0
    for tokens, probability in pdf.items():
        if (
            isinstance(tokens, bool)
            or isinstance(probability, bool)
            or not isinstance(tokens, int | float)
            or not isinstance(probability, int | float)
        ):
            raise ValueError(
                f"{name} holds a non-numeric entry {tokens!r:.32}: {probability!r:.32}"
            )
        if not (math.isfinite(tokens) and math.isfinite(probability)) or tokens < 0:
            raise ValueError(f"{name} holds a bad entry {tokens!r:.32}: {probability!r:.32}")
        if probability < 0:
            raise ValueError(f"{name} has a negative probability at {tokens}")
        total += probability
        weighted += tokens * probability
    if total <= 0 or not math.isfinite(weighted):
        raise ValueError(f"{name} probabilities sum to {total}")
    return weighted / total


def parse_token_windows(
    path: Path, *, client: str | None = None, source: str | None = None
) -> ParsedTokenWindows:
    """Read a ``chunk-<client>-dataset.json`` into mean input/output tokens per window.

    Each top-level entry ``{"<window start s>": {"input_tokens": "<dict literal>",
    "output_tokens": "<dict literal>", ...}}`` is one row, numbered from 1 in file order;
    other fields are ignored. An entry whose key is not whole seconds, or whose
    distributions are missing, empty or malformed, is rejected (raw text capped).

    Args:
        path: The JSON file.
        client: Client name; defaults to the one in the file name.
        source: Name stored with rejected rows; defaults to the file name.

    Raises:
        InputDataError: the file cannot be read, is not UTF-8 JSON, or is not an object.
    """
    client = client or client_of(path)
    try:
        text = path.read_bytes().decode("utf-8")
        document = json.loads(text, parse_constant=lambda c: float("nan"))
    except OSError as exc:
        raise InputDataError(f"cannot read ServeGen dataset {path}: {exc.strerror}") from exc
    except (ValueError, RecursionError) as exc:
        raise InputDataError(
            f"{path}: not a UTF-8 JSON document ({exc}); a ServeGen dataset file is one JSON "
            "object {window_start_s: {input_tokens, output_tokens}}"
        ) from exc
    if not isinstance(document, dict):
        raise InputDataError(f"{path}: the JSON document is not an object of windows")
    rejects = RejectCollector(source or path.name)
    windows: list[TokenWindow] = []
    for index, (key, entry) in enumerate(document.items(), start=1):
        try:
            timestamp_s = _timestamp(key)
            if not isinstance(entry, dict):
                raise ValueError("window is not an object with input_tokens and output_tokens")
            mean_in = distribution_mean(entry.get("input_tokens"), "input_tokens")
            mean_out = distribution_mean(entry.get("output_tokens"), "output_tokens")
        except _CONTENT_ERRORS as exc:
            raw = json.dumps({key: entry}, default=str)
            rejects.reject(index, raw, str(exc).splitlines()[0] if str(exc) else repr(exc))
            continue
        windows.append(TokenWindow(client, timestamp_s, mean_in, mean_out))
    return ParsedTokenWindows(tuple(windows), tuple(rejects.rows), len(document))


def workload_rates(
    rates: Iterable[RateWindow],
    token_windows: Mapping[str, Iterable[TokenWindow]],
    *,
    workload: str,
    day0_at: datetime = SERVEGEN_DAY0,
    window_s: int = SERVEGEN_WINDOW_S,
) -> list[WorkloadRate]:
    """Rows of ``workload_rates``: each rate window with its client's token means.

    The token means come from the latest dataset window starting at or before the rate
    window (the 6-hour window containing it; ServeGen's own generator picks the same one);
    None where the client has no dataset file or no such window.

    Args:
        rates: Rate windows of any clients.
        token_windows: Dataset windows per client.
        workload: Name stored in every row, e.g. ``servegen-m-large``.
        day0_at: Instant of day 0, 00:00 (aware).
        window_s: Length of one rate window in seconds.
    """
    if day0_at.tzinfo is None:
        raise ValueError("day0_at must be an aware datetime")
    lookup = {
        client: sorted((w.timestamp_s, w) for w in windows)
        for client, windows in token_windows.items()
    }
    rows = []
    for r in rates:
        mean_in = mean_out = None
        series = lookup.get(r.client)
        if series:
            i = bisect.bisect_right(series, r.timestamp_s, key=lambda item: item[0]) - 1
            if i >= 0:
                mean_in, mean_out = series[i][1].mean_input_tokens, series[i][1].mean_output_tokens
        rows.append(
            WorkloadRate(
                workload,
                r.client,
                day0_at + timedelta(seconds=r.timestamp_s),
                window_s,
                r.rate_rps,
                r.cv,
                r.pattern,
                mean_in,
                mean_out,
            )
        )
    return rows

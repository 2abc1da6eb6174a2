"""Request logs: parse the Azure LLM trace format, classify requests and aggregate windows.

Pure functions over plain values; the database writers live in ``wattplan.store``.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from wattplan.domain import REQUEST_TYPES, RequestTypeBins, TypeWindow
from wattplan.errors import InputDataError
from wattplan.timefmt import floor_to

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
PEAK_BUCKET_S = 60


@dataclass(frozen=True)
class RequestRecord:
    """One served request, as logged."""

    source: str
    line_no: int
    service: str
    arrived_at: datetime
    input_tokens: int
    output_tokens: int
    request_type: str


@dataclass(frozen=True)
class RejectedRow:
    """An input line that could not be parsed, kept with the reason so nothing is lost."""

    source: str
    line_no: int
    raw: str
    reason: str


@dataclass(frozen=True)
class ParsedTrace:
    """Result of parsing one trace file."""

    records: tuple[RequestRecord, ...]
    rejected: tuple[RejectedRow, ...]


def parse_azure_timestamp(text: str) -> datetime:
    """Parse ``YYYY-MM-DD HH:MM:SS.fffffff`` (7 fractional digits) as UTC.

    The trace carries no time zone; wattplan reads it as UTC (docs/data.md).
    """
    head, _, frac = text.strip().partition(".")
    moment = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    if frac:
        if not frac.isdigit():
            raise ValueError(f"bad fractional seconds {frac!r}")
        moment += timedelta(microseconds=int((frac + "000000")[:6]))
    return moment


def parse_azure_trace(
    path: Path, service: str, bins: RequestTypeBins, *, source: str | None = None
) -> ParsedTrace:
    """Read an Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    Malformed lines are returned as :class:`RejectedRow` instead of raising.

    Args:
        path: The CSV file.
        service: Service (model endpoint) the requests belong to.
        bins: Request-type bin edges.
        source: Name stored with each row; defaults to the file name.

    Raises:
        InputDataError: the file is missing or its header is not the Azure format.
    """
    source = source or path.name
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise InputDataError(f"cannot open trace {path}: {exc.strerror}") from exc
    records: list[RequestRecord] = []
    rejected: list[RejectedRow] = []
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != AZURE_COLUMNS:
            raise InputDataError(
                f"{path}: header {header!r} is not the Azure trace format {','.join(AZURE_COLUMNS)}"
            )
        for line_no, row in enumerate(reader, start=1):
            try:
                if len(row) != 3:
                    raise ValueError(f"expected 3 fields, got {len(row)}")
                arrived_at = parse_azure_timestamp(row[0])
                input_tokens, output_tokens = int(row[1]), int(row[2])
                if input_tokens < 0 or output_tokens < 0:
                    raise ValueError("token counts must be >= 0")
            except ValueError as exc:
                rejected.append(RejectedRow(source, line_no, ",".join(row), str(exc)))
                continue
            records.append(
                RequestRecord(
                    source=source,
                    line_no=line_no,
                    service=service,
                    arrived_at=arrived_at,
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    request_type=bins.classify(input_tokens, output_tokens),
                )
            )
    return ParsedTrace(tuple(records), tuple(rejected))


def in_interval(
    records: Iterable[RequestRecord], start: datetime, end: datetime
) -> Iterator[RequestRecord]:
    """Records that arrived in ``[start, end)``."""
    return (r for r in records if start <= r.arrived_at < end)


def aggregate_windows(
    records: Iterable[RequestRecord],
    start: datetime,
    end: datetime,
    window_s: int,
    services: Iterable[str],
) -> list[TypeWindow]:
    """Aggregate records into one :class:`TypeWindow` per (service, type, window) in the interval.

    Every service and request type gets a row for every window, zeros included, so a quiet
    window is recorded as quiet rather than missing. The peak rate is the highest count in
    any 60-second bucket of the window, divided by 60.

    Args:
        records: Requests (any order); those outside ``[start, end)`` are ignored.
        start: Interval start, aligned to ``window_s``.
        end: Interval end, aligned to ``window_s``.
        window_s: Window length in seconds, a multiple of 60.
        services: Services to emit rows for.
    """
    if window_s % PEAK_BUCKET_S or (end - start).total_seconds() % window_s:
        raise ValueError(f"window_s={window_s} must be a multiple of 60 dividing the interval")
    counts: dict[tuple[str, str, datetime], list[int]] = defaultdict(lambda: [0, 0, 0])
    buckets: dict[tuple[str, str, datetime, int], int] = defaultdict(int)
    for r in in_interval(records, start, end):
        window_start = floor_to(r.arrived_at, window_s)
        acc = counts[(r.service, r.request_type, window_start)]
        acc[0] += 1
        acc[1] += r.input_tokens
        acc[2] += r.output_tokens
        bucket = int((r.arrived_at - window_start).total_seconds()) // PEAK_BUCKET_S
        buckets[(r.service, r.request_type, window_start, bucket)] += 1
    peaks: dict[tuple[str, str, datetime], int] = defaultdict(int)
    for (service, rtype, window_start, _), n in buckets.items():
        key = (service, rtype, window_start)
        peaks[key] = max(peaks[key], n)
    rows = []
    window_start = start
    while window_start < end:
        for service in sorted(set(services)):
            for rtype in REQUEST_TYPES:
                n, tin, tout = counts.get((service, rtype, window_start), (0, 0, 0))
                rows.append(
                    TypeWindow(
                        service=service,
                        request_type=rtype,
                        window_start=window_start,
                        window_s=window_s,
                        request_count=n,
                        input_tokens=tin,
                        output_tokens=tout,
                        peak_rate_rps=peaks.get((service, rtype, window_start), 0) / PEAK_BUCKET_S,
                        mean_rate_rps=n / window_s,
                    )
                )
        window_start += timedelta(seconds=window_s)
    return rows

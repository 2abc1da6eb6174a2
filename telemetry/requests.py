"""Request logs: parse the Azure LLM trace format, classify requests and aggregate windows.

Pure functions over plain values; the database loader lives in ``wattplan.ingest_requests``.
The JSONL request-log format of serving engines is parsed by ``telemetry.request_log``.
Every parser reads a file line by line and never raises on a line's content: a line it
cannot use becomes a :class:`RejectedRow` with the reason, and ``rows_read`` always equals
``len(records) + len(rejected)`` (blank lines are not rows). Formats: docs/formats.md.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from telemetry.lines import (
    INT32_MAX,
    RejectCollector,
    RejectedRow,
    decode_line,
    is_blank,
    line_key,
    open_lines,
    printable,
)
from wattplan.domain import REQUEST_TYPES, RequestTypeBins, TypeWindow
from wattplan.errors import InputDataError

__all__ = [
    "AZURE_COLUMNS",
    "PEAK_BUCKET_S",
    "ParsedRequests",
    "ParsedTrace",
    "RejectedRow",
    "RequestRecord",
    "aggregate_windows",
    "in_interval",
    "parse_azure_timestamp",
    "parse_azure_trace",
    "parse_token_count",
    "percentile",
]

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
PEAK_BUCKET_S = 60

_AZURE_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One served request, as logged.

    The latency fields are None where the log does not carry them (the Azure trace never
    does). ``tbt_s`` is the mean time between output tokens of the request.
    """

    source: str
    line_no: int
    service: str
    arrived_at: datetime
    input_tokens: int
    output_tokens: int
    request_type: str
    model: str | None = None
    pool: str | None = None
    instance_id: str | None = None
    ttft_s: float | None = None
    tbt_s: float | None = None
    e2e_s: float | None = None
    outcome: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class ParsedRequests:
    """Result of parsing one request-log file.

    Attributes:
        records: Requests read, in line order.
        rejected: Lines that could not be used, in line order, each with its reason.
        rows_read: Non-blank data lines read; always ``len(records) + len(rejected)``.
    """

    records: tuple[RequestRecord, ...]
    rejected: tuple[RejectedRow, ...]
    rows_read: int

    def __post_init__(self) -> None:
        if self.rows_read != len(self.records) + len(self.rejected):
            raise ValueError(
                f"row accounting broken: read {self.rows_read} != {len(self.records)} records "
                f"+ {len(self.rejected)} rejected"
            )


#: The former name of :class:`ParsedRequests` (it gained ``rows_read``).
ParsedTrace = ParsedRequests


def parse_azure_timestamp(text: str) -> datetime:
    """Parse ``YYYY-MM-DD HH:MM:SS[.fffffff]`` (up to 9 fractional digits) as UTC.

    The trace carries no time zone; wattplan reads it as UTC (docs/formats.md). Fractional
    seconds beyond microseconds are cut, not rounded.

    Raises:
        ValueError: the text is not such a timestamp, or names an impossible date.
    """
    match = _AZURE_TIME.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"bad timestamp {text.strip()[:64]!r}: expected YYYY-MM-DD HH:MM:SS.f")
    year, month, day, hour, minute, second, frac = match.groups()
    micro = int((frac + "000000")[:6]) if frac else 0
    return datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=UTC
    )


def parse_token_count(text: str, name: str) -> int:
    """Parse a token count: a plain decimal integer in ``[0, 2**31 - 1]``.

    Raises:
        ValueError: the text is not such an integer (signs, underscores, exponents and
            non-ASCII digits are refused).
    """
    t = text.strip()
    if t.startswith("-") and t[1:].isascii() and t[1:].isdigit():
        raise ValueError(f"token counts must be >= 0 ({name} is {t})")
    if not (t.isascii() and t.isdigit()):
        raise ValueError(f"{name} {t[:64]!r} is not a whole number of tokens")
    value = int(t)
    if value > INT32_MAX:
        raise ValueError(f"{name} {value} is larger than {INT32_MAX}")
    return value


def parse_azure_trace(
    path: Path,
    service: str,
    bins: RequestTypeBins,
    *,
    source: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> ParsedRequests:
    """Read an Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    Never raises on a line's content: lines with the wrong number of fields, a bad
    timestamp, a token count that is not a non-negative integer, invalid UTF-8, NUL bytes,
    or that repeat an earlier line exactly are returned as :class:`RejectedRow`. Line
    numbers count data lines (1 = the line after the header); blank lines are skipped and
    not counted.

    With ``start`` and ``end``, only the interval ``[start, end)`` is read: lines arriving
    outside it are skipped after their time is read (not validated, not counted), and only
    rejected lines attributed to the interval are returned; the result is the interval's
    part of a full parse.

    Args:
        path: The CSV file.
        service: Service (model endpoint) the requests belong to.
        bins: Request-type bin edges.
        source: Name stored with each row; defaults to the file name.
        start: Start of the interval to read (aware), or None for the whole file.
        end: End of the interval to read (aware), or None for the whole file.

    Raises:
        InputDataError: the file cannot be opened, is empty, or its header is not the Azure
            format.
    """
    source = source or path.name
    records: list[RequestRecord] = []
    rejects = RejectCollector(source)
    seen_lines: dict[bytes, int] = {}
    header_ok = False
    for physical_no, data in open_lines(path, "trace"):
        if physical_no == 1:
            _check_azure_header(path, data)
            header_ok = True
            continue
        if is_blank(data):
            continue
        line_no = physical_no - 1
        at: datetime | None = None
        try:
            fields = decode_line(data).strip().split(",")
            if len(fields) != 3:
                raise ValueError(f"expected 3 fields, got {len(fields)}")
            at = arrived_at = parse_azure_timestamp(fields[0])
            rejects.seen(arrived_at)
            if (start is not None and at < start) or (end is not None and at >= end):
                continue
            input_tokens = parse_token_count(fields[1], "ContextTokens")
            output_tokens = parse_token_count(fields[2], "GeneratedTokens")
            first = seen_lines.setdefault(line_key(data), line_no)
            if first != line_no:
                raise ValueError(f"duplicate of line {first}")
        except ValueError as exc:
            rejects.reject(line_no, data, str(exc), at)
            continue
        records.append(
            RequestRecord(
                source,
                line_no,
                service,
                arrived_at,
                input_tokens,
                output_tokens,
                bins.classify(input_tokens, output_tokens),
            )
        )
    if not header_ok:
        raise InputDataError(
            f"{path}: empty file; an Azure trace starts with the header {','.join(AZURE_COLUMNS)}"
        )
    rejected = rejects.within(start, end)
    return ParsedRequests(tuple(records), rejected, len(records) + len(rejected))


def _check_azure_header(path: Path, data: bytes) -> None:
    header = tuple(h.strip() for h in printable(data, 200).split(","))
    if header != AZURE_COLUMNS:
        raise InputDataError(
            f"{path}: header {','.join(header)!r} is not the Azure trace format "
            f"{','.join(AZURE_COLUMNS)}; for JSONL request logs use format 'jsonl'"
        )


def in_interval(
    records: Iterable[RequestRecord], start: datetime, end: datetime
) -> Iterator[RequestRecord]:
    """Records that arrived in ``[start, end)``."""
    return (r for r in records if start <= r.arrived_at < end)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, linear between closest ranks.

    The same definition as numpy's and pandas' default (``linear``) and PostgreSQL's
    ``percentile_cont``.

    Raises:
        ValueError: no values, or ``q`` outside ``[0, 1]``.
    """
    if not sorted_values or not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile needs values and 0 <= q <= 1 (q={q})")
    h = (len(sorted_values) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo])


def _p50_p99(values: list[float] | None) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    values.sort()
    return percentile(values, 0.5), percentile(values, 0.99)


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
    any 60-second bucket of the window, divided by 60. P50 and P99 of TTFT and of mean TBT
    are taken over the window's requests that carry the measurement (linear interpolation,
    see :func:`percentile`), and are None where none does.

    Args:
        records: Requests (any order); those outside ``[start, end)`` are ignored.
        start: Interval start, aligned to ``window_s`` (a multiple of it since the epoch).
        end: Interval end, ``start`` plus a whole number of windows.
        window_s: Window length in seconds, a multiple of 60.
        services: Services to emit rows for.

    Raises:
        ValueError: ``window_s`` is not a multiple of 60, or the interval is not aligned to
            it or not a whole number of windows.
    """
    span_s = (end - start).total_seconds()
    if (
        window_s <= 0
        or window_s % PEAK_BUCKET_S
        or span_s < 0
        or span_s % window_s
        or start.timestamp() % window_s
    ):
        raise ValueError(
            f"window_s={window_s} must be a positive multiple of 60, the interval "
            f"{start.isoformat()}..{end.isoformat()} aligned to it and a whole number of windows"
        )
    n_windows = int(span_s // window_s)
    counts: dict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    buckets: dict[tuple[str, str, int, int], int] = defaultdict(int)
    ttfts: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    tbts: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in records:
        offset = r.arrived_at - start
        seconds = offset.days * 86400 + offset.seconds  # whole seconds; floors below are exact
        if seconds < 0 or seconds >= span_s:
            continue
        k = seconds // window_s
        key = (r.service, r.request_type, k)
        acc = counts[key]
        acc[0] += 1
        acc[1] += r.input_tokens
        acc[2] += r.output_tokens
        buckets[(r.service, r.request_type, k, (seconds % window_s) // PEAK_BUCKET_S)] += 1
        if r.ttft_s is not None:
            ttfts[key].append(r.ttft_s)
        if r.tbt_s is not None:
            tbts[key].append(r.tbt_s)
    peaks: dict[tuple[str, str, int], int] = defaultdict(int)
    for (service, rtype, k, _), n in buckets.items():
        key = (service, rtype, k)
        peaks[key] = max(peaks[key], n)
    rows = []
    for k in range(n_windows):
        window_start = start + timedelta(seconds=k * window_s)
        for service in sorted(set(services)):
            for rtype in REQUEST_TYPES:
                key = (service, rtype, k)
                n, tin, tout = counts.get(key, (0, 0, 0))
                ttft_p50, ttft_p99 = _p50_p99(ttfts.get(key))
                tbt_p50, tbt_p99 = _p50_p99(tbts.get(key))
                rows.append(
                    TypeWindow(
                        service=service,
                        request_type=rtype,
                        window_start=window_start,
                        window_s=window_s,
                        request_count=n,
                        input_tokens=tin,
                        output_tokens=tout,
                        peak_rate_rps=peaks.get(key, 0) / PEAK_BUCKET_S,
                        mean_rate_rps=n / window_s,
                        ttft_p50_s=ttft_p50,
                        ttft_p99_s=ttft_p99,
                        tbt_p50_s=tbt_p50,
                        tbt_p99_s=tbt_p99,
                    )
                )
    return rows

"""Load request logs of one interval into PostgreSQL, with row accounting.

The database edge for ``telemetry.requests`` and ``telemetry.request_log``: parse each
source (pure), keep the rows of ``[start, end)``, and in the caller's transaction replace
the interval's rows of those sources in ``request_logs`` (DELETE, then COPY), upsert the
interval's rejected lines into ``rejected_rows``, replace the interval's
``request_type_windows`` (with TTFT/TBT percentiles), and record the run in ``ingest_runs``.
Re-running an interval leaves identical rows.

Row accounting per run: ``rows_read`` counts the data lines *attributed to the interval*:
a loaded line by its arrival time, a rejected line by
:attr:`~telemetry.lines.RejectedRow.attributed_at` (its own timestamp when readable, else
that of the nearest readable line before it). Lines attributed to other intervals are
neither loaded nor counted by this run, so runs over disjoint intervals that cover a file
count each line exactly once, and ``rows_read == rows_loaded + rows_rejected`` in every run.
A rejected line with no attributable time (a file without a single readable timestamp) is
counted, and upserted, by every run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from telemetry.lines import RejectedRow
from telemetry.request_log import parse_request_log
from telemetry.requests import (
    AZURE_COLUMNS,
    ParsedRequests,
    RequestRecord,
    aggregate_windows,
    parse_azure_trace,
)
from wattplan import store
from wattplan.bulk import IngestResult, copy_rows, upsert_rejected_rows
from wattplan.domain import RequestTypeBins, TypeWindow
from wattplan.errors import InputDataError

log = logging.getLogger(__name__)

SOURCE_KIND = "request_logs"
FORMATS = ("auto", "azure", "jsonl")
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}

REQUEST_LOG_COLUMNS = (
    "source",
    "line_no",
    "service",
    "arrived_at",
    "input_tokens",
    "output_tokens",
    "request_type",
    "model",
    "pool",
    "instance_id",
    "ttft_s",
    "tbt_s",
    "e2e_s",
    "outcome",
)
TYPE_WINDOW_COLUMNS = (
    "service",
    "request_type",
    "window_start_at",
    "window_s",
    "request_count",
    "input_tokens",
    "output_tokens",
    "peak_rate_rps",
    "mean_rate_rps",
    "ttft_p50_s",
    "ttft_p99_s",
    "tbt_p50_s",
    "tbt_p99_s",
)


@dataclass(frozen=True)
class RequestSource:
    """One request-log file and the service its requests belong to.

    Attributes:
        service: Service (model endpoint) of the requests.
        path: The file.
        format: ``azure`` (Azure LLM trace CSV), ``jsonl`` (JSONL request log) or ``auto``
            (by extension: ``.csv`` azure, ``.jsonl``/``.ndjson``/``.json`` jsonl; otherwise
            by the first bytes).
        source: Name stored in ``request_logs.source``; defaults to the file name. Must be
            unique among the sources of a load and stable across runs.
    """

    service: str
    path: Path
    format: str = "auto"
    source: str | None = None

    @property
    def name(self) -> str:
        """The name stored with the rows."""
        return self.source or self.path.name


def detect_format(path: Path) -> str:
    """``azure`` or ``jsonl`` for a request-log file, by extension, else by its first line.

    Raises:
        InputDataError: the file cannot be opened or its format is not recognised.
    """
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "azure"
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    try:
        with path.open("rb") as handle:
            head = handle.read(256).lstrip(b"\xef\xbb\xbf").lstrip()
    except OSError as exc:
        raise InputDataError(f"cannot open request log {path}: {exc.strerror}") from exc
    if head.startswith(b"{"):
        return "jsonl"
    if head.startswith(",".join(AZURE_COLUMNS).encode()):
        return "azure"
    raise InputDataError(
        f"{path}: cannot tell the request-log format from its extension or first line; "
        "name it .csv (Azure trace) or .jsonl, or set the format explicitly"
    )


def parse_source(
    src: RequestSource,
    bins: RequestTypeBins,
    start: datetime | None = None,
    end: datetime | None = None,
) -> ParsedRequests:
    """Parse one source in its format, whole or only the interval ``[start, end)``.

    Raises:
        InputDataError: unknown format, unreadable file, or wrong Azure header.
    """
    if src.format not in FORMATS:
        raise InputDataError(
            f"request source {src.name}: format {src.format!r} is not one of {FORMATS}"
        )
    fmt = detect_format(src.path) if src.format == "auto" else src.format
    if fmt == "azure":
        return parse_azure_trace(src.path, src.service, bins, source=src.name, start=start, end=end)
    return parse_request_log(src.path, src.service, bins, source=src.name, start=start, end=end)


def replace_type_windows(
    conn: Connection,
    windows: Sequence[TypeWindow],
    start: datetime,
    end: datetime,
    window_s: int,
    services: Iterable[str],
) -> int:
    """Replace the services' windows of length ``window_s`` in ``[start, end)`` (COPY).

    Like :func:`wattplan.store.replace_type_windows`, with the latency percentile columns.
    """
    conn.execute(
        sa.text(
            "DELETE FROM request_type_windows WHERE service = ANY(:services) AND window_s = :w"
            " AND window_start_at >= :start AND window_start_at < :end"
        ),
        {"services": sorted(set(services)), "w": window_s, "start": start, "end": end},
    )
    return copy_rows(
        conn,
        "request_type_windows",
        TYPE_WINDOW_COLUMNS,
        (
            (
                w.service,
                w.request_type,
                w.window_start,
                w.window_s,
                w.request_count,
                w.input_tokens,
                w.output_tokens,
                w.peak_rate_rps,
                w.mean_rate_rps,
                w.ttft_p50_s,
                w.ttft_p99_s,
                w.tbt_p50_s,
                w.tbt_p99_s,
            )
            for w in windows
        ),
    )


def _request_rows(records: Iterable[RequestRecord]) -> Iterable[tuple[object, ...]]:
    for r in records:
        yield (
            r.source,
            r.line_no,
            r.service,
            r.arrived_at,
            r.input_tokens,
            r.output_tokens,
            r.request_type,
            r.model,
            r.pool,
            r.instance_id,
            r.ttft_s,
            r.tbt_s,
            r.e2e_s,
            r.outcome,
        )


def load_request_logs(
    conn: Connection,
    sources: Sequence[RequestSource],
    start: datetime,
    end: datetime,
    *,
    window_s: int,
    bins: RequestTypeBins | None = None,
) -> IngestResult:
    """Load the requests of ``[start, end)`` from ``sources`` in the caller's transaction.

    Replaces the interval's ``request_logs`` rows of these sources (DELETE, then COPY),
    upserts the interval's rejected lines (``source_kind`` ``request_logs``), replaces the
    sources' services' ``request_type_windows`` of length ``window_s`` in the interval, and
    records the run in ``ingest_runs``. See the module docstring for how rows are counted.

    Args:
        conn: Connection in an open transaction (psycopg 3 driver, for COPY).
        sources: Files to read; every line's time is read, but only the interval's lines
            are validated and loaded; the others are left alone.
        start: Interval start (aware), aligned to ``window_s``.
        end: Interval end (aware), a whole number of windows after ``start``.
        window_s: Aggregation window in seconds, a multiple of 60.
        bins: Request-type bin edges (defaults: DOMAIN.md section 2).

    Returns:
        Row accounting of this run; ``files`` lists the sources' paths.

    Raises:
        InputDataError: a file is missing or unreadable, has the wrong header or an unknown
            format, two sources share a name, or a line number of a source is already
            stored for a different interval (the file was replaced: give it a new name).
        ValueError: the interval is not aware, empty, or not aligned to ``window_s``.
    """
    if start.tzinfo is None or end.tzinfo is None or not start < end:
        raise ValueError(f"interval {start}..{end} must be aware and non-empty")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise InputDataError(
            f"request sources share a name: {sorted(names)}; give each a distinct `source`"
        )
    bins = bins or RequestTypeBins()
    services = sorted({s.service for s in sources})
    started = time.perf_counter()
    records: list[RequestRecord] = []
    rejected: list[RejectedRow] = []
    for src in sources:
        parsed = parse_source(src, bins)
        records.extend(r for r in parsed.records if start <= r.arrived_at < end)
        rejected.extend(
            r for r in parsed.rejected if r.attributed_at is None or start <= r.attributed_at < end
        )
    windows = aggregate_windows(records, start, end, window_s, services)
    parsed_s = time.perf_counter() - started

    conn.execute(
        sa.text(
            "DELETE FROM request_logs WHERE source = ANY(:sources)"
            " AND arrived_at >= :start AND arrived_at < :end"
        ),
        {"sources": names, "start": start, "end": end},
    )
    copy_started = time.perf_counter()
    try:
        with conn.begin_nested():
            loaded = copy_rows(conn, "request_logs", REQUEST_LOG_COLUMNS, _request_rows(records))
    except sa.exc.IntegrityError as exc:
        _raise_line_conflict(exc)
    except psycopg.errors.UniqueViolation as exc:
        _raise_line_conflict(exc)
    copy_s = time.perf_counter() - copy_started
    upsert_rejected_rows(conn, rejected, SOURCE_KIND)
    replace_type_windows(conn, windows, start, end, window_s, services)
    result = IngestResult(
        rows_read=loaded + len(rejected),
        rows_loaded=loaded,
        rows_rejected=len(rejected),
        files=tuple(str(s.path) for s in sources),
    )
    store.record_ingest_run(conn, SOURCE_KIND, start, end, result)
    log.info(
        "loaded %d requests (%d rejected lines) of %d sources for %s..%s: parse and aggregate"
        " %.2f s, COPY %.2f s (%.0f rows/s), total %.2f s",
        loaded,
        len(rejected),
        len(sources),
        start.isoformat(),
        end.isoformat(),
        parsed_s,
        copy_s,
        loaded / copy_s if copy_s > 0 else 0.0,
        time.perf_counter() - started,
    )
    return result


def _raise_line_conflict(exc: Exception) -> NoReturn:
    raise InputDataError(
        "a (source, line_no) of this load is already stored with an arrival time outside the "
        f"interval: the file was replaced or rotated under the same name ({exc}). Give each "
        "log file a distinct, stable source name (e.g. include its date)."
    ) from exc

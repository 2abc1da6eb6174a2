"""Load GPU telemetry files of one interval into PostgreSQL, with row accounting.

The database edge for ``telemetry.gpu``: parse the collector's closed spool files (pure),
keep the samples of ``[start, end)``, and in the caller's transaction

* make sure the daily partitions of ``gpu_telemetry`` for the interval exist,
* replace the interval's rows of the GPUs and nodes found in the files (DELETE, then COPY),
* upsert the interval's rejected lines into ``rejected_rows`` (``source_kind``
  ``gpu_telemetry``),
* replace the interval's ``instance_windows`` of those instances and nodes,
* drop partitions older than ``retention_days`` before ``end`` (never relative to now),
* record the run in ``ingest_runs``.

Re-running an interval with the same files leaves identical rows.

Row accounting per run: ``rows_read`` counts the lines *attributed to the interval*: an
accepted sample by its ``sampled_at``, a rejected line by
:attr:`~telemetry.lines.RejectedRow.attributed_at` (its own time when readable, else that of
the nearest readable line before it, after it at the start of a file). Lines of other
intervals are neither loaded nor counted, so runs over disjoint intervals count each line
once, and ``rows_read == rows_loaded + rows_rejected`` in every run. A rejected line of a
file without any readable time is counted (and upserted) by every run that reads the file.

Speed: parsing (Python) and COPY (PostgreSQL) overlap: a writer thread owns the database
connection while the files are parsed and streams preformatted COPY text to the server.
A partition that does not exist yet is filled as a plain table and attached when its day is
complete, so PostgreSQL builds its indexes once, sorted, instead of row by row (how bulk
loads into partitioned tables are done); an existing partition is loaded directly.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Connection

from telemetry.gpu import (
    COPY_COLUMNS,
    DEFAULT_MAX_GAP_S,
    TELEMETRY_SUFFIXES,
    GpuColumns,
    GpuScan,
    InstanceWindow,
    SeenSamples,
    aggregate_columns,
    parse_spool_file_name,
    read_gpu_file,
    scan_file_bytes,
)
from wattplan import store
from wattplan.bulk import IngestResult, copy_rows, upsert_rejected_rows
from wattplan.errors import InputDataError

log = logging.getLogger(__name__)

SOURCE_KIND = "gpu_telemetry"
PARENT_TABLE = "gpu_telemetry"
PARTITION_PREFIX = "gpu_telemetry_p"
INSTANCE_WINDOW_COLUMNS = (
    "instance_id",
    "window_start_at",
    "window_s",
    "node",
    "gpus",
    "samples",
    "energy_j",
    "mean_power_w",
    "peak_power_w",
    "counter_resets",
)
#: Arbitrary constant key of the advisory lock that serialises GPU telemetry loads (they
#: create, attach and drop partitions).
_LOAD_LOCK_KEY = 7_263_003
#: A file's samples may start this much before the time in its name (clock steps).
_FILE_TIME_MARGIN_S = 120.0
_DAY_S = 86_400
#: GIL switch interval while loading: the writer thread must get the GIL back quickly
#: when the server has drained the socket, or the server idles (measured: 5 ms, the
#: default, cost a quarter of the throughput on 2 cores).
_SWITCH_INTERVAL_S = 0.001


def list_complete_files(
    spool_dir: Path, start: datetime | None = None, end: datetime | None = None
) -> list[Path]:
    """Closed telemetry files (``*.tsv`` spool files and ``*.jsonl`` files; never a
    ``*.part`` file being written), sorted.

    With ``start`` and ``end``, only the files that can hold samples of ``[start, end)``
    (or the reading just before ``start``): per node, a file named for its first sample
    covers the time until the next file's first sample. Files whose name does not follow
    ``gpu-<node>-<time>.tsv`` (or ``.jsonl``) are always listed.

    Raises:
        InputDataError: the spool folder does not exist or is not a folder.
    """
    if not spool_dir.is_dir():
        raise InputDataError(
            f"GPU telemetry spool folder {spool_dir} does not exist; point the loader at the "
            "collector's --spool-dir"
        )
    files = sorted(
        p for p in spool_dir.iterdir() if p.name.endswith(TELEMETRY_SUFFIXES) and p.is_file()
    )
    if start is None or end is None:
        return files
    margin = timedelta(seconds=_FILE_TIME_MARGIN_S)
    by_node: dict[str, list[tuple[datetime, Path]]] = {}
    keep: list[Path] = []
    for path in files:
        named = parse_spool_file_name(path.name)
        if named is None:
            keep.append(path)
        else:
            by_node.setdefault(named[0], []).append((named[1], path))
    for entries in by_node.values():
        entries.sort()
        for i, (first_at, path) in enumerate(entries):
            next_at = entries[i + 1][0] if i + 1 < len(entries) else None
            if first_at - margin < end and (next_at is None or next_at + margin > start):
                keep.append(path)
    return sorted(keep)


def partition_name(day: date) -> str:
    """Name of the ``gpu_telemetry`` partition of one UTC day: ``gpu_telemetry_pYYYYMMDD``."""
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def _days(start: datetime, end: datetime) -> list[date]:
    first = start.astimezone(UTC).date()
    last = (end - timedelta(microseconds=1)).astimezone(UTC).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


@dataclass(frozen=True)
class GpuLoadReport:
    """What one load did besides the row accounting (see :func:`load_with_report`)."""

    result: IngestResult
    windows: int
    partitions_created: tuple[str, ...]
    partitions_dropped: tuple[str, ...]
    rows_outside_interval: int
    timings: dict[str, float]


def load_gpu_telemetry(
    conn: Connection,
    files: Sequence[Path],
    start: datetime,
    end: datetime,
    *,
    window_s: int,
    retention_days: int,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
) -> IngestResult:
    """Load the GPU samples of ``[start, end)`` from ``files`` in the caller's transaction.

    See the module docstring for what is written and how rows are counted; the energy
    rules of ``instance_windows`` are those of
    :func:`telemetry.gpu.aggregate_instance_windows`. Each GPU's previous reading before
    ``start`` comes from the files or, failing that, from ``gpu_telemetry``.

    Args:
        conn: Connection in an open transaction (psycopg 3 driver, for COPY).
        files: Closed spool files (see :func:`list_complete_files`); their names must be
            distinct, since rows and rejects are keyed by file name and line.
        start: Interval start (aware), a multiple of ``window_s`` since the epoch.
        end: Interval end (aware), a whole number of windows after ``start``.
        window_s: Length of an ``instance_windows`` window, seconds.
        retention_days: Partitions whose day ended at least this many days before ``end``
            are dropped; must cover the interval.
        max_gap_s: Longest step between two samples of a GPU that still counts energy.

    Returns:
        Row accounting of this run; ``files`` lists the files read.

    Raises:
        InputDataError: a file is missing or unreadable, or two files share a name.
        ValueError: the interval is naive, empty or not aligned to ``window_s``, or the
            retention is shorter than the interval.
    """
    return load_with_report(
        conn,
        files,
        start,
        end,
        window_s=window_s,
        retention_days=retention_days,
        max_gap_s=max_gap_s,
    ).result


def load_with_report(
    conn: Connection,
    files: Sequence[Path],
    start: datetime,
    end: datetime,
    *,
    window_s: int,
    retention_days: int,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
    progress: bool = False,
) -> GpuLoadReport:
    """:func:`load_gpu_telemetry` with a fuller report (``progress``: a line per file on
    the log)."""
    _check_arguments(files, start, end, window_s, retention_days)
    raw = conn.connection.dbapi_connection
    if not isinstance(raw, psycopg.Connection):
        raise TypeError(
            "load_gpu_telemetry needs the psycopg (3) driver: create the engine with "
            "wattplan.db.create_engine or a postgresql+psycopg:// URL"
        )
    start_s, end_s = start.timestamp(), end.timestamp()
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOAD_LOCK_KEY})
    days = _days(start, end)
    existing = _existing_partitions(conn)
    fresh = [d for d in days if partition_name(d) not in existing]
    for day in fresh:  # filled as plain tables, attached once complete
        _execute(
            raw,
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
                sql.Identifier(partition_name(day)), sql.Identifier(PARENT_TABLE)
            ),
        )
    unattached = set(fresh)
    if fresh:
        # attaching builds each new partition's indexes with one sort: give it memory
        # (transaction-local; PostgreSQL's default of 64 MB spills to disk at ~1M rows)
        conn.execute(sa.text("SET LOCAL maintenance_work_mem = '256MB'"))

    timings = {"parse_s": 0.0}
    scan = GpuScan()
    seen = SeenSamples()
    loaded_uuids: set[str] = set()
    loaded_nodes: set[str] = set()
    ordered = _in_time_order(files)
    with _copy_pipe(raw) as pipe, _gc_paused():
        for index, path in enumerate(ordered):
            # days that no later file can reach are complete: attach them now, so the
            # server builds their indexes while the next files are parsed
            horizon = _file_time(ordered, index)
            for day in sorted(unattached):
                if horizon is not None and _day_bounds(day)[1] <= horizon:
                    pipe.execute(_attach_sql(day))
                    unattached.discard(day)
            first_row = scan.rows_loaded
            tick = time.perf_counter()
            scan_file_bytes(
                read_gpu_file(path),
                path.name,
                start_s=start_s,
                end_s=end_s,
                seen=seen,
                into=scan,
            )
            timings["parse_s"] += time.perf_counter() - tick
            new_uuids = set(scan.gpu_uuid[first_row:]) - loaded_uuids
            new_nodes = set(scan.node[first_row:]) - loaded_nodes
            if (new_uuids or new_nodes) and len(fresh) < len(days):
                _replace_rows(pipe, start, end, new_uuids, new_nodes, loaded_uuids)
            loaded_uuids |= new_uuids
            loaded_nodes |= new_nodes
            for day_text, chunks in sorted(scan.copy_by_day.items()):
                table = f"{PARTITION_PREFIX}{day_text}"
                for chunk in chunks:
                    pipe.copy(table, chunk)
            scan.copy_by_day.clear()
            if progress:
                log.info(
                    "%s: %d samples so far, %d rejected",
                    path.name,
                    scan.rows_loaded,
                    len(scan.rejected),
                )
        for day in sorted(unattached):
            pipe.execute(_attach_sql(day))
        # while the server finishes, aggregate with the previous readings the files hold
        tick = time.perf_counter()
        columns = GpuColumns(
            np.frombuffer(scan.t_s, dtype=np.float64),
            scan.gpu_uuid,
            scan.node,
            scan.instance_id,
            np.frombuffer(scan.energy_mj, dtype=np.float64),
            np.frombuffer(scan.power_w, dtype=np.float64),
        )
        windows = aggregate_columns(
            columns, start, end, window_s, max_gap_s=max_gap_s, anchors=scan.anchors
        )
        timings["aggregate_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
    timings["drain_s"] = time.perf_counter() - tick
    timings["put_wait_s"] = pipe.put_wait_s
    timings["writer_busy_s"] = pipe.busy_s
    tick = time.perf_counter()

    stored_anchors = _read_stored_anchors(
        conn, set(scan.gpu_uuid) - set(scan.anchors), start, max_gap_s
    )
    if stored_anchors:  # some GPUs' previous readings are only in the database
        windows = aggregate_columns(
            columns,
            start,
            end,
            window_s,
            max_gap_s=max_gap_s,
            anchors={**stored_anchors, **scan.anchors},
        )
    rejected = scan.rejected
    upsert_rejected_rows(conn, rejected, SOURCE_KIND)
    _replace_instance_windows(
        conn, windows, start, end, window_s, set(scan.instance_id) - {None}, loaded_nodes
    )
    dropped = _drop_old_partitions(conn, end, retention_days)
    loaded = scan.rows_loaded
    result = IngestResult(
        rows_read=loaded + len(rejected),
        rows_loaded=loaded,
        rows_rejected=len(rejected),
        files=tuple(str(p) for p in ordered),
    )
    store.record_ingest_run(conn, SOURCE_KIND, start, end, result)
    timings["after_s"] = time.perf_counter() - tick
    log.info(
        "loaded %d GPU samples (%d rejected lines, %d outside the interval) from %d files for "
        "%s..%s: %d instance windows; partitions created %s, dropped %s",
        loaded,
        len(rejected),
        scan.rows_outside,
        len(ordered),
        start.isoformat(),
        end.isoformat(),
        len(windows),
        [partition_name(d) for d in fresh] or "none",
        list(dropped) or "none",
    )
    return GpuLoadReport(
        result,
        len(windows),
        tuple(partition_name(d) for d in fresh),
        dropped,
        scan.rows_outside,
        {k: round(v, 3) for k, v in timings.items()},
    )


def _check_arguments(
    files: Sequence[Path], start: datetime, end: datetime, window_s: int, retention_days: int
) -> None:
    if start.tzinfo is None or end.tzinfo is None or not start < end:
        raise ValueError(f"interval {start}..{end} must be aware and non-empty")
    span_s = (end - start).total_seconds()
    if window_s <= 0 or span_s % window_s or start.timestamp() % window_s:
        raise ValueError(
            f"interval {start.isoformat()}..{end.isoformat()} must start on a multiple of "
            f"window_s={window_s} and span whole windows"
        )
    if retention_days < 1 or retention_days * _DAY_S < span_s:
        raise ValueError(
            f"retention_days={retention_days} must be >= 1 and cover the interval "
            f"({span_s / _DAY_S:.2f} days)"
        )
    names = [p.name for p in files]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise InputDataError(
            f"GPU telemetry files share a name ({repeated[:3]}): rows are keyed by file name "
            "and line, so each file needs a distinct name"
        )


def _in_time_order(files: Sequence[Path]) -> list[Path]:
    """Files by the first-sample time in their names (unnamed ones first, by name)."""

    def key(path: Path) -> tuple[float, str]:
        named = parse_spool_file_name(path.name)
        return (named[1].timestamp() if named else -math.inf, path.name)

    return sorted(files, key=key)


def _file_time(files: Sequence[Path], index: int) -> datetime | None:
    """Earliest time file ``index`` or any later one can hold (None: unknown)."""
    named = parse_spool_file_name(files[index].name)
    if named is None:
        return None
    return named[1] - timedelta(seconds=_FILE_TIME_MARGIN_S)


def _execute(
    raw: psycopg.Connection, statement: sql.Composed, params: Sequence[object] | None = None
) -> None:
    with raw.cursor() as cursor:
        cursor.execute(statement, params)


def _attach_sql(day: date) -> sql.Composed:
    day_start, day_end = _day_bounds(day)
    return sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
        sql.Identifier(PARENT_TABLE),
        sql.Identifier(partition_name(day)),
        sql.Literal(day_start),
        sql.Literal(day_end),
    )


def _existing_partitions(conn: Connection) -> set[str]:
    return set(
        conn.execute(
            sa.text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = CAST(:parent AS regclass)"
            ),
            {"parent": PARENT_TABLE},
        ).scalars()
    )


def _replace_rows(
    pipe: _CopyPipe,
    start: datetime,
    end: datetime,
    new_uuids: set[str],
    new_nodes: set[str],
    loaded_uuids: set[str],
) -> None:
    """Delete the interval's stored rows of GPUs and nodes met for the first time in this run.

    Rows this run has already copied are never touched: a GPU is deleted only before its
    first row is copied, and a node's rows only for GPUs not copied yet.
    """
    pipe.execute(
        sql.SQL(
            "DELETE FROM {} WHERE gpu_uuid = ANY(%s) AND sampled_at >= %s AND sampled_at < %s"
        ).format(sql.Identifier(PARENT_TABLE)),
        (sorted(new_uuids), start, end),
    )
    if new_nodes:
        pipe.execute(
            sql.SQL(
                "DELETE FROM {} WHERE node = ANY(%s) AND sampled_at >= %s AND sampled_at < %s"
                " AND NOT gpu_uuid = ANY(%s)"
            ).format(sql.Identifier(PARENT_TABLE)),
            (sorted(new_nodes), start, end, sorted(loaded_uuids | new_uuids)),
        )


def _read_stored_anchors(
    conn: Connection, uuids: set[str], start: datetime, max_gap_s: float
) -> dict[str, tuple[float, float, float]]:
    """The latest stored reading before ``start`` (within ``max_gap_s``) of each GPU."""
    anchors: dict[str, tuple[float, float, float]] = {}
    if not uuids:
        return anchors
    rows = conn.execute(
        sa.text(
            "SELECT DISTINCT ON (gpu_uuid) gpu_uuid, sampled_at, energy_mj, power_w"
            " FROM gpu_telemetry WHERE gpu_uuid = ANY(:uuids) AND sampled_at >= :since"
            " AND sampled_at < :start ORDER BY gpu_uuid, sampled_at DESC"
        ),
        {"uuids": sorted(uuids), "since": start - timedelta(seconds=max_gap_s), "start": start},
    )
    for uuid, at, energy_mj, power_w in rows:
        anchors[uuid] = (
            at.timestamp(),
            math.nan if energy_mj is None else float(energy_mj),
            math.nan if power_w is None else float(power_w),
        )
    return anchors


def _replace_instance_windows(
    conn: Connection,
    windows: Sequence[InstanceWindow],
    start: datetime,
    end: datetime,
    window_s: int,
    instances: set[str | None],
    nodes: set[str],
) -> int:
    """Replace the interval's windows of the instances and nodes of this load."""
    conn.execute(
        sa.text(
            "DELETE FROM instance_windows WHERE window_s = :w AND window_start_at >= :start"
            " AND window_start_at < :end AND (instance_id = ANY(:instances)"
            " OR string_to_array(node, ',') && CAST(:nodes AS text[]))"
        ),
        {
            "w": window_s,
            "start": start,
            "end": end,
            "instances": sorted(i for i in instances if i is not None),
            "nodes": sorted(nodes),
        },
    )
    return copy_rows(
        conn,
        "instance_windows",
        INSTANCE_WINDOW_COLUMNS,
        (
            (
                w.instance_id,
                w.window_start,
                w.window_s,
                w.node,
                w.gpus,
                w.samples,
                w.energy_j,
                w.mean_power_w,
                w.peak_power_w,
                w.counter_resets,
            )
            for w in windows
        ),
    )


def _drop_old_partitions(conn: Connection, end: datetime, retention_days: int) -> tuple[str, ...]:
    """Drop partitions whose whole day ended ``retention_days`` or more before ``end``."""
    cutoff = end - timedelta(days=retention_days)
    dropped: list[str] = []
    for name in sorted(_existing_partitions(conn)):
        if not name.startswith(PARTITION_PREFIX):
            continue
        try:
            day = datetime.strptime(name[len(PARTITION_PREFIX) :], "%Y%m%d").date()
        except ValueError:
            continue  # not one of ours: leave it alone
        if _day_bounds(day)[1] <= cutoff:
            raw = conn.connection.dbapi_connection
            assert isinstance(raw, psycopg.Connection)
            _execute(raw, sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
            dropped.append(name)
    if dropped:
        log.info(
            "dropped %d partition(s) older than %d days: %s", len(dropped), retention_days, dropped
        )
    return tuple(dropped)


# --- the writer thread ----------------------------------------------------------------------


class _CopyPipe:
    """Runs COPYs and statements on the connection in a thread, in the order given.

    The main thread keeps parsing while the server ingests; consecutive chunks for the same
    table share one COPY. The queue is bounded, so memory stays bounded when the server is
    the slower side. An error in the thread is raised in the main thread at the next call.
    """

    _STOP = object()

    def __init__(self, raw: psycopg.Connection, max_chunks: int = 8) -> None:
        self._raw = raw
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_chunks)
        self._error: BaseException | None = None
        self._aborted = False
        self.put_wait_s = 0.0
        self.busy_s = 0.0
        self._cursor = raw.cursor()
        self._copy_cm: AbstractContextManager[psycopg.Copy] | None = None
        self._copy: psycopg.Copy | None = None
        self._table: str | None = None
        self._thread = threading.Thread(target=self._run, name="wattplan-gpu-copy", daemon=True)
        self._thread.start()

    def copy(self, table: str, data: bytes) -> None:
        """Queue COPY text (complete lines) for ``table``."""
        if data:
            self._put(("copy", table, data))

    def execute(self, statement: sql.Composed, params: Sequence[object] | None = None) -> None:
        """Queue a statement (runs after everything queued before it)."""
        self._put(("sql", statement, params))

    def close(self) -> None:
        """Wait until everything queued has run; raise the thread's error, if any."""
        self._put(self._STOP)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Skip whatever is still queued and stop (the transaction will be rolled back)."""
        self._aborted = True
        self._put(self._STOP, raise_error=False)
        self._thread.join()

    def _put(self, item: object, *, raise_error: bool = True) -> None:
        tick = time.perf_counter()
        try:
            self._put_wait(item, raise_error=raise_error)
        finally:
            self.put_wait_s += time.perf_counter() - tick

    def _put_wait(self, item: object, *, raise_error: bool) -> None:
        while True:
            if raise_error:
                self._raise()
            elif not self._thread.is_alive():
                return
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is self._STOP:
                    break
                if self._aborted:
                    continue
                tick = time.perf_counter()
                self._handle(item)
                self.busy_s += time.perf_counter() - tick
            self._end_copy()
        except BaseException as exc:  # handed to the main thread
            self._error = exc
            if self._copy_cm is not None:
                # the first error is the one to report
                with contextlib.suppress(BaseException):
                    self._copy_cm.__exit__(type(exc), exc, exc.__traceback__)
            # keep taking items so a producer blocked on a full queue wakes up and sees it
            while self._queue.get() is not self._STOP:
                pass
        finally:
            self._cursor.close()

    def _handle(self, item: object) -> None:
        assert isinstance(item, tuple)
        if item[0] == "copy":
            if item[1] != self._table:
                self._end_copy()
                statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(item[1]),
                    sql.SQL(", ").join(sql.Identifier(c) for c in COPY_COLUMNS),
                )
                self._copy_cm = self._cursor.copy(statement)
                self._copy = self._copy_cm.__enter__()
                self._table = item[1]
            assert self._copy is not None
            self._copy.write(item[2])
        else:
            self._end_copy()
            self._cursor.execute(item[1], item[2])

    def _end_copy(self) -> None:
        if self._copy_cm is not None:
            cm, self._copy_cm, self._copy, self._table = self._copy_cm, None, None, None
            cm.__exit__(None, None, None)


@contextmanager
def _copy_pipe(raw: psycopg.Connection) -> Iterator[_CopyPipe]:
    pipe = _CopyPipe(raw)
    try:
        yield pipe
    except BaseException:
        pipe.abort()
        raise
    pipe.close()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of small objects are made.

    Parsing allocates no cycles; without the pause, CPython's collector re-scans the
    growing columns again and again (measured: about a tenth of the parse time).
    """
    was_enabled = gc.isenabled()
    interval = sys.getswitchinterval()
    gc.disable()
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        if was_enabled:
            gc.enable()

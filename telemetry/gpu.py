"""GPU telemetry files: the sample fields and their rules, the JSONL format, the line loop
every format shares, and per-instance energy windows from NVML energy-counter deltas.

The collector's own spool format (PostgreSQL COPY text under a header, read vectorised) is
``telemetry.gpu_spool``; it validates lines with :func:`parse_sample_object` and
:func:`scan_lines` from here, so both formats accept and reject the same samples.

Pure functions over bytes and plain values; the collector that writes the files is
``telemetry.nvml_collector`` and the database loader is ``wattplan.ingest_gpu``. The format,
the validation rules and the energy rules are documented in docs/telemetry.md.

One sample is one line, a JSON object whose keys match the ``gpu_telemetry`` columns. The
collector writes them in a canonical form (:func:`format_sample_line`: fixed key order, no
spaces, UTC timestamps with microseconds); the parser reads that form with one regular
expression and builds the ``COPY`` text from the matched text directly, which is what
makes bulk loading fast. Any other valid JSON spelling (other key order, spaces, extra
keys, offsets other than ``Z``) goes through :mod:`json` and the same rules, so both paths
accept and reject exactly the same samples.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from telemetry.lines import printable
from telemetry.requests import RejectedRow
from wattplan.errors import InputDataError

#: Measurement fields that NVML may report as not supported (value null).
MEASUREMENT_FIELDS: tuple[str, ...] = (
    "energy_mj",
    "power_w",
    "sm_clock_mhz",
    "memory_clock_mhz",
    "applied_sm_clock_mhz",
    "power_limit_w",
    "utilization_pct",
    "memory_used_bytes",
    "temperature_c",
)
#: Keys of one sample line, in the canonical order (the ``gpu_telemetry`` column order).
SAMPLE_KEYS: tuple[str, ...] = (
    "gpu_uuid",
    "sampled_at",
    "node",
    "gpu_index",
    "instance_id",
    *MEASUREMENT_FIELDS,
    "unsupported_fields",
)
#: ``gpu_telemetry`` columns a loader writes, in order: the sample keys (a row's file is
#: recorded per load in ``ingest_runs.files``).
COPY_COLUMNS: tuple[str, ...] = SAMPLE_KEYS

#: Samples must lie in [1970, 2200): anything else is a broken clock, not telemetry.
MIN_SAMPLED_AT = datetime(1970, 1, 1, tzinfo=UTC)
MAX_SAMPLED_AT = datetime(2200, 1, 1, tzinfo=UTC)
#: Longest identifier (uuid, node, instance id) accepted.
MAX_NAME_CHARS = 256
#: Default longest step between two samples of a GPU that still counts energy (s).
DEFAULT_MAX_GAP_S = 60.0

_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_MIN_T_S = MIN_SAMPLED_AT.timestamp()
_MAX_T_S = MAX_SAMPLED_AT.timestamp()

# kind, upper bound (inclusive) for each measurement field
_INT32, _INT64, _FLOAT, _PCT = "int32", "int64", "float", "pct"
_FIELD_KIND: dict[str, str] = {
    "energy_mj": _INT64,
    "power_w": _FLOAT,
    "sm_clock_mhz": _INT32,
    "memory_clock_mhz": _INT32,
    "applied_sm_clock_mhz": _INT32,
    "power_limit_w": _FLOAT,
    "utilization_pct": _PCT,
    "memory_used_bytes": _INT64,
    "temperature_c": _FLOAT,
}

# --- the canonical line, matched with one regular expression --------------------------------
# Identifiers of the canonical form use a conservative character set, so the matched text
# needs no COPY escaping; anything else (still valid) takes the json path.
_NAME = r'"([A-Za-z0-9_.:/@+-]{1,128})"'
_NAME_OR_NULL = r'(?:"([A-Za-z0-9_.:/@+-]{1,128})"|null)'
_I32 = r"(?:(0|[1-9][0-9]{0,8})|null)"  # < 10**9, fits a PostgreSQL integer
_I64 = r"(?:(0|[1-9][0-9]{0,17})|null)"  # < 10**18, fits a bigint
_FLT = r"(?:((?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,17})?)|null)"  # finite, >= 0, no exponent
_PCT_RE = r"(?:(100(?:\.0{1,17})?|[1-9]?[0-9](?:\.[0-9]{1,17})?)|null)"
_FAST_PART = {_INT32: _I32, _INT64: _I64, _FLOAT: _FLT, _PCT: _PCT_RE}
_CANONICAL = re.compile(
    r'\{"gpu_uuid":'
    + _NAME
    + r',"sampled_at":"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z)"'
    + r',"node":'
    + _NAME
    + r',"gpu_index":(0|[1-9][0-9]{0,8}),"instance_id":'
    + _NAME_OR_NULL
    + "".join(f',"{name}":{_FAST_PART[_FIELD_KIND[name]]}' for name in MEASUREMENT_FIELDS)
    + r',"unsupported_fields":(\[\]|\["[a-z_]{1,32}"(?:,"[a-z_]{1,32}"){0,8}\])\}'
)
_NULL = "\\N"  # COPY text NULL
#: What a blank line may hold (ASCII whitespace, as ``bytes.strip`` sees it).
_BLANK = " \t\n\r\x0b\x0c"


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One NVML reading of one GPU (a row of ``gpu_telemetry``).

    Attributes:
        gpu_uuid: NVML UUID of the GPU (``GPU-...`` or ``MIG-...``).
        sampled_at: When the collector's sweep read the GPU (aware, UTC).
        node: Host the GPU is in.
        gpu_index: NVML index of the GPU on its node.
        instance_id: Serving instance the GPU belongs to, None when unassigned.
        energy_mj: NVML total-energy counter since the driver loaded, millijoules.
        power_w: Power draw, watts.
        sm_clock_mhz: SM clock, MHz.
        memory_clock_mhz: Memory clock, MHz.
        applied_sm_clock_mhz: Applications (target) SM clock, MHz, where readable.
        power_limit_w: Enforced power limit, watts.
        utilization_pct: GPU utilisation over NVML's last sample period, percent.
        memory_used_bytes: Device memory in use, bytes.
        temperature_c: GPU temperature, degrees Celsius.
        unsupported_fields: Measurement fields NVML reported as not supported.
        source: File the sample came from.
        line_no: 1-based line number in that file.
    """

    gpu_uuid: str
    sampled_at: datetime
    node: str
    gpu_index: int
    instance_id: str | None
    energy_mj: int | None
    power_w: float | None
    sm_clock_mhz: int | None
    memory_clock_mhz: int | None
    applied_sm_clock_mhz: int | None
    power_limit_w: float | None
    utilization_pct: float | None
    memory_used_bytes: int | None
    temperature_c: float | None
    unsupported_fields: tuple[str, ...] = ()
    source: str = ""
    line_no: int = 0


@dataclass(frozen=True)
class ParsedGpuFile:
    """Result of parsing one telemetry file: ``rows_read == len(samples) + len(rejected)``.

    Blank lines are not rows and are not counted.
    """

    samples: tuple[GpuSample, ...]
    rejected: tuple[RejectedRow, ...]
    rows_read: int


@dataclass(frozen=True)
class InstanceWindow:
    """Energy and power of one serving instance in one window (a row of ``instance_windows``).

    Attributes:
        instance_id: The serving instance.
        window_start: Window start (aware, UTC).
        window_s: Window length, seconds.
        node: Node(s) of the instance's GPUs, sorted and comma-separated.
        gpus: Distinct GPUs with samples in the window.
        samples: GPU samples in the window.
        energy_j: Energy of the instance's GPUs attributed to the window, joules.
        mean_power_w: Mean over the window's sample times of the instance's summed power, W.
        peak_power_w: Highest summed power at one sample time, W.
        counter_resets: Energy-counter resets (counter went backwards) seen in the window.
    """

    instance_id: str
    window_start: datetime
    window_s: int
    node: str
    gpus: int
    samples: int
    energy_j: float
    mean_power_w: float | None
    peak_power_w: float | None
    counter_resets: int


# --- writing --------------------------------------------------------------------------------


def format_timestamp(moment: datetime) -> str:
    """Canonical UTC text of a sample time: ``2026-03-01T12:00:01.000000Z``.

    Raises:
        ValueError: the time is naive.
    """
    if moment.tzinfo is None:
        raise ValueError("sample times must be aware (UTC)")
    return moment.astimezone(UTC).strftime(_TS_FORMAT)


def format_sample_line(record: Mapping[str, Any]) -> str:
    """One sample as its canonical JSON line (no trailing newline).

    Args:
        record: The :data:`SAMPLE_KEYS` (``sampled_at`` an aware datetime; missing
            measurement keys are written as null, ``unsupported_fields`` defaults to []).
    """
    values: dict[str, Any] = {}
    for key in SAMPLE_KEYS:
        value = record.get(key)
        if key == "sampled_at":
            value = format_timestamp(value) if isinstance(value, datetime) else value
        elif key == "unsupported_fields":
            value = list(value or ())
        values[key] = value
    return json.dumps(values, separators=(",", ":"), allow_nan=False)


# --- spool file names -----------------------------------------------------------------------

#: Closed spool files the collector writes: ``gpu-<node>-<first sample, UTC,
#: %Y%m%dT%H%M%S.%fZ>.tsv`` (the spool format, :mod:`telemetry.gpu_spool`).
SPOOL_SUFFIX = ".tsv"
#: GPU telemetry files in the JSONL format (this module), from other producers.
JSONL_SUFFIX = ".jsonl"
#: Suffixes of the GPU telemetry files loaders read.
TELEMETRY_SUFFIXES = (SPOOL_SUFFIX, JSONL_SUFFIX)
#: Appended to the name of a file the collector is still writing (never read by loaders).
PART_SUFFIX = ".part"
_FILE_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"
_FILE_NAME = re.compile(r"gpu-(.+)-([0-9]{8}T[0-9]{6}\.[0-9]{6}Z)(?:-[0-9]+)?\.(?:tsv|jsonl)")
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def spool_file_name(node: str, first_sampled_at: datetime, suffix: str = SPOOL_SUFFIX) -> str:
    """Name of a closed telemetry file: ``gpu-<node>-<first sample UTC><suffix>``.

    Characters of ``node`` outside ``[A-Za-z0-9_.-]`` become ``_``.
    """
    safe = _UNSAFE_FILE_CHARS.sub("_", node) or "_"
    return f"gpu-{safe}-{first_sampled_at.astimezone(UTC).strftime(_FILE_TIME_FORMAT)}{suffix}"


def parse_spool_file_name(name: str) -> tuple[str, datetime] | None:
    """``(node as written in the name, first sample time)`` of a spool file name, else None."""
    match = _FILE_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        moment = datetime.strptime(match.group(2), _FILE_TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None
    return match.group(1), moment


# --- parsing --------------------------------------------------------------------------------


class _Reject(ValueError):
    """A line breaks a rule; carries the time read before the rule broke (if any)."""

    def __init__(self, reason: str, t_s: float | None = None) -> None:
        super().__init__(reason)
        self.t_s = t_s


@dataclass
class GpuScan:
    """Everything one pass over telemetry files yields, in columns (see :func:`scan_gpu_bytes`).

    Column lists hold the accepted samples *in the interval* in line order; ``copy_by_day``
    holds their ``COPY`` text (rows of :data:`COPY_COLUMNS`) in chunks by UTC day
    (``YYYYMMDD``). ``anchors`` keeps, per GPU, the latest accepted sample before the
    interval as ``(t_s, energy_mj, power_w)`` for energy deltas. ``rejected`` holds every
    rejected line whose attributed time is in the interval or unknown.
    """

    t_s: array[float] = field(default_factory=lambda: array("d"))
    gpu_uuid: list[str] = field(default_factory=list)
    node: list[str] = field(default_factory=list)
    instance_id: list[str | None] = field(default_factory=list)
    energy_mj: array[float] = field(default_factory=lambda: array("d"))
    power_w: array[float] = field(default_factory=lambda: array("d"))
    copy_by_day: dict[str, list[bytes]] = field(default_factory=dict)
    samples: list[GpuSample] = field(default_factory=list)
    anchors: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    rejected: list[RejectedRow] = field(default_factory=list)
    rows_outside: int = 0

    @property
    def rows_loaded(self) -> int:
        """Accepted samples in the interval."""
        return len(self.t_s)


def parse_gpu_file(path: Path, *, source: str | None = None) -> ParsedGpuFile:
    """Parse one telemetry file; bad lines become :class:`RejectedRow` s, never exceptions.

    Rejected: lines that are not valid UTF-8 or not JSON (a truncated last line included),
    not an object, missing or invalid required fields (``gpu_uuid``, ``sampled_at`` with a
    time zone, ``node``, ``gpu_index``), measurements that are not finite non-negative
    numbers of the column's type and range, unknown ``unsupported_fields`` names, and a
    repeated ``(gpu_uuid, sampled_at)`` (the first one is kept). Each rejected row's
    ``attributed_at`` is its own ``sampled_at`` when readable, else the nearest readable one
    before it (after it, at the start of a file).

    Args:
        path: The file.
        source: Name stored with each row; defaults to the file name.

    Raises:
        InputDataError: the file is missing or unreadable.
    """
    scan = scan_file_bytes(read_gpu_file(path), source or path.name, keep_samples=True)
    return ParsedGpuFile(
        tuple(scan.samples), tuple(scan.rejected), len(scan.samples) + len(scan.rejected)
    )


def scan_file_bytes(
    data: bytes,
    source: str,
    *,
    start_s: float = -math.inf,
    end_s: float = math.inf,
    seen: SeenSamples | None = None,
    keep_samples: bool = False,
    into: GpuScan | None = None,
) -> GpuScan:
    """Scan one telemetry file in the format its name says: ``*.jsonl`` JSONL
    (:func:`scan_gpu_bytes`), anything else the collector's spool format
    (:func:`telemetry.gpu_spool.scan_spool_bytes`). Arguments as for :func:`scan_gpu_bytes`.
    """
    if source.endswith(JSONL_SUFFIX):
        scan = scan_gpu_bytes
    else:
        from telemetry.gpu_spool import scan_spool_bytes as scan  # the module imports this one
    return scan(
        data,
        source,
        start_s=start_s,
        end_s=end_s,
        seen=seen,
        keep_samples=keep_samples,
        into=into,
    )


def read_gpu_file(path: Path) -> bytes:
    """The bytes of a telemetry file.

    Raises:
        InputDataError: the file is missing, a folder, or unreadable.
    """
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputDataError(
            f"cannot read GPU telemetry file {path}: {exc.strerror or exc}; check the path "
            "(the collector's spool folder holds closed files named gpu-<node>-<time>.tsv)"
        ) from exc


def _split_lines(data: bytes) -> tuple[list[str | bytes], bool]:
    """Lines of ``data`` (str when valid UTF-8, else the raw bytes) and whether it ends in \\n."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    ends_in_newline = data.endswith(b"\n")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        lines: list[str | bytes] = []
        for chunk in data.split(b"\n"):
            try:
                lines.append(chunk.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append(chunk)
        return lines, ends_in_newline
    return list(text.split("\n")), ends_in_newline


class SeenSamples:
    """The ``(gpu_uuid, sampled_at)`` keys accepted so far in one load, to reject repeats.

    Kept as one sorted list of sample times (integer microseconds since the epoch, see
    :func:`micros`) per GPU: samples arrive in time order, so the common case is one
    comparison and an append (far cheaper than a set of tuples).
    """

    def __init__(self) -> None:
        self.by_gpu: dict[str, list[int]] = {}

    def add(self, gpu_uuid: str, sampled_at_us: int) -> bool:
        """Record a key; False if it was already there."""
        times = self.by_gpu.get(gpu_uuid)
        if times is None:
            self.by_gpu[gpu_uuid] = [sampled_at_us]
            return True
        if sampled_at_us > times[-1]:
            times.append(sampled_at_us)
            return True
        i = bisect.bisect_left(times, sampled_at_us)
        if i < len(times) and times[i] == sampled_at_us:
            return False
        times.insert(i, sampled_at_us)
        return True


def micros(t_s: float) -> int:
    """A sample time in whole microseconds since the epoch (exact for [1970, 2200): the
    float's error there is below 1 us)."""
    return round(t_s * 1_000_000)


def scan_gpu_bytes(
    data: bytes,
    source: str,
    *,
    start_s: float = -math.inf,
    end_s: float = math.inf,
    seen: SeenSamples | None = None,
    keep_samples: bool = False,
    into: GpuScan | None = None,
) -> GpuScan:
    """Validate every line of one telemetry file and collect the interval's samples.

    The workhorse of :func:`parse_gpu_file` and of the bulk loader. Lines whose
    ``sampled_at`` is outside ``[start_s, end_s)`` are checked but not collected (those
    before the interval update ``anchors``; all are counted in ``rows_outside``); rejected
    lines attributed outside the interval are left out as well.

    Args:
        data: The file's bytes.
        source: Name stored with each row (the file name).
        start_s: Interval start, seconds since the epoch.
        end_s: Interval end, seconds since the epoch.
        seen: Keys accepted so far in this load; share one across files so a repeat in
            another file is rejected too.
        keep_samples: Build :class:`GpuSample` objects instead of ``COPY`` text (the pure
            API; slower).
        into: Append to this scan instead of a new one.
    """
    lines, ends_in_newline = _split_lines(data)
    if lines and lines[-1] in ("", b""):
        lines.pop()
        ends_in_newline = True
    return scan_lines(
        lines,
        ends_in_newline,
        source,
        start_s=start_s,
        end_s=end_s,
        seen=seen,
        keep_samples=keep_samples,
        into=into,
    )


#: A line parser of one file format: the line (stripped, not blank) -> ``(texts, t_s,
#: unsupported)`` where ``texts`` are the 14 sample values before ``unsupported_fields`` as
#: unescaped text (None for null) and ``unsupported`` is ``(array text, names)``; raises
#: :class:`_Reject` for a line that breaks a rule.
LineParser = Callable[[str], tuple[tuple[str | None, ...], float, tuple[str, tuple[str, ...]]]]


def scan_lines(
    lines: Sequence[str | bytes],
    ends_in_newline: bool,
    source: str,
    *,
    first_line_no: int = 1,
    parse_line: LineParser | None = None,
    start_s: float = -math.inf,
    end_s: float = math.inf,
    seen: SeenSamples | None = None,
    keep_samples: bool = False,
    into: GpuScan | None = None,
) -> GpuScan:
    """The line loop of :func:`scan_gpu_bytes`, for any line format.

    Args:
        lines: The file's lines (str, or bytes where not valid UTF-8), without the final
            empty one.
        ends_in_newline: Whether the file ends in a newline (else its last line may be a
            truncated write).
        source: Name stored with each row (the file name).
        first_line_no: Line number of ``lines[0]`` (2 after a header line).
        parse_line: Parser of a line; None: the JSONL format (canonical lines by regular
            expression, any other spelling by :mod:`json`).
        start_s, end_s, seen, keep_samples, into: As for :func:`scan_gpu_bytes`.
    """
    out = into if into is not None else GpuScan()
    by_gpu = (SeenSamples() if seen is None else seen).by_gpu
    # Rejected lines with no readable time so far wait here for the next readable one.
    pending: list[tuple[int, str | bytes, str]] = []
    last_t_s: float | None = None
    last_line_no = first_line_no + len(lines) - 1
    fast = _CANONICAL.fullmatch if parse_line is None else _no_match
    slow = _parse_slow if parse_line is None else parse_line
    fromiso = datetime.fromisoformat
    arrays = _ARRAY_CACHE
    nan = math.nan
    interned: dict[str, str] = {}
    add_t, add_gpu, add_node = out.t_s.append, out.gpu_uuid.append, out.node.append
    add_inst, add_energy, add_power = (
        out.instance_id.append,
        out.energy_mj.append,
        out.power_w.append,
    )
    day_key = ""
    sweep_text, sweep_t_s = "", 0.0
    no_lines: list[str] = []
    add_copy: Callable[[str], None] = no_lines.append
    day_lines: dict[str, list[str]] = {}

    def reject(line_no: int, raw: str | bytes, reason: str, t_s: float | None) -> None:
        nonlocal last_t_s
        if t_s is None and last_t_s is None:
            pending.append((line_no, raw, reason))
            return
        if t_s is not None:
            last_t_s = t_s
            _flush_pending(out, pending, source, t_s, start_s, end_s)
        _add_reject(out, source, line_no, raw, reason, last_t_s, start_s, end_s)

    for line_no, line in enumerate(lines, start=first_line_no):
        if isinstance(line, bytes):
            if line.strip(_BLANK.encode()):
                reject(line_no, line, "not valid UTF-8 (binary data or another encoding)", None)
            continue
        match = fast(line)
        if match is not None:
            # canonical line: nulls come back as COPY's \N, identifiers need no escaping
            g: Sequence[Any] = match.groups(_NULL)
            if g[1] == sweep_text:  # all GPUs of a sweep share one time
                t_s = sweep_t_s
            else:
                try:
                    t_s = fromiso(g[1]).timestamp()
                except ValueError:
                    reject(line_no, line, f"sampled_at {g[1]!r} is not a valid time", None)
                    continue
                sweep_text, sweep_t_s = g[1], t_s
            unsupported = arrays.get(g[14]) or _array_from_json(g[14])
            if unsupported.__class__ is str or not _MIN_T_S <= t_s < _MAX_T_S:
                reason = (
                    unsupported
                    if isinstance(unsupported, str)
                    else f"sampled_at {g[1]} outside [1970, 2200)"
                )
                reject(line_no, line, reason, t_s)
                continue
            canonical = True
        else:
            stripped = line.strip(_BLANK)
            if not stripped:
                continue
            try:
                g, t_s, unsupported = slow(stripped)
            except _Reject as exc:
                reason = str(exc)
                if line_no == last_line_no and not ends_in_newline:
                    reason = f"last line has no newline (truncated write?): {reason}"
                reject(line_no, line, reason, exc.t_s)
                continue
            canonical = False
        # an accepted sample: its time attributes waiting rejects
        last_t_s = t_s
        if pending:
            _flush_pending(out, pending, source, t_s, start_s, end_s)
        uuid = g[0]
        energy = g[5]
        power = g[6]
        if t_s < start_s or t_s >= end_s:
            out.rows_outside += 1
            if t_s < start_s:
                anchor = out.anchors.get(uuid)
                if anchor is None or anchor[0] < t_s:
                    out.anchors[uuid] = (t_s, _num(energy), _num(power))
            continue
        ts_text = g[1]
        t_us = round(t_s * 1_000_000)  # micros(), inlined
        times = by_gpu.get(uuid)
        if times is None:
            by_gpu[uuid] = [t_us]
        elif t_us > times[-1]:
            times.append(t_us)
        else:
            i = bisect.bisect_left(times, t_us)
            if i < len(times) and times[i] == t_us:
                reason = f"duplicate: {uuid} at {ts_text} was already read (first one kept)"
                _add_reject(out, source, line_no, line, reason, t_s, start_s, end_s)
                continue
            times.insert(i, t_us)
        instance = g[4]
        if canonical and instance == _NULL:
            instance = None
        add_t(t_s)
        # one string object per distinct name keeps millions of rows small
        add_gpu(interned.setdefault(uuid, uuid))
        add_node(interned.setdefault(g[2], g[2]))
        add_inst(instance if instance is None else interned.setdefault(instance, instance))
        add_energy(nan if energy is None or energy == _NULL else float(energy))
        add_power(nan if power is None or power == _NULL else float(power))
        if keep_samples:
            names: tuple[str, ...] = unsupported[1]  # type: ignore[assignment]
            out.samples.append(_sample(g, instance, t_s, names, source, line_no))
            continue
        if ts_text[:10] != day_key:
            day_key = ts_text[:10]
            add_copy = day_lines.setdefault(day_key.replace("-", ""), []).append
        if canonical:
            add_copy(f"{chr_tab.join(g[:14])}\t{unsupported[0]}\n")
        else:
            head = chr_tab.join(map(_copy_field, g[:14]))
            add_copy(f"{head}\t{unsupported[0]}\n")
    for line_no, raw, reason in pending:  # a file without a single readable time
        _add_reject(out, source, line_no, raw, reason, None, start_s, end_s)
    for day, texts in day_lines.items():
        out.copy_by_day.setdefault(day, []).append("".join(texts).encode())
    return out


def _no_match(line: str) -> None:
    return None


chr_tab = "\t"


def _num(text: str | None) -> float:
    return math.nan if text is None or text == _NULL else float(text)


def _flush_pending(
    out: GpuScan,
    pending: list[tuple[int, str | bytes, str]],
    source: str,
    t_s: float,
    start_s: float,
    end_s: float,
) -> None:
    for line_no, raw, reason in pending:
        _add_reject(out, source, line_no, raw, reason, t_s, start_s, end_s)
    pending.clear()


def _add_reject(
    out: GpuScan,
    source: str,
    line_no: int,
    raw: str | bytes,
    reason: str,
    t_s: float | None,
    start_s: float,
    end_s: float,
) -> None:
    if t_s is not None and not start_s <= t_s < end_s:
        return
    at = None if t_s is None else datetime.fromtimestamp(t_s, tz=UTC)
    out.rejected.append(RejectedRow(source, line_no, printable(raw), reason, attributed_at=at))


def _sample(
    g: Sequence[str | None],
    instance: str | None,
    t_s: float,
    unsupported: tuple[str, ...],
    source: str,
    line_no: int,
) -> GpuSample:
    def i(text: str | None) -> int | None:
        return None if text is None or text == _NULL else int(text)

    def f(text: str | None) -> float | None:
        return None if text is None or text == _NULL else float(text)

    return GpuSample(
        gpu_uuid=str(g[0]),
        sampled_at=datetime.fromtimestamp(t_s, tz=UTC),
        node=str(g[2]),
        gpu_index=int(str(g[3])),
        instance_id=instance,
        energy_mj=i(g[5]),
        power_w=f(g[6]),
        sm_clock_mhz=i(g[7]),
        memory_clock_mhz=i(g[8]),
        applied_sm_clock_mhz=i(g[9]),
        power_limit_w=f(g[10]),
        utilization_pct=f(g[11]),
        memory_used_bytes=i(g[12]),
        temperature_c=f(g[13]),
        unsupported_fields=unsupported,
        source=source,
        line_no=line_no,
    )


def _copy_escape(text: str) -> str:
    """Escape text for PostgreSQL's COPY text format (identifiers are printable)."""
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return (
            text.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return text


def _copy_field(value: str | None) -> str:
    return _NULL if value is None else _copy_escape(value)


# unsupported_fields: JSON list text -> (PostgreSQL array text, names) or a reject reason
_ARRAY_CACHE: dict[str, tuple[str, tuple[str, ...]] | str] = {}


def _array_from_json(text: str) -> tuple[str, tuple[str, ...]] | str:
    try:
        result: tuple[str, tuple[str, ...]] | str = _unsupported_array(json.loads(text))
    except _Reject as exc:
        result = str(exc)
    if len(_ARRAY_CACHE) < 4096:
        _ARRAY_CACHE[text] = result
    return result


def _unsupported_array(value: object) -> tuple[str, tuple[str, ...]]:
    if value is None:
        return "{}", ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Reject("unsupported_fields must be a list of field names")
    unknown = [v for v in value if v not in _FIELD_KIND]
    if unknown:
        raise _Reject(
            f"unsupported_fields names unknown fields {unknown[:3]}; known: "
            f"{', '.join(MEASUREMENT_FIELDS)}"
        )
    if len(set(value)) != len(value):
        raise _Reject("unsupported_fields repeats a name")
    return "{" + ",".join(value) + "}", tuple(value)


def _reject_constant(name: str) -> float:
    raise _Reject(f"{name} is not a number JSON allows (NaN/Infinity)")


def _parse_slow(
    line: str,
) -> tuple[tuple[str | None, ...], float, tuple[str, tuple[str, ...]]]:
    """Validate a non-canonical line: (COPY-ready texts, t_s, unsupported) or raise _Reject."""
    try:
        obj = json.loads(line, parse_constant=_reject_constant)
    except _Reject:
        raise
    except (ValueError, RecursionError) as exc:
        raise _Reject(f"not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(obj, dict):
        raise _Reject(f"not a JSON object but {type(obj).__name__}")
    return parse_sample_object(obj)


def parse_sample_object(
    obj: dict[str, Any],
) -> tuple[tuple[str | None, ...], float, tuple[str, tuple[str, ...]]]:
    """Validate one sample given as a mapping of the :data:`SAMPLE_KEYS` to JSON-like values
    (str, int, float, list, None): what every line format reduces to.

    Returns:
        ``(texts, t_s, unsupported)`` as described for :data:`LineParser`.

    Raises:
        _Reject: a rule is broken (the message is the reject reason).
    """
    t_s = None
    raw_at = obj.get("sampled_at")
    try:
        if not isinstance(raw_at, str):
            raise _Reject("sampled_at is missing or not a string (ISO 8601 with time zone)")
        try:
            moment = datetime.fromisoformat(raw_at)
        except ValueError:
            raise _Reject(f"sampled_at {raw_at[:60]!r} is not an ISO 8601 time") from None
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise _Reject(f"sampled_at {raw_at[:60]!r} has no time zone (write ...Z)")
        moment = moment.astimezone(UTC)
        if not MIN_SAMPLED_AT <= moment < MAX_SAMPLED_AT:
            raise _Reject(f"sampled_at {raw_at[:60]} outside [1970, 2200)")
        t_s = moment.timestamp()
        texts: list[str | None] = [
            _name(obj, "gpu_uuid", required=True),
            moment.strftime(_TS_FORMAT),
            _name(obj, "node", required=True),
            _integer(obj, "gpu_index", _INT32_MAX, required=True),
            _name(obj, "instance_id", required=False),
        ]
        texts.extend(_measurement(obj, name) for name in MEASUREMENT_FIELDS)
        unsupported = _unsupported_array(obj.get("unsupported_fields"))
    except _Reject as exc:
        exc.t_s = t_s
        raise
    return tuple(texts), t_s, unsupported


def _name(obj: dict[str, Any], key: str, *, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _Reject(f"{key} is missing")
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise _Reject(f"{key} must be a non-empty string of at most {MAX_NAME_CHARS} characters")
    if not value.isprintable():
        raise _Reject(f"{key} holds control or unprintable characters")
    return value


def _integer(obj: dict[str, Any], key: str, maximum: int, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _Reject(f"{key} is missing")
        return None
    if type(value) is not int:
        raise _Reject(f"{key} must be an integer, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise _Reject(f"{key} {value} outside [0, {maximum}]")
    return str(value)


def _measurement(obj: dict[str, Any], key: str) -> str | None:
    kind = _FIELD_KIND[key]
    if kind == _INT32:
        return _integer(obj, key, _INT32_MAX)
    if kind == _INT64:
        return _integer(obj, key, _INT64_MAX)
    value = obj.get(key)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise _Reject(f"{key} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise _Reject(f"{key} is too large") from None
    if not math.isfinite(number) or number < 0:
        raise _Reject(f"{key} {number} must be finite and >= 0")
    if kind == _PCT and number > 100:
        raise _Reject(f"{key} {number} must be at most 100")
    return repr(number)


# --- energy windows -------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuColumns:
    """Samples as columns for :func:`aggregate_columns` (missing numbers are NaN).

    Attributes:
        t_s: Sample times, seconds since the epoch.
        gpu_uuid: GPU of each sample.
        node: Node of each sample.
        instance_id: Instance of each sample (None: not counted in any instance window).
        energy_mj: Energy counter, mJ.
        power_w: Power draw, W.
    """

    t_s: np.ndarray
    gpu_uuid: Sequence[str]
    node: Sequence[str]
    instance_id: Sequence[str | None]
    energy_mj: np.ndarray
    power_w: np.ndarray


def aggregate_instance_windows(
    samples: Iterable[GpuSample],
    start: datetime,
    end: datetime,
    window_s: int,
    *,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
) -> list[InstanceWindow]:
    """Energy and power per serving instance and window of ``[start, end)``.

    Rules (docs/telemetry.md, "Energy windows"):

    * Energy comes from energy-counter deltas between consecutive samples of each GPU,
      summed over the instance's GPUs. The step from sample ``a`` to sample ``b`` is
      attributed entirely to the window (and instance) of ``b``, the later sample: steps
      never straddle two windows, so consecutive runs never count a step twice and the sum
      over windows equals the counter's increase.
    * A counter that goes backwards is a reset (driver reload): it is counted in
      ``counter_resets``, and that step's energy is the step's power integrated over time
      (trapezoid of the two samples' ``power_w``; 0 if either is missing). A missing
      counter on either side is handled the same way without counting a reset.
    * A step longer than ``max_gap_s`` (the collector was down) contributes no energy: it
      cannot be placed in time.
    * Samples before ``start`` serve only as each GPU's previous reading (the latest one
      counts); samples at or after ``end`` are ignored. Samples without an instance are
      not counted. Windows without samples are not emitted (unknown, not zero).
    * Power at a sample time is the sum of the instance's GPUs' ``power_w`` sampled at that
      exact time (the collector stamps all GPUs of a sweep with one time); the window's
      mean and peak are over those sums.

    Raises:
        ValueError: the interval is naive, empty, or not a whole number of windows.
    """
    t_s, gpu, node, inst, energy, power = [], [], [], [], [], []
    for s in samples:
        t_s.append(s.sampled_at.timestamp())
        gpu.append(s.gpu_uuid)
        node.append(s.node)
        inst.append(s.instance_id)
        energy.append(math.nan if s.energy_mj is None else float(s.energy_mj))
        power.append(math.nan if s.power_w is None else s.power_w)
    columns = GpuColumns(
        np.asarray(t_s, dtype=np.float64),
        gpu,
        node,
        inst,
        np.asarray(energy, dtype=np.float64),
        np.asarray(power, dtype=np.float64),
    )
    return aggregate_columns(columns, start, end, window_s, max_gap_s=max_gap_s)


def _codes(values: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """Integer codes of ``values`` (first-seen order) and the distinct values."""
    names = list(dict.fromkeys(values))
    index = {name: code for code, name in enumerate(names)}
    return np.fromiter(map(index.__getitem__, values), dtype=np.int64, count=len(values)), names


def _check_interval(start: datetime, end: datetime, window_s: int) -> int:
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("the interval must be aware datetimes")
    span_s = (end - start).total_seconds()
    if window_s <= 0 or span_s <= 0 or span_s % window_s:
        raise ValueError(
            f"interval {start.isoformat()}..{end.isoformat()} is not a positive whole number "
            f"of {window_s} s windows"
        )
    return int(span_s // window_s)


def aggregate_columns(
    columns: GpuColumns,
    start: datetime,
    end: datetime,
    window_s: int,
    *,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
    anchors: Mapping[str, tuple[float, float, float]] | None = None,
) -> list[InstanceWindow]:
    """:func:`aggregate_instance_windows` over columns (vectorised; what the loader uses).

    Args:
        columns: The samples (any order, any time).
        start: Interval start (aware).
        end: Interval end (aware), a whole number of windows after ``start``.
        window_s: Window length, seconds.
        max_gap_s: Longest step that still counts energy, seconds.
        anchors: Extra previous readings ``gpu_uuid -> (t_s, energy_mj, power_w)`` from
            before ``start`` (e.g. read back from the database); the latest reading before
            ``start`` of each GPU wins, wherever it comes from.
    """
    n_windows = _check_interval(start, end, window_s)
    start_s, end_s = start.timestamp(), end.timestamp()
    t_all = np.asarray(columns.t_s, dtype=np.float64)
    energy_all = np.asarray(columns.energy_mj, dtype=np.float64)
    power_all = np.asarray(columns.power_w, dtype=np.float64)
    # previous readings: the latest before start of each GPU, from the columns or anchors
    latest = {u: r for u, r in (anchors or {}).items() if r[0] < start_s}
    for idx in np.flatnonzero(t_all < start_s).tolist():
        uuid = columns.gpu_uuid[idx]
        if uuid not in latest or latest[uuid][0] < t_all[idx]:
            latest[uuid] = (float(t_all[idx]), float(energy_all[idx]), float(power_all[idx]))
    inside = np.flatnonzero((t_all >= start_s) & (t_all < end_s))
    if not len(inside):
        return []
    gpu_all, gpu_names = _codes(columns.gpu_uuid)
    inst_all, inst_names = _codes(columns.instance_id)
    node_of_gpu = dict(zip(columns.gpu_uuid, columns.node, strict=True))
    if None in inst_names:  # samples without an instance are not counted
        inst_all = np.where(inst_all == inst_names.index(None), -1, inst_all)
    gpu_codes = {name: code for code, name in enumerate(gpu_names)}
    prev = [(gpu_codes[u], r) for u, r in sorted(latest.items()) if u in gpu_codes]
    n_real = len(inside)
    t = np.concatenate([t_all[inside], [r[0] for _, r in prev]])
    energy = np.concatenate([energy_all[inside], [r[1] for _, r in prev]])
    power = np.concatenate([power_all[inside], [r[2] for _, r in prev]])
    gpu = np.concatenate([gpu_all[inside], np.asarray([c for c, _ in prev], dtype=np.int64)])
    inst = np.concatenate([inst_all[inside], np.full(len(prev), -1, dtype=np.int64)])
    real = np.arange(len(t)) < n_real

    # steps between consecutive readings of each GPU; a step belongs to its later sample
    order = np.lexsort((t, gpu))
    t, energy, power = t[order], energy[order], power[order]
    gpu, inst, real = gpu[order], inst[order], real[order]
    step_j = np.zeros(len(t))
    resets = np.zeros(len(t), dtype=np.int64)
    same = gpu[1:] == gpu[:-1]
    dt_s = t[1:] - t[:-1]
    both = ~np.isnan(energy[1:]) & ~np.isnan(energy[:-1])
    went_back = same & both & (energy[1:] < energy[:-1])
    counter_j = (energy[1:] - energy[:-1]) / 1000.0
    trapezoid_j = np.nan_to_num((power[1:] + power[:-1]) / 2.0 * dt_s, nan=0.0)
    step_j[1:] = np.where(
        same & (dt_s <= max_gap_s), np.where(both & ~went_back, counter_j, trapezoid_j), 0.0
    )
    resets[1:] = went_back

    mine = real & (inst >= 0)
    if not mine.any():
        return []
    t, power, gpu, inst = t[mine], power[mine], gpu[mine], inst[mine]
    step_j, resets = step_j[mine], resets[mine]
    window = np.minimum(((t - start_s) // window_s).astype(np.int64), n_windows - 1)
    keys, group = np.unique(inst * n_windows + window, return_inverse=True)
    n_groups = len(keys)
    energy_j = np.bincount(group, weights=step_j, minlength=n_groups)
    reset_count = np.bincount(group, weights=resets, minlength=n_groups)
    sample_count = np.bincount(group, minlength=n_groups)
    n_gpus = int(gpu.max()) + 1
    gpu_pairs = np.unique(group * n_gpus + gpu)
    gpu_count = np.bincount(gpu_pairs // n_gpus, minlength=n_groups)

    # instance power at each sample time = sum over its GPUs sampled at that time
    by_time = np.lexsort((t, group))
    g_sorted, t_sorted, p_sorted = group[by_time], t[by_time], power[by_time]
    first = np.ones(len(by_time), dtype=bool)
    first[1:] = (g_sorted[1:] != g_sorted[:-1]) | (t_sorted[1:] != t_sorted[:-1])
    starts = np.flatnonzero(first)
    sums = np.add.reduceat(np.nan_to_num(p_sorted, nan=0.0), starts)
    measured = np.add.reduceat((~np.isnan(p_sorted)).astype(np.int64), starts) > 0
    sum_group, sums = g_sorted[starts][measured], sums[measured]
    power_n = np.bincount(sum_group, minlength=n_groups)
    power_total = np.bincount(sum_group, weights=sums, minlength=n_groups)
    peak = np.full(n_groups, -np.inf)
    np.maximum.at(peak, sum_group, sums)

    node_sets: list[set[str]] = [set() for _ in range(n_groups)]
    for pair in gpu_pairs.tolist():  # a GPU is in one node
        node_sets[pair // n_gpus].add(node_of_gpu[gpu_names[pair % n_gpus]])
    result = []
    for i, k in enumerate(keys.tolist()):
        inst_code, w = divmod(k, n_windows)
        result.append(
            InstanceWindow(
                instance_id=str(inst_names[inst_code]),
                window_start=datetime.fromtimestamp(start_s + w * window_s, tz=UTC),
                window_s=window_s,
                node=",".join(sorted(node_sets[i])),
                gpus=int(gpu_count[i]),
                samples=int(sample_count[i]),
                energy_j=float(energy_j[i]),
                mean_power_w=float(power_total[i] / power_n[i]) if power_n[i] else None,
                peak_power_w=float(peak[i]) if power_n[i] else None,
                counter_resets=int(reset_count[i]),
            )
        )
    result.sort(key=lambda w: (w.instance_id, w.window_start))
    return result

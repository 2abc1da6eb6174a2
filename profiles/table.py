"""The profile table on disk: one CSV row per (serving config, request type).

A row carries the SLO capacity and a curve of *load points* from loaded idle (rate 0) to
capacity: request rate, instance power, and P50/P99 TTFT and TBT at that rate. List-valued
cells hold one value per load point, separated by ``;``. The calibration command
(``wattplan profiles calibrate``) and the profiler (``wattplan profile``) both write this
format; ``load_profiles`` reads it back into :class:`~wattplan.domain.Profile` values.

``write_profiles_csv`` and ``load_profile_records`` round-trip exactly: floats are written
with Python's shortest ``repr``, rows in the order given, ``\\n`` line ends, so the same
records always give the same bytes.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wattplan.domain import LONG_CONTEXT_TYPE, REQUEST_TYPES, Profile, ServingConfig
from wattplan.errors import InputDataError

#: Request types a profile row may name: the nine DynamoLLM types and the long-context class.
PROFILE_REQUEST_TYPES: tuple[str, ...] = (*REQUEST_TYPES, LONG_CONTEXT_TYPE)

#: How a row was obtained.
METHODS: tuple[str, ...] = ("calibrated", "measured", "manual")

#: Column order of the profile CSV.
PROFILE_COLUMNS: tuple[str, ...] = (
    "version",
    "model",
    "gpu_type",
    "tp",
    "spp",
    "kvp",
    "power_cap_w",
    "clock_mhz",
    "request_type",
    "capacity_rps",
    "ttft_slo_s",
    "tbt_slo_s",
    "load_rps",
    "power_w",
    "ttft_p50_s",
    "ttft_p99_s",
    "tbt_p50_s",
    "tbt_p99_s",
    "energy_per_request_j",
    "method",
    "source",
)
_LIST_COLUMNS = ("load_rps", "power_w", "ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s")
_SEP = ";"


@dataclass(frozen=True)
class LoadPoint:
    """What one instance does at one request rate: power and latency percentiles."""

    rate_rps: float
    power_w: float
    ttft_p50_s: float
    ttft_p99_s: float
    tbt_p50_s: float
    tbt_p99_s: float


@dataclass(frozen=True)
class ProfileRecord:
    """A profile with its load points and how it was obtained (one CSV or table row).

    ``profile.power_curve`` is the ``(rate, power)`` of ``points``; ``profile``'s latencies
    are those of the last point (capacity).
    """

    profile: Profile
    points: tuple[LoadPoint, ...]
    method: str = "calibrated"

    def __post_init__(self) -> None:
        curve = tuple((p.rate_rps, p.power_w) for p in self.points)
        name = f"profile {self.profile.config.key} {self.profile.request_type}"
        if curve != self.profile.power_curve:
            raise ValueError(f"{name}: load points do not match the profile's power curve")
        last = self.points[-1]
        if (last.ttft_p99_s, last.tbt_p99_s) != (self.profile.ttft_p99_s, self.profile.tbt_p99_s):
            raise ValueError(f"{name}: the last load point's P99 latencies are not the profile's")
        if self.method not in METHODS:
            raise ValueError(f"{name}: method {self.method!r} is not one of {METHODS}")


def make_record(
    config: ServingConfig,
    request_type: str,
    points: Sequence[LoadPoint],
    ttft_slo_s: float,
    tbt_slo_s: float,
    version: str,
    source: str,
    method: str = "calibrated",
) -> ProfileRecord:
    """Build a record whose profile's capacity is the last point's rate.

    Raises:
        ValueError: The points do not form a valid power curve (see ``Profile``).
    """
    last = points[-1]
    profile = Profile(
        config=config,
        request_type=request_type,
        capacity_rps=last.rate_rps,
        power_curve=tuple((p.rate_rps, p.power_w) for p in points),
        ttft_p99_s=last.ttft_p99_s,
        tbt_p99_s=last.tbt_p99_s,
        ttft_slo_s=ttft_slo_s,
        tbt_slo_s=tbt_slo_s,
        version=version,
        source=source,
        ttft_p50_s=last.ttft_p50_s,
        tbt_p50_s=last.tbt_p50_s,
    )
    return ProfileRecord(profile, tuple(points), method)


def _row(record: ProfileRecord) -> list[str]:
    profile, config = record.profile, record.profile.config

    def joined(values: Iterable[float]) -> str:
        return _SEP.join(repr(v) for v in values)

    points = record.points
    return [
        profile.version,
        config.model,
        config.gpu_type,
        str(config.tp),
        str(config.spp),
        str(config.kvp),
        str(config.power_cap_w),
        "" if config.clock_mhz is None else str(config.clock_mhz),
        profile.request_type,
        repr(profile.capacity_rps),
        repr(profile.ttft_slo_s),
        repr(profile.tbt_slo_s),
        joined(p.rate_rps for p in points),
        joined(p.power_w for p in points),
        joined(p.ttft_p50_s for p in points),
        joined(p.ttft_p99_s for p in points),
        joined(p.tbt_p50_s for p in points),
        joined(p.tbt_p99_s for p in points),
        repr(round(profile.energy_per_request_j, 1)),
        record.method,
        profile.source,
    ]


def format_profiles_csv(records: Iterable[ProfileRecord]) -> str:
    """Render records as CSV text (header first, ``\\n`` line ends)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PROFILE_COLUMNS)
    writer.writerows(_row(r) for r in records)
    return buffer.getvalue()


def write_profiles_csv(records: Iterable[ProfileRecord], path: Path) -> None:
    """Write records to a CSV file, creating its folder; same records, same bytes.

    Args:
        records: Rows to write, in the order to write them.
        path: Destination file; overwritten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(format_profiles_csv(records).encode("utf-8"))


class _Cells:
    """Typed access to one CSV row that names file, line and column in its errors."""

    def __init__(self, path: Path, line: int, row: dict[str, str]) -> None:
        self.path, self.line, self.row = path, line, row

    def fail(self, column: str, message: str) -> InputDataError:
        value = self.row.get(column)
        return InputDataError(
            f"{self.path}: line {self.line}: column {column}: {value!r} {message}"
        )

    def text(self, column: str) -> str:
        value = self.row.get(column)
        if not value:
            raise self.fail(column, "must not be empty")
        return value

    def _parse(
        self, column: str, text: str, kind: Callable[[str], float], positive: bool, where: str = ""
    ) -> float:
        try:
            value = kind(text)
        except ValueError as exc:
            name = getattr(kind, "__name__", kind)
            raise self.fail(column, f"{where}is not a valid {name}") from exc
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = ">0" if positive else ">=0"
            raise self.fail(column, f"{where}must be a finite number {bound}")
        return value

    def number(self, column: str, kind: Callable[[str], float], positive: bool) -> float:
        return self._parse(column, self.text(column), kind, positive)

    def numbers(self, column: str) -> list[float]:
        parts = self.text(column).split(_SEP)
        return [
            self._parse(column, part, float, False, f"item {i} ({part!r}) ")
            for i, part in enumerate(parts, start=1)
        ]


def _points(cells: _Cells) -> tuple[LoadPoint, ...]:
    columns = {c: cells.numbers(c) for c in _LIST_COLUMNS}
    counts = {len(v) for v in columns.values()}
    if len(counts) != 1:
        raise cells.fail("load_rps", f"list lengths differ across {', '.join(_LIST_COLUMNS)}")
    return tuple(
        LoadPoint(*(columns[c][i] for c in _LIST_COLUMNS)) for i in range(len(columns["load_rps"]))
    )


def _record(cells: _Cells) -> ProfileRecord:
    request_type = cells.text("request_type")
    if request_type not in PROFILE_REQUEST_TYPES:
        raise cells.fail("request_type", f"is not one of {', '.join(PROFILE_REQUEST_TYPES)}")
    method = cells.text("method")
    if method not in METHODS:
        raise cells.fail("method", f"is not one of {', '.join(METHODS)}")
    clock = cells.row.get("clock_mhz") or ""
    config = ServingConfig(
        model=cells.text("model"),
        gpu_type=cells.text("gpu_type"),
        tp=int(cells.number("tp", int, positive=True)),
        power_cap_w=int(cells.number("power_cap_w", int, positive=True)),
        clock_mhz=None if clock == "" else int(cells.number("clock_mhz", int, positive=True)),
        spp=int(cells.number("spp", int, positive=True)),
        kvp=int(cells.number("kvp", int, positive=True)),
    )
    capacity = cells.number("capacity_rps", float, positive=True)
    points = _points(cells)
    if points[-1].rate_rps != capacity:
        raise cells.fail("load_rps", f"must end at capacity_rps {capacity!r}")
    try:
        record = make_record(
            config,
            request_type,
            points,
            ttft_slo_s=cells.number("ttft_slo_s", float, positive=True),
            tbt_slo_s=cells.number("tbt_slo_s", float, positive=True),
            version=cells.text("version"),
            source=cells.text("source"),
            method=method,
        )
    except ValueError as exc:
        raise cells.fail("load_rps", f"does not form a valid power curve: {exc}") from exc
    energy = cells.number("energy_per_request_j", float, positive=False)
    if abs(energy - record.profile.energy_per_request_j) > 0.05 + 1e-9 * energy:
        raise cells.fail(
            "energy_per_request_j",
            f"disagrees with the last power / capacity ({record.profile.energy_per_request_j})",
        )
    return record


def load_profile_records(path: Path) -> list[ProfileRecord]:
    """Read and validate a profile CSV written by :func:`write_profiles_csv`.

    Args:
        path: The CSV file.

    Returns:
        One :class:`ProfileRecord` per data row, in file order.

    Raises:
        InputDataError: The file cannot be read, a column is missing, a cell is empty or
            malformed (the message names file, line and column), or a (config, request
            type) appears twice.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(f"{path}: cannot read profile table ({exc})") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in PROFILE_COLUMNS if c not in header]
    if missing:
        raise InputDataError(f"{path}: line 1: missing column(s) {', '.join(missing)}")
    records: list[ProfileRecord] = []
    seen: dict[tuple[str, str, str], int] = {}
    for row in reader:
        line = reader.line_num
        if None in row or any(v is None for v in row.values()):
            raise InputDataError(
                f"{path}: line {line}: expected {len(header)} fields, got a different count"
            )
        record = _record(_Cells(path, line, row))
        profile = record.profile
        key = (profile.version, profile.config.key, profile.request_type)
        if key in seen:
            raise InputDataError(
                f"{path}: line {line}: duplicate of line {seen[key]} for {key[1]} {key[2]}"
            )
        seen[key] = line
        records.append(record)
    return records


def load_profiles(path: Path) -> list[Profile]:
    """The profiles of a profile CSV (see :func:`load_profile_records`)."""
    return [record.profile for record in load_profile_records(path)]

"""The profile table on disk: one CSV row per (serving config, request type).

``write_profiles_csv`` and ``load_profiles`` round-trip exactly: floats are written with
Python's shortest ``repr``, rows in the order given, ``\\n`` line ends, so the same
profiles always give the same bytes.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from wattplan.domain import REQUEST_TYPES, Profile, ServingConfig
from wattplan.errors import InputDataError

#: Column order of the profile CSV.
PROFILE_COLUMNS: tuple[str, ...] = (
    "version",
    "model",
    "gpu_type",
    "tp",
    "power_cap_w",
    "clock_mhz",
    "request_type",
    "capacity_rps",
    "idle_power_w",
    "power_at_capacity_w",
    "ttft_p99_s",
    "tbt_p99_s",
    "ttft_slo_s",
    "tbt_slo_s",
    "source",
)


def _row(profile: Profile) -> list[str]:
    config = profile.config
    return [
        profile.version,
        config.model,
        config.gpu_type,
        str(config.tp),
        str(config.power_cap_w),
        "" if config.clock_mhz is None else str(config.clock_mhz),
        profile.request_type,
        repr(profile.capacity_rps),
        repr(profile.idle_power_w),
        repr(profile.power_at_capacity_w),
        repr(profile.ttft_p99_s),
        repr(profile.tbt_p99_s),
        repr(profile.ttft_slo_s),
        repr(profile.tbt_slo_s),
        profile.source,
    ]


def format_profiles_csv(profiles: Iterable[Profile]) -> str:
    """Render profiles as CSV text (header first, ``\\n`` line ends)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PROFILE_COLUMNS)
    writer.writerows(_row(p) for p in profiles)
    return buffer.getvalue()


def write_profiles_csv(profiles: Iterable[Profile], path: Path) -> None:
    """Write profiles to a CSV file, creating its folder; same profiles, same bytes.

    Args:
        profiles: Rows to write, in the order to write them.
        path: Destination file; overwritten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(format_profiles_csv(profiles).encode("utf-8"))


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

    def number(self, column: str, kind: Callable[[str], float], positive: bool) -> float:
        try:
            value = kind(self.text(column))
        except ValueError as exc:
            raise self.fail(column, f"is not a valid {getattr(kind, '__name__', kind)}") from exc
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise self.fail(column, "must be a finite number " + (">0" if positive else ">=0"))
        return value


def _profile(cells: _Cells) -> Profile:
    request_type = cells.text("request_type")
    if request_type not in REQUEST_TYPES:
        raise cells.fail("request_type", f"is not one of {', '.join(REQUEST_TYPES)}")
    clock = cells.row.get("clock_mhz") or ""
    config = ServingConfig(
        model=cells.text("model"),
        gpu_type=cells.text("gpu_type"),
        tp=int(cells.number("tp", int, positive=True)),
        power_cap_w=int(cells.number("power_cap_w", int, positive=True)),
        clock_mhz=None if clock == "" else int(cells.number("clock_mhz", int, positive=True)),
    )
    profile = Profile(
        config=config,
        request_type=request_type,
        capacity_rps=cells.number("capacity_rps", float, positive=True),
        idle_power_w=cells.number("idle_power_w", float, positive=False),
        power_at_capacity_w=cells.number("power_at_capacity_w", float, positive=True),
        ttft_p99_s=cells.number("ttft_p99_s", float, positive=True),
        tbt_p99_s=cells.number("tbt_p99_s", float, positive=True),
        ttft_slo_s=cells.number("ttft_slo_s", float, positive=True),
        tbt_slo_s=cells.number("tbt_slo_s", float, positive=True),
        version=cells.text("version"),
        source=cells.text("source"),
    )
    if profile.power_at_capacity_w < profile.idle_power_w:
        raise cells.fail("power_at_capacity_w", "is below idle_power_w")
    return profile


def load_profiles(path: Path) -> list[Profile]:
    """Read and validate a profile CSV written by :func:`write_profiles_csv`.

    Args:
        path: The CSV file.

    Returns:
        One :class:`~wattplan.domain.Profile` per data row, in file order.

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
    profiles: list[Profile] = []
    seen: dict[tuple[str, str], int] = {}
    for row in reader:
        line = reader.line_num
        if None in row or any(v is None for v in row.values()):
            raise InputDataError(
                f"{path}: line {line}: expected {len(header)} fields, got a different count"
            )
        profile = _profile(_Cells(path, line, row))
        key = (profile.config.key, profile.request_type)
        if key in seen:
            raise InputDataError(
                f"{path}: line {line}: duplicate of line {seen[key]} for {key[0]} {key[1]}"
            )
        seen[key] = line
        profiles.append(profile)
    return profiles

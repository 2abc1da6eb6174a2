"""Reference data parsers: grid carbon intensity, electricity prices, GPU prices (pure).

Two layers: ``*_rows`` functions read a file line by line and never raise on a row's
content (bad rows come back as :class:`~telemetry.lines.RejectedRow`); the older
``parse_*`` functions return the values and raise :class:`InputDataError` at the first bad
row (GPU prices: skip rows without a per-GPU price, as before). Formats: docs/formats.md.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, TypeVar

from telemetry.lines import (
    RejectCollector,
    RejectedRow,
    decode_line,
    finite_float,
    is_blank,
    open_lines,
    printable,
)
from wattplan.errors import InputDataError

T = TypeVar("T")

CARBON_TIME = "Datetime (UTC)"
CARBON_ZONE = "Zone Id"
CARBON_DIRECT = "Carbon Intensity gCO₂eq/kWh (direct)"
CARBON_LCA = "Carbon Intensity gCO₂eq/kWh (LCA)"
PRICE_TIME = "Datetime (UTC)"
PRICE_VALUE = "Price (USD/MWh)"
GPU_COLUMNS = ("Cloud", "GPU Type", "Per-GPU")

_CONTENT_ERRORS = (ValueError, TypeError, ArithmeticError, csv.Error)


@dataclass(frozen=True)
class HourlyValue:
    """One hourly value of a zone's series."""

    zone: str
    hour_at: datetime
    value: float
    lifecycle_value: float | None = None


@dataclass(frozen=True)
class GpuPrice:
    """On-demand price of one GPU-hour at one provider."""

    gpu_type: str
    provider: str
    offer: str
    price_usd_per_gpu_hour: float


@dataclass(frozen=True)
class ParsedRows(Generic[T]):
    """Rows of one reference file; ``rows_read == len(rows) + len(rejected)``.

    Line numbers of rejected rows count data lines (1 = the line after the header).
    """

    rows: tuple[T, ...]
    rejected: tuple[RejectedRow, ...]
    rows_read: int

    def __post_init__(self) -> None:
        if self.rows_read != len(self.rows) + len(self.rejected):
            raise ValueError("row accounting broken")


def _csv_lines(
    path: Path, required: tuple[str, ...], what: str
) -> Iterator[tuple[int, bytes, dict[str, str] | str]]:
    """Data lines of a CSV with a header, as ``(data line no, raw, row or error text)``.

    Raises:
        InputDataError: the file cannot be opened, is empty, or lacks a required column.
    """
    lines = open_lines(path, what)
    header: list[str] | None = None
    for physical_no, data in lines:
        if physical_no == 1:
            try:
                header = [h.strip() for h in next(csv.reader([decode_line(data)]))]
            except (ValueError, csv.Error, StopIteration):
                header = []
            missing = [c for c in required if c not in header]
            if missing:
                raise InputDataError(
                    f"{path}: missing columns {missing} in the header "
                    f"{printable(data, 300)!r}; expected the {what} format (docs/formats.md)"
                )
            continue
        if is_blank(data):
            continue
        assert header is not None
        try:
            fields = next(csv.reader([decode_line(data)]))
            if len(fields) != len(header):
                raise ValueError(f"expected {len(header)} fields, got {len(fields)}")
        except _CONTENT_ERRORS as exc:
            yield physical_no - 1, data, str(exc)
            continue
        yield physical_no - 1, data, dict(zip(header, fields, strict=True))
    if header is None:
        raise InputDataError(f"{path}: empty file; expected a {what} CSV with a header")


def _utc_hour(text: str) -> datetime:
    moment = datetime.fromisoformat(text.strip())
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if moment.minute or moment.second or moment.microsecond:
        raise ValueError(f"timestamp {text.strip()!r} is not on the hour")
    return moment


def parse_carbon_intensity_rows(
    path: Path, *, source: str | None = None
) -> ParsedRows[HourlyValue]:
    """Electricity Maps hourly CSV -> direct (and lifecycle) gCO2eq/kWh per UTC hour.

    Rejects (never raises on) rows with a bad or off-the-hour timestamp, no zone, a
    non-numeric, NaN, infinite or negative intensity, or a (zone, hour) seen before. Naive
    timestamps are read as UTC.

    Raises:
        InputDataError: the file cannot be opened or lacks a required column.
    """
    rejects = RejectCollector(source or path.name)
    rows: list[HourlyValue] = []
    seen: dict[tuple[str, datetime], int] = {}
    rows_read = 0
    for line_no, data, row in _csv_lines(
        path, (CARBON_TIME, CARBON_ZONE, CARBON_DIRECT), "Electricity Maps carbon-intensity"
    ):
        rows_read += 1
        at = None
        try:
            if isinstance(row, str):
                raise ValueError(row)
            at = _utc_hour(row[CARBON_TIME])
            zone = row[CARBON_ZONE].strip()
            if not zone:
                raise ValueError("empty Zone Id")
            value = finite_float(row[CARBON_DIRECT], "carbon intensity")
            lca_text = (row.get(CARBON_LCA) or "").strip()
            lifecycle = finite_float(lca_text, "lifecycle intensity") if lca_text else None
            if value < 0 or (lifecycle is not None and lifecycle < 0):
                raise ValueError(f"carbon intensity {value} must be >= 0")
            first = seen.setdefault((zone, at), line_no)
            if first != line_no:
                raise ValueError(f"zone {zone} hour {at.isoformat()} already on line {first}")
        except _CONTENT_ERRORS as exc:
            rejects.reject(line_no, data, str(exc), at)
            continue
        rows.append(HourlyValue(zone, at, value, lifecycle))
    return ParsedRows(tuple(rows), tuple(rejects.rows), rows_read)


def parse_electricity_price_rows(
    path: Path, zone: str, *, source: str | None = None
) -> ParsedRows[HourlyValue]:
    """SustainCluster standardized CSV -> USD/MWh per UTC hour of ``zone``.

    Negative prices are kept (wholesale markets have them). Rejects (never raises on) rows
    with a bad or off-the-hour timestamp, a non-numeric, NaN or infinite price, or an hour
    seen before.

    Raises:
        InputDataError: the file cannot be opened or lacks a required column.
    """
    rejects = RejectCollector(source or path.name)
    rows: list[HourlyValue] = []
    seen: dict[datetime, int] = {}
    rows_read = 0
    for line_no, data, row in _csv_lines(
        path, (PRICE_TIME, PRICE_VALUE), "SustainCluster electricity-price"
    ):
        rows_read += 1
        at = None
        try:
            if isinstance(row, str):
                raise ValueError(row)
            at = _utc_hour(row[PRICE_TIME])
            value = finite_float(row[PRICE_VALUE], "price")
            first = seen.setdefault(at, line_no)
            if first != line_no:
                raise ValueError(f"hour {at.isoformat()} already on line {first}")
        except _CONTENT_ERRORS as exc:
            rejects.reject(line_no, data, str(exc), at)
            continue
        rows.append(HourlyValue(zone, at, value))
    return ParsedRows(tuple(rows), tuple(rejects.rows), rows_read)


def normalise_gpu_type(text: str) -> str:
    """``"H100 (80 GB)"`` -> ``"H100-80GB"``; ``"A10G"`` -> ``"A10G"``."""
    match = re.fullmatch(r"\s*([A-Za-z0-9]+)\s*(?:\((\d+)\s*GB\))?\s*", text)
    if not match:
        return text.strip().replace(" ", "-")
    name, mem = match.groups()
    return f"{name}-{mem}GB" if mem else name


def parse_gpu_price_rows(path: Path, *, source: str | None = None) -> ParsedRows[GpuPrice]:
    """FSDL cloud-gpus.csv -> per-GPU on-demand prices.

    Rows without a per-GPU price (the table lists some offers without one), with a
    non-numeric, NaN, infinite or negative price, without a provider or GPU type, or
    repeating a (GPU type, provider, offer) seen before are rejected with the reason.

    Raises:
        InputDataError: the file cannot be opened or lacks a required column.
    """
    rejects = RejectCollector(source or path.name)
    rows: list[GpuPrice] = []
    seen: dict[tuple[str, str, str], int] = {}
    rows_read = 0
    for line_no, data, row in _csv_lines(path, GPU_COLUMNS, "FSDL cloud GPU price"):
        rows_read += 1
        try:
            if isinstance(row, str):
                raise ValueError(row)
            price_text = row["Per-GPU"].strip()
            if not price_text:
                raise ValueError("no per-GPU on-demand price listed for this offer")
            price = finite_float(price_text, "Per-GPU price")
            if price < 0:
                raise ValueError(f"Per-GPU price {price} must be >= 0")
            gpu_type, provider = normalise_gpu_type(row["GPU Type"]), row["Cloud"].strip()
            if not gpu_type or not provider:
                raise ValueError("empty Cloud or GPU Type")
            offer = (row.get("Name") or "").strip() or f"{(row.get('GPUs') or '?').strip()}x"
            first = seen.setdefault((gpu_type, provider, offer), line_no)
            if first != line_no:
                raise ValueError(f"{gpu_type} at {provider} offer {offer} already on line {first}")
        except _CONTENT_ERRORS as exc:
            rejects.reject(line_no, data, str(exc))
            continue
        rows.append(GpuPrice(gpu_type, provider, offer, price))
    return ParsedRows(tuple(rows), tuple(rejects.rows), rows_read)


def _strict(parsed: ParsedRows[T], path: Path) -> list[T]:
    if parsed.rejected:
        bad = parsed.rejected[0]
        raise InputDataError(f"{path}:{bad.line_no + 1}: {bad.reason} in {bad.raw[:200]!r}")
    return list(parsed.rows)


def parse_carbon_intensity(path: Path) -> list[HourlyValue]:
    """Electricity Maps hourly CSV -> direct (and lifecycle) gCO2eq/kWh per UTC hour.

    Raises:
        InputDataError: the file cannot be read, or a row is bad (``path:line: reason``).
    """
    return _strict(parse_carbon_intensity_rows(path), path)


def parse_electricity_prices(path: Path, zone: str) -> list[HourlyValue]:
    """SustainCluster standardized CSV -> USD/MWh per UTC hour.

    Raises:
        InputDataError: the file cannot be read, or a row is bad (``path:line: reason``).
    """
    return _strict(parse_electricity_price_rows(path, zone), path)


def parse_gpu_prices(path: Path) -> list[GpuPrice]:
    """FSDL cloud-gpus.csv -> per-GPU on-demand prices (rows without one are skipped)."""
    return list(parse_gpu_price_rows(path).rows)

"""Reference data parsers: grid carbon intensity, electricity prices, GPU prices (pure)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from wattplan.errors import InputDataError


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


def _read(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise InputDataError(f"{path}: missing columns {missing}")
            return list(reader)
    except OSError as exc:
        raise InputDataError(f"cannot read {path}: {exc.strerror}") from exc


def _utc_hour(text: str, path: Path, line: int) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise InputDataError(f"{path}:{line}: bad timestamp {text!r}") from exc
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_carbon_intensity(path: Path) -> list[HourlyValue]:
    """Electricity Maps hourly CSV -> direct (and lifecycle) gCO2eq/kWh per UTC hour."""
    direct = "Carbon Intensity gCO₂eq/kWh (direct)"
    lca = "Carbon Intensity gCO₂eq/kWh (LCA)"
    rows = _read(path, ("Datetime (UTC)", "Zone Id", direct))
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            value = float(row[direct])
            lifecycle = float(row[lca]) if row.get(lca) else None
        except ValueError as exc:
            raise InputDataError(f"{path}:{line}: bad carbon intensity {row[direct]!r}") from exc
        out.append(
            HourlyValue(
                row["Zone Id"], _utc_hour(row["Datetime (UTC)"], path, line), value, lifecycle
            )
        )
    return out


def parse_electricity_prices(path: Path, zone: str) -> list[HourlyValue]:
    """SustainCluster standardized CSV -> USD/MWh per UTC hour."""
    rows = _read(path, ("Datetime (UTC)", "Price (USD/MWh)"))
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            value = float(row["Price (USD/MWh)"])
        except ValueError as exc:
            raise InputDataError(f"{path}:{line}: bad price {row['Price (USD/MWh)']!r}") from exc
        out.append(HourlyValue(zone, _utc_hour(row["Datetime (UTC)"], path, line), value))
    return out


def normalise_gpu_type(text: str) -> str:
    """``"H100 (80 GB)"`` -> ``"H100-80GB"``; ``"A10G"`` -> ``"A10G"``."""
    match = re.fullmatch(r"\s*([A-Za-z0-9]+)\s*(?:\((\d+)\s*GB\))?\s*", text)
    if not match:
        return text.strip().replace(" ", "-")
    name, mem = match.groups()
    return f"{name}-{mem}GB" if mem else name


def parse_gpu_prices(path: Path) -> list[GpuPrice]:
    """FSDL cloud-gpus.csv -> per-GPU on-demand prices (rows without one are skipped)."""
    rows = _read(path, ("Cloud", "GPU Type", "Per-GPU"))
    out = []
    seen = set()
    for row in rows:
        try:
            price = float(row["Per-GPU"])
        except ValueError:
            continue  # no per-GPU on-demand price listed for this offer
        offer = row.get("Name") or f"{row.get('GPUs', '?')}x"
        key = (normalise_gpu_type(row["GPU Type"]), row["Cloud"], offer)
        if key in seen:
            continue
        seen.add(key)
        out.append(GpuPrice(*key, price))
    return out

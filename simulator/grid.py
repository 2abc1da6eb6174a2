"""Hourly grid carbon intensity and electricity price, and the GPU-hour price (bundled data).

Read with the project's reference-data parsers (``telemetry.reference``) from the data
folder, the same files the ``reference_data`` DAG loads. A workload's hours often fall
outside the bundled years (ServeGen's day 0 is placed in 2024, the carbon file is 2023):
an hour missing from a series takes the value of the same month, day and hour in the
closest year the series has, and when that is missing too, the series' median. Which
fallback was used is reported.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from telemetry.reference import parse_carbon_intensity, parse_electricity_prices, parse_gpu_prices
from wattplan.errors import InputDataError


@dataclass(frozen=True)
class HourlySeries:
    """Values per UTC hour (epoch hour -> value), with the fallbacks described above."""

    name: str
    values: dict[int, float]
    notes: list[str] = field(default_factory=list)

    def at(self, moments: list[datetime]) -> np.ndarray:
        """Value at each moment's hour."""
        if not self.values:
            return np.zeros(len(moments))
        median = statistics.median(self.values.values())
        by_calendar: dict[tuple[int, int, int], dict[int, float]] = {}
        for hour, value in self.values.items():
            d = datetime.fromtimestamp(hour * 3600, tz=UTC)
            by_calendar.setdefault((d.month, d.day, d.hour), {})[d.year] = value
        out = np.empty(len(moments))
        shifted = missing = 0
        for i, moment in enumerate(moments):
            hour = int(moment.timestamp() // 3600)
            moment = moment.astimezone(UTC)
            if hour in self.values:
                out[i] = self.values[hour]
                continue
            years = by_calendar.get((moment.month, moment.day, moment.hour))
            if years:
                year = min(years, key=lambda y: abs(y - moment.year))
                out[i] = years[year]
                shifted += 1
            else:
                out[i] = median
                missing += 1
        if shifted:
            self.notes.append(
                f"{self.name}: {shifted} hour(s) outside the bundled years took the same "
                "calendar hour of the closest bundled year"
            )
        if missing:
            self.notes.append(f"{self.name}: {missing} hour(s) took the series median {median:.2f}")
        return out


@dataclass(frozen=True)
class Grid:
    """Carbon intensity (gCO2eq/kWh), electricity price (USD/MWh) and GPU-hour price (USD)."""

    carbon: HourlySeries
    price: HourlySeries
    gpu_usd_per_hour: float
    zone: str
    gpu_type: str


def load_grid(data_dir: Path, zone: str, gpu_type: str) -> Grid:
    """The bundled series of ``zone`` and the median on-demand GPU-hour price of ``gpu_type``.

    Raises:
        InputDataError: no carbon-intensity file for the zone.
    """
    carbon_files = sorted((data_dir / "electricitymaps-carbon-intensity" / zone).glob("*/*.csv"))
    if not carbon_files:
        raise InputDataError(
            f"no carbon-intensity files for zone {zone} under {data_dir}; set "
            "WATTPLAN_CARBON_ZONE to a bundled zone"
        )
    carbon = {
        int(v.hour_at.timestamp() // 3600): v.value
        for f in carbon_files
        for v in parse_carbon_intensity(f)
    }
    price_files = sorted((data_dir / "sustain-cluster-electricity-prices" / zone).glob("*/*.csv"))
    price = {
        int(v.hour_at.timestamp() // 3600): v.value
        for f in price_files
        for v in parse_electricity_prices(f, zone)
    }
    gpu_file = data_dir / "fsdl-cloud-gpu-prices" / "cloud-gpus.csv"
    offers = [
        p.price_usd_per_gpu_hour for p in parse_gpu_prices(gpu_file) if p.gpu_type == gpu_type
    ]
    return Grid(
        HourlySeries(f"carbon {zone}", carbon),
        HourlySeries(f"price {zone}", price),
        statistics.median(offers) if offers else 0.0,
        zone,
        gpu_type,
    )

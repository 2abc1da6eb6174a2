"""Shared pieces of the simulator tests: a small hand-made profile set and layouts."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from simulator.model import ProfileTable
from simulator.workload import RateWorkload
from wattplan.domain import REQUEST_TYPES, Layout, LayoutItem, Profile, ServingConfig

START = datetime(2024, 1, 1, tzinfo=UTC)
MODEL = "m"
GPU = "H100-80GB"


def config(tp: int, cap: int = 700) -> ServingConfig:
    """A config of the test model."""
    return ServingConfig(MODEL, GPU, tp, cap)


def profile(
    cfg: ServingConfig, rtype: str, capacity: float, idle_w: float, full_w: float
) -> Profile:
    """A two-point profile with fixed latencies and SLOs."""
    kwargs = {
        "config": cfg,
        "request_type": rtype,
        "capacity_rps": capacity,
        "ttft_p99_s": 0.2,
        "tbt_p99_s": 0.05,
        "ttft_slo_s": 0.5,
        "tbt_slo_s": 0.15,
        "version": "test",
        "source": "tests",
    }
    if "power_curve" in Profile.__dataclass_fields__:
        kwargs["power_curve"] = ((0.0, idle_w), (capacity, full_w))
    else:
        kwargs["idle_power_w"] = idle_w
        kwargs["power_at_capacity_w"] = full_w
    return Profile(**kwargs)  # type: ignore[arg-type]


def profile_set() -> list[Profile]:
    """TP2 and TP4 at two caps for every type; capacity falls with the input class."""
    out = []
    for rtype in REQUEST_TYPES:
        scale = {"S": 1.0, "M": 0.5, "L": 0.1}[rtype[0]]
        for tp, cap_w, capacity, idle, full in (
            (2, 700, 10.0, 200.0, 1000.0),
            (2, 500, 7.0, 200.0, 650.0),
            (4, 700, 18.0, 400.0, 1900.0),
            (4, 500, 13.0, 400.0, 1300.0),
        ):
            out.append(profile(config(tp, cap_w), rtype, capacity * scale, idle, full))
    return out


@pytest.fixture
def profiles() -> list[Profile]:
    return profile_set()


@pytest.fixture
def table(profiles: list[Profile]) -> ProfileTable:
    return ProfileTable(profiles)


def rate_workload(
    rates: dict[str, list[float]], window_s: int = 600, cv: float = 1.0
) -> RateWorkload:
    """A rate workload of service ``svc`` with the given per-type rates per window."""
    pools = tuple(("svc", t) for t in rates)
    matrix = np.array([rates[t] for t in rates], dtype=float)
    return RateWorkload("test", START, window_s, pools, matrix, np.full(matrix.shape, cv))


def layout(**counts: tuple[ServingConfig, int]) -> Layout:
    """``layout(SS=(config(2), 3))``: one item per type."""
    return Layout(tuple(LayoutItem("svc", t, c, n) for t, (c, n) in counts.items()))

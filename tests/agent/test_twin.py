"""The simulated agent's GPU telemetry: collector format, loaded by the real ingest job."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from agent.server import run_in_thread
from agent.twin import TwinModel, TwinTelemetry
from telemetry.gpu_spool import scan_spool_bytes
from wattplan import jobs
from wattplan.settings import Settings

W = datetime(2023, 11, 16, 18, 30, tzinfo=UTC)
TOKEN = "twin-token"


def _item(tp: int, cap: int, n: int, clock: int | None = None) -> dict:
    return {
        "service": "chat",
        "request_type": "SS",
        "model": "llama2-70b",
        "gpu_type": "H100-80GB",
        "tp": tp,
        "power_cap_w": cap,
        "clock_mhz": clock,
        "instances": n,
    }


def test_applied_plan_leaves_a_window_of_telemetry_the_ingest_job_loads(
    tmp_path: Path, engine: sa.Engine
) -> None:
    spool = tmp_path / "spool"
    twin = TwinTelemetry(spool, "test", window_s=600, interval_s=5.0)
    base_url, stop = run_in_thread(token=TOKEN, gpu_capacity=16, telemetry=twin)
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"})
    body = {
        "version": int(W.timestamp()),
        "base_plan_id": None,
        "changes": [_item(4, 500, 1), _item(2, 400, 1, clock=1410)],
    }
    assert client.post("/v1/plans/p1/changes", json=body).json()["status"] == "applied"
    deadline = time.monotonic() + 5
    while not list(spool.glob("*.tsv")):
        assert time.monotonic() < deadline, "no telemetry file"
        time.sleep(0.02)
    instances = client.get("/v1/status").json()["instances"]
    stop()

    (path,) = spool.glob("*.tsv")
    assert path.name == "gpu-twin-test-20231116T183000.000000Z.tsv"
    scan = scan_spool_bytes(path.read_bytes(), path.name)
    assert scan.rejected == []
    assert scan.rows_loaded == 6 * 600 // 5  # six GPUs, one sample every 5 s

    settings = dataclasses.replace(Settings(), gpu_spool_dir=spool)
    assert jobs.ingest_gpu_telemetry(engine, settings, W, W + timedelta(minutes=5)) == 6 * 60
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT instance_id, mean_power_w, energy_j FROM instance_windows"
                " ORDER BY instance_id"
            )
        ).all()
    model = TwinModel()
    expected = {i["instance_id"]: i["tp"] * model.power_w(i["power_cap_w"]) for i in instances}
    assert sorted(expected.values()) == [2 * model.power_w(400), 4 * model.power_w(500)]
    assert {r[0] for r in rows} == set(expected)
    for instance_id, mean_power_w, energy_j in rows:
        assert mean_power_w == pytest.approx(expected[instance_id])
        # Energy from counter deltas over the 5-minute window (one sample step may fall at
        # its edge): within one step of power x 300 s.
        assert abs(energy_j - expected[instance_id] * 300) <= expected[instance_id] * 5 + 1e-6


def test_twin_counters_keep_growing_across_windows(tmp_path: Path) -> None:
    from agent.rollout import Instance
    from wattplan.domain import ServingConfig

    twin = TwinTelemetry(tmp_path, "c", window_s=60, interval_s=10)
    inst = Instance("i00001", "chat", "SS", ServingConfig("m", "H100", 1, 300), (0,))
    first = twin.lines([inst], W)
    second = twin.lines([inst], W + timedelta(seconds=60))
    energy = [int(line.split("\t")[5]) for line in first + second]
    assert energy == sorted(energy) and energy[0] == 0
    assert energy[-1] == pytest.approx(TwinModel().power_w(300) * 10 * 1000 * 11, rel=1e-6)


def test_twin_power_follows_the_profile_at_the_plans_load(tmp_path: Path) -> None:
    """A profiled instance draws the default table's power at its planned mean load; one
    the plan gives no load (NaN) or that has no profile keeps the stand-in."""
    import math

    from agent.rollout import Instance
    from profiles import load_profiles
    from wattplan.domain import ServingConfig
    from wattplan.settings import PROJECT_ROOT

    table = load_profiles(PROJECT_ROOT / "data" / "profiles" / "v1.csv")
    profile = next(
        p
        for p in table
        if p.config.model == "llama2-70b"
        and p.config.gpu_type == "H100-80GB"
        and p.config.tp == 4
        and p.config.clock_mhz == 1400
        and p.request_type == "MM"
    )
    twin = TwinTelemetry(tmp_path, "c", window_s=20, interval_s=10)
    planned = Instance("i00001", "chat", "MM", profile.config, (0, 1, 2, 3))
    unplanned = Instance("i00002", "chat", "MM", profile.config, (4, 5, 6, 7))
    unknown = Instance("i00003", "chat", "MM", ServingConfig("m", "H100", 1, 300), (8,))
    load = profile.capacity_rps / 3
    lines = twin.lines([planned, unplanned, unknown], W, {"i00001": load, "i00002": math.nan})
    power = {int(line.split("\t")[3]): float(line.split("\t")[6]) for line in lines}
    utilization = {int(line.split("\t")[3]): float(line.split("\t")[11]) for line in lines}
    expected = profile.power_w(load) / 4
    assert profile.idle_power_w / 4 < expected < profile.power_at_capacity_w / 4
    assert [power[g] for g in range(4)] == [pytest.approx(expected, abs=1e-3)] * 4
    assert utilization[0] == pytest.approx(100 / 3, abs=1e-3)
    stand_in = TwinModel()
    assert power[4] == pytest.approx(stand_in.power_w(700), abs=1e-3)
    assert power[8] == pytest.approx(stand_in.power_w(300), abs=1e-3)

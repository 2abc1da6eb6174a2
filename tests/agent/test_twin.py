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

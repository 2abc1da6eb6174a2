"""The digital twin writes telemetry the ingest parsers accept, consistent with the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.model import ProfileTable
from simulator.twin import ClusterTwin
from telemetry.gpu import parse_gpu_file
from telemetry.request_log import parse_request_log
from tests.simulator.conftest import config, layout, rate_workload
from wattplan.domain import RequestTypeBins
from wattplan.errors import InputDataError


def test_twin_emits_spool_telemetry_and_request_logs(table: ProfileTable, tmp_path: Path) -> None:
    trace = rate_workload({"SS": [4.0, 8.0], "MM": [1.0, 1.0]}).to_requests(seed=3)
    twin = ClusterTwin(table, trace, step_s=60, sample_s=10.0)
    twin.apply(layout(SS=(config(2), 1), MM=(config(4), 1)), 0.0)
    twin.apply(layout(SS=(config(2), 2), MM=(config(4), 1)), 590.0)  # from step 600 s
    assert twin.layout.gpus == 8
    out = twin.run(1200.0, tmp_path / "spool", tmp_path / "requests.jsonl")

    samples = []
    for path in out.spool_files:
        parsed = parse_gpu_file(path)
        assert parsed.rejected == ()
        samples.extend(parsed.samples)
    assert len(samples) == out.samples
    # 6 GPUs for 600 s then 8 GPUs for 600 s, one sample each 10 s.
    assert out.samples == 6 * 60 + 8 * 60
    last = {}
    for s in samples:
        last[s.gpu_uuid] = s.energy_mj
    assert sum(last.values()) / 1000 == pytest.approx(out.serving_energy_j, rel=0.01)
    assert {s.power_limit_w for s in samples} == {700.0}

    requests = parse_request_log(out.request_log, "svc", RequestTypeBins())
    assert requests.rejected == ()
    assert len(requests.records) == out.requests == len(trace)
    assert all(r.outcome == "ok" and r.ttft_s is not None for r in requests.records)
    assert {r.request_type for r in requests.records} == {"SS", "MM"}


def test_twin_refuses_layout_changes_back_in_time(table: ProfileTable) -> None:
    twin = ClusterTwin(table, rate_workload({"SS": [1.0]}).to_requests())
    twin.apply(layout(SS=(config(2), 1)), 100.0)
    with pytest.raises(InputDataError, match="time order"):
        twin.apply(layout(SS=(config(2), 2)), 50.0)

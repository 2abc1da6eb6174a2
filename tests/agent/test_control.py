"""The agent's control loops on both backends: the clock loop follows load on the simulated
twin and its changes reach ``clock_changes`` through the ingest DAG; on the nvml backend
(pynvml patched where the backend imports it, replaying recorded values) it locks only
supported clocks, keeps the clock on garbage metrics and resets the clocks on stop; and the
power guard caps pools in order from a replayed power trace and releases them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pynvml
import pytest
import sqlalchemy as sa

from agent.backends import NvmlBackend, SimulatedBackend
from agent.control import ControlLoops, ControlSettings
from agent.runner import Applier
from agent.server import run_in_thread
from agent.state import StateStore
from agent.twin import TwinFleet
from telemetry.clock_events import list_clock_files, parse_clock_file
from wattplan import db
from wattplan.settings import PROJECT_ROOT

DATA = json.loads((PROJECT_ROOT / "tests/data/nvml/h100_clocks_power.json").read_text())
SUPPORTED = sorted(DATA["supported_graphics_clocks_mhz"])
WAIT_S = 60.0  # generous: the loops run in threads on a busy CI machine


def _until(check: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _item(service: str, request_type: str, instances: int, tp: int = 4) -> dict[str, Any]:
    return {
        "service": service,
        "request_type": request_type,
        "model": "llama2-70b",
        "gpu_type": "H100-80GB",
        "tp": tp,
        "power_cap_w": 700,
        "clock_mhz": None,
        "instances": instances,
    }


def _shape(tp: int) -> str:
    from agent.rollout import Instance
    from agent.state import parse_item

    config = parse_item(_item("x", "SS", 1, tp)).config
    from agent.control import shape_key

    return shape_key(Instance("i00001", "x", "SS", config, tuple(range(tp))))


# --- simulated backend ------------------------------------------------------------------------

T0 = datetime(2023, 11, 16, 18, 35, tzinfo=UTC)


def _ingest(run_after: datetime) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / "telemetry_ingest.py"))
    dag_run = bag.get_dag("telemetry_ingest").test(logical_date=run_after)
    assert dag_run.state == DagRunState.SUCCESS


def test_simulated_agent_clock_loop_follows_load_and_its_changes_are_ingested(
    tmp_path: Path, database_url: str, airflow_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10 simulated seconds per wall second; the twin's clock starts at T0
    fleet = TwinFleet(load_rps=0.3, speed=10.0, start=T0, seed=3)
    spool = tmp_path / "clock"
    base_url, stop = run_in_thread(
        cluster="sim",
        backend=SimulatedBackend(fleet=fleet),
        control=ControlSettings(clock_spool_dir=spool, node="twin-sim"),
    )
    try:
        body = {"version": 1, "base_plan_id": None, "changes": [_item("chat", "MM", 1)]}
        assert httpx.post(f"{base_url}/v1/plans/p1/changes", json=body).json()["status"] in {
            "applying",
            "applied",
        }

        def clock() -> int | None:
            control = httpx.get(f"{base_url}/v1/status").json()["control"]
            return control["clocks_mhz"].get("i00001")

        # light load: the loop lowers the clock below the maximum
        low = _until(lambda: (c := clock()) is not None and c < 1980 and c, "a lower clock")
        assert low in fleet.clocks_mhz
        assert fleet.clock_mhz("i00001") == low  # the twin runs the clock the loop set
        # heavy load: the queue builds and the loop goes to the maximum clock
        fleet.set_load(40.0)
        _until(lambda: clock() == 1980, "the maximum clock under load")
        # and the metrics endpoint speaks vLLM's names
        text = httpx.get(fleet.metrics_url("i00001")).text
        assert "vllm:num_requests_waiting" in text and "vllm:kv_cache_usage_perc" in text
    finally:
        stop()

    [events_file] = list_clock_files(spool)  # closed when the agent stopped
    events = parse_clock_file(events_file).changes
    assert not parse_clock_file(events_file).rejected
    reasons = [e.reason for e in events]
    assert "lower" in reasons and ({"raise", "deadline"} & set(reasons))
    assert all(e.to_mhz in fleet.clocks_mhz and e.from_mhz in fleet.clocks_mhz for e in events)
    assert all(
        (e.service, e.request_type, e.controller) == ("chat", "MM", "clock-loop") for e in events
    )
    # consecutive changes chain: each starts from the clock the previous one set
    assert all(a.to_mhz == b.from_mhz for a, b in zip(events, events[1:], strict=False))

    # the real ingest path: the telemetry_ingest DAG, one run per 5-minute interval
    monkeypatch.setenv("WATTPLAN_DATABASE_URL", database_url)
    monkeypatch.setenv("WATTPLAN_CLOCK_SPOOL_DIR", str(spool))
    last = max(e.changed_at for e in events)
    with db.connect(database_url) as engine:
        db.upgrade(engine)
        run_after = T0 + timedelta(minutes=5)
        while run_after - timedelta(minutes=5) <= last:
            _ingest(run_after)
            run_after += timedelta(minutes=5)
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT instance_id, changed_at, from_mhz, to_mhz, reason, controller, service,"
                    " request_type FROM clock_changes ORDER BY changed_at"
                )
            ).all()
            per_window = conn.execute(
                sa.text("SELECT count(*) FROM clock_changes WHERE node = 'twin-sim'")
            ).scalar_one()
    assert [tuple(r) for r in rows] == [
        (
            e.instance_id,
            e.changed_at,
            e.from_mhz,
            e.to_mhz,
            e.reason,
            e.controller,
            e.service,
            e.request_type,
        )
        for e in events
    ]
    assert per_window == len(events)


# --- nvml backend -----------------------------------------------------------------------------

METRICS_SERVER = """
import http.server, sys
path, port = sys.argv[1], int(sys.argv[2])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            body, code = open(path, "rb").read(), 200
        except OSError:
            body, code = b"no metrics yet", 404
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""
LIGHT = (
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{model_name="m"} 2\n'
    'vllm:num_requests_waiting{model_name="m"} 0\n'
    'vllm:kv_cache_usage_perc{model_name="m"} 0.05\n'
    'vllm:prompt_tokens_total{model_name="m"} 5000\n'
)
HEAVY = (
    'vllm:num_requests_running{model_name="m"} 60\n'
    'vllm:num_requests_waiting{model_name="m"} 30\n'
    'vllm:kv_cache_usage_perc{model_name="m"} 0.97\n'
    'vllm:prompt_tokens_total{model_name="m"} 90000\n'
)


@pytest.fixture
def nvml() -> Iterator[mock.MagicMock]:
    """pynvml as the backend sees it: eight H100s with the recorded clock lists."""
    fake = mock.create_autospec(pynvml, instance=False)
    fake.NVMLError = pynvml.NVMLError
    fake.NVML_PSTATE_0 = pynvml.NVML_PSTATE_0
    fake.NVML_CLOCK_GRAPHICS = pynvml.NVML_CLOCK_GRAPHICS
    fake.nvmlDeviceGetCount.return_value = 8
    fake.nvmlDeviceGetHandleByIndex.side_effect = lambda index: f"gpu{index}"
    fake.nvmlDeviceGetPowerManagementDefaultLimit.return_value = 700_000
    fake.nvmlDeviceGetSupportedMemoryClocks.return_value = DATA["supported_memory_clocks_mhz"]

    def graphics(handle: str, memory_mhz: int) -> list[int]:
        assert memory_mhz == max(DATA["supported_memory_clocks_mhz"])
        return DATA["supported_graphics_clocks_mhz"]

    fake.nvmlDeviceGetSupportedGraphicsClocks.side_effect = graphics
    with mock.patch("agent.backends.pynvml", fake):
        yield fake


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "instances"
    yield folder
    for pid_file in folder.glob("*.pid"):  # never leave serving processes behind
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _locked(nvml: mock.MagicMock) -> list[tuple[str, int, int]]:
    return [c.args for c in nvml.nvmlDeviceSetGpuLockedClocks.call_args_list]


def test_nvml_clock_loop_locks_supported_clocks_keeps_them_on_garbage_and_resets_on_stop(
    tmp_path: Path, run_dir: Path, nvml: mock.MagicMock
) -> None:
    script = tmp_path / "serve_metrics.py"
    script.write_text(METRICS_SERVER)
    metrics = tmp_path / "metrics-i00001.txt"
    metrics.write_text(LIGHT)
    backend = NvmlBackend(
        f"{sys.executable} {script} {tmp_path}/metrics-{{instance_id}}.txt {{port}}",
        run_dir,
        start_grace_s=0.3,
        stop_timeout_s=5,
        base_port=_free_port() - 1,  # i00001 serves on base_port + 1
    )
    spool = tmp_path / "clock"
    base_url, stop = run_in_thread(
        cluster="gpu-node",
        gpu_capacity=8,
        state_path=tmp_path / "state.json",
        backend=backend,
        control=ControlSettings(
            poll_s=0.2, min_change_interval_s=0.5, clock_spool_dir=spool, node="gpu-node"
        ),
    )
    stopped = False
    try:
        body = {"version": 1, "base_plan_id": None, "changes": [_item("chat", "MS", 1, tp=2)]}
        httpx.post(f"{base_url}/v1/plans/p1/changes", json=body)
        _until(lambda: httpx.get(f"{base_url}/v1/plans/p1").json()["status"] == "applied", "apply")

        # light load: both GPUs of the instance locked at one lower, supported clock
        _until(lambda: len(_locked(nvml)) >= 2, "a locked clock")
        lowered = _locked(nvml)
        assert {gpu for gpu, _, _ in lowered} == {"gpu0", "gpu1"}
        assert all(low == high and low in SUPPORTED and low < 1980 for _, low, high in lowered)
        assert nvml.nvmlDeviceGetSupportedGraphicsClocks.called

        # garbage metrics: the clock stays, the loop keeps reading
        def failures() -> int:
            control = httpx.get(f"{base_url}/v1/status").json()["control"]
            return int(control["metrics_failures"].get("i00001", 0))

        calls = len(_locked(nvml))
        metrics.write_text("vllm:num_requests_running banana\n")
        _until(lambda: failures() >= 5, "five unreadable metrics reads")
        metrics.unlink()  # and a 404
        seen = failures()
        _until(lambda: failures() >= seen + 3, "three more unreadable reads")
        assert len(_locked(nvml)) == calls

        # heavy load: the queue would miss its TTFT at this clock: jump to the maximum
        metrics.write_text(HEAVY)
        _until(lambda: _locked(nvml)[-1][1] == 1980, "the maximum clock")
        assert all(args[1] in SUPPORTED for args in _locked(nvml))

        resets_before = len(nvml.nvmlDeviceResetGpuLockedClocks.call_args_list)
        stop()
        stopped = True
    finally:
        if not stopped:
            stop()
    resets = [c.args[0] for c in nvml.nvmlDeviceResetGpuLockedClocks.call_args_list[resets_before:]]
    assert sorted(resets) == ["gpu0", "gpu1"]  # every GPU the loop touched, once
    [events_file] = list_clock_files(spool)
    events = parse_clock_file(events_file).changes
    assert [e.reason for e in events][0] == "lower"
    assert events[-1].controller == "clock-loop" and events[-1].to_mhz == 1980
    assert {e.reason for e in events} <= {"lower", "raise", "deadline"}


def test_nvml_clock_is_never_set_outside_the_supported_list(
    tmp_path: Path, run_dir: Path, nvml: mock.MagicMock
) -> None:
    from agent.backends import BackendError
    from agent.rollout import Instance
    from agent.state import parse_item

    backend = NvmlBackend("sleep 1", run_dir)
    config = parse_item(_item("chat", "SS", 1, tp=2)).config
    inst = Instance("i00001", "chat", "SS", config, (0, 1))
    assert backend.supported_clocks(inst) == tuple(SUPPORTED)
    with pytest.raises(BackendError, match="not a supported SM clock"):
        backend.set_clock(inst, 1400)  # not on the 15 MHz grid of this GPU
    with pytest.raises(BackendError, match="not a supported SM clock"):
        backend.set_clock(inst, 2100)
    assert not nvml.nvmlDeviceSetGpuLockedClocks.called
    backend.set_clock(inst, 1410)
    backend.restore_clocks()
    assert sorted(c.args[0] for c in nvml.nvmlDeviceResetGpuLockedClocks.call_args_list) == [
        "gpu0",
        "gpu1",
    ]


def test_nvml_clocks_left_locked_by_a_killed_agent_are_reset_at_the_next_start(
    tmp_path: Path, run_dir: Path, nvml: mock.MagicMock
) -> None:
    from agent.rollout import Instance
    from agent.state import parse_item

    backend = NvmlBackend("sleep 1", run_dir)
    config = parse_item(_item("chat", "SS", 1, tp=2)).config
    backend.set_clock(Instance("i00003", "chat", "SS", config, (2, 3)), 1410)
    assert json.loads((run_dir / "clock-locks.json").read_text()) == {"gpus": [2, 3]}
    del backend  # killed: restore_clocks never runs
    assert not nvml.nvmlDeviceResetGpuLockedClocks.called

    NvmlBackend("sleep 1", run_dir)  # the next agent on this node
    resets = sorted(c.args[0] for c in nvml.nvmlDeviceResetGpuLockedClocks.call_args_list)
    assert resets == ["gpu2", "gpu3"]
    assert not (run_dir / "clock-locks.json").exists()

    # A GPU that cannot be reset stays listed for the start after that.
    again = NvmlBackend("sleep 1", run_dir)
    again.set_clock(Instance("i00004", "chat", "SS", config, (4, 5)), 1410)
    nvml.nvmlDeviceResetGpuLockedClocks.side_effect = lambda h: (
        (_ for _ in ()).throw(pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION))
        if h == "gpu5"
        else None
    )
    again.restore_clocks()
    assert json.loads((run_dir / "clock-locks.json").read_text()) == {"gpus": [5]}


# --- the power guard in the agent --------------------------------------------------------------

BUDGET_W = 2000.0
FLOORS = {"batch": 1410, "chat": 1605}  # the plan's SLO-feasible clocks (cap_clock_all)
LOWEST = 800  # the plan's lowest profiled clock (cap_clock_low_priority); 795 on this GPU


def _policy() -> dict[str, Any]:
    shape = _shape(2)
    caps = [
        {
            "service": service,
            "request_type": "LL" if service == "batch" else "SS",
            "shape": shape,
            "low_priority": service == "batch",
            "cap_clock_low_priority": LOWEST,
            "cap_clock_all": FLOORS[service],
        }
        for service in ("batch", "chat")
    ]
    return {
        "clock_policy": [],
        "power_guard": {
            "low_priority_fraction": 0.90,
            "all_fraction": 0.97,
            "release_fraction": 0.85,
            "low_priority_services": ["batch"],
            "domains": [{"name": "row-1", "gpus": 4, "budget_w": BUDGET_W, "caps": caps}],
        },
    }


def test_power_guard_caps_in_order_from_a_replayed_power_trace_and_releases(
    tmp_path: Path, run_dir: Path, nvml: mock.MagicMock
) -> None:
    trace = DATA["power_domain_trace"]["per_gpu_mw"]
    second = {"t": 0}
    nvml.nvmlDeviceGetPowerUsage.side_effect = lambda handle: trace[second["t"]]
    backend = NvmlBackend("sleep 120", run_dir, start_grace_s=0.1, stop_timeout_s=5)
    store = StateStore("gpu-node", 8, tmp_path / "state.json")
    applier = Applier(store, backend)
    applier.start()
    try:
        body = {
            "version": 1,
            "base_plan_id": None,
            "changes": [_item("batch", "LL", 1, tp=2), _item("chat", "SS", 1, tp=2)],
            "policy": _policy(),
        }
        store.submit("p1", body)
        applier.poke()
        assert applier.wait_idle(WAIT_S)
    finally:
        applier.stop()
    state = store.snapshot()
    assert state.policy is not None and state.policy["power_guard"]["domains"][0]["budget_w"]
    gpus = {inst.service: inst.gpus for inst in state.instances}

    start = datetime(2026, 3, 1, 12, tzinfo=UTC)
    loops = ControlLoops(
        store,
        backend,
        ControlSettings(clock_spool_dir=tmp_path / "clock", node="gpu-node"),
        now=lambda: (float(second["t"]), start + timedelta(seconds=second["t"])),
    )
    nvml.nvmlDeviceSetGpuLockedClocks.reset_mock()
    ids = {inst.service: inst.instance_id for inst in state.instances}
    clocks_at: list[dict[str, int]] = []
    t2_w = 0.97 * BUDGET_W
    first_above_t2 = next(t for t, mw in enumerate(trace) if 4 * mw / 1000 > t2_w)
    for t in range(len(trace)):
        second["t"] = t
        loops.guard_round()  # one power reading a second, as the loop does
        clocks = loops.clocks()
        clocks_at.append({service: clocks[iid] for service, iid in ids.items()})
    resets_before = len(nvml.nvmlDeviceResetGpuLockedClocks.call_args_list)
    loops.stop()

    levels = [(t, c["batch"], c["chat"]) for t, c in enumerate(clocks_at)]
    changes = [lv for prev, lv in zip(levels, levels[1:], strict=False) if prev[1:] != lv[1:]]
    # T1 (1800 W) first: only the low-priority pool, to its SLO-feasible clock
    assert changes[0][1:] == (FLOORS["batch"], 1980)
    # T2 (1940 W): the low-priority pool to its lowest clock, the other to its floor
    assert changes[1][1:] == (795, FLOORS["chat"]) and changes[1][0] == first_above_t2
    # released with hysteresis, one level at a time, after power fell
    assert changes[2][1:] == (FLOORS["batch"], 1980)
    assert changes[3][1:] == (1980, 1980)
    assert changes[2][0] > first_above_t2 and changes[3][0] > changes[2][0]
    # nothing below its SLO-feasible clock before T2 was exceeded
    assert all(
        b >= FLOORS["batch"] and c >= FLOORS["chat"] for t, b, c in levels if t < first_above_t2
    )
    # every lock was a supported clock on both GPUs of the instance
    locked = _locked(nvml)
    assert locked and all(low == high and low in SUPPORTED for _, low, high in locked)
    # every cap and release recorded as the power guard's, and the GPUs reset on stop
    [events_file] = list_clock_files(tmp_path / "clock")
    events = parse_clock_file(events_file).changes
    guard = [e for e in events if e.controller == "power-guard"]
    assert len(guard) == 1 + 2 + 2 + 1  # batch at T1; both at T2; both, then batch released
    resets = nvml.nvmlDeviceResetGpuLockedClocks.call_args_list[resets_before:]
    assert sorted(c.args[0] for c in resets) == sorted(
        f"gpu{g}" for gs in gpus.values() for g in gs
    )


def test_change_sets_carry_the_plan_policy_through_the_state_file(tmp_path: Path) -> None:
    from agent.state import ChangeSetError, parse_change_request

    body = {
        "version": 7,
        "base_plan_id": None,
        "changes": [_item("chat", "SS", 1)],
        "policy": _policy(),
    }
    with pytest.raises(ChangeSetError, match="policy"):
        parse_change_request({**body, "policy": [1, 2]})
    assert (
        parse_change_request(body).fingerprint
        != parse_change_request({k: v for k, v in body.items() if k != "policy"}).fingerprint
    )
    store = StateStore("c", 8, tmp_path / "state.json")
    store.submit("p7", body)
    applier = Applier(store, SimulatedBackend())
    applier.start()
    try:
        assert applier.wait_idle(WAIT_S)
    finally:
        applier.stop()
    reloaded = StateStore("c", 8, tmp_path / "state.json").snapshot()
    assert reloaded.applied_plan_id == "p7" and reloaded.policy == _policy()


def test_sigterm_stops_the_loops_and_closes_the_event_file(tmp_path: Path) -> None:
    """``wattplan agent`` as a process: SIGTERM runs the shutdown that restores clocks and
    closes the clock-change file (the simulated backend; nvml restores in the same step,
    ``ControlLoops.stop``)."""
    import subprocess

    port = _free_port()
    spool = tmp_path / "clock"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("wattplan")),
            "agent",
            "--port",
            str(port),
            "--twin-load-rps",
            "0.2",
            "--clock-spool",
            str(spool),
            "--node",
            "sigterm-node",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        _until(up, "the agent to answer")
        body = {"version": 1, "base_plan_id": None, "changes": [_item("chat", "SS", 1)]}
        httpx.post(f"{base_url}/v1/plans/p1/changes", json=body, timeout=10)
        _until(lambda: list(spool.glob("*.jsonl.part")), "a clock change in an open file")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit -SIGTERM)
    assert proc.returncode in (0, -signal.SIGTERM), err[-2000:]
    assert "Application shutdown complete" in err, err[-2000:]
    assert not list(spool.glob("*.part"))
    [closed] = list_clock_files(spool)
    assert parse_clock_file(closed).changes[0].node == "sigterm-node"

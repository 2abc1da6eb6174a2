"""The nvml backend with pynvml patched where the backend imports it (no GPU here), real
serving processes from a harmless command template, over real HTTP on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pynvml
import pytest

from agent.backends import BackendError, NvmlBackend
from agent.server import run_in_thread
from wattplan.errors import ConfigError

TOKEN = "nvml-test-token"
# Writes the GPUs it was given and its arguments, then serves (sleeps) until stopped.
SERVE = (
    f'{sys.executable} -c "import os, sys, time; '
    "open(sys.argv[1], 'w').write(os.environ['CUDA_VISIBLE_DEVICES'] + ' ' + sys.argv[2]); "
    'time.sleep(120)" {out}/{instance_id}.txt tp{tp}-port{port}'
)


@pytest.fixture
def nvml() -> Iterator[mock.MagicMock]:
    """pynvml as the backend sees it: eight GPUs, every setter recorded."""
    fake = mock.create_autospec(pynvml, instance=False)
    fake.NVMLError = pynvml.NVMLError
    fake.nvmlDeviceGetCount.return_value = 8
    fake.nvmlDeviceGetHandleByIndex.side_effect = lambda index: f"gpu{index}"
    fake.nvmlDeviceGetPowerManagementDefaultLimit.return_value = 700_000
    with mock.patch("agent.backends.pynvml", fake):
        yield fake


def _pids(run_dir: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in run_dir.glob("*.pid")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        return True


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "instances"
    yield folder
    for pid in _pids(folder).values():  # never leave serving processes behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _start(tmp_path: Path, run_dir: Path, **kwargs: Any) -> tuple[httpx.Client, Any]:
    backend = NvmlBackend(
        SERVE.replace("{out}", str(tmp_path)), run_dir, start_grace_s=0.3, stop_timeout_s=5
    )
    base_url, stop = run_in_thread(
        cluster="gpu-node",
        token=TOKEN,
        gpu_capacity=backend.gpu_count,
        state_path=tmp_path / "state.json",
        backend=backend,
        **kwargs,
    )
    client = httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    return client, stop


def _item(instances: int, power_cap_w: int, clock_mhz: int | None) -> dict[str, Any]:
    return {
        "service": "chat",
        "request_type": "SS",
        "model": "llama2-70b",
        "gpu_type": "H100-80GB",
        "tp": 2,
        "power_cap_w": power_cap_w,
        "clock_mhz": clock_mhz,
        "instances": instances,
    }


def _apply(
    client: httpx.Client, plan_id: str, version: int, base: str | None, changes: list
) -> None:
    response = client.post(
        f"/v1/plans/{plan_id}/changes",
        json={"version": version, "base_plan_id": base, "changes": changes},
    )
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 20
    while (status := client.get(f"/v1/plans/{plan_id}").json())["status"] == "applying":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status["status"] == "applied", status


def test_nvml_backend_sets_gpus_and_runs_serving_processes(
    nvml: mock.MagicMock, tmp_path: Path, run_dir: Path
) -> None:
    client, stop = _start(tmp_path, run_dir)
    _apply(client, "p1", 1, None, [_item(2, 400, 1410)])
    assert (tmp_path / "i00001.txt").read_text() == "0,1 tp2-port8001"
    assert (tmp_path / "i00002.txt").read_text() == "2,3 tp2-port8002"
    for gpu in range(4):
        nvml.nvmlDeviceSetGpuLockedClocks.assert_any_call(f"gpu{gpu}", 1410, 1410)
        nvml.nvmlDeviceSetPowerManagementLimit.assert_any_call(f"gpu{gpu}", 400_000)
    assert nvml.nvmlDeviceSetGpuLockedClocks.call_count == 4
    pids = _pids(run_dir)
    assert set(pids) == {"i00001", "i00002"} and all(_alive(p) for p in pids.values())

    # A retune changes clocks and power limit in place: same processes.
    nvml.reset_mock()
    _apply(client, "p2", 2, "p1", [_item(0, 400, 1410), _item(2, 300, None)])
    assert nvml.nvmlDeviceResetGpuLockedClocks.call_count == 4
    nvml.nvmlDeviceSetPowerManagementLimit.assert_any_call("gpu3", 300_000)
    assert _pids(run_dir) == pids

    # Processes outlive the agent, and a restarted agent keeps them.
    stop()
    assert all(_alive(p) for p in pids.values())
    client, stop = _start(tmp_path, run_dir)
    assert _pids(run_dir) == pids

    # Scaling to zero ends the processes and gives the GPUs their defaults back.
    nvml.reset_mock()
    _apply(client, "p3", 3, "p2", [_item(0, 300, None)])
    assert _pids(run_dir) == {}
    assert not any(_alive(p) for p in pids.values())
    nvml.nvmlDeviceSetPowerManagementLimit.assert_any_call("gpu0", 700_000)
    stop()


def test_restarted_agent_restarts_a_serving_process_that_died(
    nvml: mock.MagicMock, tmp_path: Path, run_dir: Path
) -> None:
    client, stop = _start(tmp_path, run_dir)
    _apply(client, "p1", 1, None, [_item(1, 400, None)])
    stop()
    (pid,) = _pids(run_dir).values()
    os.killpg(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.02)
    client, stop = _start(tmp_path, run_dir)
    (new_pid,) = _pids(run_dir).values()
    assert new_pid != pid and _alive(new_pid)
    stop()


def test_a_serving_process_that_exits_fails_the_plan(
    nvml: mock.MagicMock, tmp_path: Path, run_dir: Path
) -> None:
    backend = NvmlBackend(f"{sys.executable} -c 'raise SystemExit(3)'", run_dir, start_grace_s=0.3)
    base_url, stop = run_in_thread(gpu_capacity=8, backend=backend, token=TOKEN)
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"})
    client.post(
        "/v1/plans/p1/changes",
        json={"version": 1, "base_plan_id": None, "changes": [_item(1, 400, None)]},
    )
    deadline = time.monotonic() + 10
    while (status := client.get("/v1/plans/p1").json())["status"] == "applying":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status["status"] == "failed"
    assert "exited within 0.3 s" in status["message"]
    assert client.get("/v1/layout").json()["gpus"] == 0
    stop()


def test_nvml_errors_name_the_gpu_and_the_fix(
    nvml: mock.MagicMock, tmp_path: Path, run_dir: Path
) -> None:
    nvml.nvmlDeviceSetGpuLockedClocks.side_effect = pynvml.NVMLError(
        pynvml.NVML_ERROR_NO_PERMISSION
    )
    backend = NvmlBackend("sleep 60", run_dir)
    with pytest.raises(BackendError, match="GPU 0: .*needs root"):
        backend._configure((0,), 400, 1410)


def test_missing_driver_and_bad_template_are_clear_errors(tmp_path: Path) -> None:
    with mock.patch("agent.backends.pynvml") as fake:
        fake.NVMLError = pynvml.NVMLError
        fake.nvmlInit.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        with pytest.raises(BackendError, match="--backend simulated"):
            NvmlBackend("sleep 60", tmp_path)
    with pytest.raises(ConfigError, match=r"\{colour\}|colour"):
        NvmlBackend("vllm serve {colour}", tmp_path)

"""The NVML collector, run against a replayed H100 sequence through an autospec'd pynvml."""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pynvml
import pytest

from telemetry import nvml_collector
from telemetry.gpu import parse_gpu_file, parse_spool_file_name
from telemetry.nvml_collector import (
    CollectorConfig,
    main,
    parse_instance_map,
    run_collector,
)
from wattplan.errors import ConfigError

RECORDING = Path(__file__).parents[1] / "data" / "nvml" / "h100_tp2_sequence.json"
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
_ERRORS = {
    "NotSupported": pynvml.NVML_ERROR_NOT_SUPPORTED,
    "Unknown": pynvml.NVML_ERROR_UNKNOWN,
    "GpuIsLost": pynvml.NVML_ERROR_GPU_IS_LOST,
}


class FakeClock:
    """Aware UTC time that moves only when the collector sleeps."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start
        self.on_sleep: list[Any] = []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        for hook in self.on_sleep:
            hook(self)


def load_recording() -> dict[str, Any]:
    return json.loads(RECORDING.read_text())


def replay_nvml(recording: dict[str, Any], clock: FakeClock) -> mock.MagicMock:
    """An autospec'd pynvml whose device calls answer from ``recording`` at ``clock``'s time.

    Constants and exception classes are the real ones, so ``except pynvml.NVMLError_...``
    in the collector works unchanged.
    """
    fake = mock.create_autospec(pynvml, spec_set=True)
    for name in dir(pynvml):
        if name.startswith(("NVML_", "NVMLError")) or name == "NVMLError":
            setattr(fake, name, getattr(pynvml, name))
    gpus = recording["gpus"]
    handles = [object() for _ in gpus]
    by_handle = {id(h): g for h, g in zip(handles, gpus, strict=True)}
    interval_s = recording["interval_s"]

    def value(handle: object, key: str) -> Any:
        sweeps = by_handle[id(handle)]["sweeps"]
        index = round((clock.now - T0).total_seconds() / interval_s)
        v = sweeps[min(index, len(sweeps) - 1)][key]
        if isinstance(v, str):
            raise pynvml.NVMLError(_ERRORS[v])
        return v

    clocks = {pynvml.NVML_CLOCK_SM: "sm_clock_mhz", pynvml.NVML_CLOCK_MEM: "memory_clock_mhz"}
    fake.nvmlDeviceGetCount.return_value = len(gpus)
    fake.nvmlDeviceGetHandleByIndex.side_effect = lambda i: handles[i]
    fake.nvmlDeviceGetUUID.side_effect = lambda h: by_handle[id(h)]["uuid"]
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = lambda h: value(h, "energy_mj")
    fake.nvmlDeviceGetPowerUsage.side_effect = lambda h: value(h, "power_mw")
    fake.nvmlDeviceGetClockInfo.side_effect = lambda h, t: value(h, clocks[t])
    fake.nvmlDeviceGetApplicationsClock.side_effect = lambda h, t: value(
        h, "applications_clock_mhz"
    )
    fake.nvmlDeviceGetEnforcedPowerLimit.side_effect = lambda h: value(h, "power_limit_mw")
    fake.nvmlDeviceGetUtilizationRates.side_effect = lambda h: pynvml.c_nvmlUtilization_t(
        gpu=value(h, "utilization_gpu_pct"), memory=0
    )
    fake.nvmlDeviceGetMemoryInfo.side_effect = lambda h, version=None: pynvml.c_nvmlMemory_t(
        total=85_520_809_984,
        free=85_520_809_984 - value(h, "memory_used_bytes"),
        used=value(h, "memory_used_bytes"),
    )
    fake.nvmlDeviceGetTemperature.side_effect = lambda h, sensor: value(h, "temperature_c")
    return fake


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake_nvml(clock: FakeClock) -> mock.MagicMock:
    fake = replay_nvml(load_recording(), clock)
    with mock.patch.object(nvml_collector, "pynvml", fake):
        yield fake


def _config(spool: Path, **overrides: Any) -> CollectorConfig:
    values: dict[str, Any] = {
        "spool_dir": spool,
        "node": "gpu-node-7",
        "instance_map": {"gpu0": "llama70b-tp2-a", "gpu1": "llama70b-tp2-a"},
        "rotate_s": 0,
        "rotate_bytes": 0,
    }
    values.update(overrides)
    return CollectorConfig(**values)


def _collect(spool: Path, clock: FakeClock, **kwargs: Any) -> nvml_collector.CollectorStats:
    config_keys = {"rotate_s", "rotate_bytes", "instance_map", "interval_s", "node"}
    config = _config(spool, **{k: v for k, v in kwargs.items() if k in config_keys})
    run_kwargs = {k: v for k, v in kwargs.items() if k not in config_keys}
    run_kwargs.setdefault("max_samples", 96)
    return run_collector(config, clock=clock, sleep=clock.sleep, progress=None, **run_kwargs)


def _samples(spool: Path) -> list[Any]:
    out = []
    for path in sorted(spool.glob("*.tsv")):
        parsed = parse_gpu_file(path)
        assert parsed.rejected == ()
        out.extend(parsed.samples)
    return sorted(out, key=lambda s: (s.sampled_at, s.gpu_index))


def test_replayed_sweeps_become_one_line_per_gpu_per_second_in_file_units(
    tmp_path: Path, clock: FakeClock, fake_nvml: mock.MagicMock
) -> None:
    stats = _collect(tmp_path, clock)
    samples = _samples(tmp_path)
    recording = load_recording()
    assert stats.sweeps == 48 and stats.samples == 96 == len(samples)
    first = samples[0]
    raw = recording["gpus"][0]["sweeps"][0]
    assert first.sampled_at == T0 and first.node == "gpu-node-7"
    assert first.gpu_uuid == recording["gpus"][0]["uuid"]
    assert first.instance_id == "llama70b-tp2-a"
    assert first.energy_mj == raw["energy_mj"]
    assert first.power_w == pytest.approx(raw["power_mw"] / 1000)
    assert first.power_limit_w == 700.0
    assert (first.sm_clock_mhz, first.memory_clock_mhz) == (raw["sm_clock_mhz"], 2619)
    assert first.memory_used_bytes == raw["memory_used_bytes"]
    assert [s.sampled_at for s in samples[::2]] == [T0 + timedelta(seconds=i) for i in range(48)]
    capped = [s for s in samples if s.power_w is not None and s.power_w >= 694]
    assert capped and {s.sm_clock_mhz for s in capped} == {1755}


def test_not_supported_field_is_null_listed_and_never_asked_again(
    tmp_path: Path, clock: FakeClock, fake_nvml: mock.MagicMock
) -> None:
    stats = _collect(tmp_path, clock)
    gpu1 = [s for s in _samples(tmp_path) if s.gpu_index == 1]
    assert {s.applied_sm_clock_mhz for s in gpu1} == {None}
    assert {s.unsupported_fields for s in gpu1} == {("applied_sm_clock_mhz",)}
    gpu0 = [s for s in _samples(tmp_path) if s.gpu_index == 0]
    assert {s.applied_sm_clock_mhz for s in gpu0} == {1980}
    assert stats.unsupported == {0: (), 1: ("applied_sm_clock_mhz",)}
    # 48 sweeps of GPU 0, one (refused) call for GPU 1
    assert fake_nvml.nvmlDeviceGetApplicationsClock.call_count == 48 + 1


def test_other_nvml_error_is_counted_and_the_loop_goes_on(
    tmp_path: Path, clock: FakeClock, fake_nvml: mock.MagicMock
) -> None:
    stats = _collect(tmp_path, clock)
    assert stats.nvml_errors == {(0, "temperature_c", "NVMLError_Unknown"): 1}
    at_error = [s for s in _samples(tmp_path) if s.sampled_at == T0 + timedelta(seconds=10)]
    assert at_error[0].temperature_c is None and at_error[0].unsupported_fields == ()
    assert at_error[1].temperature_c is not None
    assert stats.samples == 96


def test_counter_reset_is_recorded_as_read(
    tmp_path: Path, clock: FakeClock, fake_nvml: mock.MagicMock
) -> None:
    _collect(tmp_path, clock)
    gpu1 = [s.energy_mj for s in _samples(tmp_path) if s.gpu_index == 1]
    assert gpu1[30] is not None and gpu1[29] is not None and gpu1[30] < gpu1[29]


def test_rotation_by_age_leaves_only_complete_closed_files(
    tmp_path: Path, clock: FakeClock, fake_nvml: mock.MagicMock
) -> None:
    seen_while_running: list[set[str]] = []

    def check_spool(_: FakeClock) -> None:
        # a loader listing the spool now must only find complete, clean files
        closed = {p.name for p in tmp_path.glob("*.tsv")}
        for name in closed:
            assert parse_gpu_file(tmp_path / name).rejected == ()
        assert len(list(tmp_path.glob("*.tsv.part"))) == 1
        seen_while_running.append(closed)

    clock.on_sleep.append(check_spool)
    stats = _collect(tmp_path, clock, rotate_s=10)
    files = sorted(tmp_path.glob("*.tsv"))
    assert len(files) == 5 == len(stats.files_closed)
    assert not list(tmp_path.glob("*.part"))
    assert [len(parse_gpu_file(p).samples) for p in files] == [20, 20, 20, 20, 16]
    assert [p.name for p in files][0] == "gpu-gpu-node-7-20260301T120000.000000Z.tsv"
    named = [parse_spool_file_name(p.name) for p in files]
    assert [n[1] for n in named if n] == [T0 + timedelta(seconds=10 * i) for i in range(5)]
    assert seen_while_running[9] == set() and len(seen_while_running[10]) == 1


def test_rotation_by_size_never_splits_a_sweep(
    tmp_path: Path, clock: FakeClock, fake_nvml: mock.MagicMock
) -> None:
    _collect(tmp_path, clock, rotate_bytes=2000)
    files = sorted(tmp_path.glob("*.tsv"))
    assert len(files) > 5
    for path in files:
        parsed = parse_gpu_file(path)
        assert parsed.rejected == () and len(parsed.samples) % 2 == 0
    assert len(_samples(tmp_path)) == 96


def test_part_file_left_by_a_crash_is_closed_at_start(
    tmp_path: Path, clock: FakeClock, fake_nvml: mock.MagicMock
) -> None:
    _collect(tmp_path, clock, max_samples=4)
    (done,) = tmp_path.glob("*.tsv")
    crashed = tmp_path / "gpu-gpu-node-7-20260301T110000.000000Z.tsv.part"
    crashed.write_bytes(done.read_bytes() + done.read_bytes()[:57])  # torn last line
    other_node = tmp_path / "gpu-gpu-node-7b-20260301T110000.000000Z.tsv.part"
    other_node.write_text("")
    clock.now = T0
    stats = _collect(tmp_path, clock, max_samples=2)
    recovered = tmp_path / "gpu-gpu-node-7-20260301T110000.000000Z.tsv"
    assert recovered in stats.files_closed and other_node.exists()
    parsed = parse_gpu_file(recovered)
    assert len(parsed.samples) == 4 and len(parsed.rejected) == 1
    assert "truncated" in parsed.rejected[0].reason


def test_duration_bound_stops_before_the_first_late_sweep(
    tmp_path: Path, clock: FakeClock, fake_nvml: mock.MagicMock
) -> None:
    stats = _collect(tmp_path, clock, max_samples=None, duration_s=5, interval_s=0.5)
    assert stats.sweeps == 10
    fake_nvml.nvmlShutdown.assert_called_once_with()


def test_sigterm_stops_after_the_sweep_closes_the_file_and_shuts_nvml_down(
    tmp_path: Path, clock: FakeClock, fake_nvml: mock.MagicMock
) -> None:
    def terminate(c: FakeClock) -> None:
        if c.now == T0 + timedelta(seconds=3):
            os.kill(os.getpid(), signal.SIGTERM)

    clock.on_sleep.append(terminate)
    before = signal.getsignal(signal.SIGTERM)
    stats = _collect(tmp_path, clock, max_samples=None, handle_signals=True)
    assert stats.sweeps == 3  # the signal came while waiting for the 4th
    assert len(list(tmp_path.glob("*.tsv"))) == 1 and not list(tmp_path.glob("*.part"))
    fake_nvml.nvmlShutdown.assert_called_once_with()
    assert signal.getsignal(signal.SIGTERM) == before


def test_main_without_a_driver_fails_with_a_clear_message(
    tmp_path: Path, clock: FakeClock, fake_nvml: mock.MagicMock, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_nvml.nvmlInit.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    status = main(["--spool-dir", str(tmp_path / "spool"), "--duration-s", "1"])
    assert status == 2
    assert "no NVIDIA driver/GPU found" in capsys.readouterr().err
    assert not (tmp_path / "spool").exists()


def test_main_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--spool-dir", "--interval-s", "--node", "--instance-map", "--rotate-mb"):
        assert option in out


def test_instance_map_accepts_index_and_uuid_keys_and_names_bad_entries() -> None:
    assert parse_instance_map("gpu0=a, 1=b;GPU-x=c") == {"gpu0": "a", "1": "b", "GPU-x": "c"}
    with pytest.raises(ConfigError, match="gpu=instance"):
        parse_instance_map("gpu0")

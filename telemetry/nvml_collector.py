"""The NVML collector: read every GPU of a node each interval and spool samples to files.

One process per GPU node (``wattplan collect``). Every ``interval_s`` it reads each GPU's
energy counter, power, clocks, power limit, utilisation, memory and temperature through
NVML and appends one line per GPU (``telemetry.gpu_spool.format_spool_line``: the spool
format, PostgreSQL COPY text under a header line) to a ``*.tsv.part`` file in the spool
folder. Files rotate by size and age; a closed file is fsynced and renamed to
``gpu-<node>-<first sample UTC>.tsv`` in one atomic step, so
loaders only ever see complete files. The collector never talks to the database: when it
is away, files simply wait in the spool. Format and operation: docs/telemetry.md.

Only this module touches NVML and the clock; tests patch ``telemetry.nvml_collector.pynvml``
with an autospec'd replacement that replays recorded readings, and pass a fake clock.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TextIO

import pynvml

from telemetry.gpu import (
    MEASUREMENT_FIELDS,
    PART_SUFFIX,
    SPOOL_SUFFIX,
    parse_spool_file_name,
    spool_file_name,
)
from telemetry.gpu_spool import SPOOL_HEADER, format_spool_line
from wattplan.errors import ConfigError, WattplanError

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

DEFAULT_ROTATE_BYTES = 64 * 1024 * 1024
DEFAULT_ROTATE_S = 3600.0
DEFAULT_PROGRESS_S = 60.0


class NvmlUnavailableError(WattplanError, RuntimeError):
    """NVML cannot start: no NVIDIA driver, no GPU, or no permission."""


# Each measurement: how to read it from NVML and convert it to the file's unit. The
# functions look ``pynvml`` up at call time, so a test's patched module is the one used.
def _energy_mj(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))


def _power_w(handle: Any) -> float:
    return pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0


def _sm_clock_mhz(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))


def _memory_clock_mhz(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))


def _applied_sm_clock_mhz(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetApplicationsClock(handle, pynvml.NVML_CLOCK_SM))


def _power_limit_w(handle: Any) -> float:
    return pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0


def _utilization_pct(handle: Any) -> float:
    return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def _memory_used_bytes(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def _temperature_c(handle: Any) -> float:
    return float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))


READERS: dict[str, Callable[[Any], int | float]] = {
    "energy_mj": _energy_mj,
    "power_w": _power_w,
    "sm_clock_mhz": _sm_clock_mhz,
    "memory_clock_mhz": _memory_clock_mhz,
    "applied_sm_clock_mhz": _applied_sm_clock_mhz,
    "power_limit_w": _power_limit_w,
    "utilization_pct": _utilization_pct,
    "memory_used_bytes": _memory_used_bytes,
    "temperature_c": _temperature_c,
}
assert tuple(READERS) == MEASUREMENT_FIELDS


@dataclass(frozen=True)
class CollectorConfig:
    """What to collect and where to spool it.

    Attributes:
        spool_dir: Folder for the sample files (created if missing).
        node: Name of this node, stored with every sample and in the file names.
        interval_s: Seconds between two sweeps over the GPUs.
        instance_map: GPU -> serving instance id; keys are a UUID (``GPU-...``), an index
            (``0``) or ``gpu<index>`` (``gpu0``). Unmapped GPUs get no instance.
        rotate_bytes: Close the current file once it holds this many bytes (0: never).
        rotate_s: Close the current file once its first sample is this old (0: never).
        progress_s: Seconds between progress lines on the progress stream.
    """

    spool_dir: Path
    node: str
    interval_s: float = 1.0
    instance_map: Mapping[str, str] = field(default_factory=dict)
    rotate_bytes: int = DEFAULT_ROTATE_BYTES
    rotate_s: float = DEFAULT_ROTATE_S
    progress_s: float = DEFAULT_PROGRESS_S

    def __post_init__(self) -> None:
        problems = []
        if not self.interval_s > 0:
            problems.append(f"interval_s={self.interval_s} must be > 0")
        if self.rotate_bytes < 0 or self.rotate_s < 0:
            problems.append("rotate_bytes and rotate_s must be >= 0 (0 disables)")
        if not self.node:
            problems.append("node must not be empty")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class CollectorStats:
    """What a collector run did (also what its progress lines report)."""

    sweeps: int = 0
    samples: int = 0
    files_closed: list[Path] = field(default_factory=list)
    #: ``(gpu index, field, NVML error name) -> count`` of errors other than NotSupported.
    nvml_errors: Counter[tuple[int, str, str]] = field(default_factory=Counter)
    #: ``gpu index -> fields NVML reported as not supported``.
    unsupported: dict[int, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class _Gpu:
    index: int
    uuid: str
    handle: Any
    instance_id: str | None
    unsupported: set[str] = field(default_factory=set)


def parse_instance_map(text: str) -> dict[str, str]:
    """Parse ``gpu0=inst-a,GPU-uuid=inst-b`` (``;`` also separates) into a mapping.

    Raises:
        ConfigError: an entry is not ``gpu=instance``.
    """
    mapping: dict[str, str] = {}
    for part in text.replace(";", ",").split(","):
        if not part.strip():
            continue
        gpu, sep, instance = part.partition("=")
        if not sep or not gpu.strip() or not instance.strip():
            raise ConfigError(
                f"instance map entry {part!r} is not gpu=instance (example: "
                "gpu0=inst-a,GPU-8f3c...=inst-b)"
            )
        mapping[gpu.strip()] = instance.strip()
    return mapping


def _instance_for(mapping: Mapping[str, str], index: int, uuid: str) -> str | None:
    for key in (uuid, f"gpu{index}", str(index)):
        if key in mapping:
            return mapping[key]
    return None


class SpoolWriter:
    """Appends sweeps to ``*.tsv.part`` spool files and closes them atomically.

    Each file starts with the spool header (:data:`telemetry.gpu_spool.SPOOL_HEADER`). A
    sweep is never split across files. Closing fsyncs the file and renames it to its final
    name (``gpu-<node>-<first sample>.tsv``; ``-1``, ``-2`` ... appended if that name is
    taken), so a reader listing ``*.tsv`` only sees complete files.
    """

    def __init__(self, spool_dir: Path, node: str, rotate_bytes: int, rotate_s: float) -> None:
        self.spool_dir = spool_dir
        self.node = node
        self.rotate_bytes = rotate_bytes
        self.rotate_s = rotate_s
        self._handle: IO[bytes] | None = None
        self._part: Path | None = None
        self._final: Path | None = None
        self._first_at: datetime | None = None
        self._bytes = 0
        spool_dir.mkdir(parents=True, exist_ok=True)

    def recover(self) -> list[Path]:
        """Close ``.part`` files this node left behind (a crash): nothing read is lost.

        A line cut short by the crash stays in the file; the parser rejects it. Empty
        leftovers are removed.
        """
        mine = parse_spool_file_name(spool_file_name(self.node, datetime.now(UTC)))
        assert mine is not None
        closed = []
        for part in sorted(self.spool_dir.glob(f"gpu-*{SPOOL_SUFFIX}{PART_SUFFIX}")):
            named = parse_spool_file_name(part.name[: -len(PART_SUFFIX)])
            if named is None or named[0] != mine[0]:
                continue  # another node's file, or not a spool file
            if part.stat().st_size == 0:
                part.unlink()
                continue
            final = self._free_name(part.name[: -len(PART_SUFFIX)], check_part=False)
            os.replace(part, final)
            closed.append(final)
            log.warning("closed %s left by an earlier run (crash?) as %s", part.name, final.name)
        return closed

    def write_sweep(self, lines: Sequence[str], sampled_at: datetime) -> Path | None:
        """Append one sweep's lines; returns the file closed to make room, if any."""
        closed = None
        if self._handle is not None and self._due(sampled_at):
            closed = self.close()
        if self._handle is None:
            self._open(sampled_at)
        data = "".join(f"{line}\n" for line in lines).encode()
        assert self._handle is not None
        self._handle.write(data)
        self._handle.flush()  # a crash loses at most what the OS has not written yet
        self._bytes += len(data)
        return closed

    def close(self) -> Path | None:
        """Close the current file (fsync, atomic rename); returns its final path."""
        if self._handle is None:
            return None
        handle, part, final = self._handle, self._part, self._final
        self._handle = self._part = self._final = self._first_at = None
        self._bytes = 0
        assert part is not None and final is not None
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        final = self._free_name(final.name, check_part=False)
        os.replace(part, final)
        _fsync_dir(self.spool_dir)
        return final

    def _due(self, sampled_at: datetime) -> bool:
        if self.rotate_bytes and self._bytes >= self.rotate_bytes:
            return True
        return bool(
            self.rotate_s
            and self._first_at is not None
            and (sampled_at - self._first_at).total_seconds() >= self.rotate_s
        )

    def _open(self, first_at: datetime) -> None:
        final = self._free_name(spool_file_name(self.node, first_at))
        part = final.with_name(final.name + PART_SUFFIX)
        self._handle = part.open("xb")
        header = f"{SPOOL_HEADER}\n".encode()
        self._handle.write(header)
        self._part, self._final, self._first_at = part, final, first_at
        self._bytes = len(header)

    def _free_name(self, name: str, *, check_part: bool = True) -> Path:
        """``name`` in the spool, or ``<stem>-N.tsv`` if it (or its .part) exists."""
        stem = name[: -len(SPOOL_SUFFIX)]
        candidate, n = name, 0
        while (self.spool_dir / candidate).exists() or (
            check_part and (self.spool_dir / f"{candidate}.part").exists()
        ):
            n += 1
            candidate = f"{stem}-{n}{SPOOL_SUFFIX}"
        return self.spool_dir / candidate


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def start_nvml() -> None:
    """Initialise NVML.

    Raises:
        NvmlUnavailableError: no NVIDIA driver or GPU (the message says what to check).
    """
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailableError(
            f"no NVIDIA driver/GPU found (NVML: {exc}); the collector must run on a GPU node "
            "with the NVIDIA driver installed (nvidia-smi should work there)"
        ) from exc


def discover_gpus(instance_map: Mapping[str, str], stats: CollectorStats) -> list[_Gpu]:
    """The node's GPUs by NVML index; a GPU NVML cannot identify is skipped and counted.

    Raises:
        NvmlUnavailableError: NVML reports no GPU at all.
    """
    count = pynvml.nvmlDeviceGetCount()
    gpus = []
    for index in range(count):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
        except pynvml.NVMLError as exc:
            stats.nvml_errors[(index, "uuid", type(exc).__name__)] += 1
            log.error("GPU %d: cannot read its handle/UUID (%s); skipped", index, exc)
            continue
        if isinstance(uuid, bytes):  # older nvidia-ml-py releases
            uuid = uuid.decode()
        gpus.append(_Gpu(index, str(uuid), handle, _instance_for(instance_map, index, uuid)))
    if not gpus:
        raise NvmlUnavailableError(f"NVML reports {count} GPU(s) and none could be read")
    return gpus


def read_sample(
    gpu: _Gpu, node: str, sampled_at: datetime, stats: CollectorStats
) -> dict[str, Any]:
    """One GPU's reading as a sample record (see ``telemetry.gpu.SAMPLE_KEYS``).

    A field NVML reports as not supported is None and listed in ``unsupported_fields``
    (and not asked again); any other NVML error leaves the field None and is counted in
    ``stats.nvml_errors`` (logged on first occurrence).
    """
    record: dict[str, Any] = {
        "gpu_uuid": gpu.uuid,
        "sampled_at": sampled_at,
        "node": node,
        "gpu_index": gpu.index,
        "instance_id": gpu.instance_id,
    }
    for name, reader in READERS.items():
        value: int | float | None = None
        if name not in gpu.unsupported:
            try:
                value = reader(gpu.handle)
            except pynvml.NVMLError_NotSupported:
                gpu.unsupported.add(name)
                log.info("GPU %d (%s): %s not supported", gpu.index, gpu.uuid, name)
            except pynvml.NVMLError as exc:
                key = (gpu.index, name, type(exc).__name__)
                stats.nvml_errors[key] += 1
                if stats.nvml_errors[key] == 1:
                    log.warning("GPU %d: reading %s failed: %s", gpu.index, name, exc)
        record[name] = value
    record["unsupported_fields"] = [n for n in MEASUREMENT_FIELDS if n in gpu.unsupported]
    return record


def _utc_now() -> datetime:
    return datetime.now(UTC)


def run_collector(
    config: CollectorConfig,
    *,
    clock: Clock = _utc_now,
    sleep: Callable[[float], object] | None = None,
    stop: threading.Event | None = None,
    max_samples: int | None = None,
    duration_s: float | None = None,
    progress: TextIO | None = sys.stderr,
    handle_signals: bool = False,
) -> CollectorStats:
    """Collect until stopped, ``duration_s`` has passed, or ``max_samples`` are written.

    Sweeps start every ``interval_s`` after the first (ticks missed while a sweep ran
    long are skipped, not bunched); all GPUs of a sweep share the time the sweep started.
    On the way out (stop, bound, error, SIGTERM) the current file is closed and NVML is
    shut down.

    Args:
        config: What to collect and where.
        clock: Aware UTC "now" (tests pass a fake clock).
        sleep: Waits that many seconds; defaults to waiting on ``stop`` (tests pass the
            fake clock's sleep).
        stop: Set it to stop after the current sweep.
        max_samples: Stop once at least this many GPU samples are written (a sweep is
            never cut).
        duration_s: Stop before the first sweep that would start this late.
        progress: Stream for progress lines (None: quiet).
        handle_signals: Stop on SIGTERM (main thread only).

    Raises:
        NvmlUnavailableError: NVML cannot start or sees no GPU.
    """
    stop = stop or threading.Event()
    wait = sleep or stop.wait
    stats = CollectorStats()
    start_nvml()
    previous_handler: Any = None
    writer: SpoolWriter | None = None
    try:
        if handle_signals:
            previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        writer = SpoolWriter(config.spool_dir, config.node, config.rotate_bytes, config.rotate_s)
        stats.files_closed.extend(writer.recover())
        gpus = discover_gpus(config.instance_map, stats)
        _say(
            progress,
            f"collecting {len(gpus)} GPU(s) on {config.node} every {config.interval_s:g} s into "
            f"{config.spool_dir}: "
            + ", ".join(f"{g.index}={g.uuid}->{g.instance_id or '-'}" for g in gpus),
        )
        started = clock()
        next_progress_s = config.progress_s
        tick = 0
        while not stop.is_set():
            now = clock()
            elapsed_s = (now - started).total_seconds()
            if duration_s is not None and elapsed_s >= duration_s:
                break
            lines = [format_spool_line(read_sample(g, config.node, now, stats)) for g in gpus]
            closed = writer.write_sweep(lines, now)
            if closed is not None:
                stats.files_closed.append(closed)
            stats.sweeps += 1
            stats.samples += len(lines)
            unsupported = {g.index: tuple(sorted(g.unsupported)) for g in gpus}
            if unsupported != stats.unsupported:
                stats.unsupported = unsupported
                if any(unsupported.values()):
                    _say(progress, f"not supported by NVML: {unsupported}")
            if max_samples is not None and stats.samples >= max_samples:
                break
            if progress is not None and elapsed_s >= next_progress_s:
                _say(progress, _progress_line(stats))
                next_progress_s += config.progress_s
            # next tick on the interval grid; skip ticks a slow sweep overran
            tick = max(tick + 1, int(elapsed_s // config.interval_s) + 1)
            remaining_s = tick * config.interval_s - (clock() - started).total_seconds()
            if remaining_s > 0:
                wait(remaining_s)
    finally:
        try:
            closed = writer.close() if writer is not None else None
            if closed is not None:
                stats.files_closed.append(closed)
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as exc:  # shutting down anyway
                log.warning("nvmlShutdown failed: %s", exc)
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
    _say(progress, _progress_line(stats) + " (stopped)")
    return stats


def _progress_line(stats: CollectorStats) -> str:
    errors = sum(stats.nvml_errors.values())
    return (
        f"collector: {stats.sweeps} sweeps, {stats.samples} samples, "
        f"{len(stats.files_closed)} files closed, {errors} NVML errors"
    )


def _say(stream: TextIO | None, line: str) -> None:
    if stream is not None:
        print(line, file=stream, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``wattplan collect`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="wattplan collect",
        description="Sample every NVIDIA GPU of this node through NVML and spool one JSON "
        "line per GPU per interval to files the GPU telemetry loader reads. Stops on "
        "SIGTERM/Ctrl-C (closing the current file) or after --duration-s.",
    )
    parser.add_argument("--spool-dir", type=Path, required=True, help="folder for the files")
    parser.add_argument(
        "--interval-s", type=float, default=1.0, help="seconds between sweeps (default 1)"
    )
    parser.add_argument("--node", default=socket.gethostname(), help="node name (default: host)")
    parser.add_argument(
        "--instance-map",
        default="",
        help="GPU -> serving instance, e.g. gpu0=inst-a,gpu1=inst-a,GPU-8f3c...=inst-b",
    )
    parser.add_argument(
        "--rotate-mb", type=float, default=64.0, help="close a file at this size (default 64)"
    )
    parser.add_argument(
        "--rotate-s", type=float, default=3600.0, help="close a file at this age (default 3600)"
    )
    parser.add_argument("--duration-s", type=float, help="stop after this long (default: run)")
    parser.add_argument("--max-samples", type=int, help="stop after this many GPU samples")
    parser.add_argument(
        "--progress-s", type=float, default=60.0, help="seconds between progress lines"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wattplan collect``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = CollectorConfig(
            spool_dir=args.spool_dir,
            node=args.node,
            interval_s=args.interval_s,
            instance_map=parse_instance_map(args.instance_map),
            rotate_bytes=int(args.rotate_mb * 1024 * 1024),
            rotate_s=args.rotate_s,
            progress_s=args.progress_s,
        )
        run_collector(
            config,
            duration_s=args.duration_s,
            max_samples=args.max_samples,
            handle_signals=threading.current_thread() is threading.main_thread(),
        )
    except NvmlUnavailableError as exc:
        print(f"wattplan collect: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"wattplan collect: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"wattplan collect: cannot write to the spool folder {args.spool_dir}: {exc}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

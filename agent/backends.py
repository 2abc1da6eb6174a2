"""Backends of the cluster agent: what running a wave of steps means on a cluster.

- :class:`SimulatedBackend` (``--backend simulated``): an in-process twin. A wave takes
  ``wave_s`` seconds of wall time (0: at once); nothing outside the agent changes. With a
  telemetry spool it also writes GPU samples of the running instances (:mod:`agent.twin`).
- :class:`NvmlBackend` (``--backend nvml``): the node's own GPUs. A start locks the clocks
  and sets the power limit of the instance's GPUs with pynvml, then starts a serving process
  from a command template (e.g. ``vllm serve {model} --tensor-parallel-size {tp} --port
  {port}``) with ``CUDA_VISIBLE_DEVICES`` set to those GPUs; a retune only changes clocks
  and power limit; a stop ends the process (SIGTERM, then SIGKILL) and resets the GPUs.

Both backends also serve the control loops (:mod:`agent.control`, the
:class:`ControlPlane` methods): the simulated one through live twin engines
(:class:`agent.twin.TwinFleet`: vLLM-format ``/metrics``, locked clocks, measured power),
the nvml one through the instances' serving engines (``http://127.0.0.1:{port}/metrics``),
``nvmlDeviceSetGpuLockedClocks`` (never outside the GPU's supported clocks),
``nvmlDeviceGetPowerUsage``, and ``nvmlDeviceResetGpuLockedClocks`` for every GPU the loops
touched when the agent stops. The GPUs the loops locked are also listed in
``<run dir>/clock-locks.json``, so an agent killed without a chance to reset them (SIGKILL,
power loss) resets them when it starts again.

Every step is idempotent (a process already running for the instance is kept, a stopped
one is not stopped twice, clock settings are absolute), because a wave interrupted by a
restart of the agent is run again from the start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pynvml

from agent.rollout import RETUNE, START, STOP, Instance, Step, gpus_per_instance
from wattplan.errors import ConfigError, WattplanError

if TYPE_CHECKING:
    from agent.twin import TwinFleet

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("simulated", "nvml")


class BackendError(WattplanError, RuntimeError):
    """A step failed on the cluster; the plan is marked failed with this message."""


class Interrupted(WattplanError, RuntimeError):
    """The agent is stopping: the wave in flight is run again at the next start."""


class Backend(Protocol):
    """What the apply loop needs from a backend."""

    name: str

    def recover(self, instances: Sequence[Instance]) -> None:
        """Bring what runs in line with ``instances`` after the agent (re)started."""

    def run_wave(self, wave: Sequence[Step], stop: threading.Event) -> None:
        """Run every step of ``wave``; return when all are done.

        Raises:
            BackendError: a step failed.
            Interrupted: ``stop`` was set before the wave completed.
        """

    def close(self) -> None:
        """Release what the backend holds (serving processes keep running)."""


class ControlPlane(Protocol):
    """What the control loops (:mod:`agent.control`) need from a backend."""

    #: Simulated seconds per wall second (1 on real GPUs); the loops scale their waits.
    speed: float

    def control_now(self) -> tuple[float, datetime]:
        """``(seconds, time)``: a monotonic clock for the controllers and the event time."""

    def sync(self, instances: Sequence[Instance]) -> None:
        """Learn the running instances (called before each round of the loops)."""

    def metrics_url(self, inst: Instance) -> str:
        """URL of the instance's serving engine's Prometheus ``/metrics``."""

    def supported_clocks(self, inst: Instance) -> tuple[int, ...]:
        """SM clocks (MHz) every GPU of the instance supports, ascending.

        Raises:
            BackendError: they cannot be read.
        """

    def set_clock(self, inst: Instance, clock_mhz: int) -> None:
        """Lock the SM clock of the instance's GPUs.

        Raises:
            BackendError: the clock is not supported, or setting it failed.
        """

    def power_w(self, gpus: Sequence[int]) -> float:
        """Measured power of ``gpus`` now (W).

        Raises:
            BackendError: it cannot be read.
        """

    def restore_clocks(self) -> None:
        """Give every GPU whose clock the loops locked its default clocks back."""


class SimulatedBackend:
    """An in-process twin: each wave takes ``wave_s`` seconds and changes nothing else.

    Args:
        wave_s: Wall-clock seconds one wave takes (0: instant).
        on_wave: Called with each completed wave (tests, telemetry).
        fleet: The live twin engines the control loops read and set (default: one with no
            load, created on first use).
    """

    name = "simulated"

    def __init__(
        self,
        wave_s: float = 0.0,
        on_wave: Callable[[Sequence[Step]], None] | None = None,
        fleet: TwinFleet | None = None,
    ) -> None:
        if wave_s < 0:
            raise ConfigError(f"wave_s must be >= 0, got {wave_s}")
        self.wave_s = wave_s
        self.on_wave = on_wave
        self._fleet = fleet

    @property
    def fleet(self) -> TwinFleet:
        """The live twin engines."""
        if self._fleet is None:
            from agent.twin import TwinFleet

            self._fleet = TwinFleet()
        return self._fleet

    @property
    def speed(self) -> float:
        return self.fleet.speed

    def control_now(self) -> tuple[float, datetime]:
        return self.fleet.now()

    def sync(self, instances: Sequence[Instance]) -> None:
        self.fleet.sync(instances)

    def metrics_url(self, inst: Instance) -> str:
        return self.fleet.metrics_url(inst.instance_id)

    def supported_clocks(self, inst: Instance) -> tuple[int, ...]:
        return self.fleet.clocks_mhz

    def set_clock(self, inst: Instance, clock_mhz: int) -> None:
        try:
            self.fleet.set_clock(inst.instance_id, clock_mhz)
        except (KeyError, ValueError) as exc:
            raise BackendError(f"{inst.instance_id}: {exc}") from exc

    def power_w(self, gpus: Sequence[int]) -> float:
        return self.fleet.power_w(gpus)

    def restore_clocks(self) -> None:
        """Nothing to restore: the twin's GPUs go with the agent."""

    def recover(self, instances: Sequence[Instance]) -> None:
        """Nothing to do: the twin's instances are the state's."""

    def run_wave(self, wave: Sequence[Step], stop: threading.Event) -> None:
        """Wait ``wave_s`` seconds (or until ``stop``)."""
        if self.wave_s > 0 and stop.wait(self.wave_s):
            raise Interrupted("agent stopping")
        if stop.is_set():
            raise Interrupted("agent stopping")
        if self.on_wave is not None:
            self.on_wave(wave)

    def close(self) -> None:
        """Stop the twin's metrics endpoint."""
        if self._fleet is not None:
            self._fleet.close()


def _nvml_error(action: str, gpu: int, exc: Exception) -> BackendError:
    return BackendError(
        f"NVML could not {action} on GPU {gpu}: {exc} (setting clocks and power limits needs "
        "root or the driver's persistence mode and permission settings)"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0): reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


class NvmlBackend:
    """Local GPUs through pynvml, serving processes from a command template.

    Template fields: ``{model}``, ``{tp}``, ``{service}``, ``{request_type}``,
    ``{instance_id}``, ``{gpus}`` (comma-separated indices), ``{port}`` (``base_port`` + the
    instance's number), ``{power_cap_w}``, ``{clock_mhz}`` (empty when not locked).

    Args:
        command_template: The serving command, e.g. ``vllm serve {model}
            --tensor-parallel-size {tp} --port {port}``.
        run_dir: Folder for each instance's PID file and log.
        start_grace_s: A started process must still run after this many seconds.
        stop_timeout_s: Seconds between SIGTERM and SIGKILL.
        base_port: First port handed to instances.

    Raises:
        ConfigError: the template names an unknown field.
        BackendError: NVML cannot be initialised (no driver or GPU).
    """

    name = "nvml"
    FIELDS = (
        "model",
        "tp",
        "service",
        "request_type",
        "instance_id",
        "gpus",
        "port",
        "power_cap_w",
        "clock_mhz",
    )

    def __init__(
        self,
        command_template: str,
        run_dir: Path,
        *,
        start_grace_s: float = 1.0,
        stop_timeout_s: float = 30.0,
        base_port: int = 8000,
    ) -> None:
        self.command_template = command_template
        self._fields(command_template)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.start_grace_s = start_grace_s
        self.stop_timeout_s = stop_timeout_s
        self.base_port = base_port
        self.speed = 1.0
        self._locked: set[int] = set()  # GPUs whose clocks the control loops locked
        self._supported: dict[int, tuple[int, ...]] = {}
        try:
            pynvml.nvmlInit()
            self.gpu_count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            raise BackendError(
                f"NVML is not available ({exc}): the nvml backend runs on a GPU node with the "
                "NVIDIA driver; use --backend simulated elsewhere"
            ) from exc
        self._locks_file = self.run_dir / "clock-locks.json"
        self._reset_leftover_locks()

    def _reset_leftover_locks(self) -> None:
        """Reset the clocks a previous agent locked and could not reset (it was killed)."""
        if not self._locks_file.exists():
            return
        try:
            leftover = [int(g) for g in json.loads(self._locks_file.read_text())["gpus"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "%s is unreadable (%s): resetting every GPU's locked clocks", self._locks_file, exc
            )
            leftover = list(range(self.gpu_count))
        self._locked = {g for g in leftover if 0 <= g < self.gpu_count}
        if self._locked:
            log.warning(
                "GPUs %s still have the clocks a previous agent locked: resetting them",
                sorted(self._locked),
            )
        self.restore_clocks()

    def _save_locks(self) -> None:
        """List the GPUs the loops locked (atomically), or remove the list when none are."""
        if not self._locked:
            self._locks_file.unlink(missing_ok=True)
            return
        part = self._locks_file.with_suffix(".part")
        part.write_text(json.dumps({"gpus": sorted(self._locked)}))
        os.replace(part, self._locks_file)

    def _fields(self, template: str) -> None:
        try:
            template.format(**dict.fromkeys(self.FIELDS, ""))
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"command template {template!r} is invalid ({exc!r}); it may use "
                + ", ".join("{" + f + "}" for f in self.FIELDS)
            ) from exc
        if not shlex.split(template):
            raise ConfigError("the command template is empty")

    # --- GPUs -----------------------------------------------------------------------------

    def _handle(self, gpu: int) -> Any:
        if not 0 <= gpu < self.gpu_count:
            raise BackendError(f"GPU {gpu} does not exist on this node ({self.gpu_count} GPUs)")
        return pynvml.nvmlDeviceGetHandleByIndex(gpu)

    def _configure(self, gpus: Sequence[int], power_cap_w: int, clock_mhz: int | None) -> None:
        for gpu in gpus:
            handle = self._handle(gpu)
            try:
                if clock_mhz:
                    pynvml.nvmlDeviceSetGpuLockedClocks(handle, clock_mhz, clock_mhz)
                else:
                    pynvml.nvmlDeviceResetGpuLockedClocks(handle)
                pynvml.nvmlDeviceSetPowerManagementLimit(handle, power_cap_w * 1000)
            except pynvml.NVMLError as exc:
                raise _nvml_error(
                    f"set {clock_mhz or 'default'} MHz / {power_cap_w} W", gpu, exc
                ) from exc

    def _reset(self, gpus: Sequence[int]) -> None:
        for gpu in gpus:
            handle = self._handle(gpu)
            try:
                pynvml.nvmlDeviceResetGpuLockedClocks(handle)
                default_mw = pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
                pynvml.nvmlDeviceSetPowerManagementLimit(handle, default_mw)
            except pynvml.NVMLError as exc:
                log.warning("could not reset GPU %d after a stop: %s", gpu, exc)

    # --- the control loops -----------------------------------------------------------------

    def control_now(self) -> tuple[float, datetime]:
        return time.monotonic(), datetime.now(UTC)

    def sync(self, instances: Sequence[Instance]) -> None:
        """Nothing to learn: the serving processes are the instances."""

    def port(self, instance_id: str) -> int:
        """The port of an instance's serving engine (``{port}`` in the template)."""
        return self.base_port + int("".join(ch for ch in instance_id if ch.isdigit()) or 0)

    def metrics_url(self, inst: Instance) -> str:
        return f"http://127.0.0.1:{self.port(inst.instance_id)}/metrics"

    def _gpu_clocks(self, gpu: int) -> tuple[int, ...]:
        cached = self._supported.get(gpu)
        if cached is not None:
            return cached
        handle = self._handle(gpu)
        try:
            memory = max(pynvml.nvmlDeviceGetSupportedMemoryClocks(handle))
            clocks = tuple(
                sorted(
                    {int(c) for c in pynvml.nvmlDeviceGetSupportedGraphicsClocks(handle, memory)}
                )
            )
        except pynvml.NVMLError as exc:
            log.info("GPU %d lists no supported clocks (%s): using its min/max", gpu, exc)
            try:
                low, high = pynvml.nvmlDeviceGetMinMaxClockOfPState(
                    handle, pynvml.NVML_PSTATE_0, pynvml.NVML_CLOCK_GRAPHICS
                )
            except pynvml.NVMLError as exc2:
                raise _nvml_error("read the supported clocks", gpu, exc2) from exc2
            step = 15  # NVIDIA's data-center GPUs step their SM clock by 15 MHz
            clocks = tuple(sorted({*range(int(low), int(high), step), int(high)}))
        if not clocks or clocks[0] <= 0:
            raise BackendError(f"GPU {gpu} reports no usable SM clocks ({clocks})")
        self._supported[gpu] = clocks
        return clocks

    def supported_clocks(self, inst: Instance) -> tuple[int, ...]:
        common: set[int] | None = None
        for gpu in inst.gpus:
            clocks = set(self._gpu_clocks(gpu))
            common = clocks if common is None else common & clocks
        if not common:
            raise BackendError(f"the GPUs {inst.gpus} of {inst.instance_id} share no SM clock")
        return tuple(sorted(common))

    def set_clock(self, inst: Instance, clock_mhz: int) -> None:
        if clock_mhz not in self.supported_clocks(inst):
            raise BackendError(
                f"{clock_mhz} MHz is not a supported SM clock of the GPUs {inst.gpus} of "
                f"{inst.instance_id}"
            )
        for gpu in inst.gpus:
            handle = self._handle(gpu)
            try:
                pynvml.nvmlDeviceSetGpuLockedClocks(handle, clock_mhz, clock_mhz)
            except pynvml.NVMLError as exc:
                raise _nvml_error(f"lock the SM clock at {clock_mhz} MHz", gpu, exc) from exc
            if gpu not in self._locked:
                self._locked.add(gpu)
                self._save_locks()

    def power_w(self, gpus: Sequence[int]) -> float:
        total_mw = 0
        for gpu in gpus:
            try:
                total_mw += int(pynvml.nvmlDeviceGetPowerUsage(self._handle(gpu)))
            except pynvml.NVMLError as exc:
                raise _nvml_error("read the power", gpu, exc) from exc
        return total_mw / 1000.0

    def restore_clocks(self) -> None:
        """Reset the locked clocks of every GPU the loops touched (errors are logged, and
        such GPUs stay listed so that the next start tries again)."""
        failed = set()
        for gpu in sorted(self._locked):
            try:
                pynvml.nvmlDeviceResetGpuLockedClocks(self._handle(gpu))
            except (pynvml.NVMLError, BackendError) as exc:
                log.warning("could not reset the locked clocks of GPU %d: %s", gpu, exc)
                failed.add(gpu)
                continue
            log.info("GPU %d: locked clocks reset", gpu)
        self._locked = failed
        self._save_locks()

    # --- processes ------------------------------------------------------------------------

    def _pid_file(self, instance_id: str) -> Path:
        return self.run_dir / f"{instance_id}.pid"

    def _pid(self, instance_id: str) -> int | None:
        try:
            pid = int(self._pid_file(instance_id).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def command(self, step: Step) -> list[str]:
        """The argv that serves the instance of a start step."""
        config = step.target
        assert config is not None
        values = {
            "model": config.model,
            "tp": config.tp,
            "service": step.service,
            "request_type": step.request_type,
            "instance_id": step.instance_id,
            "gpus": ",".join(str(g) for g in step.gpus),
            "port": self.port(step.instance_id),
            "power_cap_w": config.power_cap_w,
            "clock_mhz": config.clock_mhz or "",
        }
        return shlex.split(self.command_template.format(**values))

    def _spawn(self, step: Step) -> int:
        argv = self.command(step)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in step.gpus)}
        log_path = self.run_dir / f"{step.instance_id}.log"
        with log_path.open("ab") as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # keeps serving when the agent restarts
                )
            except OSError as exc:
                raise BackendError(
                    f"cannot start {argv[0]!r} for {step.instance_id}: {exc}"
                ) from exc
        self._pid_file(step.instance_id).write_text(str(proc.pid))
        log.info("started %s (pid %d): %s", step.instance_id, proc.pid, shlex.join(argv))
        return proc.pid

    def _terminate(self, instance_id: str) -> None:
        pid = self._pid(instance_id)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                log.warning("%s (pid %d) ignored SIGTERM; killing it", instance_id, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            log.info("stopped %s (pid %d)", instance_id, pid)
        self._pid_file(instance_id).unlink(missing_ok=True)

    # --- the backend interface ------------------------------------------------------------

    def recover(self, instances: Sequence[Instance]) -> None:
        """Restart the serving process of any running instance whose process is gone."""
        for inst in instances:
            if self._pid(inst.instance_id) is None:
                log.warning("instance %s has no serving process: starting it", inst.instance_id)
                step = Step(
                    START,
                    inst.instance_id,
                    inst.service,
                    inst.request_type,
                    None,
                    inst.config,
                    inst.gpus,
                )
                self._configure(inst.gpus, inst.config.power_cap_w, inst.config.clock_mhz)
                self._spawn(step)

    def run_wave(self, wave: Sequence[Step], stop: threading.Event) -> None:
        """Run the steps: stops and retunes first (they free or keep GPUs), then starts;
        then check that every started process survived ``start_grace_s``."""
        order = {STOP: 0, RETUNE: 1, START: 2}
        started: list[Step] = []
        for step in sorted(wave, key=lambda s: order[s.kind]):
            if stop.is_set():
                raise Interrupted("agent stopping")
            if step.kind == STOP:
                self._terminate(step.instance_id)
                self._reset(step.gpus)
            elif step.kind == RETUNE:
                assert step.target is not None
                self._configure(step.gpus, step.target.power_cap_w, step.target.clock_mhz)
            else:
                assert step.target is not None
                if len(step.gpus) != gpus_per_instance(step.target):
                    raise BackendError(f"{step.instance_id}: wrong number of GPUs {step.gpus}")
                self._configure(step.gpus, step.target.power_cap_w, step.target.clock_mhz)
                if self._pid(step.instance_id) is None:
                    self._spawn(step)
                started.append(step)
        if started and self.start_grace_s > 0 and stop.wait(self.start_grace_s):
            raise Interrupted("agent stopping")
        dead = [s.instance_id for s in started if self._pid(s.instance_id) is None]
        if dead:
            raise BackendError(
                f"serving process of {', '.join(dead)} exited within {self.start_grace_s} s; "
                f"see {self.run_dir}/<instance>.log"
            )

    def close(self) -> None:
        """Shut NVML down; serving processes keep running."""
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()

"""The simulated backend's twin: GPU telemetry per applied plan, and live engines.

Live engines (:class:`TwinFleet`): one :class:`~agent.instance_twin.LiveInstance` per
running instance, driven by Poisson arrivals, advanced to the fleet's clock whenever it is
read; each serves vLLM-format ``/metrics`` on loopback (``/instances/<id>/metrics``), takes
locked clocks and reports measured power: what the agent's clock loop and power guard
(:mod:`agent.control`) read and set, as they would on GPUs.

GPU telemetry per applied plan:

When the simulated agent finishes applying a plan, it writes the GPU samples its running
instances would produce over the plan's window (the plan's version is its window start) in
the node collector's spool format (:mod:`telemetry.gpu_spool`), as one closed file in the
spool folder. The ``telemetry_ingest`` DAG loads it like any collector's file, so the loop
plan -> agent -> telemetry -> database closes without GPUs.

Power: an instance with a profile in the default profile table (``data/profiles/v1.csv``,
keyed by its serving config, clock included, and request type) draws the profile's power at
its planned mean load (its share of the pool's ``dispatch_mean`` in the plan's clock policy,
as the control loops read it), split evenly over its GPUs, constant over the window; its
utilization is that load over the profile's SLO capacity. An instance without a profile (or
a plan without a policy) falls back to a stand-in: ``power_cap_w x (idle_fraction + (1 -
idle_fraction) x utilization)`` at a constant utilization. The SM clock is the locked clock
(or ``default_clock_mhz``), and the NVML-style energy counter integrates the power. The
twin does not see the requests that really arrive; nothing here is a measurement.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from agent.instance_twin import (
    H100_CLOCKS_MHZ,
    TYPE_TOKENS,
    LiveInstance,
    PowerModel,
    model_for_tp,
)
from agent.metrics import format_metrics
from agent.performance import instance_performance
from agent.rollout import Instance
from profiles import load_profiles
from telemetry.gpu import PART_SUFFIX, spool_file_name
from telemetry.gpu_spool import SPOOL_HEADER, format_spool_line
from wattplan.domain import Profile
from wattplan.settings import PROJECT_ROOT

if TYPE_CHECKING:
    from agent.control import WindowClockReplay


@dataclass(frozen=True)
class TwinModel:
    """The twin's per-GPU readings.

    Attributes:
        utilization: Constant GPU utilization (0..1).
        idle_fraction: Loaded-idle power as a share of the power cap.
        default_clock_mhz: SM clock of an instance without a locked clock.
        memory_clock_mhz: Memory clock.
        memory_used_bytes: Memory in use (weights and KV cache).
        temperature_c: GPU temperature.
    """

    utilization: float = 0.6
    idle_fraction: float = 0.35
    default_clock_mhz: int = 1980
    memory_clock_mhz: int = 2619
    memory_used_bytes: int = 70 * 2**30
    temperature_c: float = 55.0

    def power_w(self, power_cap_w: int) -> float:
        """Power of one GPU under the cap."""
        return power_cap_w * (self.idle_fraction + (1 - self.idle_fraction) * self.utilization)


class TwinTelemetry:
    """Writes a window of samples for the running instances into a spool folder.

    Args:
        spool_dir: The collectors' spool folder (``WATTPLAN_GPU_SPOOL_DIR``).
        cluster: Name of the cluster; the node is ``twin-<cluster>``.
        window_s: Length of the window a plan covers.
        interval_s: Seconds between two samples of a GPU.
        model: The readings.
        clock_replay: Also replay the clock loop over each applied plan's window and record
            its clock changes (:class:`agent.control.WindowClockReplay`).
    """

    def __init__(
        self,
        spool_dir: Path,
        cluster: str,
        *,
        window_s: int = 1800,
        interval_s: float = 10.0,
        model: TwinModel | None = None,
        clock_replay: WindowClockReplay | None = None,
    ) -> None:
        self.clock_replay = clock_replay
        if window_s <= 0 or interval_s <= 0:
            raise ValueError("window_s and interval_s must be positive")
        self.spool_dir = Path(spool_dir)
        self.node = f"twin-{cluster}"
        self.cluster = cluster
        self.window_s = window_s
        self.interval_s = interval_s
        self.model = model or TwinModel()
        self._energy_mj: dict[int, tuple[datetime, float]] = {}

    def _gpu_power(self, inst: Instance, loads: Mapping[str, float] | None) -> tuple[float, float]:
        """Power (W) and utilization (0..1) of each GPU of ``inst`` (module docstring)."""
        profile = _default_profiles().get((inst.config.key, inst.request_type))
        load = (loads or {}).get(inst.instance_id, math.nan)
        if profile is None or not math.isfinite(load):
            return self.model.power_w(inst.config.power_cap_w), self.model.utilization
        load = min(max(load, 0.0), profile.capacity_rps)
        gpus = len(inst.gpus) or inst.config.gpus
        return profile.power_w(load) / gpus, load / profile.capacity_rps

    def lines(
        self,
        instances: Sequence[Instance],
        start: datetime,
        loads: Mapping[str, float] | None = None,
    ) -> list[str]:
        """Sample lines of every GPU of ``instances`` over ``[start, start + window_s)``;
        ``loads``: each instance's planned mean rate (req/s; NaN or absent: none)."""
        m = self.model
        gpus = sorted((gpu, inst) for inst in instances for gpu in inst.gpus)
        per_gpu = {inst.instance_id: self._gpu_power(inst, loads) for inst in instances}
        out = []
        steps = int(self.window_s / self.interval_s)
        # A GPU's counter runs on from its last sample (as NVML's does), starting at 0.
        for k in range(steps):
            at = start + timedelta(seconds=k * self.interval_s)
            for gpu, inst in gpus:
                power, utilization = per_gpu[inst.instance_id]
                last_at, energy = self._energy_mj.get(gpu, (at, 0.0))
                energy += power * max((at - last_at).total_seconds(), 0.0) * 1000.0
                self._energy_mj[gpu] = (at, energy)
                clock = inst.config.clock_mhz or m.default_clock_mhz
                out.append(
                    format_spool_line(
                        {
                            "gpu_uuid": f"GPU-twin-{self.cluster}-{gpu:04d}",
                            "sampled_at": at,
                            "node": self.node,
                            "gpu_index": gpu,
                            "instance_id": inst.instance_id,
                            "energy_mj": int(energy),
                            "power_w": round(power, 3),
                            "sm_clock_mhz": clock,
                            "memory_clock_mhz": m.memory_clock_mhz,
                            "applied_sm_clock_mhz": clock,
                            "power_limit_w": float(inst.config.power_cap_w),
                            "utilization_pct": round(utilization * 100, 3),
                            "memory_used_bytes": m.memory_used_bytes,
                            "temperature_c": m.temperature_c,
                        }
                    )
                )
        return out

    def write_window(
        self,
        instances: Sequence[Instance],
        start: datetime,
        loads: Mapping[str, float] | None = None,
    ) -> Path | None:
        """Write the window's samples as one closed spool file (``None``: no instances).

        The file appears atomically (written as ``.part``, then renamed).
        """
        lines = self.lines(instances, start, loads)
        if not lines:
            return None
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        final = self.spool_dir / spool_file_name(self.node, start)
        part = final.with_name(final.name + PART_SUFFIX)
        with part.open("w", encoding="utf-8") as handle:
            handle.write(SPOOL_HEADER + "\n")
            handle.writelines(line + "\n" for line in lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(part, final)
        return final


log = logging.getLogger(__name__)


@functools.cache
def _default_profiles() -> dict[tuple[str, str], Profile]:
    """The default profile table by (config key, request type)."""
    return {
        (p.config.key, p.request_type): p
        for p in load_profiles(PROJECT_ROOT / "data" / "profiles" / "v1.csv")
    }


_METRICS_PATH = re.compile(r"/instances/([A-Za-z0-9_.:@+-]{1,256})/metrics")


class TwinFleet:
    """Live simulated engines of the running instances (see the module docstring).

    The fleet's clock runs at ``speed`` times wall time from ``start`` (default: now), so a
    test can compress minutes of load into seconds; the control loops scale their waits by
    the same factor. Every read advances the engines to the fleet's clock.

    Args:
        load_rps: Arrival rate of each instance (:meth:`set_load` changes it).
        speed: Simulated seconds per wall second.
        start: Simulated time at the fleet's start (event times of clock changes).
        seed: Seed of the arrivals (each instance gets its own stream).
        clocks_mhz: Clocks the twin's GPUs support (H100 SXM: 800-1980 MHz).
        now: Wall-clock source in seconds (tests).
    """

    def __init__(
        self,
        *,
        load_rps: float = 0.0,
        speed: float = 1.0,
        start: datetime | None = None,
        seed: int = 0,
        clocks_mhz: Sequence[int] = H100_CLOCKS_MHZ,
        now: object = time.monotonic,
    ) -> None:
        if load_rps < 0 or speed <= 0:
            raise ValueError("load_rps must be >= 0 and speed > 0")
        self.speed = speed
        self.clocks_mhz = tuple(sorted(clocks_mhz))
        self._wall = now
        self._t0 = float(now())  # type: ignore[operator]
        self._start = start or datetime.now(UTC)
        self._load = load_rps
        self._seed = seed
        self._lock = threading.RLock()
        self._engines: dict[str, LiveInstance] = {}
        self._gpus: dict[str, tuple[int, ...]] = {}
        self._power_marks: dict[str, tuple[float, float]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- time -----------------------------------------------------------------------------

    def now_s(self) -> float:
        """Simulated seconds since the fleet started."""
        return (float(self._wall()) - self._t0) * self.speed  # type: ignore[operator]

    def now(self) -> tuple[float, datetime]:
        """``(seconds, datetime)`` of the fleet's clock."""
        t = self.now_s()
        return t, self._start + timedelta(seconds=t)

    # --- instances ------------------------------------------------------------------------

    def sync(self, instances: Sequence[Instance]) -> None:
        """Start an engine for every new running instance; drop the stopped ones."""
        with self._lock:
            now = self.now_s()
            wanted = {inst.instance_id: inst for inst in instances}
            for gone in set(self._engines) - set(wanted):
                del self._engines[gone]
                self._gpus.pop(gone, None)
                self._power_marks.pop(gone, None)
            for iid, inst in wanted.items():
                if iid in self._engines:
                    continue
                prompt, output = TYPE_TOKENS.get(inst.request_type, TYPE_TOKENS["MM"])
                clock = inst.config.clock_mhz or self.clocks_mhz[-1]
                clock = min(self.clocks_mhz, key=lambda c: abs(c - clock))
                perf = instance_performance(inst.config, inst.request_type)
                self._engines[iid] = LiveInstance(
                    perf.model if perf is not None else model_for_tp(inst.config.tp),
                    PowerModel(gpus=len(inst.gpus) or inst.config.gpus),
                    clock_mhz=clock,
                    load_rps=self._load,
                    prompt_tokens=prompt,
                    output_tokens=output,
                    seed=self._seed * 1_000_003 + int("".join(c for c in iid if c.isdigit()) or 0),
                    start_s=now,
                )
                self._gpus[iid] = tuple(inst.gpus)

    def set_load(self, load_rps: float, instance_id: str | None = None) -> None:
        """Set the arrival rate of one instance, or of all (and of those started later)."""
        if load_rps < 0:
            raise ValueError(f"load_rps must be >= 0, not {load_rps}")
        with self._lock:
            self._advance()
            if instance_id is None:
                self._load = load_rps
            for iid, engine in self._engines.items():
                if instance_id is None or iid == instance_id:
                    engine.set_load(load_rps)

    def _advance(self) -> float:
        now = self.now_s()
        for engine in self._engines.values():
            engine.advance_to(now)
        return now

    def _engine(self, instance_id: str) -> LiveInstance:
        engine = self._engines.get(instance_id)
        if engine is None:
            raise KeyError(f"no simulated engine for instance {instance_id!r}")
        return engine

    def metrics_text(self, instance_id: str) -> str:
        """The instance's ``/metrics`` body (vLLM names)."""
        with self._lock:
            self._advance()
            engine = self._engine(instance_id)
            return format_metrics(engine.snapshot(), f'model_name="twin-{instance_id}"')

    def clock_mhz(self, instance_id: str) -> int:
        """The clock the instance's GPUs run at."""
        with self._lock:
            return int(self._engine(instance_id).twin.clock_mhz)

    def set_clock(self, instance_id: str, clock_mhz: int) -> None:
        """Lock the instance's clock.

        Raises:
            ValueError: the clock is not one the twin's GPUs support.
        """
        if clock_mhz not in self.clocks_mhz:
            raise ValueError(f"{clock_mhz} MHz is not a supported clock of the twin's GPUs")
        with self._lock:
            self._advance()
            self._engine(instance_id).set_clock(clock_mhz)

    def power_w(self, gpus: Sequence[int]) -> float:
        """Measured power of ``gpus`` (W): each engine's energy since the previous reading
        over the time since then, shared evenly over its GPUs."""
        wanted = set(gpus)
        with self._lock:
            now = self._advance()
            total = 0.0
            for iid, engine in self._engines.items():
                energy = engine.twin.energy_j
                last = self._power_marks.get(iid)
                self._power_marks[iid] = (now, energy)
                share = len(wanted.intersection(self._gpus[iid])) / max(len(self._gpus[iid]), 1)
                if share == 0:
                    continue
                if last is None or now - last[0] <= 0:
                    watts = engine.twin.power.watts(
                        engine.twin.clock_mhz,
                        engine.model.max_clock_mhz,
                        len(engine.twin.running),
                        False,
                    )
                else:
                    watts = (energy - last[1]) / (now - last[0])
                total += share * watts
            return total

    def energy_j(self) -> Mapping[str, float]:
        """Energy each engine used since it started."""
        with self._lock:
            self._advance()
            return {iid: e.twin.energy_j for iid, e in self._engines.items()}

    # --- the metrics endpoint -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Root of the metrics endpoint (starts it on first use)."""
        if self._server is None:
            self.start_server()
        assert self._server is not None
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}"

    def metrics_url(self, instance_id: str) -> str:
        """URL of the instance's ``/metrics``."""
        return f"{self.base_url}/instances/{instance_id}/metrics"

    def start_server(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve every engine's ``/metrics`` on ``host:port`` (0: any free port)."""
        fleet = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                match = _METRICS_PATH.fullmatch(self.path)
                try:
                    body = fleet.metrics_text(match.group(1)) if match else None
                except KeyError:
                    body = None
                data = (body or "not found\n").encode()
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="wattplan-twin-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the metrics endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

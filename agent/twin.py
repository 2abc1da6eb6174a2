"""GPU telemetry of the simulated backend: what the twin's instances would report.

When the simulated agent finishes applying a plan, it writes the GPU samples its running
instances would produce over the plan's window (the plan's version is its window start) in
the node collector's spool format (:mod:`telemetry.gpu_spool`), as one closed file in the
spool folder. The ``telemetry_ingest`` DAG loads it like any collector's file, so the loop
plan -> agent -> telemetry -> database closes without GPUs.

The power model is deliberately simple and says so: each GPU of an instance draws
``power_cap_w x (idle_fraction + (1 - idle_fraction) x utilization)`` at a constant
utilization, its SM clock is the locked clock (or ``default_clock_mhz``), and the NVML-style
energy counter integrates that power. It is a stand-in until the simulator package drives
the twin with load; nothing here is a measurement.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from agent.rollout import Instance
from telemetry.gpu import PART_SUFFIX, spool_file_name
from telemetry.gpu_spool import SPOOL_HEADER, format_spool_line


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
    """

    def __init__(
        self,
        spool_dir: Path,
        cluster: str,
        *,
        window_s: int = 1800,
        interval_s: float = 10.0,
        model: TwinModel | None = None,
    ) -> None:
        if window_s <= 0 or interval_s <= 0:
            raise ValueError("window_s and interval_s must be positive")
        self.spool_dir = Path(spool_dir)
        self.node = f"twin-{cluster}"
        self.cluster = cluster
        self.window_s = window_s
        self.interval_s = interval_s
        self.model = model or TwinModel()
        self._energy_mj: dict[int, tuple[datetime, float]] = {}

    def lines(self, instances: Sequence[Instance], start: datetime) -> list[str]:
        """Sample lines of every GPU of ``instances`` over ``[start, start + window_s)``."""
        m = self.model
        gpus = sorted((gpu, inst) for inst in instances for gpu in inst.gpus)
        out = []
        steps = int(self.window_s / self.interval_s)
        # A GPU's counter runs on from its last sample (as NVML's does), starting at 0.
        for k in range(steps):
            at = start + timedelta(seconds=k * self.interval_s)
            for gpu, inst in gpus:
                power = m.power_w(inst.config.power_cap_w)
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
                            "utilization_pct": round(m.utilization * 100, 3),
                            "memory_used_bytes": m.memory_used_bytes,
                            "temperature_c": m.temperature_c,
                        }
                    )
                )
        return out

    def write_window(self, instances: Sequence[Instance], start: datetime) -> Path | None:
        """Write the window's samples as one closed spool file (``None``: no instances).

        The file appears atomically (written as ``.part``, then renamed).
        """
        lines = self.lines(instances, start)
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

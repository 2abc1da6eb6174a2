"""Digital twin: a simulated serving cluster that layouts are applied to and that emits
the telemetry the ingest DAG loads.

:class:`ClusterTwin` holds a request trace and the layouts applied to it over time
(:meth:`ClusterTwin.apply`, what an agent backend calls once a plan is applied). Its
:meth:`ClusterTwin.run` replays the trace up to a point with the per-request simulator and
writes

- GPU telemetry in the collector's spool format (``SPOOL_HEADER`` then one
  ``format_spool_line`` per GPU and sample, one file per node of ``gpus_per_node`` GPUs,
  named by ``spool_file_name``): power per GPU from the profiles at the instance's load,
  the energy counter integrating it, clock and power limit of the instance's config;
- a JSONL request log (docs/formats.md): arrival, tokens, TTFT, mean TBT, end-to-end
  latency, pool, instance and outcome of every request.

GPUs are numbered in layout order at each step (an instance keeps no GPU identity across
layout changes); only GPUs held by an instance are reported. Not wired into the reference
agent's process: an agent backend (``agent.app.SimulatedBackend``) would call
``twin.apply(store.snapshot().layout, offset)`` after completing a plan.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from simulator.engine import simulate_requests
from simulator.model import POOL_ALL, ProfileTable, ReconfigCosts
from simulator.schedule import Schedule
from simulator.workload import RequestTrace
from telemetry.gpu import spool_file_name
from telemetry.gpu_spool import SPOOL_HEADER, format_spool_line
from wattplan.domain import Layout
from wattplan.errors import InputDataError


@dataclass(frozen=True)
class TwinOutput:
    """What one :meth:`ClusterTwin.run` wrote and measured."""

    spool_files: tuple[Path, ...]
    request_log: Path
    requests: int
    samples: int
    serving_energy_j: float


class ClusterTwin:
    """A simulated cluster: apply layouts at trace offsets, replay, emit telemetry.

    Args:
        table: Profiles as arrays.
        trace: The traffic the cluster receives.
        node: Prefix of the node names (``<node>-0``, ``<node>-1``, ...).
        gpus_per_node: GPUs per node.
        step_s: Granularity of layout changes (a change applies from the next step).
        sample_s: Interval of GPU samples.
        costs: Reconfiguration costs.
        clock_governor: Instances run DynamoLLM's instance-level clock loop.
    """

    def __init__(
        self,
        table: ProfileTable,
        trace: RequestTrace,
        *,
        node: str = "twin",
        gpus_per_node: int = 8,
        step_s: int = 60,
        sample_s: float = 10.0,
        costs: ReconfigCosts | None = None,
        clock_governor: bool = True,
    ) -> None:
        if step_s <= 0 or sample_s <= 0 or gpus_per_node <= 0:
            raise InputDataError("step_s, sample_s and gpus_per_node must be positive")
        self.table = table
        self.trace = trace
        self.node = node
        self.gpus_per_node = gpus_per_node
        self.step_s = step_s
        self.sample_s = sample_s
        self.costs = costs or ReconfigCosts()
        self.clock_governor = clock_governor
        self._applied: list[tuple[float, Layout]] = [(0.0, Layout())]

    def apply(self, layout: Layout, at_s: float) -> None:
        """The cluster runs ``layout`` from trace offset ``at_s`` (rounded up to a step).

        Raises:
            InputDataError: ``at_s`` is before the last change.
        """
        if at_s < self._applied[-1][0]:
            raise InputDataError(f"layout changes must come in time order ({at_s} s is earlier)")
        self._applied.append((at_s, layout))

    @property
    def layout(self) -> Layout:
        """The layout applied last."""
        return self._applied[-1][1]

    def _schedule(self, steps: int) -> Schedule:
        layouts = []
        for k in range(steps):
            start = k * self.step_s
            current = Layout()
            for at_s, layout in self._applied:
                if math.ceil(at_s / self.step_s) * self.step_s <= start:
                    current = layout
            layouts.append(current)
        return Schedule(
            "twin",
            self.trace.start_at,
            self.step_s,
            tuple(layouts),
            clock_governor=self.clock_governor,
        )

    def run(self, until_s: float, spool_dir: Path, request_log: Path) -> TwinOutput:
        """Replay ``[0, until_s)`` and write its GPU telemetry and request log."""
        part = self.trace.sliced(0.0, until_s)
        steps = max(1, math.ceil(until_s / self.step_s))
        schedule = self._schedule(steps)
        result = simulate_requests(part, schedule, self.table, self.costs, detail=True)
        assert result.detail is not None
        spool_dir.mkdir(parents=True, exist_ok=True)
        files, samples = self._write_spool(result.detail, steps, until_s, spool_dir)
        self._write_requests(part, result.detail, request_log)
        serving = float((result.energy_j - result.reconfig_energy_j).sum())
        return TwinOutput(tuple(files), request_log, len(part), samples, serving)

    # --- writers ----------------------------------------------------------------------------

    def _instance_ids(self, detail: dict[str, object]) -> list[str]:
        g = detail["groups"]
        keys = detail["pool_keys"]
        assert isinstance(g, dict) and isinstance(keys, list)
        out = []
        for i in range(g["step"].size):
            service, pool = keys[int(g["pool"][i])]
            config = self.table.configs[int(g["config"][i])]
            name = "all" if pool == POOL_ALL else pool
            out.append(f"{service}/{name}/tp{config.tp}/cap{config.power_cap_w}/g{i}")
        return out

    def _write_spool(
        self, detail: dict[str, object], steps: int, until_s: float, spool_dir: Path
    ) -> tuple[list[Path], int]:
        g = detail["groups"]
        instance_w = detail["instance_w"]
        util = detail["utilisation"]
        bucket_s = float(detail["bucket_s"])  # type: ignore[arg-type]
        assert isinstance(g, dict) and isinstance(instance_w, np.ndarray)
        assert isinstance(util, np.ndarray)
        names = self._instance_ids(detail)
        per_step = instance_w.shape[1]
        energy_mj: dict[int, float] = {}
        lines: dict[int, list[str]] = {}
        first_at: dict[int, datetime] = {}
        count = 0
        for k in range(steps):
            members = np.nonzero(g["step"] == k)[0]
            gpu = 0
            slots: list[tuple[int, int, int]] = []  # (gpu index, group, instance number)
            for member in members.tolist():
                per = int(self.table.gpus[int(g["config"][member])])
                for j in range(int(g["count"][member])):
                    slots.extend((gpu + x, member, j) for x in range(per))
                    gpu += per
            t = float(k * self.step_s)
            while t < min((k + 1) * self.step_s, until_s):
                bucket = min(int((t - k * self.step_s) // bucket_s), per_step - 1)
                at = self.trace.start_at + timedelta(seconds=t)
                for index, i, j in slots:
                    config = self.table.configs[int(g["config"][i])]
                    per = int(self.table.gpus[int(g["config"][i])])
                    watts = float(instance_w[i, bucket]) / per
                    energy_mj[index] = energy_mj.get(index, 0.0) + watts * self.sample_s * 1000
                    node = index // self.gpus_per_node
                    u = float(util[int(g["pool"][i]), k * per_step + bucket])
                    record = {
                        "gpu_uuid": f"GPU-{self.node}-{index:06d}",
                        "sampled_at": at,
                        "node": f"{self.node}-{node}",
                        "gpu_index": index % self.gpus_per_node,
                        "instance_id": f"{names[i]}/{j}",
                        "energy_mj": int(energy_mj[index]),
                        "power_w": round(watts, 3),
                        "sm_clock_mhz": config.clock_mhz,
                        "applied_sm_clock_mhz": config.clock_mhz,
                        "power_limit_w": float(config.power_cap_w),
                        "utilization_pct": round(min(max(u, 0.0), 1.0) * 100, 2),
                        "unsupported_fields": [],
                    }
                    lines.setdefault(node, []).append(format_spool_line(record))
                    first_at.setdefault(node, at)
                    count += 1
                t += self.sample_s
        files = []
        for node, body in sorted(lines.items()):
            path = spool_dir / spool_file_name(f"{self.node}-{node}", first_at[node])
            path.write_text(SPOOL_HEADER + "\n" + "\n".join(body) + "\n", encoding="utf-8")
            files.append(path)
        return files, count

    def _write_requests(self, part: RequestTrace, detail: dict[str, object], path: Path) -> None:
        ttft, tbt, group = detail["ttft_s"], detail["tbt_s"], detail["group"]
        g = detail["groups"]
        assert isinstance(ttft, np.ndarray) and isinstance(tbt, np.ndarray)
        assert isinstance(group, np.ndarray) and isinstance(g, dict)
        names = self._instance_ids(detail)
        path.parent.mkdir(parents=True, exist_ok=True)
        base = part.start_at.astimezone(UTC)
        with path.open("w", encoding="utf-8") as handle:
            for r in range(len(part)):
                service, rtype = part.pools[int(part.pool_code[r])]
                at = base + timedelta(seconds=float(part.arrival_s[r]))
                line: dict[str, object] = {
                    "request_id": f"{self.node}-{r}",
                    "arrived_at": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "input_tokens": int(part.input_tokens[r]),
                    "output_tokens": int(part.output_tokens[r]),
                    "pool": rtype,
                }
                i = int(group[r])
                if i < 0:
                    line["outcome"] = "error"  # no instance of its service
                else:
                    out = int(part.output_tokens[r])
                    line.update(
                        ttft_s=round(float(ttft[r]), 6),
                        tbt_s=round(float(tbt[r]), 6),
                        e2e_s=round(float(ttft[r]) + float(tbt[r]) * max(out - 1, 0), 6),
                        model=self.table.configs[int(g["config"][i])].model,
                        instance_id=f"{names[i]}/{r % int(g['count'][i])}",
                        outcome="ok",
                    )
                handle.write(json.dumps(line, separators=(",", ":")) + "\n")

"""A serving instance in simulation, iteration by iteration: the simulated backend of the
instance clock loop.

:class:`InstanceTwin` runs one engine with continuous batching: each iteration, waiting
requests are admitted (FCFS, up to ``max_batch``) and prefilled, and every running
sequence emits one token; the iteration takes the decode step time of the batch plus the
prefills admitted, both from :class:`~agent.clock_control.PerformanceModel` at the
current clock. The twin exposes the engine's state as an
:class:`~agent.metrics.EngineSnapshot` (what vLLM's ``/metrics`` gives the real loop),
takes clock changes (each stalls the engine for ``clock_change_s``, DOMAIN.md section 6)
and integrates power: loaded-idle plus dynamic power, which grows with batch activity and
superlinearly with clock (``(f / f_max) ** clock_power_exponent``).

:func:`replay` drives the twin through a request trace with a clock rule -- the
controller every ``control_interval_s``, or a fixed clock -- and returns energy and SLO
attainment; ``wattplan bench clock-loop`` compares the loop with the fixed maximum clock
on the bundled Azure conversation trace.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.clock_control import ClockController, PerformanceModel
from agent.metrics import EngineSnapshot
from telemetry.requests import parse_azure_trace
from wattplan.domain import RequestTypeBins
from wattplan.errors import InputDataError


@dataclass(frozen=True)
class PowerModel:
    """Power of one instance (all its GPUs), W.

    ``gpus x (idle_w + dynamic_w x activity x (f / f_max) ** exponent)`` with ``activity``
    = 1 in an iteration with prefill and ``min(1, decode_activity_base +
    decode_activity_per_seq x batch)`` in a decode-only iteration; ``idle_w`` between
    requests. H100 SXM defaults: ~90 W loaded idle, 700 W limit.
    """

    gpus: int = 4
    idle_w: float = 90.0
    dynamic_w: float = 560.0
    decode_activity_base: float = 0.45
    decode_activity_per_seq: float = 0.01
    clock_power_exponent: float = 2.4

    def watts(self, clock_mhz: float, max_clock_mhz: float, batch: int, prefill: bool) -> float:
        if batch == 0 and not prefill:
            return self.gpus * self.idle_w
        activity = (
            1.0
            if prefill
            else min(1.0, self.decode_activity_base + self.decode_activity_per_seq * batch)
        )
        scale = (clock_mhz / max_clock_mhz) ** self.clock_power_exponent
        return self.gpus * (self.idle_w + self.dynamic_w * activity * scale)


@dataclass(frozen=True)
class TraceRequest:
    """A request to replay: arrival (s from the trace start) and token counts."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass
class _Running:
    index: int
    left: int
    first_token_s: float = 0.0
    last_token_s: float = 0.0


@dataclass
class ReplayResult:
    """What a replay measured."""

    energy_j: float
    seconds: float
    requests: int
    slo_attainment: float
    ttft_p99_s: float
    tbt_mean_p99_s: float
    clock_changes: int
    clock_time_share: dict[int, float] = field(default_factory=dict)


class InstanceTwin:
    """One simulated engine (see the module docstring)."""

    def __init__(
        self,
        model: PerformanceModel,
        power: PowerModel,
        *,
        clock_mhz: int,
        max_batch: int = 64,
        clock_change_s: float = 0.07,
    ) -> None:
        self.model, self.power = model, power
        self.clock_mhz = clock_mhz
        self.max_batch = max_batch
        self.clock_change_s = clock_change_s
        self.now_s = 0.0
        self.energy_j = 0.0
        self.waiting: deque[int] = deque()
        self.running: list[_Running] = []
        self.clock_changes = 0
        self.clock_time: dict[int, float] = {}
        self.prompt_tokens_total = 0.0

    def snapshot(self) -> EngineSnapshot:
        """The engine's state as its metrics endpoint would report it."""
        return EngineSnapshot(
            running=len(self.running),
            waiting=len(self.waiting),
            kv_cache_usage=len(self.running) / self.max_batch,
            prompt_tokens_total=self.prompt_tokens_total,
        )

    def set_clock(self, clock_mhz: int) -> None:
        """Lock a new clock: the engine stalls for ``clock_change_s`` at the old power."""
        if clock_mhz == self.clock_mhz:
            return
        self._spend(self.clock_change_s, bool(self.running), prefill=False)
        self.clock_mhz = clock_mhz
        self.clock_changes += 1

    def _spend(self, seconds: float, busy: bool, *, prefill: bool) -> None:
        batch = len(self.running) if busy else 0
        watts = self.power.watts(self.clock_mhz, self.model.max_clock_mhz, batch, prefill)
        self.energy_j += watts * seconds
        self.clock_time[self.clock_mhz] = self.clock_time.get(self.clock_mhz, 0.0) + seconds
        self.now_s += seconds


def replay(
    trace: Sequence[TraceRequest],
    model: PerformanceModel,
    power: PowerModel,
    *,
    ttft_slo_s: float,
    tbt_slo_s: float,
    clock_rule: ClockController | int,
    control_interval_s: float = 0.5,
    max_batch: int = 64,
) -> ReplayResult:
    """Serve ``trace`` on one twin; ``clock_rule`` is a controller (asked every
    ``control_interval_s``) or a fixed clock (MHz). A request attains its SLO when its TTFT
    and its mean time between tokens are within the SLOs."""
    fixed = isinstance(clock_rule, int)
    start_clock = clock_rule if isinstance(clock_rule, int) else int(clock_rule.clock_mhz or 0)
    twin = InstanceTwin(model, power, clock_mhz=start_clock, max_batch=max_batch)
    arrivals = sorted(range(len(trace)), key=lambda i: trace[i].arrival_s)
    ttft = np.full(len(trace), np.nan)
    tbt = np.full(len(trace), np.nan)
    next_arrival = 0
    next_control = 0.0
    while next_arrival < len(arrivals) or twin.waiting or twin.running:
        while (
            next_arrival < len(arrivals) and trace[arrivals[next_arrival]].arrival_s <= twin.now_s
        ):
            twin.waiting.append(arrivals[next_arrival])
            next_arrival += 1
        if not fixed and twin.now_s >= next_control:
            assert isinstance(clock_rule, ClockController)
            decision = clock_rule.decide(twin.now_s, twin.snapshot())
            twin.set_clock(decision.clock_mhz)
            next_control = twin.now_s + control_interval_s
        if not twin.waiting and not twin.running:
            # idle until the next arrival (or the next control tick, whichever is first)
            target = trace[arrivals[next_arrival]].arrival_s
            if not fixed:
                target = min(target, max(next_control, twin.now_s))
            twin._spend(max(target - twin.now_s, 0.0), False, prefill=False)
            if twin.now_s < target:  # float safety
                twin.now_s = target
            continue
        admitted: list[int] = []
        while twin.waiting and len(twin.running) + len(admitted) < twin.max_batch:
            admitted.append(twin.waiting.popleft())
        prefill_s = sum(model.prefill_s(trace[i].prompt_tokens, twin.clock_mhz) for i in admitted)
        twin.prompt_tokens_total += sum(trace[i].prompt_tokens for i in admitted)
        batch = len(twin.running) + len(admitted)
        step_s = model.tbt_s(batch, twin.clock_mhz) + prefill_s
        twin.running.extend(_Running(i, trace[i].output_tokens) for i in admitted)
        twin._spend(step_s, True, prefill=bool(admitted))
        still = []
        for r in twin.running:
            if r.left == trace[r.index].output_tokens:  # its first token
                ttft[r.index] = twin.now_s - trace[r.index].arrival_s
                r.first_token_s = twin.now_s
            r.left -= 1
            r.last_token_s = twin.now_s
            if r.left <= 0:
                tokens = trace[r.index].output_tokens
                tbt[r.index] = (
                    (r.last_token_s - r.first_token_s) / (tokens - 1) if tokens > 1 else 0.0
                )
            else:
                still.append(r)
        twin.running = still
    ok = (ttft <= ttft_slo_s) & (tbt <= tbt_slo_s)
    total = sum(twin.clock_time.values()) or 1.0
    return ReplayResult(
        energy_j=twin.energy_j,
        seconds=twin.now_s,
        requests=len(trace),
        slo_attainment=float(ok.mean()) if len(trace) else 1.0,
        ttft_p99_s=float(np.nanpercentile(ttft, 99)) if len(trace) else 0.0,
        tbt_mean_p99_s=float(np.nanpercentile(tbt, 99)) if len(trace) else 0.0,
        clock_changes=twin.clock_changes,
        clock_time_share={c: round(t / total, 4) for c, t in sorted(twin.clock_time.items())},
    )


#: Performance of Llama-2-70B on 4 H100s as the comparison assumes it (documented in
#: docs/control.md): ~15 ms decode steps plus 0.4 ms per sequence, prefill ~16k tokens/s.
LLAMA70B_TP4_H100 = PerformanceModel(
    max_clock_mhz=1980,
    tbt_base_s=0.015,
    tbt_per_seq_s=0.0004,
    prefill_base_s=0.005,
    prefill_per_token_s=0.00006,
    decode_clock_sensitivity=0.3,
)
#: H100 SXM clocks the loop may lock: 800-1980 MHz in 100 MHz steps (and the maximum).
H100_CLOCKS_MHZ = (*range(800, 1980, 100), 1980)


def load_azure_trace(path: Path, *, minutes: float, every: int = 1) -> list[TraceRequest]:
    """The first ``minutes`` of an Azure LLM trace CSV; ``every`` n-th request (one of n
    instances behind a round-robin router).

    Raises:
        InputDataError: the file cannot be read or has no usable rows.
    """
    parsed = parse_azure_trace(path, "replay", RequestTypeBins())
    if not parsed.records:
        raise InputDataError(f"{path} holds no requests to replay")
    t0 = min(r.arrived_at for r in parsed.records)
    out = [
        TraceRequest((r.arrived_at - t0).total_seconds(), r.input_tokens, max(r.output_tokens, 1))
        for r in sorted(parsed.records, key=lambda r: r.arrived_at)
        if (r.arrived_at - t0).total_seconds() < minutes * 60
    ]
    return out[::every]


def compare_with_max_clock(
    trace: Sequence[TraceRequest],
    *,
    ttft_slo_s: float = 1.0,
    tbt_slo_s: float = 0.075,
    model: PerformanceModel = LLAMA70B_TP4_H100,
    power: PowerModel | None = None,
    clocks_mhz: Sequence[int] = H100_CLOCKS_MHZ,
    poll_s: float = 0.5,
    max_lower_steps: int | None = None,
    prompt_percentile: float = 90.0,
    margin: float = 0.65,
) -> dict[str, Any]:
    """Energy and SLO attainment of the clock loop against the fixed maximum clock.

    The loop projects prefills with a long prompt (the trace's ``prompt_percentile``; the
    median under-projects bursts of long prompts: more TTFT misses, measured), keeps its
    projections under ``margin`` x SLO and lowers by at most ``max_lower_steps`` clocks a
    change (None: at once).
    """
    if not 0 <= prompt_percentile <= 100:
        raise ValueError(f"prompt_percentile must be in [0, 100], not {prompt_percentile}")
    power = power or PowerModel()
    prompt = (
        float(np.percentile([r.prompt_tokens for r in trace], prompt_percentile)) if trace else 0.0
    )
    fixed = replay(
        trace, model, power, ttft_slo_s=ttft_slo_s, tbt_slo_s=tbt_slo_s, clock_rule=max(clocks_mhz)
    )
    controller = ClockController(
        model,
        clocks_mhz,
        tbt_slo_s=tbt_slo_s,
        ttft_slo_s=ttft_slo_s,
        prompt_tokens=prompt,
        margin=margin,
        max_lower_steps=max_lower_steps,
    )
    loop = replay(
        trace,
        model,
        power,
        ttft_slo_s=ttft_slo_s,
        tbt_slo_s=tbt_slo_s,
        clock_rule=controller,
        control_interval_s=poll_s,
    )
    return {
        "requests": len(trace),
        "loop": {
            "max_lower_steps": max_lower_steps,
            "prompt_percentile": prompt_percentile,
            "margin": margin,
            "poll_s": poll_s,
        },
        "slo": {"ttft_s": ttft_slo_s, "tbt_mean_s": tbt_slo_s},
        "max_clock": _figures(fixed),
        "clock_loop": _figures(loop),
        "energy_saved": round(1 - loop.energy_j / fixed.energy_j, 4) if fixed.energy_j else 0.0,
    }


def _figures(r: ReplayResult) -> dict[str, Any]:
    return {
        "energy_kwh": round(r.energy_j / 3.6e6, 5),
        "slo_attainment": round(r.slo_attainment, 5),
        "ttft_p99_s": round(r.ttft_p99_s, 4),
        "tbt_mean_p99_s": round(r.tbt_mean_p99_s, 4),
        "clock_changes": r.clock_changes,
        "time_share_by_clock_mhz": {str(k): v for k, v in r.clock_time_share.items() if v},
    }


#: Typical (prompt, output) tokens of each DynamoLLM request type (input S/M/L, output
#: S/M/L; bin edges 256/1024 and 100/350 tokens): mid-bin values, an assumption.
TYPE_TOKENS: dict[str, tuple[int, int]] = {
    f"{i}{o}": (p, q)
    for i, p in (("S", 128), ("M", 640), ("L", 2048))
    for o, q in (("S", 50), ("M", 220), ("L", 600))
}


def model_for_tp(tp: int, base: PerformanceModel = LLAMA70B_TP4_H100) -> PerformanceModel:
    """``base`` (4 GPUs) scaled to ``tp`` GPUs: step times ~ 1/tp (an assumption: weights
    and compute split evenly, communication ignored)."""
    scale = 4.0 / max(tp, 1)
    return PerformanceModel(
        max_clock_mhz=base.max_clock_mhz,
        tbt_base_s=base.tbt_base_s * scale,
        tbt_per_seq_s=base.tbt_per_seq_s * scale,
        prefill_base_s=base.prefill_base_s * scale,
        prefill_per_token_s=base.prefill_per_token_s * scale,
        decode_clock_sensitivity=base.decode_clock_sensitivity,
    )


@dataclass
class _LiveRequest:
    prompt_tokens: int
    left: int


class LiveInstance:
    """One simulated engine driven by Poisson arrivals, advanced on demand to a time.

    What the simulated backend of the agent runs per instance: :meth:`advance_to` serves
    the requests that arrived up to a time (continuous batching as :func:`replay`),
    :meth:`snapshot` is what its ``/metrics`` reports (vLLM's counters included),
    :meth:`set_clock` locks a clock (with the stall), and the energy counter gives measured
    power. Arrivals: a Poisson process at ``load_rps`` (changeable any time), each request
    with ``prompt_tokens`` and ``output_tokens`` drawn around the given means
    (exponential, at least 1).

    Args:
        model: Step times.
        power: Power model.
        clock_mhz: Starting clock.
        load_rps: Arrival rate.
        prompt_tokens: Mean prompt length.
        output_tokens: Mean output length.
        seed: Random seed of the arrivals.
        start_s: Time the instance starts at.
    """

    def __init__(
        self,
        model: PerformanceModel,
        power: PowerModel,
        *,
        clock_mhz: int,
        load_rps: float = 0.0,
        prompt_tokens: int = 640,
        output_tokens: int = 220,
        seed: int = 0,
        start_s: float = 0.0,
        max_batch: int = 64,
    ) -> None:
        if load_rps < 0:
            raise ValueError(f"load_rps must be >= 0, not {load_rps}")
        self.twin = InstanceTwin(model, power, clock_mhz=clock_mhz, max_batch=max_batch)
        self.twin.now_s = start_s
        self.model = model
        self.prompt_tokens, self.output_tokens = prompt_tokens, output_tokens
        self._rng = np.random.default_rng(seed)
        self._load_rps = load_rps
        self._next_arrival_s = self._draw_arrival(start_s)
        self._requests: dict[int, _LiveRequest] = {}
        self._next_id = 0
        self.generation_tokens_total = 0.0
        self.finished = 0

    @property
    def now_s(self) -> float:
        return self.twin.now_s

    @property
    def load_rps(self) -> float:
        return self._load_rps

    def set_load(self, load_rps: float) -> None:
        """Change the arrival rate from now on."""
        if load_rps < 0:
            raise ValueError(f"load_rps must be >= 0, not {load_rps}")
        self._load_rps = load_rps
        self._next_arrival_s = self._draw_arrival(self.twin.now_s)

    def _draw_arrival(self, after_s: float) -> float:
        if self._load_rps <= 0:
            return float("inf")
        return after_s + float(self._rng.exponential(1.0 / self._load_rps))

    def _draw_tokens(self, mean: int) -> int:
        return max(1, int(self._rng.exponential(mean)))

    def set_clock(self, clock_mhz: int) -> None:
        """Lock a clock (the engine stalls ``clock_change_s``)."""
        self.twin.set_clock(clock_mhz)

    def snapshot(self) -> EngineSnapshot:
        """What the engine's ``/metrics`` reports now."""
        base = self.twin.snapshot()
        return EngineSnapshot(
            running=base.running,
            waiting=base.waiting,
            kv_cache_usage=base.kv_cache_usage,
            generation_tokens_total=self.generation_tokens_total,
            prompt_tokens_total=base.prompt_tokens_total,
        )

    def advance_to(self, t_s: float, max_iterations: int = 1_000_000) -> None:
        """Serve until ``t_s`` (the last iteration may end a little after it)."""
        twin = self.twin
        for _ in range(max_iterations):
            while self._next_arrival_s <= twin.now_s:
                rid = self._next_id
                self._next_id += 1
                self._requests[rid] = _LiveRequest(
                    self._draw_tokens(self.prompt_tokens), self._draw_tokens(self.output_tokens)
                )
                twin.waiting.append(rid)
                self._next_arrival_s = self._draw_arrival(self._next_arrival_s)
            if twin.now_s >= t_s:
                return
            if not twin.waiting and not twin.running:
                target = min(self._next_arrival_s, t_s)
                twin._spend(max(target - twin.now_s, 0.0), False, prefill=False)
                twin.now_s = max(twin.now_s, target)
                continue
            admitted: list[int] = []
            while twin.waiting and len(twin.running) + len(admitted) < twin.max_batch:
                admitted.append(twin.waiting.popleft())
            prompts = [self._requests[i].prompt_tokens for i in admitted]
            prefill_s = sum(self.model.prefill_s(p, twin.clock_mhz) for p in prompts)
            twin.prompt_tokens_total += sum(prompts)
            batch = len(twin.running) + len(admitted)
            step_s = self.model.tbt_s(batch, twin.clock_mhz) + prefill_s
            twin.running.extend(_Running(i, self._requests[i].left) for i in admitted)
            twin._spend(step_s, True, prefill=bool(admitted))
            self.generation_tokens_total += len(twin.running)
            still = []
            for r in twin.running:
                r.left -= 1
                if r.left > 0:
                    still.append(r)
                else:
                    self._requests.pop(r.index, None)
                    self.finished += 1
            twin.running = still

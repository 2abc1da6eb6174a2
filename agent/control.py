"""The agent's control loops: the per-instance clock loop and the per-domain power guard.

Two background threads beside the apply loop (:mod:`agent.runner`), on either backend
(:class:`agent.backends.ControlPlane`):

* **Clock loop**, every ``poll_s`` (0.5 s): for each running instance, read its serving
  engine's ``/metrics`` (:mod:`agent.metrics`) and ask its
  :class:`~agent.clock_control.ClockController` for a clock; the plan's clock policy for the
  instance's pool is the floor (``policy.clock_policy[].bands``: load -> clock). Lowering is
  rate-limited (``min_change_interval_s``, 5 s: a clock change stalls the engine 50-200 ms);
  raises and deadline jumps are not. The poll is 0.5 s, not DynamoLLM's 5 s, because on
  the replayed Azure trace a 5 s poll missed 1-5% of the requests' SLOs and 0.5 s none
  (docs/control.md); lowering keeps the 5 s pace. A metrics endpoint that is missing or
  answers garbage keeps the instance's clock; the loop logs it and reads again next poll.
* **Power guard**, every ``guard_interval_s`` (1 s), per power domain of the applied plan
  (``policy.power_guard.domains`` with a budget): read the domain's measured power and step
  its :class:`~agent.power_guard.PowerGuard` (thresholds, release and low-priority pools
  from the plan); its caps bound the clock loop's choice at once.

The clock an instance gets is ``min(loop's choice, guard's cap)``, always one of the GPU's
supported clocks. Every change is recorded (instance, time, from, to, reason, controller) in
the clock-change spool (:mod:`telemetry.clock_events`); the ``telemetry_ingest`` DAG loads
the closed files into ``clock_changes``. When the loops stop, every GPU whose clock they
locked gets its default clocks back (``nvmlDeviceResetGpuLockedClocks`` on the nvml backend),
and the open event file is closed so that it can be ingested.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from agent.backends import BackendError, ControlPlane
from agent.clock_control import ClockController, ClockPolicy, PerformanceModel
from agent.instance_twin import (
    H100_CLOCKS_MHZ,
    LLAMA70B_TP4_H100,
    TYPE_TOKENS,
    LiveInstance,
    PowerModel,
    model_for_tp,
)
from agent.metrics import EngineSnapshot, MetricsError, fetch_snapshot
from agent.performance import instance_performance
from agent.power_guard import PoolClocks, PowerDomain, PowerGuard
from agent.rollout import Instance
from agent.state import StateStore
from telemetry.clock_events import ClockChange, ClockEventLog
from wattplan.errors import ConfigError

log = logging.getLogger(__name__)

#: Prompt length the loop projects prefills with, by the input class of the request type
#: (the top of DynamoLLM's input bins; a long prompt: the median under-projects bursts).
PROJECTED_PROMPT_TOKENS: Mapping[str, int] = {"S": 256, "M": 1024, "L": 4096}
#: (TTFT, mean TBT) SLOs of an instance the profile model does not know.
FALLBACK_SLOS_S = (1.0, 0.075)
#: Seconds between two warnings about one instance's unreadable metrics.
METRICS_WARN_EVERY_S = 60.0


@dataclass(frozen=True)
class ControlSettings:
    """Settings of the control loops.

    Attributes:
        poll_s: Seconds between two reads of each instance's metrics.
        min_change_interval_s: Least seconds between two lowering changes of an instance.
        guard_interval_s: Seconds between two power readings of a domain.
        ttft_slo_s: SLO on the time to first token the loop keeps (``None``: the profile
            model's SLO of the instance's request type, see ``agent/performance.py``).
        tbt_slo_s: SLO on the (mean) time between tokens the loop keeps (``None``: as
            above).
        margin: Projections must stay under ``margin`` x SLO (``ClockController``).
        max_lower_steps: Lower by at most this many supported clocks per change (None: to
            the lowest feasible clock at once; see docs/control.md for the trade-off).
        metrics_timeout_s: Timeout of one metrics read.
        power_domains: GPUs of each power domain by name; a plan domain not listed covers
            every GPU of the agent when it is the plan's only domain with a budget.
        grace_s: The guard's grace period above the budget.
        clock_spool_dir: Where clock-change events go (``None``: not recorded).
        node: Node name written with each event.
        base_model: Performance model of a 4-GPU instance, other TPs scaled from it, for
            instances whose model or GPU type the profile model does not know (with the
            fallback SLOs ``FALLBACK_SLOS_S``).
    """

    poll_s: float = 0.5
    min_change_interval_s: float = 5.0
    guard_interval_s: float = 1.0
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    margin: float = 0.65
    max_lower_steps: int | None = None
    metrics_timeout_s: float = 1.0
    power_domains: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    grace_s: float = 10.0
    clock_spool_dir: Path | None = None
    node: str = "agent"
    base_model: PerformanceModel = LLAMA70B_TP4_H100

    def __post_init__(self) -> None:
        for name in ("poll_s", "guard_interval_s", "ttft_slo_s", "tbt_slo_s", "grace_s"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"control setting {name} must be > 0, not {getattr(self, name)}")
        if self.min_change_interval_s < 0:
            raise ConfigError(
                f"min_change_interval_s must be >= 0, not {self.min_change_interval_s}"
            )
        if not 0 < self.margin <= 1:
            raise ConfigError(f"the clock margin must be in (0, 1], not {self.margin}")
        if self.max_lower_steps is not None and self.max_lower_steps < 1:
            raise ConfigError(f"max_lower_steps must be >= 1, not {self.max_lower_steps}")


def shape_key(inst: Instance) -> str:
    """The plan's pool shape of an instance: its config key without the clock."""
    return replace(inst.config, clock_mhz=None).key


def pool_key(service: str, request_type: str, shape: str) -> str:
    """Name of a pool as the guard and the events see it."""
    return f"{service}/{request_type}/{shape}"


def _instance_pool(inst: Instance) -> str:
    return pool_key(inst.service, inst.request_type, shape_key(inst))


def clock_floors(policy: Mapping[str, Any] | None, max_mhz: int) -> dict[str, ClockPolicy]:
    """Per pool, the plan's clock policy as floors: band ``[upto_rps, clock]`` i says the
    clock at loads from band i-1's ``upto_rps`` on (an unlocked clock: the maximum)."""
    out: dict[str, ClockPolicy] = {}
    for entry in (policy or {}).get("clock_policy", []) or []:
        try:
            bands = entry["bands"]
            floors, lower = [], 0.0
            for upto, clock in bands:
                floors.append((float(lower), int(clock) if clock is not None else max_mhz))
                lower = float(upto)
            key = pool_key(entry["service"], entry["request_type"], entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("plan clock policy entry %r is malformed (%s): ignored", entry, exc)
            continue
        out[key] = ClockPolicy(tuple(floors))
    return out


@dataclass(frozen=True)
class DomainGuard:
    """One power domain of the applied plan with its GPUs and the pools in it."""

    domain: PowerDomain
    gpus: tuple[int, ...]
    pools: tuple[PoolClocks, ...]


def guard_domains(
    policy: Mapping[str, Any] | None,
    instances: Sequence[Instance],
    clocks: Mapping[str, tuple[int, ...]],
    settings: ControlSettings,
) -> list[DomainGuard]:
    """The power domains to guard: those of the plan's ``power_guard`` with a budget.

    Args:
        policy: The applied plan's policy.
        instances: The running instances.
        clocks: Supported clocks by pool (of a running instance of it).
        settings: GPUs per domain, grace period.
    """
    guard = (policy or {}).get("power_guard") or {}
    domains = [d for d in guard.get("domains", []) or [] if d.get("budget_w")]
    if not domains:
        return []
    all_gpus = tuple(sorted({g for inst in instances for g in inst.gpus}))
    t1 = float(guard.get("low_priority_fraction", 0.90))
    t2 = float(guard.get("all_fraction", 0.97))
    release = float(guard.get("release_fraction", t2 - 0.04))
    out = []
    for d in domains:
        name = str(d["name"])
        gpus = settings.power_domains.get(name)
        if gpus is None:
            if len(domains) != 1:
                log.warning(
                    "power domain %s of the plan has no GPUs configured (--power-domain): "
                    "not guarded",
                    name,
                )
                continue
            gpus = all_gpus
        try:
            domain = PowerDomain(
                name,
                budget_w=float(d["budget_w"]),
                t1_frac=t1,
                t2_frac=t2,
                release_frac=max(0.0, min(t2 - release, t1 - 1e-6)),
                grace_s=settings.grace_s,
            )
        except ValueError as exc:
            log.warning("power guard of domain %s is malformed (%s): not guarded", name, exc)
            continue
        pools = []
        for cap in d.get("caps", []) or []:
            key = pool_key(cap["service"], cap["request_type"], cap["shape"])
            supported = clocks.get(key)
            if not supported:
                continue  # no instance of the pool runs here
            low, high = supported[0], supported[-1]
            floor = cap.get("cap_clock_all") or high
            floor = max(low, min(int(floor), high))
            minimum = cap.get("cap_clock_low_priority") or low
            minimum = max(low, min(int(minimum), floor))
            pools.append(PoolClocks(key, bool(cap.get("low_priority")), floor, minimum, high))
        out.append(DomainGuard(domain, tuple(gpus), tuple(pools)))
    return out


def instance_model(
    inst: Instance, settings: ControlSettings
) -> tuple[PerformanceModel, tuple[float, float]]:
    """The performance model and (TTFT, TBT) SLOs the loop uses for an instance.

    From the profile model (``agent/performance.py``) when it knows the instance's model,
    GPU type and request type; otherwise ``settings.base_model`` scaled to the TP, with
    ``FALLBACK_SLOS_S`` (logged once per configuration). Explicit SLO settings win.
    """
    perf = instance_performance(inst.config, inst.request_type)
    if perf is None:
        _warn_fallback(inst.config.key, inst.request_type)
        model, slos = model_for_tp(inst.config.tp, settings.base_model), FALLBACK_SLOS_S
    else:
        model, slos = perf.model, (perf.ttft_slo_s, perf.tbt_slo_s)
    return model, (
        settings.ttft_slo_s if settings.ttft_slo_s is not None else slos[0],
        settings.tbt_slo_s if settings.tbt_slo_s is not None else slos[1],
    )


@functools.cache
def _warn_fallback(config_key: str, request_type: str) -> None:
    log.warning(
        "no profile model for %s serving %s: the clock loop uses the fallback performance "
        "model and SLOs %s",
        config_key,
        request_type,
        FALLBACK_SLOS_S,
    )


def make_controller(
    inst: Instance, clocks: Sequence[int], settings: ControlSettings
) -> ClockController:
    """The clock controller of an instance, starting at its planned clock (or the maximum)."""
    clocks = sorted(clocks)
    start = inst.config.clock_mhz or clocks[-1]
    start = max((c for c in clocks if c <= start), default=clocks[0])
    model, (ttft_slo, tbt_slo) = instance_model(inst, settings)
    return ClockController(
        model,
        clocks,
        tbt_slo_s=tbt_slo,
        ttft_slo_s=ttft_slo,
        prompt_tokens=PROJECTED_PROMPT_TOKENS.get(inst.request_type[:1], 1024),
        margin=settings.margin,
        min_change_interval_s=settings.min_change_interval_s,
        max_lower_steps=settings.max_lower_steps,
        clock_mhz=start,
    )


def planned_loads(
    policy: Mapping[str, Any] | None, instances: Sequence[Instance], default_rps: float
) -> dict[str, float]:
    """Each instance's share of its pool's planned mean load (``dispatch_mean`` of the
    plan's clock policy, spread evenly, as a round-robin router would); ``default_rps``
    where the plan says nothing."""
    totals: dict[str, tuple[float, int]] = {}
    for entry in (policy or {}).get("clock_policy", []) or []:
        try:
            key = pool_key(entry["service"], entry["request_type"], entry["shape"])
            load = sum(float(k) * float(rate) for k, rate, _ in entry.get("dispatch_mean", []))
            totals[key] = (load, int(entry.get("instances") or 0))
        except (KeyError, TypeError, ValueError):
            continue
    counts: dict[str, int] = {}
    for inst in instances:
        counts[_instance_pool(inst)] = counts.get(_instance_pool(inst), 0) + 1
    out = {}
    for inst in instances:
        key = _instance_pool(inst)
        if key in totals:
            load, planned = totals[key]
            out[inst.instance_id] = load / max(planned, counts[key], 1)
        else:
            out[inst.instance_id] = default_rps
    return out


class ClockRecorder:
    """Records clock changes into the spool (thread-safe) and keeps the last ones in memory."""

    def __init__(self, spool_dir: Path | None, node: str, keep: int = 1000) -> None:
        self._log = ClockEventLog(spool_dir, node) if spool_dir is not None else None
        self.node = node
        self._lock = threading.Lock()
        self._keep = keep
        self._last_at: dict[str, datetime] = {}
        self.recent: list[ClockChange] = []

    def record(
        self,
        instance_id: str,
        at: datetime,
        from_mhz: int | None,
        to_mhz: int,
        reason: str,
        controller: str,
        pool: tuple[str, str] | None = None,
    ) -> None:
        """Record one change; ``pool`` is the instance's (service, request type)."""
        with self._lock:
            last = self._last_at.get(instance_id)
            if last is not None and at <= last:  # one event per instance and instant
                at = last + timedelta(microseconds=1)
            self._last_at[instance_id] = at
            service, request_type = pool if pool is not None else (None, None)
            change = ClockChange(
                instance_id,
                at,
                self.node,
                from_mhz,
                to_mhz,
                reason,
                controller,
                service,
                request_type,
            )
            self.recent.append(change)
            del self.recent[: -self._keep]
            if self._log is not None:
                try:
                    self._log.append(change)
                except OSError as exc:
                    log.error("cannot write the clock-change event %s: %s", change, exc)

    def close(self) -> Path | None:
        """Close the open event file (it becomes ingestible)."""
        with self._lock:
            return self._log.close() if self._log is not None else None


@dataclass
class _Instance:
    inst: Instance
    controller: ClockController
    applied_mhz: int
    last_prompt: tuple[float, float] | None = None
    load_rps: float | None = None
    metrics_failures: int = 0
    warned_at_s: float = float("-inf")


class ControlLoops:
    """The clock loop and the power guard of one agent (see the module docstring).

    Args:
        store: The agent's state (running instances, the applied plan's policy).
        backend: Where clocks are read, set and restored.
        settings: The loops' settings.
        now: Source of ``(seconds, time)`` (default: the backend's ``control_now``; tests
            replay time with it).
    """

    def __init__(
        self,
        store: StateStore,
        backend: ControlPlane,
        settings: ControlSettings,
        now: Callable[[], tuple[float, datetime]] | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.settings = settings
        self._now = now or backend.control_now
        self.recorder = ClockRecorder(settings.clock_spool_dir, settings.node)
        self._lock = threading.RLock()
        self._instances: dict[str, _Instance] = {}
        self._caps: dict[str, int | None] = {}
        self._guards: dict[str, PowerGuard] = {}
        self._guard_key: object = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client = httpx.Client(timeout=settings.metrics_timeout_s)
        self.guard_levels: dict[str, int] = {}

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start both loops."""
        self._stop.clear()
        for name, target in (("clock", self._clock_loop), ("guard", self._guard_loop)):
            thread = threading.Thread(
                target=target, name=f"wattplan-{name}-{self.store.cluster}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop both loops, give the GPUs their default clocks back, close the event file."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        self._threads.clear()
        try:
            self.restore()
        finally:
            self._client.close()
            closed = self.recorder.close()
            if closed is not None:
                log.info("clock changes in %s", closed)

    def restore(self) -> None:
        """Default clocks for every GPU the loops locked (recorded as ``restore``)."""
        with self._lock:
            try:
                self.backend.restore_clocks()
            except Exception:  # restoring must go on for the other GPUs and the file
                log.exception("restoring the default clocks failed")
                return
            _, at = self._now()
            for state in self._instances.values():
                top = state.controller.max_mhz
                if state.applied_mhz != top:
                    self.recorder.record(
                        state.inst.instance_id,
                        at,
                        state.applied_mhz,
                        top,
                        "agent-stop",
                        "restore",
                        state.inst.pool,
                    )
                    state.applied_mhz = top

    def _wait(self, seconds: float) -> bool:
        return self._stop.wait(seconds / self.backend.speed)

    # --- the clock loop -------------------------------------------------------------------

    def _clock_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.clock_round()
            except Exception:  # a background thread has no caller to raise to
                log.exception("clock loop round failed")
            if self._wait(self.settings.poll_s):
                return

    def _sync(self) -> tuple[Sequence[Instance], Mapping[str, Any] | None, str | None]:
        state = self.store.snapshot()
        instances = state.instances
        self.backend.sync(instances)
        with self._lock:
            for gone in set(self._instances) - {i.instance_id for i in instances}:
                del self._instances[gone]
            for inst in instances:
                known = self._instances.get(inst.instance_id)
                if known is not None and known.inst == inst:
                    continue
                try:
                    clocks = self.backend.supported_clocks(inst)
                except BackendError as exc:
                    log.error("%s: no clock control: %s", inst.instance_id, exc)
                    continue
                controller = make_controller(inst, clocks, self.settings)
                start = int(controller.clock_mhz or clocks[-1])
                self._instances[inst.instance_id] = _Instance(inst, controller, start)
        return instances, state.policy, state.applied_plan_id

    def clock_round(self) -> None:
        """One poll of every running instance (the loop's body; tests call it directly)."""
        instances, policy, _ = self._sync()
        with self._lock:
            states = [
                self._instances[i.instance_id]
                for i in instances
                if i.instance_id in self._instances
            ]
        floors = clock_floors(policy, max((s.controller.max_mhz for s in states), default=0))
        for state in states:
            snapshot = self._read(state)
            now_s, _ = self._now()
            controller = state.controller
            controller.policy = floors.get(_instance_pool(state.inst), ClockPolicy())
            decision = controller.decide(now_s, snapshot, state.load_rps)
            self._apply(state, decision.reason, "clock-loop")

    def _read(self, state: _Instance) -> EngineSnapshot | None:
        url = self.backend.metrics_url(state.inst)
        try:
            snapshot = fetch_snapshot(
                url, client=self._client, timeout_s=self.settings.metrics_timeout_s
            )
        except MetricsError as exc:
            state.metrics_failures += 1
            now_s, _ = self._now()
            if now_s - state.warned_at_s >= METRICS_WARN_EVERY_S * self.backend.speed:
                state.warned_at_s = now_s
                log.warning(
                    "%s: keeping %d MHz, metrics unreadable (%d time(s) so far; retrying): %s",
                    state.inst.instance_id,
                    state.applied_mhz,
                    state.metrics_failures,
                    exc,
                )
            return None
        now_s, _ = self._now()
        total = snapshot.prompt_tokens_total
        if total is not None:
            if state.last_prompt is not None and now_s > state.last_prompt[0]:
                delta = total - state.last_prompt[1]
                if delta >= 0:
                    rate = delta / (now_s - state.last_prompt[0])
                    state.load_rps = rate / state.controller.prompt_tokens
            state.last_prompt = (now_s, total)
        return snapshot

    def _apply(self, state: _Instance, reason: str, controller: str) -> None:
        """Set ``min(loop's choice, guard's cap)`` if it differs from what runs."""
        with self._lock:
            ctl = state.controller
            want = int(ctl.clock_mhz or ctl.max_mhz)
            cap = self._caps.get(_instance_pool(state.inst))
            if cap is not None and cap < want:
                want = max((c for c in ctl.clocks_mhz if c <= cap), default=ctl.clocks_mhz[0])
                if controller == "clock-loop":
                    reason, controller = "power-cap", "power-guard"
            if want == state.applied_mhz:
                return
            try:
                self.backend.set_clock(state.inst, want)
            except BackendError as exc:
                log.error("%s: keeping %d MHz: %s", state.inst.instance_id, state.applied_mhz, exc)
                return
            _, at = self._now()
            self.recorder.record(
                state.inst.instance_id,
                at,
                state.applied_mhz,
                want,
                reason,
                controller,
                state.inst.pool,
            )
            log.debug(
                "%s: %d -> %d MHz (%s, %s)",
                state.inst.instance_id,
                state.applied_mhz,
                want,
                reason,
                controller,
            )
            state.applied_mhz = want

    def metrics_failures(self) -> dict[str, int]:
        """Unreadable metrics reads per controlled instance so far."""
        with self._lock:
            return {iid: s.metrics_failures for iid, s in self._instances.items()}

    def clocks(self) -> dict[str, int]:
        """The clock each controlled instance runs at."""
        with self._lock:
            return {iid: s.applied_mhz for iid, s in self._instances.items()}

    # --- the power guard ------------------------------------------------------------------

    def _guard_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.guard_round()
            except Exception:
                log.exception("power guard round failed")
            if self._wait(self.settings.guard_interval_s):
                return

    def guard_round(self) -> None:
        """One power reading of every guarded domain (the loop's body)."""
        instances, policy, plan_id = self._sync()
        with self._lock:
            clocks = {
                _instance_pool(s.inst): tuple(s.controller.clocks_mhz)
                for s in self._instances.values()
            }
        domains = guard_domains(policy, instances, clocks, self.settings)
        key = (plan_id, tuple((d.domain, d.gpus, d.pools) for d in domains))
        if key != self._guard_key:  # a new plan: new guards (levels start at 0)
            self._guard_key = key
            self._guards = {d.domain.name: PowerGuard(d.domain, d.pools) for d in domains}
            self._set_caps({})
        caps: dict[str, int | None] = {}
        changed = False
        for d in domains:
            guard = self._guards[d.domain.name]
            try:
                power = self.backend.power_w(d.gpus)
            except BackendError as exc:
                log.error("power domain %s: no power reading: %s", d.domain.name, exc)
                caps.update(guard.caps())
                continue
            now_s, _ = self._now()
            decision = guard.step(now_s, power)
            self.guard_levels[d.domain.name] = decision.level
            if decision.changed:
                changed = True
                log.info(
                    "power domain %s: %.0f W of %.0f W: level %d, caps %s",
                    d.domain.name,
                    power,
                    d.domain.budget_w,
                    decision.level,
                    {k: v for k, v in decision.caps.items() if v is not None},
                )
            for pool, cap in decision.caps.items():
                prev = caps.get(pool)
                caps[pool] = cap if prev is None else (prev if cap is None else min(prev, cap))
        if changed or caps != self._caps:
            self._set_caps(caps)

    def _set_caps(self, caps: Mapping[str, int | None]) -> None:
        with self._lock:
            old = dict(self._caps)
            self._caps = dict(caps)
            for state in list(self._instances.values()):
                pool = _instance_pool(state.inst)
                if old.get(pool) != self._caps.get(pool):
                    level = max(self.guard_levels.values(), default=0)
                    self._apply(
                        state,
                        f"power-guard-level-{level}" if self._caps.get(pool) else "power-release",
                        "power-guard",
                    )


class WindowClockReplay:
    """The clock loop over an applied plan's window, on twin engines (simulated backend).

    What the demo shows: when the simulated agent finishes applying a plan, it replays the
    first ``replay_s`` seconds of the plan's window for every running instance -- a
    :class:`~agent.instance_twin.LiveInstance` with Poisson arrivals at the instance's
    share of its pool's planned mean load, the instance's clock controller polled every
    ``settings.poll_s`` with the plan's clock policy as floor -- and records each change at
    its time in the window into the clock-change spool (one closed file per window), which
    the ``telemetry_ingest`` DAG then loads like any agent's events. Deterministic for a
    seed.

    Args:
        settings: The loops' settings (spool, node, SLOs, poll).
        replay_s: Seconds of each window replayed.
        default_load_rps: Per-instance load where the plan gives none.
        seed: Seed of the arrivals.
    """

    def __init__(
        self,
        settings: ControlSettings,
        *,
        replay_s: float = 300.0,
        default_load_rps: float = 1.0,
        seed: int = 0,
    ) -> None:
        if replay_s <= 0 or default_load_rps < 0:
            raise ConfigError("replay_s must be > 0 and default_load_rps >= 0")
        self.settings = settings
        self.replay_s = replay_s
        self.default_load_rps = default_load_rps
        self.seed = seed
        self.recorder = ClockRecorder(settings.clock_spool_dir, settings.node)

    def run(
        self,
        instances: Sequence[Instance],
        policy: Mapping[str, Any] | None,
        start: datetime,
        clocks_mhz: Sequence[int] = H100_CLOCKS_MHZ,
    ) -> list[ClockChange]:
        """Replay the window starting at ``start``; return the changes recorded."""
        loads = planned_loads(policy, instances, self.default_load_rps)
        floors = clock_floors(policy, max(clocks_mhz))
        before = len(self.recorder.recent)
        poll = self.settings.poll_s
        for number, inst in enumerate(sorted(instances, key=lambda i: i.instance_id)):
            controller = make_controller(inst, clocks_mhz, self.settings)
            controller.policy = floors.get(_instance_pool(inst), ClockPolicy())
            prompt, output = TYPE_TOKENS.get(inst.request_type, TYPE_TOKENS["MM"])
            engine = LiveInstance(
                instance_model(inst, self.settings)[0],
                PowerModel(gpus=len(inst.gpus) or inst.config.gpus),
                clock_mhz=int(controller.clock_mhz or max(clocks_mhz)),
                load_rps=loads[inst.instance_id],
                prompt_tokens=prompt,
                output_tokens=output,
                seed=self.seed * 1_000_003 + int(start.timestamp()) + number,
            )
            load_rps: float | None = None
            last: tuple[float, float] | None = None
            t = 0.0
            while t < self.replay_s:
                engine.advance_to(t)
                snapshot = engine.snapshot()
                total = snapshot.prompt_tokens_total or 0.0
                if last is not None and t > last[0]:
                    load_rps = (total - last[1]) / (t - last[0]) / controller.prompt_tokens
                last = (t, total)
                was = int(engine.twin.clock_mhz)
                decision = controller.decide(t, snapshot, load_rps)
                if decision.clock_mhz != was:
                    engine.set_clock(decision.clock_mhz)
                    self.recorder.record(
                        inst.instance_id,
                        start + timedelta(seconds=t),
                        was,
                        decision.clock_mhz,
                        decision.reason,
                        "clock-loop",
                        inst.pool,
                    )
                t += poll
        self.recorder.close()
        return self.recorder.recent[before:]

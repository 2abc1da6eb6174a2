"""Layout sequences (what a policy produces) and what changing layout costs.

A :class:`Schedule` holds one :class:`~wattplan.domain.Layout` per simulation step: the
layout that *serves* during that step. :func:`transition` compares two consecutive layouts
and says, per pool and config, how the new instances come about (kept, clock change, moved
between pools, re-shard, cold start) with :class:`~simulator.model.ReconfigCosts`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from simulator.model import ReconfigCosts, gpus_of, shape_of
from wattplan.domain import Layout, LayoutItem, ServingConfig

PoolKey = tuple[str, str]  # (service, pool name: a request type or POOL_ALL)


@dataclass(frozen=True)
class Schedule:
    """One layout per step.

    Attributes:
        policy: Name of the policy that made it.
        start_at: Start of step 0.
        step_s: Length of one step.
        layouts: Layout serving during each step.
        free_reconfiguration: Changes cost nothing (the oracle).
        clock_governor: The serving side runs DynamoLLM's instance-level loop: each
            instance of a per-type pool runs the slowest clock/cap variant of its shape
            that carries its current load (the planned config is where it starts).
        inventory_gpus: GPUs of the cluster: new instances start ahead on GPUs the running
            layout leaves free before re-sharding (None: re-shard whenever GPUs are freed).
        notes: What the policy wants said about its run (fallbacks, infeasible windows).
        decisions: Counts about the policy's decisions (plans, refits, ...).
        planned_rps: Per workload pool (the view's order) and step, the peak rate the
            plan in force was asked to carry (its forecast); None for policies that do not
            plan from a forecast.
        planned_share: Per step, the share of that forecast the plan carries (below 1
            where the whole of it did not fit the cluster, 0 where the running layout was
            kept).
    """

    policy: str
    start_at: datetime
    step_s: int
    layouts: tuple[Layout, ...]
    free_reconfiguration: bool = False
    clock_governor: bool = False
    inventory_gpus: int | None = None
    notes: tuple[str, ...] = ()
    decisions: dict[str, float] = field(default_factory=dict)
    planned_rps: np.ndarray | None = field(default=None, compare=False, repr=False)
    planned_share: np.ndarray | None = field(default=None, compare=False, repr=False)

    def step_start(self, k: int) -> datetime:
        """Start of step ``k``."""
        return self.start_at + timedelta(seconds=k * self.step_s)


@dataclass(frozen=True)
class Group:
    """Instances of one config in one pool during one step.

    ``downtime_s``: they serve nothing for the first ``downtime_s`` of the step (a
    re-shard or clock change at the step's start). ``startup_s``: they were cold-started
    that long before the step (powered, serving nothing) and are ready at its start.
    """

    config: ServingConfig
    instances: int
    downtime_s: float = 0.0
    startup_s: float = 0.0


@dataclass
class Changes:
    """Counts of instance-level actions at one step boundary."""

    cold_starts: int = 0
    reshards: int = 0
    clock_changes: int = 0
    moves: int = 0
    stops: int = 0

    @property
    def total(self) -> int:
        """Reconfigurations: every instance started, re-sharded, re-clocked or moved."""
        return self.cold_starts + self.reshards + self.clock_changes + self.moves

    def add(self, other: Changes) -> None:
        """Accumulate another boundary's counts."""
        self.cold_starts += other.cold_starts
        self.reshards += other.reshards
        self.clock_changes += other.clock_changes
        self.moves += other.moves
        self.stops += other.stops


def pools_of(layout: Layout) -> dict[PoolKey, dict[str, tuple[ServingConfig, int]]]:
    """Instances per pool and config key (items of the same slot summed)."""
    pools: dict[PoolKey, dict[str, tuple[ServingConfig, int]]] = defaultdict(dict)
    for item in layout.items:
        if item.instances <= 0:
            continue
        slot = pools[(item.service, item.request_type)]
        _, n = slot.get(item.config.key, (item.config, 0))
        slot[item.config.key] = (item.config, n + item.instances)
    return dict(pools)


@dataclass
class _Slot:
    pool: PoolKey
    config: ServingConfig
    count: int


def transition(
    before: Layout,
    after: Layout,
    costs: ReconfigCosts,
    spare_gpus: int | None = None,
) -> tuple[dict[PoolKey, list[Group]], Changes]:
    """How ``after``'s instances come about from ``before``'s.

    Per service, in this order of preference (cheapest first): instances kept in their
    pool and config; a clock/cap change of a surplus instance of the same shape in the
    same pool; a move of a surplus instance of the same config from another pool of the
    service (a router change, free); a clock change of a surplus same-shape instance of
    another pool; a re-shard on GPUs freed by surplus instances of the service on the same
    GPU type; otherwise a cold start. Surplus engines left after clock changes and moves
    are stopped (their GPUs may host a re-shard).

    With ``spare_gpus`` (GPUs of the cluster that ``before`` leaves free), new instances
    are cold-started ahead on spare GPUs while there are enough (make before break: no
    downtime, start-up energy instead), and re-shards are used only beyond that.

    Returns:
        The groups serving each pool of ``after`` and the counts of actions.
    """
    old, new = pools_of(before), pools_of(after)
    changes = Changes()
    groups: dict[PoolKey, list[Group]] = defaultdict(list)
    surplus: dict[str, list[_Slot]] = defaultdict(list)
    need: dict[str, list[_Slot]] = defaultdict(list)
    for pool in sorted(set(old) | set(new)):
        o, n = old.get(pool, {}), new.get(pool, {})
        for key in sorted(set(o) | set(n)):
            config = (n.get(key) or o[key])[0]
            had, wanted = o.get(key, (config, 0))[1], n.get(key, (config, 0))[1]
            kept = min(had, wanted)
            if kept:
                groups[pool].append(Group(config, kept))
            if had > kept:
                surplus[pool[0]].append(_Slot(pool, config, had - kept))
            if wanted > kept:
                need[pool[0]].append(_Slot(pool, config, wanted - kept))

    def reuse(service: str, want: _Slot, rule: str, kind: str, delay: float) -> None:
        for spare in surplus[service]:
            if want.count == 0:
                break
            if spare.count == 0:
                continue
            same_pool = spare.pool == want.pool
            same_shape = shape_of(spare.config) == shape_of(want.config)
            if rule == "clock_same_pool":
                ok = same_pool and same_shape
            elif rule == "move":
                ok = not same_pool and spare.config.key == want.config.key
            else:
                ok = not same_pool and same_shape
            if not ok:
                continue
            used = min(want.count, spare.count)
            spare.count -= used
            want.count -= used
            groups[want.pool].append(Group(want.config, used, downtime_s=delay))
            setattr(changes, kind, getattr(changes, kind) + used)

    for service, wants in need.items():
        for rule, kind, delay in (
            ("clock_same_pool", "clock_changes", costs.clock_change_s),
            ("move", "moves", 0.0),
            ("clock_other_pool", "clock_changes", costs.clock_change_s),
        ):
            for want in wants:
                reuse(service, want, rule, kind, delay)
        freed: dict[str, int] = defaultdict(int)
        for spare in surplus[service]:
            freed[spare.config.gpu_type] += spare.count * gpus_of(spare.config)
        for want in wants:
            if spare_gpus is not None:
                ahead = min(want.count, max(spare_gpus, 0) // gpus_of(want.config))
                if ahead:
                    spare_gpus -= ahead * gpus_of(want.config)
                    groups[want.pool].append(Group(want.config, ahead, startup_s=costs.startup_s))
                    changes.cold_starts += ahead
                    want.count -= ahead
            reshard = min(want.count, freed[want.config.gpu_type] // gpus_of(want.config))
            if reshard:
                freed[want.config.gpu_type] -= reshard * gpus_of(want.config)
                groups[want.pool].append(Group(want.config, reshard, downtime_s=costs.reshard_s))
                changes.reshards += reshard
            cold = want.count - reshard
            if cold:
                groups[want.pool].append(Group(want.config, cold, startup_s=costs.startup_s))
                changes.cold_starts += cold
    changes.stops = sum(spare.count for spares in surplus.values() for spare in spares)
    return dict(groups), changes


def layout_of(items: dict[tuple[str, str, str], tuple[ServingConfig, int]]) -> Layout:
    """A layout from ``{(service, pool, config key): (config, instances)}``."""
    return Layout(
        tuple(
            LayoutItem(service, pool, config, n)
            for (service, pool, _), (config, n) in sorted(items.items())
            if n > 0
        )
    )

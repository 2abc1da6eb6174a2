"""What it takes to turn one layout into another, pool by pool: instances started, stopped
and retuned in place.

A *pool* is (service, request type). Inside a pool, an instance keeps its *shape* (model,
GPU type, parallelism) when only its locked clock or power cap changes: that is a retune, a
50-80 ms setting on the running engine (DOMAIN.md section 6), not a restart. Any other
change of serving config stops one instance and starts another. The approval policy
(``wattplan.approval``) counts these moves to decide whether a person must look; the cluster
agent (``agent.rollout``) pairs instances the same way when it applies a plan.

Pure functions over frozen values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from wattplan.domain import Layout, LayoutItem, ServingConfig

#: (service, request type).
Pool = tuple[str, str]


def shape_of(config: ServingConfig) -> ServingConfig:
    """The config with its clock and power cap cleared: what a retune cannot change."""
    return replace(config, power_cap_w=0, clock_mhz=None)


@dataclass(frozen=True)
class Move:
    """Instances of one pool going from one serving config to another.

    Attributes:
        service: Service of the pool.
        request_type: Request type of the pool.
        source: Config the instances run now; ``None`` for instances to start.
        target: Config they run afterwards; ``None`` for instances to stop.
        instances: How many instances make this move.
    """

    service: str
    request_type: str
    source: ServingConfig | None
    target: ServingConfig | None
    instances: int

    @property
    def kind(self) -> str:
        """``start``, ``stop`` or ``retune`` (same shape, new clock or power cap)."""
        if self.source is None:
            return "start"
        if self.target is None:
            return "stop"
        return "retune"


def _counts(items: Iterable[LayoutItem]) -> dict[Pool, Counter[ServingConfig]]:
    pools: dict[Pool, Counter[ServingConfig]] = {}
    for item in items:
        if item.instances > 0:
            pools.setdefault((item.service, item.request_type), Counter())[item.config] += (
                item.instances
            )
    return pools


def _config_order(config: ServingConfig) -> tuple[str, int, int]:
    return (config.key, config.power_cap_w, config.clock_mhz or 0)


def _of_shape(
    counts: Counter[ServingConfig], shape: ServingConfig
) -> list[tuple[ServingConfig, int]]:
    return sorted(
        ((c, n) for c, n in counts.items() if shape_of(c) == shape),
        key=lambda kv: _config_order(kv[0]),
    )


def plan_moves(before: Layout, after: Layout) -> list[Move]:
    """The fewest moves that turn ``before`` into ``after``, retunes preferred to restarts.

    Instances whose config is in both layouts stay. Within a pool and shape, the surplus of
    ``before`` is paired with the shortfall of ``after`` (in config-key order) as retunes;
    what is left is stopped or started.

    Args:
        before: What runs now.
        after: What should run.

    Returns:
        Moves in a stable order: by pool, then shape, then kind (retune, stop, start).
    """
    old_pools, new_pools = _counts(before.items), _counts(after.items)
    moves: list[Move] = []
    for pool in sorted(old_pools.keys() | new_pools.keys()):
        old = old_pools.get(pool, Counter())
        new = new_pools.get(pool, Counter())
        surplus = old - new
        shortfall = new - old
        shapes = sorted({shape_of(c) for c in surplus | shortfall}, key=lambda s: s.key)
        for shape in shapes:
            give = _of_shape(surplus, shape)
            take = _of_shape(shortfall, shape)
            i = j = 0
            while i < len(give) and j < len(take):
                n = min(give[i][1], take[j][1])
                moves.append(Move(*pool, give[i][0], take[j][0], n))
                give[i] = (give[i][0], give[i][1] - n)
                take[j] = (take[j][0], take[j][1] - n)
                i += give[i][1] == 0
                j += take[j][1] == 0
            moves.extend(Move(*pool, c, None, n) for c, n in give if n > 0)
            moves.extend(Move(*pool, None, c, n) for c, n in take if n > 0)
    return moves


@dataclass(frozen=True)
class PoolChange:
    """One pool before and after a plan.

    Attributes:
        service: Service of the pool.
        request_type: Request type of the pool.
        before: The pool's items in the current layout.
        after: The pool's items in the plan.
        started: Instances started.
        stopped: Instances stopped.
        retuned: Instances kept running with a new clock or power cap.
    """

    service: str
    request_type: str
    before: tuple[LayoutItem, ...]
    after: tuple[LayoutItem, ...]
    started: int = 0
    stopped: int = 0
    retuned: int = 0

    @property
    def instances_before(self) -> int:
        """Instances of the pool now."""
        return sum(i.instances for i in self.before)

    @property
    def instances_after(self) -> int:
        """Instances of the pool in the plan."""
        return sum(i.instances for i in self.after)

    @property
    def gpus_before(self) -> int:
        """GPUs of the pool now."""
        return sum(i.gpus for i in self.before)

    @property
    def gpus_after(self) -> int:
        """GPUs of the pool in the plan."""
        return sum(i.gpus for i in self.after)

    @property
    def changed(self) -> bool:
        """Whether anything in the pool changes."""
        return bool(self.started or self.stopped or self.retuned)


@dataclass(frozen=True)
class LayoutChange:
    """Every pool of two layouts, with the moves between them.

    Attributes:
        pools: One entry per pool present in either layout, sorted by pool.
        moves: The moves from :func:`plan_moves`.
    """

    pools: tuple[PoolChange, ...]
    moves: tuple[Move, ...]

    @property
    def started(self) -> int:
        """Instances started."""
        return sum(p.started for p in self.pools)

    @property
    def stopped(self) -> int:
        """Instances stopped."""
        return sum(p.stopped for p in self.pools)

    @property
    def retuned(self) -> int:
        """Instances retuned in place (clock or power cap only)."""
        return sum(p.retuned for p in self.pools)

    @property
    def instance_changes(self) -> int:
        """Instances started plus stopped (a retune is not counted)."""
        return self.started + self.stopped

    @property
    def is_noop(self) -> bool:
        """Whether the layouts run the same instances with the same settings."""
        return not self.moves

    @property
    def is_clock_only(self) -> bool:
        """Whether the only changes are clocks or power caps of running instances."""
        return bool(self.moves) and self.instance_changes == 0


@dataclass
class _PoolTally:
    before: list[LayoutItem] = field(default_factory=list)
    after: list[LayoutItem] = field(default_factory=list)
    moved: Counter[str] = field(default_factory=Counter)


def describe_change(before: Layout, after: Layout) -> LayoutChange:
    """Compare two layouts pool by pool.

    Args:
        before: The current layout.
        after: The planned layout.

    Returns:
        The per-pool change and the moves.
    """
    moves = plan_moves(before, after)
    tallies: dict[Pool, _PoolTally] = {}
    for item in before.items:
        if item.instances > 0:
            tallies.setdefault((item.service, item.request_type), _PoolTally()).before.append(item)
    for item in after.items:
        if item.instances > 0:
            tallies.setdefault((item.service, item.request_type), _PoolTally()).after.append(item)
    for move in moves:
        tallies.setdefault((move.service, move.request_type), _PoolTally()).moved[move.kind] += (
            move.instances
        )

    def ordered(items: list[LayoutItem]) -> tuple[LayoutItem, ...]:
        return tuple(sorted(items, key=lambda i: _config_order(i.config)))

    return LayoutChange(
        pools=tuple(
            PoolChange(
                service=pool[0],
                request_type=pool[1],
                before=ordered(t.before),
                after=ordered(t.after),
                started=t.moved["start"],
                stopped=t.moved["stop"],
                retuned=t.moved["retune"],
            )
            for pool, t in sorted(tallies.items())
        ),
        moves=tuple(moves),
    )

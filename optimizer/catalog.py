"""The candidate table the MILP is built from: pools, spill edges, columns, transition groups.

A *column* is one integer decision: instances of one serving shape in one pool (service,
request type) in one power domain. In ``envelope`` clock mode the shape leaves the clock
open (the instance-level loop sets it from the load; the column carries the envelope over
clocks), in ``explicit`` mode every clock is its own column. Everything here is pure and
deterministic: same inputs, same table, same order.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from optimizer.curves import Envelope, build_envelope
from optimizer.inputs import PLANNED_TYPES, PlanInputs, Pool, larger_or_equal
from wattplan.domain import Profile, ServingConfig

#: Name of the implicit power domain when the inputs define none.
CLUSTER_DOMAIN = "cluster"

GroupKey = tuple[object, ...]


@dataclass(frozen=True)
class Column:
    """One integer decision: instances of ``config`` serving ``pool`` in ``domain``.

    ``config`` is the shape's representative (its highest-capacity clock); in envelope mode
    the plan replaces the clock with the one the policy sets at the planned load.
    """

    index: int
    service: str
    request_type: str
    domain: str
    config: ServingConfig
    envelope: Envelope
    upper_bound: int
    groups: tuple[GroupKey, ...]  # transition group per kept level, finest first

    @property
    def pool(self) -> Pool:
        """The (service, request type) the column serves."""
        return (self.service, self.request_type)

    @property
    def gpus(self) -> int:
        """GPUs per instance."""
        return self.config.gpus

    @property
    def gpu_type(self) -> str:
        """GPU type of the instances."""
        return self.config.gpu_type


@dataclass(frozen=True)
class DomainRow:
    """A power domain as the model sees it: GPUs per type and a peak-power limit."""

    name: str
    gpus: dict[str, int]
    limit_w: float | None


@dataclass(frozen=True)
class TransitionLevel:
    """One level of the nested start-cost model.

    A started GPU is charged ``increment_s`` at every level whose group's count grows:
    level keys go from fine (same shape) to coarse (same service and GPU type), so the
    charges telescope to the cheapest way of creating the instance (docs/optimizer.md).
    ``in_gpus``: the level counts GPUs instead of instances (the coarsest level, whose
    groups mix instance sizes).
    """

    name: str
    increment_s: float
    in_gpus: bool
    current: dict[GroupKey, int]  # instances (GPUs when in_gpus) the applied layout runs
    gpus: dict[GroupKey, int]  # GPUs per instance of the group (1 when in_gpus)
    gpu_type: dict[GroupKey, str]


@dataclass(frozen=True)
class Catalog:
    """Everything the model is built from, derived once from the inputs."""

    columns: tuple[Column, ...]
    nodes: tuple[Pool, ...]
    edges: tuple[tuple[str, str, str], ...]  # spill pairs (service, from type, to type)
    demand_rps: dict[Pool, float]
    mean_rps: dict[Pool, float]
    same_mean: bool
    domains: tuple[DomainRow, ...]
    levels: tuple[TransitionLevel, ...]
    pruned: int
    candidates: int
    by_node: dict[Pool, list[int]] = field(default_factory=dict)

    @property
    def services(self) -> tuple[str, ...]:
        """Services with at least one column, sorted."""
        return tuple(sorted({c.service for c in self.columns}))


def _shape_key(config: ServingConfig, explicit: bool) -> tuple[object, ...]:
    base = (config.gpu_type, config.tp, config.spp, config.kvp, config.power_cap_w)
    return (*base, config.clock_mhz) if explicit else base


def _level_keys(explicit: bool) -> list[tuple[str, Callable[[str, ServingConfig], GroupKey]]]:
    def shape(service: str, c: ServingConfig) -> GroupKey:
        return (service, c.model, *_shape_key(c, explicit))

    def sharding(service: str, c: ServingConfig) -> GroupKey:
        return (service, c.model, c.gpu_type, c.tp, c.spp, c.kvp)

    def gpu_pool(service: str, c: ServingConfig) -> GroupKey:
        return (service, c.model, c.gpu_type)

    return [("clock", shape), ("reshard", sharding), ("cold_start", gpu_pool)]


def _envelopes(
    inputs: PlanInputs, explicit: bool
) -> dict[tuple[str, str], list[tuple[tuple[object, ...], Envelope]]]:
    """Envelope per (model, request type) and shape, for models some service serves."""
    models = set(inputs.service_models.values())
    groups: dict[tuple[str, str, tuple[object, ...]], list[Profile]] = defaultdict(list)
    for p in inputs.profiles:
        c = p.config
        if c.model in models and inputs.gpu_inventory.get(c.gpu_type, 0) > 0:
            groups[(c.model, p.request_type, _shape_key(c, explicit))].append(p)
    table: dict[tuple[str, str], list[tuple[tuple[object, ...], Envelope]]] = defaultdict(list)
    for (model, rtype, shape), profiles in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        table[(model, rtype)].append(
            (shape, build_envelope(profiles, inputs.solver.hull_tolerance))
        )
    return table


def heavier(
    envelopes: dict[tuple[str, str], list[tuple[tuple[object, ...], Envelope]]],
    model: str,
    small: str,
    large: str,
) -> bool:
    """Whether the profiles agree that ``large`` requests cost at least ``small`` ones.

    Spilled load is counted in the larger type's capacity and power, which is conservative
    only when that type is really the heavier one: for every shape profiled for both types,
    its SLO capacity for ``large`` must not exceed that for ``small``. Shapes profiled for
    one of the two only do not count.
    """
    small_cap = {shape: env.capacity_rps for shape, env in envelopes.get((model, small), [])}
    return all(
        env.capacity_rps <= small_cap[shape] * (1 + 1e-9)
        for shape, env in envelopes.get((model, large), [])
        if shape in small_cap
    )


def _nodes(
    inputs: PlanInputs,
    served: dict[str, set[str]],
    envelopes: dict[tuple[str, str], list[tuple[tuple[object, ...], Envelope]]],
) -> tuple[list[Pool], list[tuple[str, str, str]]]:
    """Pools with load or that can take spilled load, and the spill pairs between them.

    A spill pair ``(service, t0, t)`` moves load of type ``t0`` to the pool of a
    componentwise-larger type ``t`` that has columns, where the profiles agree that ``t``
    is the heavier type (:func:`heavier`). Pairs keep the origin of the load, so the mean
    load that follows it is exact (``docs/optimizer.md``, "Decisions").
    """
    nodes: list[Pool] = []
    edges: list[tuple[str, str, str]] = []
    services = sorted({s for (s, _), rate in inputs.demand_rps.items() if rate > 0})
    for service in services:
        model = inputs.service_models[service]
        types = served.get(model, set())
        loaded = [t for t in PLANNED_TYPES if inputs.demand_rps.get((service, t), 0.0) > 0]
        pairs = [
            (t0, t)
            for t0 in loaded
            for t in PLANNED_TYPES
            if t != t0
            and t in types
            and larger_or_equal(t0, t)
            and heavier(envelopes, model, t0, t)
        ]
        for t in PLANNED_TYPES:
            if t in loaded or any(t == b for _, b in pairs):
                nodes.append((service, t))
        edges += [(service, t0, t) for t0, t in pairs]
    return nodes, edges


def _domains(inputs: PlanInputs) -> tuple[DomainRow, ...]:
    if not inputs.power_domains:
        return (DomainRow(CLUSTER_DOMAIN, dict(inputs.gpu_inventory), None),)
    return tuple(
        DomainRow(d.name, {g: n for g, n in d.gpus.items() if n > 0}, d.limit_w)
        for d in inputs.power_domains
    )


def dominates(strong: Column, weak: Column) -> bool:
    """Whether ``k`` instances of ``strong`` can replace one of ``weak`` at no extra cost.

    Both serve the same pool on the same GPU type in the same domain. Sufficient condition
    checked: for some integer ``k >= 1``, ``k`` instances use no more GPUs, have at least the
    capacity, draw no more hull power at any load (``k H_s(r / k) <= H_w(r)`` on
    ``[0, cap_w]``, checked at the union of breakpoints: both sides are piecewise linear
    there) and no more upper-line power. Transition costs are per GPU, so they cannot rise
    either when ``weak``'s shape has no applied instances (the caller checks that).
    """
    if strong.gpu_type != weak.gpu_type or strong.gpus > weak.gpus:
        return False
    s, w = strong.envelope, weak.envelope
    for k in range(1, weak.gpus // strong.gpus + 1):
        if k * s.capacity_rps < w.capacity_rps - 1e-9:
            continue
        rates = {x for x, _ in w.hull} | {
            k * x for x, _ in s.hull if k * x <= w.capacity_rps + 1e-9
        }
        if any(k * s.hull_w(r / k) > w.hull_w(r) + 1e-6 for r in rates):
            continue
        cap = w.capacity_rps
        if any(
            k * s.upper_a_w + s.upper_b_w_per_rps * r > w.upper_a_w + w.upper_b_w_per_rps * r + 1e-6
            for r in (0.0, cap)
        ):
            continue
        return True
    return False


def _prune(columns: list[Column], protected: set[int]) -> set[int]:
    """Indexes of columns another column of the same pool, domain and GPU type dominates."""
    cells: dict[tuple[str, str, str, str], list[Column]] = defaultdict(list)
    for c in columns:
        cells[(c.service, c.request_type, c.domain, c.gpu_type)].append(c)
    dropped: set[int] = set()
    for cell in cells.values():
        for weak in cell:
            if weak.index in protected:
                continue
            for strong in cell:
                if strong is weak or not dominates(strong, weak):
                    continue
                # equal columns dominate each other: keep the first
                if dominates(weak, strong) and weak.index < strong.index:
                    continue
                dropped.add(weak.index)
                break
    return dropped


def build_catalog(inputs: PlanInputs) -> Catalog:
    """Derive the model's candidate table from validated inputs.

    Args:
        inputs: Validated plan inputs.

    Returns:
        The :class:`Catalog`, columns re-indexed from 0 after pruning.
    """
    explicit = inputs.solver.clock_mode == "explicit"
    envelopes = _envelopes(inputs, explicit)
    served: dict[str, set[str]] = defaultdict(set)
    for model, rtype in envelopes:
        served[model].add(rtype)
    nodes, edges = _nodes(inputs, served, envelopes)
    domains = _domains(inputs)
    level_keys = _level_keys(explicit)

    # Which levels to keep: a level whose groups are the next level's groups adds nothing.
    shapes: list[tuple[str, ServingConfig]] = []
    for service, rtype in nodes:
        for _, env in envelopes.get((inputs.service_models[service], rtype), []):
            shapes.append((service, env.profiles[-1].config))
    shapes += [(i.service, i.config) for i in inputs.current.items]
    levels = _levels(inputs, level_keys, shapes)

    reach: dict[Pool, float] = {
        (s, t): sum(
            rate
            for (s0, t0), rate in inputs.demand_rps.items()
            if s0 == s and larger_or_equal(t0, t)
        )
        for s, t in nodes
    }
    draft: list[Column] = []
    for service, rtype in nodes:
        for _, env in envelopes.get((inputs.service_models[service], rtype), []):
            config = max(env.profiles, key=lambda p: p.capacity_rps).config
            groups = tuple(key(service, config) for key in levels.keys)
            held = levels.current_instances(groups)
            for d in domains:
                count = d.gpus.get(config.gpu_type, 0)
                if count < config.gpus:
                    continue
                need = math.ceil(reach[(service, rtype)] / env.capacity_rps - 1e-9)
                bound = min(count // config.gpus, need + held)
                if bound <= 0:
                    continue
                draft.append(Column(len(draft), service, rtype, d.name, config, env, bound, groups))
    protected = {c.index for c in draft if levels.held_below_coarsest(c.groups)}
    dropped = _prune(draft, protected) if inputs.solver.prune_dominated else set()
    columns: list[Column] = []
    for c in draft:
        if c.index not in dropped:
            columns.append(
                Column(
                    len(columns),
                    c.service,
                    c.request_type,
                    c.domain,
                    c.config,
                    c.envelope,
                    c.upper_bound,
                    c.groups,
                )
            )
    by_node: dict[Pool, list[int]] = defaultdict(list)
    for c in columns:
        by_node[c.pool].append(c.index)
    demand = {n: inputs.demand_rps.get(n, 0.0) for n in nodes}
    mean = {n: inputs.mean_of(n) if n in inputs.demand_rps else 0.0 for n in nodes}
    return Catalog(
        columns=tuple(columns),
        nodes=tuple(nodes),
        edges=tuple(edges),
        demand_rps=demand,
        mean_rps=mean,
        same_mean=all(abs(mean[n] - demand[n]) <= 1e-12 for n in nodes),
        domains=domains,
        levels=levels.levels,
        pruned=len(dropped),
        candidates=len(draft),
        by_node=dict(by_node),
    )


@dataclass(frozen=True)
class _Levels:
    keys: tuple[Callable[[str, ServingConfig], GroupKey], ...]
    levels: tuple[TransitionLevel, ...]

    def current_instances(self, groups: tuple[GroupKey, ...]) -> int:
        """Applied instances in the finest group (the level that counts instances)."""
        return self.levels[0].current.get(groups[0], 0) if self.levels else 0

    def held_below_coarsest(self, groups: tuple[GroupKey, ...]) -> bool:
        """Whether a group below the coarsest level has applied instances.

        Such a column must not be pruned: replacing it could leave its applied instances
        idle and start others, raising transition costs (see :func:`dominates`).
        """
        if len(self.levels) < 2:
            return False
        return self.levels[-2].current.get(groups[-2], 0) > 0


def _levels(
    inputs: PlanInputs,
    level_keys: list[tuple[str, Callable[[str, ServingConfig], GroupKey]]],
    shapes: Iterable[tuple[str, ServingConfig]],
) -> _Levels:
    """Transition levels to model, merging a level into the next when it adds nothing."""
    r = inputs.reconfiguration
    increments = {
        "clock": r.clock_change_s,
        "reshard": r.reshard_s - r.clock_change_s,
        "cold_start": r.startup_s - r.reshard_s,
    }
    shapes = list(shapes)
    kept: list[tuple[str, Callable[[str, ServingConfig], GroupKey], float]] = []
    carry = 0.0
    for i, (name, key) in enumerate(level_keys):
        increment = increments[name] + carry
        if i + 1 < len(level_keys):
            coarser = level_keys[i + 1][1]
            mapping: dict[GroupKey, set[GroupKey]] = defaultdict(set)
            for service, config in shapes:
                mapping[coarser(service, config)].add(key(service, config))
            if all(len(fine) == 1 for fine in mapping.values()):
                carry = increment  # same groups as the next level: fold its charge there
                continue
        carry = 0.0
        kept.append((name, key, increment))
    levels = []
    for i, (name, key, increment) in enumerate(kept):
        in_gpus = i == len(kept) - 1 and len(kept) > 1
        current: dict[GroupKey, int] = defaultdict(int)
        gpus: dict[GroupKey, int] = {}
        gpu_type: dict[GroupKey, str] = {}
        for item in inputs.current.items:
            g = key(item.service, item.config)
            current[g] += item.instances * (item.config.gpus if in_gpus else 1)
        for service, config in shapes:
            g = key(service, config)
            gpus[g] = 1 if in_gpus else config.gpus
            gpu_type[g] = config.gpu_type
        levels.append(TransitionLevel(name, increment, in_gpus, dict(current), gpus, gpu_type))
    return _Levels(tuple(k for _, k, _ in kept), tuple(levels))

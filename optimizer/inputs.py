"""The optimizer's single, validated input object and its option groups."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from wattplan.domain import LONG_CONTEXT_TYPE, REQUEST_TYPES, Layout, Profile
from wattplan.errors import PlanInputError

Pool = tuple[str, str]  # (service, request type)

#: Request types the optimizer plans for: DynamoLLM's nine and the long-context class.
PLANNED_TYPES: tuple[str, ...] = (*REQUEST_TYPES, LONG_CONTEXT_TYPE)

CLOCK_MODES = ("envelope", "explicit")

_CLASS_ORDER = {"S": 0, "M": 1, "L": 2}


def sized_demand_rps(planned_rps: float, target_utilization: float) -> float:
    """The load a pool is sized for: its planned rate over the target utilization.

    Planning headroom (``WATTPLAN_TARGET_UTILIZATION``): with ``target_utilization`` u < 1,
    the MILP must give a pool ``planned_rps / u`` of SLO capacity, so at the planned rate
    its instances run at most u of their SLO capacity. The profiles define SLO capacity as
    the rate where P99 reaches the SLO, so a pool planned exactly at it misses about 1% of
    its requests, and any under-forecast more; the headroom is what absorbs forecast error
    within a window. The mean load (energy) is not scaled: the headroom costs instances,
    not load. ``jobs.plan_inputs`` and the simulator's wattplan policy both call this.

    Raises:
        PlanInputError: ``target_utilization`` outside ``(0, 1]``.
    """
    if not (math.isfinite(target_utilization) and 0 < target_utilization <= 1):
        raise PlanInputError(f"target_utilization={target_utilization} must be in (0, 1]")
    return planned_rps / target_utilization


def larger_or_equal(small: str, large: str) -> bool:
    """Whether requests of type ``small`` may be served by the pool of type ``large``.

    DynamoLLM's types are (input class, output class); ``large`` qualifies when both of its
    classes are at least those of ``small`` (componentwise). The long-context type only
    serves itself.
    """
    if small == large:
        return True
    if LONG_CONTEXT_TYPE in (small, large):
        return False
    return all(_CLASS_ORDER[a] <= _CLASS_ORDER[b] for a, b in zip(small, large, strict=True))


@dataclass(frozen=True)
class SolverOptions:
    """Explicit solver and formulation options; stored with every plan.

    Attributes:
        time_limit_s: Wall-clock limit for the whole solve (HiGHS gets what is left after
            the build; a guard interrupts it if it overruns).
        mip_gap: Relative MIP gap at which the solve stops.
        threads: HiGHS threads.
        random_seed: HiGHS random seed.
        clock_mode: ``envelope``: the clock is chosen per load by the instance-level loop and
            the MILP sees each configuration's lower envelope over clocks (docs/optimizer.md);
            ``explicit``: every clock is its own integer column.
        warm_start: Start HiGHS from the LP relaxation rounded pool by pool
            (:mod:`optimizer.heuristic`); skip the MIP run when that start is already within
            ``mip_gap`` of the LP bound.
        prune_dominated: Drop configurations another one dominates (docs/optimizer.md).
        hull_tolerance: Relative over-estimate of serving power allowed when simplifying each
            column's convex hull to fewer segments (0: exact hull).
        highs_options: Further HiGHS options by name (e.g. ``{"mip_heuristic_effort": 0.2}``).
    """

    time_limit_s: float = 20.0
    mip_gap: float = 0.01
    threads: int = 1
    random_seed: int = 0
    clock_mode: str = "envelope"
    warm_start: bool = True
    prune_dominated: bool = True
    hull_tolerance: float = 0.0
    highs_options: Mapping[str, float | int | str | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectiveWeights:
    """Weights of the registered cost terms (per kWh, per kg CO2eq, per USD)."""

    energy_kwh: float = 1.0
    carbon_kg: float = 0.0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class Reconfiguration:
    """What changing the layout costs, relative to the applied one.

    A started instance is charged the cheapest way to create it: a clock or power-cap change
    of an instance of the same shape (``clock_change_s``), a re-shard on GPUs freed by the
    same service on the same GPU type (``reshard_s``), or a cold start (``startup_s``). The
    GPUs involved are powered and paid for but serve nothing for that long. Moving an
    instance between pools of its service (a router change) is free.

    Attributes:
        startup_s: Cold start of an instance (DOMAIN.md section 6: 6-8 min for 70B).
        reshard_s: TP change by restarting the engine on the same GPUs (1-2 min).
        clock_change_s: Locked-clock or power-cap change (50-200 ms).
        hysteresis: Transition costs count this many times in the objective (>= 1): a
            layout changes only when the window's saving beats the cost with this margin.
        max_changes: At most this many instances started plus stopped per window (stagger);
            ``None``: no cap.
    """

    startup_s: float = 420.0
    reshard_s: float = 90.0
    clock_change_s: float = 0.08
    hysteresis: float = 1.0
    max_changes: int | None = None


@dataclass(frozen=True)
class PowerDomain:
    """A power domain (row, PDU) with the GPUs it holds (POLCA).

    The plan's predicted peak power of the instances placed here stays within
    ``budget_w * oversubscription``.
    """

    name: str
    budget_w: float
    gpus: Mapping[str, int]
    oversubscription: float = 1.0

    @property
    def limit_w(self) -> float:
        """The planning limit: budget times the oversubscription factor."""
        return self.budget_w * self.oversubscription


@dataclass(frozen=True)
class GuardPolicy:
    """POLCA's two-threshold clock-cap policy, carried in the plan for the runtime guard.

    Thresholds are fractions of each domain's budget: above ``low_priority_fraction`` the
    guard caps the clocks of low-priority services' instances to their lowest clock; above
    ``all_fraction`` it caps every instance to the lowest clock keeping the SLO at its
    planned load; below ``release_fraction`` it releases the caps (hysteresis).
    """

    low_priority_fraction: float = 0.90
    all_fraction: float = 0.97
    release_fraction: float = 0.85
    low_priority_services: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanInputs:
    """Everything one window's layout decision depends on.

    Attributes:
        window_s: Length of the planned window in seconds.
        demand_rps: Load each pool must carry (the forecast quantile of its peak).
        service_models: Model serving each service.
        profiles: Candidate serving configs with their per-type profiles.
        gpu_inventory: GPUs available per GPU type.
        current: The layout the cluster runs now (for reconfiguration costs).
        mean_rps: Forecast mean load per pool, for energy over the window; defaults to
            ``demand_rps`` (energy then assumes the peak lasts all window).
        carbon_g_per_kwh: Forecast grid carbon intensity over the window.
        electricity_usd_per_mwh: Electricity price over the window.
        gpu_usd_per_hour: Price of one GPU-hour per GPU type.
        reconfiguration: Transition costs, hysteresis and stagger cap.
        power_domains: Power domains; empty: one domain per cluster without a power row.
        gpu_limit: At most this many GPUs in use in the cluster, all types together.
        guard: Runtime power-guard thresholds carried in the plan.
        weights: Objective weights.
        solver: Solver and formulation options.
    """

    window_s: int
    demand_rps: Mapping[Pool, float]
    service_models: Mapping[str, str]
    profiles: tuple[Profile, ...]
    gpu_inventory: Mapping[str, int]
    current: Layout = field(default_factory=Layout)
    mean_rps: Mapping[Pool, float] = field(default_factory=dict)
    carbon_g_per_kwh: float = 0.0
    electricity_usd_per_mwh: float = 0.0
    gpu_usd_per_hour: Mapping[str, float] = field(default_factory=dict)
    reconfiguration: Reconfiguration = field(default_factory=Reconfiguration)
    power_domains: tuple[PowerDomain, ...] = ()
    gpu_limit: int | None = None
    guard: GuardPolicy = field(default_factory=GuardPolicy)
    weights: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    solver: SolverOptions = field(default_factory=SolverOptions)

    def mean_of(self, pool: Pool) -> float:
        """Forecast mean load of a pool (its planned peak when no mean was given)."""
        return self.mean_rps.get(pool, self.demand_rps.get(pool, 0.0))

    def validate(self) -> None:
        """Raise :class:`PlanInputError` naming every offending key.

        Raises:
            PlanInputError: Any check failed; the message lists all of them.
        """
        problems: list[str] = []
        if not self.window_s > 0:
            problems.append(f"window_s={self.window_s} must be positive")
        problems += self._check_loads()
        problems += self._check_gpus()
        problems += self._check_coverage()
        problems += self._check_options()
        if problems:
            raise PlanInputError("invalid plan inputs: " + "; ".join(problems))

    def _check_loads(self) -> list[str]:
        problems = []
        for pool, rate in self.demand_rps.items():
            service, rtype = pool
            if rtype not in PLANNED_TYPES:
                problems.append(f"demand_rps{pool}: unknown request type {rtype!r}")
            if service not in self.service_models:
                problems.append(f"demand_rps{pool}: service {service!r} has no model")
            if not (math.isfinite(rate) and rate >= 0):
                problems.append(f"demand_rps{pool}={rate} must be a finite number >= 0")
        for pool, rate in self.mean_rps.items():
            if pool not in self.demand_rps:
                problems.append(f"mean_rps{pool}: pool has no demand_rps entry")
            elif not (math.isfinite(rate) and 0 <= rate <= self.demand_rps[pool] + 1e-9):
                problems.append(f"mean_rps{pool}={rate} must be in [0, demand_rps{pool}]")
        for name, value in (
            ("carbon_g_per_kwh", self.carbon_g_per_kwh),
            ("electricity_usd_per_mwh", self.electricity_usd_per_mwh),
        ):
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name}={value} must be a finite number >= 0")
        for service, model in self.service_models.items():
            if not model:
                problems.append(f"service_models[{service!r}] is empty")
        return problems

    def _check_gpus(self) -> list[str]:
        problems = []
        known = sorted({p.config.gpu_type for p in self.profiles})
        seen: set[tuple[str, str]] = set()
        for p in self.profiles:
            key = (p.config.key, p.request_type)
            if key in seen:
                problems.append(f"profiles: duplicate profile {key}")
            seen.add(key)
            if p.request_type not in PLANNED_TYPES:
                problems.append(f"profiles{key}: unknown request type {p.request_type!r}")
        for gpu_type, count in self.gpu_inventory.items():
            if gpu_type not in known:
                problems.append(
                    f"gpu_inventory: unknown GPU type {gpu_type!r} (no profile uses it; "
                    f"profiled types: {known})"
                )
            if not (isinstance(count, int) and count >= 0):
                problems.append(f"gpu_inventory[{gpu_type!r}]={count} must be an integer >= 0")
        for gpu_type, price in self.gpu_usd_per_hour.items():
            if gpu_type not in self.gpu_inventory:
                problems.append(f"gpu_usd_per_hour: unknown GPU type {gpu_type!r}")
            if not (math.isfinite(price) and price >= 0):
                problems.append(f"gpu_usd_per_hour[{gpu_type!r}]={price} must be >= 0")
        for item in self.current.items:
            if item.config.gpu_type not in self.gpu_inventory:
                problems.append(
                    f"current layout: {item.service}/{item.request_type} runs on unknown GPU "
                    f"type {item.config.gpu_type!r} (not in gpu_inventory)"
                )
        if self.gpu_limit is not None and self.gpu_limit < 0:
            problems.append(f"gpu_limit={self.gpu_limit} must be >= 0")
        problems += self._check_domains()
        return problems

    def _check_domains(self) -> list[str]:
        if not self.power_domains:
            return []
        problems = []
        names = [d.name for d in self.power_domains]
        if len(set(names)) != len(names):
            problems.append(f"power_domains: duplicate names in {names}")
        totals: dict[str, int] = {}
        for d in self.power_domains:
            if not (math.isfinite(d.budget_w) and d.budget_w > 0):
                problems.append(f"power_domains[{d.name!r}].budget_w={d.budget_w} must be > 0")
            if not (math.isfinite(d.oversubscription) and d.oversubscription > 0):
                problems.append(
                    f"power_domains[{d.name!r}].oversubscription={d.oversubscription} must be > 0"
                )
            for gpu_type, count in d.gpus.items():
                if gpu_type not in self.gpu_inventory:
                    problems.append(f"power_domains[{d.name!r}]: unknown GPU type {gpu_type!r}")
                if count < 0:
                    problems.append(f"power_domains[{d.name!r}].gpus[{gpu_type!r}] must be >= 0")
                totals[gpu_type] = totals.get(gpu_type, 0) + count
        for gpu_type, count in self.gpu_inventory.items():
            if totals.get(gpu_type, 0) != count:
                problems.append(
                    f"power_domains hold {totals.get(gpu_type, 0)} {gpu_type} GPUs but "
                    f"gpu_inventory has {count}: every GPU must sit in exactly one domain"
                )
        return problems

    def _check_coverage(self) -> list[str]:
        """Every pool with load has a profile for its type or a larger one (spill)."""
        problems = []
        served: dict[str, set[str]] = {}
        for p in self.profiles:
            if self.gpu_inventory.get(p.config.gpu_type, 0) > 0:
                served.setdefault(p.config.model, set()).add(p.request_type)
        for (service, rtype), rate in sorted(self.demand_rps.items()):
            model = self.service_models.get(service)
            if model is None or rtype not in PLANNED_TYPES or not rate > 0:
                continue
            types = served.get(model, set())
            if not any(larger_or_equal(rtype, t) for t in types):
                problems.append(
                    f"demand_rps[({service!r}, {rtype!r})]={rate}: missing profiles: model "
                    f"{model!r} has no profile for {rtype} or a larger type on a GPU type in "
                    f"the inventory {sorted(self.gpu_inventory)}"
                )
        return problems

    def _check_options(self) -> list[str]:
        problems = []
        r = self.reconfiguration
        for name in ("startup_s", "reshard_s", "clock_change_s"):
            value = getattr(r, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"reconfiguration.{name}={value} must be >= 0")
        if not r.clock_change_s <= r.reshard_s <= r.startup_s:
            problems.append(
                "reconfiguration: need clock_change_s <= reshard_s <= startup_s, got "
                f"{r.clock_change_s} / {r.reshard_s} / {r.startup_s}"
            )
        if not (math.isfinite(r.hysteresis) and r.hysteresis >= 1):
            problems.append(f"reconfiguration.hysteresis={r.hysteresis} must be >= 1")
        if r.max_changes is not None and r.max_changes < 0:
            problems.append(f"reconfiguration.max_changes={r.max_changes} must be >= 0")
        w = self.weights
        values = (w.energy_kwh, w.carbon_kg, w.cost_usd)
        if not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
            problems.append(f"weights {w} must be finite, >= 0 and not all zero")
        s = self.solver
        if not s.time_limit_s > 0:
            problems.append(f"solver.time_limit_s={s.time_limit_s} must be > 0")
        if not 0 <= s.mip_gap < 1:
            problems.append(f"solver.mip_gap={s.mip_gap} must be in [0, 1)")
        if not 0 <= s.hull_tolerance < 0.2:
            problems.append(f"solver.hull_tolerance={s.hull_tolerance} must be in [0, 0.2)")
        if s.threads < 1:
            problems.append(f"solver.threads={s.threads} must be >= 1")
        if s.clock_mode not in CLOCK_MODES:
            problems.append(f"solver.clock_mode={s.clock_mode!r} must be one of {CLOCK_MODES}")
        g = self.guard
        if not 0 < g.release_fraction < g.low_priority_fraction <= g.all_fraction:
            problems.append(
                "guard: need 0 < release_fraction < low_priority_fraction <= all_fraction"
            )
        return problems

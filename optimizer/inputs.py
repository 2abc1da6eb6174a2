"""The optimizer's single, validated input object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from wattplan.domain import REQUEST_TYPES, Layout, Profile
from wattplan.errors import PlanInputError

Pool = tuple[str, str]  # (service, request type)


@dataclass(frozen=True)
class SolverOptions:
    """Explicit HiGHS options; stored with every plan."""

    time_limit_s: float = 20.0
    mip_gap: float = 0.01
    threads: int = 1
    random_seed: int = 0


@dataclass(frozen=True)
class ObjectiveWeights:
    """Weights of the registered cost terms (per kWh, per kg CO2eq, per USD)."""

    energy_kwh: float = 1.0
    carbon_kg: float = 0.0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class PlanInputs:
    """Everything one window's layout decision depends on.

    Attributes:
        window_s: Length of the planned window in seconds.
        demand_rps: Load each pool must carry (the forecast quantile of its peak).
        mean_rps: Forecast mean load per pool, for energy over the window; defaults to
            ``demand_rps`` (energy then assumes the peak lasts all window).
        service_models: Model serving each service.
        profiles: Candidate serving configs with their per-type profiles.
        gpu_inventory: GPUs available per GPU type.
        current: The layout the cluster runs now (for start-up costs).
        carbon_g_per_kwh: Forecast grid carbon intensity over the window.
        electricity_usd_per_mwh: Electricity price over the window.
        gpu_usd_per_hour: Price of one GPU-hour per GPU type.
        startup_s: Cold-start time of a new instance (powered, not serving).
        weights: Objective weights.
        solver: Solver options.
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
    startup_s: float = 420.0
    weights: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    solver: SolverOptions = field(default_factory=SolverOptions)

    def validate(self) -> None:
        """Raise :class:`PlanInputError` naming every offending key."""
        problems: list[str] = []
        if self.window_s <= 0:
            problems.append(f"window_s={self.window_s} must be positive")
        for pool, rate in self.demand_rps.items():
            service, rtype = pool
            if rtype not in REQUEST_TYPES:
                problems.append(f"demand_rps{pool}: unknown request type {rtype!r}")
            if service not in self.service_models:
                problems.append(f"demand_rps{pool}: service {service!r} has no model")
            if not rate >= 0:
                problems.append(f"demand_rps{pool}={rate} must be >= 0")
        for pool, rate in self.mean_rps.items():
            if not 0 <= rate <= self.demand_rps.get(pool, 0.0) + 1e-9:
                problems.append(f"mean_rps{pool}={rate} must be in [0, demand_rps{pool}]")
        seen = set()
        for p in self.profiles:
            key = (p.config.key, p.request_type)
            if key in seen:
                problems.append(f"profiles: duplicate profile {key}")
            seen.add(key)
            if p.capacity_rps <= 0:
                problems.append(f"profiles{key}: capacity_rps must be > 0")
            if p.power_at_capacity_w < p.idle_power_w:
                problems.append(f"profiles{key}: power_at_capacity_w below idle_power_w")
            if p.config.gpu_type not in self.gpu_inventory:
                problems.append(f"profiles{key}: gpu_type {p.config.gpu_type!r} not in inventory")
        for gpu_type, count in self.gpu_inventory.items():
            if count < 0:
                problems.append(f"gpu_inventory[{gpu_type!r}]={count} must be >= 0")
        for (service, rtype), rate in self.demand_rps.items():
            model = self.service_models.get(service)
            if rate > 0 and not any(
                p.config.model == model and p.request_type == rtype for p in self.profiles
            ):
                problems.append(
                    f"demand_rps[({service!r}, {rtype!r})]: no profile for model {model!r} "
                    f"and type {rtype}"
                )
        if self.startup_s < 0:
            problems.append("startup_s must be >= 0")
        if problems:
            raise PlanInputError("invalid plan inputs: " + "; ".join(problems))

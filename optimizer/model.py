"""Pyomo MILP for the next window's layout: instances x serving config per pool.

Decisions per slot (service, request type, serving config): an integer instance count and the
load the slot carries. Constraints: every pool's planned load is carried, no slot carries more
than its profile's SLO capacity, GPUs per type stay within inventory, and instances started
relative to the current layout are counted. Cost terms register by name and the objective
sums them (Switch's pattern), so a new term never rewrites the objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyomo.environ as pyo

from optimizer.inputs import PlanInputs
from wattplan.domain import Profile

J_PER_KWH = 3.6e6

Slot = tuple[str, str, str]  # (service, request type, config key)


@dataclass(frozen=True)
class SlotData:
    """Per-slot constants, derived from the profiles and the current layout."""

    profile: Profile
    current_instances: int
    mean_share: float  # forecast mean / planned peak of the slot's pool, in [0, 1]


def slot_table(inputs: PlanInputs) -> dict[Slot, SlotData]:
    """Every slot the model may use: pools with demand, plus slots the cluster runs now."""
    current = inputs.current.instances_by_slot()
    by_model_type: dict[tuple[str, str], list[Profile]] = {}
    for p in inputs.profiles:
        by_model_type.setdefault((p.config.model, p.request_type), []).append(p)
    pools = {pool for pool, rate in inputs.demand_rps.items() if rate > 0}
    pools |= {(s, t) for (s, t, _) in current}
    table: dict[Slot, SlotData] = {}
    for service, rtype in sorted(pools):
        model = inputs.service_models.get(service)
        demand = inputs.demand_rps.get((service, rtype), 0.0)
        mean = inputs.mean_rps.get((service, rtype), demand)
        share = min(max(mean / demand, 0.0), 1.0) if demand > 0 else 0.0
        for profile in by_model_type.get((model or "", rtype), []):
            key = (service, rtype, profile.config.key)
            table[key] = SlotData(profile, current.get(key, 0), share)
    return table


CostTerm = Callable[[pyo.ConcreteModel], pyo.Expression]


def build_model(inputs: PlanInputs) -> pyo.ConcreteModel:
    """Build the MILP from validated inputs (no file or database reads).

    Returns:
        A ConcreteModel with ``v_instances``, ``v_load_rps``, ``v_started`` and the registered
        cost-term expressions in ``m.cost_terms`` (name -> Pyomo Expression component).
    """
    inputs.validate()
    table = slot_table(inputs)
    m = pyo.ConcreteModel(name="wattplan_layout")
    m.SLOTS = pyo.Set(initialize=sorted(table), dimen=3, ordered=True)
    m.POOLS = pyo.Set(initialize=sorted({(s, t) for s, t, _ in table}), dimen=2, ordered=True)
    m.GPU_TYPES = pyo.Set(initialize=sorted(inputs.gpu_inventory), ordered=True)

    def prof(s: Slot) -> Profile:
        return table[s].profile

    m.capacity_rps = pyo.Param(m.SLOTS, initialize={s: prof(s).capacity_rps for s in table})
    m.idle_power_w = pyo.Param(m.SLOTS, initialize={s: prof(s).idle_power_w for s in table})
    m.power_slope_w_per_rps = pyo.Param(
        m.SLOTS,
        initialize={
            s: (prof(s).power_at_capacity_w - prof(s).idle_power_w) / prof(s).capacity_rps
            for s in table
        },
    )
    m.gpus_per_instance = pyo.Param(m.SLOTS, initialize={s: prof(s).config.tp for s in table})
    m.current_instances = pyo.Param(
        m.SLOTS, initialize={s: table[s].current_instances for s in table}
    )
    m.mean_share = pyo.Param(m.SLOTS, initialize={s: table[s].mean_share for s in table})
    m.demand_rps = pyo.Param(
        m.POOLS, initialize={p: inputs.demand_rps.get(p, 0.0) for p in m.POOLS}
    )
    m.gpu_inventory = pyo.Param(m.GPU_TYPES, initialize=dict(inputs.gpu_inventory))
    m.window_s = pyo.Param(initialize=inputs.window_s)
    m.startup_s = pyo.Param(initialize=inputs.startup_s)

    # An instance count never needs to exceed what the whole inventory of its GPU type holds.
    def instance_bounds(_m: pyo.ConcreteModel, *s: str) -> tuple[int, int]:
        profile = prof(s)  # type: ignore[arg-type]
        return 0, inputs.gpu_inventory[profile.config.gpu_type] // profile.config.tp

    m.v_instances = pyo.Var(m.SLOTS, domain=pyo.NonNegativeIntegers, bounds=instance_bounds)
    m.v_load_rps = pyo.Var(m.SLOTS, domain=pyo.NonNegativeReals)
    m.v_started = pyo.Var(m.SLOTS, domain=pyo.NonNegativeReals)

    def c_demand(m: pyo.ConcreteModel, service: str, rtype: str) -> pyo.Expression:
        """sum_c load[p, c] >= demand[p]: every pool's planned peak load is carried."""
        return (
            sum(m.v_load_rps[s] for s in m.SLOTS if s[0] == service and s[1] == rtype)
            >= m.demand_rps[service, rtype]
        )

    def c_capacity(m: pyo.ConcreteModel, *s: str) -> pyo.Expression:
        """load[s] <= capacity_rps[s] * instances[s]: no instance runs past its SLO capacity."""
        return m.v_load_rps[s] <= m.capacity_rps[s] * m.v_instances[s]

    def c_gpu_budget(m: pyo.ConcreteModel, gpu_type: str) -> pyo.Expression:
        """sum_s tp[s] * instances[s] <= inventory[g] over slots on GPU type g."""
        used = [
            m.gpus_per_instance[s] * m.v_instances[s]
            for s in m.SLOTS
            if prof(s).config.gpu_type == gpu_type
        ]
        if not used:
            return pyo.Constraint.Skip
        return sum(used) <= m.gpu_inventory[gpu_type]

    def c_started(m: pyo.ConcreteModel, *s: str) -> pyo.Expression:
        """started[s] >= instances[s] - current[s] (and >= 0): new instances pay a cold start."""
        return m.v_started[s] >= m.v_instances[s] - m.current_instances[s]

    m.c_demand = pyo.Constraint(m.POOLS, rule=c_demand)
    m.c_capacity = pyo.Constraint(m.SLOTS, rule=c_capacity)
    m.c_gpu_budget = pyo.Constraint(m.GPU_TYPES, rule=c_gpu_budget)
    m.c_started = pyo.Constraint(m.SLOTS, rule=c_started)

    # Power at the planned peak, and energy over the window at the forecast mean load.
    m.e_peak_power_w = pyo.Expression(
        expr=sum(
            m.idle_power_w[s] * m.v_instances[s] + m.power_slope_w_per_rps[s] * m.v_load_rps[s]
            for s in m.SLOTS
        )
    )
    m.e_serving_energy_kwh = pyo.Expression(
        expr=sum(
            m.idle_power_w[s] * m.v_instances[s]
            + m.power_slope_w_per_rps[s] * m.mean_share[s] * m.v_load_rps[s]
            for s in m.SLOTS
        )
        * m.window_s
        / J_PER_KWH
    )
    m.e_startup_energy_kwh = pyo.Expression(
        expr=sum(m.idle_power_w[s] * m.v_started[s] for s in m.SLOTS) * m.startup_s / J_PER_KWH
    )
    m.e_energy_kwh = pyo.Expression(expr=m.e_serving_energy_kwh + m.e_startup_energy_kwh)
    m.e_gpu_hours = pyo.Expression(
        expr=sum(m.gpus_per_instance[s] * m.v_instances[s] for s in m.SLOTS) * m.window_s / 3600
    )

    gpu_price = {s: inputs.gpu_usd_per_hour.get(prof(s).config.gpu_type, 0.0) for s in table}
    register_cost_term(m, "energy_kwh", lambda m: m.e_energy_kwh)
    register_cost_term(m, "carbon_kg", lambda m: m.e_energy_kwh * inputs.carbon_g_per_kwh / 1000.0)
    register_cost_term(
        m,
        "cost_usd",
        lambda m: (
            sum(gpu_price[s] * m.gpus_per_instance[s] * m.v_instances[s] for s in m.SLOTS)
            * m.window_s
            / 3600
            + m.e_energy_kwh * inputs.electricity_usd_per_mwh / 1000.0
        ),
    )
    weights = {
        "energy_kwh": inputs.weights.energy_kwh,
        "carbon_kg": inputs.weights.carbon_kg,
        "cost_usd": inputs.weights.cost_usd,
    }
    m.objective = pyo.Objective(
        expr=sum(weights[name] * term for name, term in m.cost_terms.items()),
        sense=pyo.minimize,
    )
    return m


def register_cost_term(m: pyo.ConcreteModel, name: str, build: CostTerm) -> None:
    """Add a named cost expression ``e_cost_<name>``; the objective sums the weighted terms."""
    if not hasattr(m, "cost_terms"):
        m.cost_terms = {}
    component = pyo.Expression(expr=build(m))
    m.add_component(f"e_cost_{name}", component)
    m.cost_terms[name] = component

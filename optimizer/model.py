"""Pyomo MILP for the next window's layout (formulation: docs/optimizer.md).

Decisions per column (service, request-type pool, serving shape, power domain; see
:mod:`optimizer.catalog`): an integer instance count ``v_instances`` and the peak load it
carries ``v_load_rps``; spill flows ``v_spill_rps`` move load of a type to a
componentwise-larger pool of the same service. No selection binaries: every column's count
is its own integer, so the LP relaxation is the capacity-weighted mix of configurations and
no big-M appears anywhere.

Rows: every pool's planned peak (and mean) load is carried, no column carries more than its
SLO capacity, GPUs per (domain, GPU type) and per cluster stay within inventory, predicted
peak power per domain stays within budget x oversubscription, start counts per transition
level follow the applied layout, and an optional stagger cap bounds the changes. Cost terms
register by name and the objective sums them (Switch's pattern).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable

import pyomo.environ as pyo

from optimizer.catalog import Catalog, GroupKey, build_catalog
from optimizer.inputs import PlanInputs

J_PER_KWH = 3.6e6

CostTerm = Callable[[pyo.ConcreteModel], pyo.Expression]


def transition_power_w_per_gpu(catalog: Catalog) -> dict[str, float]:
    """Power of one GPU while its instance starts or re-shards: median loaded idle per GPU."""
    idle: dict[str, list[float]] = defaultdict(list)
    for c in catalog.columns:
        idle[c.gpu_type].append(c.envelope.idle_w / c.gpus)
    return {g: statistics.median(v) for g, v in idle.items()}


def build_model(
    inputs: PlanInputs, catalog: Catalog | None = None, *, degraded: bool = False
) -> pyo.ConcreteModel:
    """Build the MILP from validated inputs (no file or database reads).

    Args:
        inputs: The plan inputs (validated here when no catalog is given).
        catalog: A catalog already built from ``inputs``.
        degraded: Add shortfall variables and the ``shortfall_objective`` (inactive until the
            solver switches to it) for the best plan when demand exceeds capacity.

    Returns:
        A ConcreteModel with the variables and rows named in the module docstring, the
        registered cost terms in ``m.cost_terms`` (name -> Expression component),
        ``m.objective`` and, when degraded, ``m.shortfall_objective``.
    """
    if catalog is None:
        inputs.validate()
        catalog = build_catalog(inputs)
    m = pyo.ConcreteModel(name="wattplan_layout")
    m.catalog = catalog
    cols = catalog.columns
    _add_sets(m, catalog)
    _add_load_variables(m, catalog, degraded)
    _add_energy(m, catalog, inputs)
    _add_inventory_rows(m, catalog, inputs)
    _add_power_rows(m, catalog)
    _add_transitions(m, catalog, inputs)
    price = {c.index: inputs.gpu_usd_per_hour.get(c.gpu_type, 0.0) for c in cols}
    m.e_gpu_hours = pyo.Expression(
        expr=sum(c.gpus * m.v_instances[c.index] for c in cols) * inputs.window_s / 3600
    )
    m.e_energy_kwh = pyo.Expression(expr=m.e_serving_energy_kwh + m.e_transition_energy_kwh)
    usd_per_kwh = inputs.electricity_usd_per_mwh / 1000.0
    kg_per_kwh = inputs.carbon_g_per_kwh / 1000.0
    gpu_cost = sum(price[c.index] * c.gpus * m.v_instances[c.index] for c in cols)
    register_cost_term(m, "energy_kwh", lambda m: m.e_energy_kwh, inputs.weights.energy_kwh)
    register_cost_term(
        m, "carbon_kg", lambda m: m.e_energy_kwh * kg_per_kwh, inputs.weights.carbon_kg
    )
    register_cost_term(
        m,
        "cost_usd",
        lambda m: (
            gpu_cost * inputs.window_s / 3600
            + m.e_transition_gpu_usd
            + m.e_energy_kwh * usd_per_kwh
        ),
        inputs.weights.cost_usd,
    )
    w = inputs.weights
    transition_value = (
        m.e_transition_energy_kwh
        * (w.energy_kwh + w.carbon_kg * kg_per_kwh + w.cost_usd * usd_per_kwh)
        + m.e_transition_gpu_usd * w.cost_usd
    )
    margin = inputs.reconfiguration.hysteresis - 1.0
    register_cost_term(m, "reconfiguration_margin", lambda m: margin * transition_value, 1.0)
    m.objective = pyo.Objective(
        expr=sum(m.cost_weights[name] * term for name, term in m.cost_terms.items()),
        sense=pyo.minimize,
    )
    if degraded:
        m.shortfall_objective = pyo.Objective(
            expr=sum(m.v_shortfall_rps[n] / catalog.demand_rps[n] for n in m.LOADED_NODES),
            sense=pyo.minimize,
        )
        m.shortfall_objective.deactivate()
    return m


def register_cost_term(m: pyo.ConcreteModel, name: str, build: CostTerm, weight: float) -> None:
    """Add a named cost expression ``e_cost_<name>``; the objective sums the weighted terms.

    Args:
        m: The model.
        name: Term name (unique).
        build: Returns the term's expression for ``m``.
        weight: The term's weight in the objective.
    """
    if not hasattr(m, "cost_terms"):
        m.cost_terms = {}
        m.cost_weights = {}
    component = pyo.Expression(expr=build(m))
    m.add_component(f"e_cost_{name}", component)
    m.cost_terms[name] = component
    m.cost_weights[name] = weight


def _add_sets(m: pyo.ConcreteModel, cat: Catalog) -> None:
    m.COLUMNS = pyo.Set(initialize=[c.index for c in cat.columns], ordered=True)
    m.NODES = pyo.Set(initialize=list(cat.nodes), dimen=2, ordered=True)
    m.EDGES = pyo.Set(initialize=list(cat.edges), dimen=3, ordered=True)
    m.LOADED_NODES = pyo.Set(
        initialize=[n for n in cat.nodes if cat.demand_rps[n] > 0], dimen=2, ordered=True
    )
    segmented = [c.index for c in cat.columns if len(c.envelope.segments) > 1]
    m.SEGMENTED = pyo.Set(initialize=segmented, ordered=True)
    m.SEGMENTS = pyo.Set(
        initialize=[
            (i, j) for i in segmented for j in range(len(cat.columns[i].envelope.segments))
        ],
        dimen=2,
        ordered=True,
    )


def _add_load_variables(m: pyo.ConcreteModel, cat: Catalog, degraded: bool) -> None:
    cols = cat.columns
    m.v_instances = pyo.Var(
        m.COLUMNS,
        domain=pyo.NonNegativeIntegers,
        bounds=lambda _m, i: (0, cols[i].upper_bound),
    )
    m.v_load_rps = pyo.Var(
        m.COLUMNS,
        domain=pyo.NonNegativeReals,
        bounds=lambda _m, i: (0, cols[i].upper_bound * cols[i].envelope.capacity_rps),
    )
    m.v_spill_rps = pyo.Var(m.EDGES, domain=pyo.NonNegativeReals)
    if degraded:
        m.v_shortfall_rps = pyo.Var(m.LOADED_NODES, domain=pyo.NonNegativeReals)
    out_edges: dict[tuple[str, str], list[tuple[str, str, str]]] = defaultdict(list)
    in_edges: dict[tuple[str, str], list[tuple[str, str, str]]] = defaultdict(list)
    for e in cat.edges:
        out_edges[(e[0], e[1])].append(e)
        in_edges[(e[0], e[2])].append(e)

    def kept(m: pyo.ConcreteModel, node: tuple[str, str]) -> pyo.Expression:
        """Load of the pool's own type that stays in it: demand - spilled out - shortfall."""
        stays = cat.demand_rps[node] - sum(m.v_spill_rps[e] for e in out_edges[node])
        if degraded and node in m.LOADED_NODES:
            stays -= m.v_shortfall_rps[node]
        return stays

    def c_carry_peak(m: pyo.ConcreteModel, service: str, rtype: str) -> pyo.Expression:
        """sum_c load[c] == demand - spill out + spill in: every pool's planned peak is carried."""
        node = (service, rtype)
        carried = sum(m.v_load_rps[i] for i in cat.by_node.get(node, []))
        return carried == kept(m, node) + sum(m.v_spill_rps[e] for e in in_edges[node])

    m.c_carry_peak = pyo.Constraint(m.NODES, rule=c_carry_peak)

    def c_capacity(m: pyo.ConcreteModel, i: int) -> pyo.Expression:
        """load[c] <= capacity_rps[c] * instances[c]: no instance runs past its SLO capacity."""
        return m.v_load_rps[i] <= cols[i].envelope.capacity_rps * m.v_instances[i]

    m.c_capacity = pyo.Constraint(m.COLUMNS, rule=c_capacity)

    def c_one_instance(m: pyo.ConcreteModel, service: str, rtype: str) -> pyo.Expression:
        """demand * sum_c instances[c] + spill out >= demand: an instance, or all load leaves.

        Valid for the MILP (an integer count is 0 or >= 1) and cuts off LP points that
        serve a small pool with a sliver of an instance; it lifts the LP bound.
        """
        node = (service, rtype)
        demand = cat.demand_rps[node]
        instances = sum(m.v_instances[i] for i in cat.by_node[node])
        leaving = sum(m.v_spill_rps[e] for e in out_edges[node])
        if degraded:
            leaving += m.v_shortfall_rps[node]
        return demand * instances + leaving >= demand

    m.c_one_instance = pyo.Constraint(
        [n for n in cat.nodes if cat.demand_rps[n] > 0 and cat.by_node.get(n)],
        rule=c_one_instance,
    )
    mir = pool_mir_rows(cat)

    def c_pool_mir(m: pyo.ConcreteModel, k: int) -> pyo.Expression:
        """sum_c (floor(a_c) + min(f_c, f) / f) n_c + spill_out / (delta f) >= ceil(D / delta).

        The covering MIR of ``sum_c cap_c n_c + spill_out >= D`` (what stays in a pool must
        fit its instances) divided by ``delta``, one of the pool's capacities, with
        ``a_c = cap_c / delta``, ``f_c = frac(a_c)``, ``f = frac(D / delta)``. Valid for
        every integer solution; it cuts off LP points that round instance counts.
        """
        node, delta, coefs, f, rhs = mir[k]
        expr = sum(coef * m.v_instances[i] for i, coef in coefs)
        leaving = sum(m.v_spill_rps[e] for e in out_edges[node])
        if degraded:
            leaving += m.v_shortfall_rps[node]
        return expr + leaving / (delta * f) >= rhs

    m.c_pool_mir = pyo.Constraint(range(len(mir)), rule=c_pool_mir)
    if cat.same_mean:
        return
    m.v_mean_load_rps = pyo.Var(
        m.COLUMNS,
        domain=pyo.NonNegativeReals,
        bounds=lambda _m, i: (0, cols[i].upper_bound * cols[i].envelope.capacity_rps),
    )
    share = {n: cat.mean_rps[n] / d if (d := cat.demand_rps[n]) > 0 else 0.0 for n in cat.nodes}

    def c_carry_mean(m: pyo.ConcreteModel, service: str, rtype: str) -> pyo.Expression:
        """sum_c mean[c] == share * kept + sum_in share[origin] * spill: spill keeps its mix."""
        node = (service, rtype)
        carried = sum(m.v_mean_load_rps[i] for i in cat.by_node.get(node, []))
        arriving = sum(share[(e[0], e[1])] * m.v_spill_rps[e] for e in in_edges[node])
        return carried == share[node] * kept(m, node) + arriving

    m.c_carry_mean = pyo.Constraint(m.NODES, rule=c_carry_mean)
    single = [c.index for c in cols if len(c.envelope.segments) == 1]

    def c_mean_capacity(m: pyo.ConcreteModel, i: int) -> pyo.Expression:
        """mean_load[c] <= capacity_rps[c] * instances[c]."""
        return m.v_mean_load_rps[i] <= cols[i].envelope.capacity_rps * m.v_instances[i]

    m.c_mean_capacity = pyo.Constraint(single, rule=c_mean_capacity)


MirRow = tuple[tuple[str, str], float, list[tuple[int, float]], float, int]


def pool_mir_rows(cat: Catalog) -> list[MirRow]:
    """``(pool, delta, [(column, coefficient)], f, rhs)`` of each pool's MIR row.

    One row per pool with demand and per distinct capacity ``delta`` among its columns,
    skipped when ``D / delta`` is (nearly) integral (the MIR adds nothing there).
    """
    rows: list[MirRow] = []
    for node in cat.nodes:
        demand = cat.demand_rps[node]
        members = cat.by_node.get(node, [])
        if demand <= 0 or not members:
            continue
        for delta in sorted({cat.columns[i].envelope.capacity_rps for i in members}):
            b = demand / delta
            f = b - math.floor(b)
            if f < 1e-4 or f > 1 - 1e-4:
                continue
            coefs = []
            for i in members:
                a = cat.columns[i].envelope.capacity_rps / delta
                coefs.append((i, math.floor(a) + min(a - math.floor(a), f) / f))
            rows.append((node, delta, coefs, f, math.ceil(b)))
    return rows


def mean_load(m: pyo.ConcreteModel, i: int) -> pyo.Var:
    """The variable holding column ``i``'s mean load (its peak load when mean == peak)."""
    return m.v_load_rps[i] if m.catalog.same_mean else m.v_mean_load_rps[i]


def _add_energy(m: pyo.ConcreteModel, cat: Catalog, inputs: PlanInputs) -> None:
    """Serving energy over the window on each column's convex hull (perspective form)."""
    cols = cat.columns
    m.v_segment_rps = pyo.Var(
        m.SEGMENTS,
        domain=pyo.NonNegativeReals,
        bounds=lambda _m, i, j: (
            0,
            cols[i].upper_bound * cols[i].envelope.segments[j][0],
        ),
    )

    def c_segment(m: pyo.ConcreteModel, i: int, j: int) -> pyo.Expression:
        """segment[c, j] <= width[c, j] * instances[c]: n instances stretch every segment n-fold."""
        return m.v_segment_rps[i, j] <= cols[i].envelope.segments[j][0] * m.v_instances[i]

    def c_segment_sum(m: pyo.ConcreteModel, i: int) -> pyo.Expression:
        """sum_j segment[c, j] == mean_load[c]."""
        n = len(cols[i].envelope.segments)
        return sum(m.v_segment_rps[i, j] for j in range(n)) == mean_load(m, i)

    m.c_segment = pyo.Constraint(m.SEGMENTS, rule=c_segment)
    m.c_segment_sum = pyo.Constraint(m.SEGMENTED, rule=c_segment_sum)

    def power_w(i: int) -> pyo.Expression:
        env = cols[i].envelope
        if len(env.segments) == 1:
            return env.idle_w * m.v_instances[i] + env.segments[0][1] * mean_load(m, i)
        return env.idle_w * m.v_instances[i] + sum(
            slope * m.v_segment_rps[i, j] for j, (_, slope) in enumerate(env.segments)
        )

    m.e_serving_power_w = pyo.Expression(expr=sum(power_w(c.index) for c in cols))
    m.e_serving_energy_kwh = pyo.Expression(
        expr=m.e_serving_power_w * (inputs.window_s / J_PER_KWH)
    )


def _add_inventory_rows(m: pyo.ConcreteModel, cat: Catalog, inputs: PlanInputs) -> None:
    cells: dict[tuple[str, str], list[int]] = defaultdict(list)
    for c in cat.columns:
        cells[(c.domain, c.gpu_type)].append(c.index)
    cols = cat.columns
    rows = {}
    for (domain, gpu_type), members in sorted(cells.items()):
        count = next(d for d in cat.domains if d.name == domain).gpus.get(gpu_type, 0)
        # a row that cannot bind only makes the LP larger (and HiGHS warns about it)
        if sum(cols[i].gpus * cols[i].upper_bound for i in members) > count:
            rows[(domain, gpu_type)] = (members, count)
    m.GPU_CELLS = pyo.Set(initialize=sorted(rows), dimen=2, ordered=True)

    def c_gpu_inventory(m: pyo.ConcreteModel, domain: str, gpu_type: str) -> pyo.Expression:
        """sum_c gpus[c] * instances[c] <= GPUs of the type in the domain (gangs whole)."""
        members, count = rows[(domain, gpu_type)]
        return sum(cols[i].gpus * m.v_instances[i] for i in members) <= count

    m.c_gpu_inventory = pyo.Constraint(m.GPU_CELLS, rule=c_gpu_inventory)
    limit = inputs.gpu_limit
    if limit is not None and sum(c.gpus * c.upper_bound for c in cols) > limit:
        m.c_gpu_limit = pyo.Constraint(
            expr=sum(c.gpus * m.v_instances[c.index] for c in cols) <= limit
        )


def _add_power_rows(m: pyo.ConcreteModel, cat: Catalog) -> None:
    """Predicted peak power per domain, in kW, on each column's upper line."""
    cols = cat.columns
    members: dict[str, list[int]] = defaultdict(list)
    for c in cols:
        members[c.domain].append(c.index)

    def peak_kw(i: int) -> pyo.Expression:
        env = cols[i].envelope
        return (env.upper_a_w * m.v_instances[i] + env.upper_b_w_per_rps * m.v_load_rps[i]) / 1000

    m.e_peak_power_kw = pyo.Expression(
        [d.name for d in cat.domains],
        rule=lambda m, d: sum(peak_kw(i) for i in members.get(d, [])),
    )
    limited = [d for d in cat.domains if d.limit_w is not None and members.get(d.name)]
    m.POWER_DOMAINS = pyo.Set(initialize=[d.name for d in limited], ordered=True)
    limits = {d.name: float(d.limit_w or 0.0) for d in limited}

    def c_peak_power(m: pyo.ConcreteModel, domain: str) -> pyo.Expression:
        """sum_c (a[c] * instances[c] + b[c] * load[c]) <= budget x oversubscription (kW)."""
        return m.e_peak_power_kw[domain] <= limits[domain] / 1000

    m.c_peak_power = pyo.Constraint(m.POWER_DOMAINS, rule=c_peak_power)


def _add_transitions(m: pyo.ConcreteModel, cat: Catalog, inputs: PlanInputs) -> None:
    """Nested start counts per transition level, their GPU-seconds, energy and price."""
    cols = cat.columns
    members: dict[tuple[int, GroupKey], list[int]] = defaultdict(list)
    for c in cols:
        for level, group in enumerate(c.groups):
            members[(level, group)].append(c.index)
    keys = sorted(members, key=repr)
    m.TRANSITION_GROUPS = pyo.Set(initialize=range(len(keys)), ordered=True)
    m.transition_groups = keys
    m.v_started = pyo.Var(m.TRANSITION_GROUPS, domain=pyo.NonNegativeReals)

    def count(level: int, members_: list[int]) -> pyo.Expression:
        lv = cat.levels[level]
        return sum((cols[i].gpus if lv.in_gpus else 1) * m.v_instances[i] for i in members_)

    def c_started(m: pyo.ConcreteModel, k: int) -> pyo.Expression:
        """started[g] >= count[g] - applied[g] (and >= 0): what the level must create."""
        level, group = keys[k]
        applied = cat.levels[level].current.get(group, 0)
        return m.v_started[k] >= count(level, members[keys[k]]) - applied

    m.c_started = pyo.Constraint(m.TRANSITION_GROUPS, rule=c_started)
    per_gpu_w = transition_power_w_per_gpu(cat)
    gpu_s = {}
    for k, (level, group) in enumerate(keys):
        lv = cat.levels[level]
        gpu_s[k] = (lv.increment_s * lv.gpus[group], lv.gpu_type[group])
    m.e_transition_gpu_s = pyo.Expression(
        expr=sum(s * m.v_started[k] for k, (s, _) in gpu_s.items())
    )
    m.e_transition_energy_kwh = pyo.Expression(
        expr=sum(s * per_gpu_w[g] * m.v_started[k] for k, (s, g) in gpu_s.items()) / J_PER_KWH
    )
    m.e_transition_gpu_usd = pyo.Expression(
        expr=sum(
            s * inputs.gpu_usd_per_hour.get(g, 0.0) * m.v_started[k] for k, (s, g) in gpu_s.items()
        )
        / 3600
    )
    cap = inputs.reconfiguration.max_changes
    if cap is None or not cat.levels:
        return
    finest = [k for k, (level, _) in enumerate(keys) if level == 0]
    m.v_stopped = pyo.Var(finest, domain=pyo.NonNegativeReals)
    applied_groups = cat.levels[0].current

    def c_stopped(m: pyo.ConcreteModel, k: int) -> pyo.Expression:
        """stopped[g] >= applied[g] - count[g] (and >= 0) at the finest level."""
        level, group = keys[k]
        return m.v_stopped[k] >= applied_groups.get(group, 0) - count(level, members[keys[k]])

    m.c_stopped = pyo.Constraint(finest, rule=c_stopped)
    modelled = {keys[k][1] for k in finest}
    # applied groups without any column can only stop: a constant part of the change count
    gone = sum(n for g, n in applied_groups.items() if g not in modelled)
    m.c_max_changes = pyo.Constraint(
        expr=sum(m.v_started[k] + m.v_stopped[k] for k in finest) + gone <= cap
    )

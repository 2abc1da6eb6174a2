"""From solved column values to the plan: layout, exact predictions, policies, diff.

Pure functions: the solve loop hands over per-column instance counts and loads; everything
the plan carries is computed here from the catalog's envelopes, so the predicted figures
are exact evaluations of the chosen layout (not the MILP's hull approximation, whose value
the solver record keeps beside them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from optimizer.catalog import Catalog
from optimizer.curves import Envelope, balanced_power_w, packed_dispatch
from optimizer.inputs import PlanInputs
from optimizer.model import J_PER_KWH, transition_power_w_per_gpu
from wattplan.domain import DispatchShare, Layout, LayoutItem, PlanPrediction, ServingConfig


@dataclass(frozen=True)
class ColumnValues:
    """Solved values per catalog column (index order)."""

    instances: tuple[int, ...]
    load_rps: tuple[float, ...]
    mean_load_rps: tuple[float, ...]
    spill_rps: dict[tuple[str, str, str], float] = field(default_factory=dict)


@dataclass(frozen=True)
class Solution:
    """A solved layout with its predicted figures, policies, diff and the solver's record."""

    layout: Layout
    prediction: PlanPrediction
    solver: dict[str, object]
    policy: dict[str, object] = field(default_factory=dict)
    diff: dict[str, object] = field(default_factory=dict)
    degraded: bool = False


@dataclass
class _Item:
    """Instances of one shape in one pool, summed over power domains."""

    service: str
    request_type: str
    envelope: Envelope
    config: ServingConfig
    instances: int = 0
    load_rps: float = 0.0
    mean_load_rps: float = 0.0
    domains: dict[str, tuple[int, float, float]] = field(default_factory=dict)


def _items(cat: Catalog, values: ColumnValues) -> list[_Item]:
    items: dict[tuple[str, str, str], _Item] = {}
    for c in cat.columns:
        n = values.instances[c.index]
        if n <= 0:
            continue
        key = (c.service, c.request_type, c.config.key)
        item = items.setdefault(key, _Item(c.service, c.request_type, c.envelope, c.config))
        y, ym = values.load_rps[c.index], values.mean_load_rps[c.index]
        item.instances += n
        item.load_rps += y
        item.mean_load_rps += ym
        item.domains[c.domain] = (n, y, ym)
    return [items[k] for k in sorted(items)]


def _shape_key(config: ServingConfig) -> str:
    """Config key without the clock: the shape the clock policy applies to."""
    return replace(config, clock_mhz=None).key


def _planned_config(item: _Item) -> ServingConfig:
    """The item's config with the clock the policy sets at its per-instance peak load."""
    clock = item.envelope.clock_for(item.load_rps / item.instances)
    return replace(item.config, clock_mhz=clock)


def level_starts(
    current: Layout, planned: Layout, key: Callable[[str, ServingConfig], tuple], in_gpus: bool
) -> dict[tuple, int]:
    """Net increase per group of ``key`` (instances, or GPUs when ``in_gpus``)."""
    delta: dict[tuple, int] = defaultdict(int)
    for sign, layout in ((-1, current), (1, planned)):
        for i in layout.items:
            delta[key(i.service, i.config)] += (
                sign * i.instances * (i.config.gpus if in_gpus else 1)
            )
    return {k: v for k, v in delta.items() if v}


def diff_layouts(current: Layout, planned: Layout) -> dict[str, object]:
    """Changes from the applied layout to the planned one, per slot and summarised.

    Summary (instances unless named ``_gpus``): ``repooled`` (an instance of the same shape
    and clock moves between pools of its service: a router change), ``reclocked`` (same
    shape, other clock or power cap), ``reshard_gpus`` (GPUs freed by the service on the same
    GPU type that take a new TP/gang shape), ``cold_start_gpus`` (GPUs newly taken).
    """
    before, after = current.instances_by_slot(), planned.instances_by_slot()
    changes = []
    for slot in sorted(set(before) | set(after)):
        old, new = before.get(slot, 0), after.get(slot, 0)
        if old != new:
            changes.append(
                {
                    "service": slot[0],
                    "request_type": slot[1],
                    "config": slot[2],
                    "from": old,
                    "to": new,
                    "action": "start" if new > old else "stop",
                }
            )
    starts = sum(max(0, c["to"] - c["from"]) for c in changes)  # type: ignore[operator]
    stops = sum(max(0, c["from"] - c["to"]) for c in changes)  # type: ignore[operator]

    def clock_key(s: str, c: ServingConfig) -> tuple:
        return (s, c.model, c.gpu_type, c.tp, c.spp, c.kvp, c.power_cap_w, c.clock_mhz)

    def shape_key(s: str, c: ServingConfig) -> tuple:
        return (s, c.model, c.gpu_type, c.tp, c.spp, c.kvp)

    clock_starts = sum(max(0, v) for v in level_starts(current, planned, clock_key, False).values())
    shape_delta = level_starts(current, planned, shape_key, False)
    shape_starts = sum(max(0, v) for v in shape_delta.values())
    added: dict[tuple, int] = defaultdict(int)
    freed: dict[tuple, int] = defaultdict(int)
    gpus_of = {}
    for i in (*current.items, *planned.items):
        gpus_of[shape_key(i.service, i.config)] = i.config.gpus
    for key, delta in shape_delta.items():
        pool = key[:3]
        if delta > 0:
            added[pool] += delta * gpus_of[key]
        else:
            freed[pool] -= delta * gpus_of[key]
    reshard_gpus = sum(min(added[p], freed[p]) for p in added)
    cold_gpus = sum(max(0, added[p] - freed[p]) for p in added)
    resharded = 0.0
    for key, delta in shape_delta.items():
        pool = key[:3]
        if delta > 0 and added[pool]:
            resharded += delta * min(added[pool], freed[pool]) / added[pool]
    return {
        "changes": changes,
        "summary": {
            "instances_started": starts,
            "instances_stopped": stops,
            "repooled": starts - clock_starts,
            "reclocked": clock_starts - shape_starts,
            "resharded": round(resharded),
            "reshard_gpus": reshard_gpus,
            "cold_start_gpus": cold_gpus,
        },
    }


def transition_figures(
    cat: Catalog, inputs: PlanInputs, values: ColumnValues
) -> tuple[float, float, float]:
    """(GPU-seconds, kWh, USD) of the transitions the model charges for this solution."""
    counts: dict[tuple[int, tuple], float] = defaultdict(float)
    for c in cat.columns:
        for level, group in enumerate(c.groups):
            units = c.gpus if cat.levels[level].in_gpus else 1
            counts[(level, group)] += values.instances[c.index] * units
    per_gpu_w = transition_power_w_per_gpu(cat)
    gpu_s = kwh = usd = 0.0
    for (level, group), count in counts.items():
        lv = cat.levels[level]
        started = max(0.0, count - lv.current.get(group, 0))
        seconds = lv.increment_s * lv.gpus[group] * started
        gpu_type = lv.gpu_type[group]
        gpu_s += seconds
        kwh += seconds * per_gpu_w.get(gpu_type, 0.0) / J_PER_KWH
        usd += seconds * inputs.gpu_usd_per_hour.get(gpu_type, 0.0) / 3600
    usd += kwh * inputs.electricity_usd_per_mwh / 1000
    return gpu_s, kwh, usd


def _dispatch(envelope: Envelope, instances: int, load: float) -> list[list[float | int | None]]:
    return [
        [k, round(r, 6), clock] for k, r, clock in packed_dispatch(envelope, instances, load).loads
    ]


def build_solution(
    inputs: PlanInputs,
    cat: Catalog,
    values: ColumnValues,
    solver: dict[str, object],
    *,
    degraded: bool = False,
    shortfall_rps: Mapping[tuple[str, str], float] | None = None,
) -> Solution:
    """Assemble the plan from solved values.

    Args:
        inputs: The plan inputs.
        cat: Their catalog.
        values: Solved per-column values.
        solver: The solver record (extended here with the energy checks).
        degraded: The plan carries less than the demand.
        shortfall_rps: Load left uncarried per pool (degraded plans).
    """
    items = _items(cat, values)
    layout_items = [
        LayoutItem(i.service, i.request_type, _planned_config(i), i.instances, round(i.load_rps, 6))
        for i in items
    ]
    layout = Layout(tuple(layout_items), dispatch_shares(inputs, values, shortfall_rps))
    hours = inputs.window_s / 3600
    packed_w = sum(packed_dispatch(i.envelope, i.instances, i.mean_load_rps).power_w for i in items)
    balanced_w = sum(balanced_power_w(i.envelope, i.instances, i.mean_load_rps) for i in items)
    hull_w = sum(i.instances * i.envelope.hull_w(i.mean_load_rps / i.instances) for i in items)
    gpu_s, transition_kwh, transition_usd = transition_figures(cat, inputs, values)
    energy_kwh = packed_w * hours / 1000 + transition_kwh
    gpu_usd = sum(
        li.gpus * inputs.gpu_usd_per_hour.get(li.config.gpu_type, 0.0) * hours
        for li in layout_items
    )
    peak_bound_w = {d.name: 0.0 for d in cat.domains}
    peak_expected_w = {d.name: 0.0 for d in cat.domains}
    for i in items:
        env = i.envelope
        for domain, (n, y, _) in i.domains.items():
            peak_bound_w[domain] += env.upper_a_w * n + env.upper_b_w_per_rps * y
            peak_expected_w[domain] += packed_dispatch(env, n, y).power_w
    diff = diff_layouts(inputs.current, layout)
    summary = diff["summary"]
    assert isinstance(summary, dict)
    headroom = [1.0 - i.load_rps / (i.envelope.capacity_rps * i.instances) for i in items]
    prediction = PlanPrediction(
        energy_kwh=energy_kwh,
        carbon_g=energy_kwh * inputs.carbon_g_per_kwh,
        cost_usd=gpu_usd + transition_usd + energy_kwh * inputs.electricity_usd_per_mwh / 1000,
        gpus=layout.gpus,
        peak_power_w=sum(peak_bound_w.values()),
        min_slo_headroom=min(headroom, default=1.0),
        instances_started=int(summary["instances_started"]),
        instances_stopped=int(summary["instances_stopped"]),
        instances_resharded=int(summary["resharded"]),
        clock_changes=int(summary["reclocked"]),
    )
    record = dict(solver)
    record["energy_check"] = {
        "serving_kwh_packed": round(packed_w * hours / 1000, 6),
        "serving_kwh_balanced": round(balanced_w * hours / 1000, 6),
        "serving_kwh_hull": round(hull_w * hours / 1000, 6),
        "transition_kwh": round(transition_kwh, 6),
        "transition_gpu_s": round(gpu_s, 3),
    }
    policy = _policy(inputs, cat, items, peak_bound_w, peak_expected_w)
    policy["spill"] = [
        {"service": s, "from": a, "to": b, "rps": round(v, 6)}
        for (s, a, b), v in sorted(values.spill_rps.items())
        if v > 1e-9
    ]
    if shortfall_rps:
        policy["shortfall_rps"] = {
            f"{s}/{t}": round(v, 6) for (s, t), v in sorted(shortfall_rps.items()) if v > 1e-9
        }
    return Solution(layout, prediction, record, policy, diff, degraded)


def dispatch_shares(
    inputs: PlanInputs,
    values: ColumnValues,
    shortfall_rps: Mapping[tuple[str, str], float] | None = None,
) -> tuple[DispatchShare, ...]:
    """How the router splits each type that spills: the plan's spill as shares of its load.

    A type ``a`` of service ``s`` with spill flows ``a -> b`` keeps ``D - sum spill -
    shortfall`` in its own pool and sends ``spill(a -> b)`` to pool ``b``; the shares are
    these loads over what the plan carries of ``a`` (the planned peak; the mean keeps the
    same split). Types without spill are not named (all their requests stay in their pool).
    """
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for (service, a, b), rps in values.spill_rps.items():
        if rps > 1e-9:
            out[(service, a)][b] = out[(service, a)].get(b, 0.0) + rps
    shares: list[DispatchShare] = []
    for (service, a), moved in sorted(out.items()):
        demand = inputs.demand_rps.get((service, a), 0.0)
        short = (shortfall_rps or {}).get((service, a), 0.0)
        kept = max(0.0, demand - short - sum(moved.values()))
        loads = {a: kept, **moved} if kept > 1e-9 else dict(moved)
        total = sum(loads.values())
        if total <= 0:
            continue
        shares += [
            DispatchShare(service, a, pool, round(load / total, 6))
            for pool, load in sorted(loads.items())
        ]
    return tuple(shares)


def _policy(
    inputs: PlanInputs,
    cat: Catalog,
    items: list[_Item],
    peak_bound_w: dict[str, float],
    peak_expected_w: dict[str, float],
) -> dict[str, object]:
    """Clock policy per item, the power guard per domain and the placement."""
    clock_policy = []
    for i in items:
        clock_policy.append(
            {
                "service": i.service,
                "request_type": i.request_type,
                "shape": _shape_key(i.config),
                "instances": i.instances,
                "bands": [[round(b.upto_rps, 6), b.clock_mhz] for b in i.envelope.bands],
                "dispatch_peak": _dispatch(i.envelope, i.instances, i.load_rps),
                "dispatch_mean": _dispatch(i.envelope, i.instances, i.mean_load_rps),
                "slo_headroom": round(1 - i.load_rps / (i.envelope.capacity_rps * i.instances), 6),
            }
        )
    guard = inputs.guard
    limits = {d.name: d.limit_w for d in cat.domains}
    budgets = {d.name: d.budget_w for d in inputs.power_domains}
    domains = []
    for d in cat.domains:
        budget = budgets.get(d.name)
        caps = []
        placement = []
        for i in items:
            if d.name not in i.domains:
                continue
            n, y, _ = i.domains[d.name]
            env = i.envelope
            placement.append(
                {
                    "service": i.service,
                    "request_type": i.request_type,
                    "shape": _shape_key(i.config),
                    "instances": n,
                }
            )
            caps.append(
                {
                    "service": i.service,
                    "request_type": i.request_type,
                    "shape": _shape_key(i.config),
                    "low_priority": i.service in guard.low_priority_services,
                    "cap_clock_low_priority": env.profiles[0].config.clock_mhz,
                    "cap_clock_all": env.lowest_slo_clock(y / n),
                }
            )
        entry: dict[str, object] = {
            "name": d.name,
            "gpus": d.gpus,
            "planned_peak_w": round(peak_bound_w[d.name], 3),
            "expected_peak_w": round(peak_expected_w[d.name], 3),
            "placement": placement,
        }
        if budget is not None and limits[d.name] is not None:
            entry.update(
                budget_w=budget,
                limit_w=limits[d.name],
                low_priority_threshold_w=round(budget * guard.low_priority_fraction, 3),
                all_threshold_w=round(budget * guard.all_fraction, 3),
                release_threshold_w=round(budget * guard.release_fraction, 3),
                caps=caps,
            )
        domains.append(entry)
    return {
        "clock_policy": clock_policy,
        "power_guard": {
            "low_priority_fraction": guard.low_priority_fraction,
            "all_fraction": guard.all_fraction,
            "release_fraction": guard.release_fraction,
            "low_priority_services": list(guard.low_priority_services),
            "domains": domains,
        },
    }


def column_values(cat: Catalog, get: Callable[[str, object], float]) -> ColumnValues:
    """Read per-column values (and spill per pair) through ``get(component_name, index)``."""
    n = len(cat.columns)
    instances = tuple(int(round(get("v_instances", i))) for i in range(n))
    load = tuple(max(0.0, get("v_load_rps", i)) for i in range(n))
    mean = load if cat.same_mean else tuple(max(0.0, get("v_mean_load_rps", i)) for i in range(n))
    spill = {e: max(0.0, get("v_spill_rps", e)) for e in cat.edges}
    return ColumnValues(instances, load, mean, spill)

"""The layout MILP: build counts, golden and brute-force optima, infeasibility, reconfiguration."""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import replace

import numpy as np
import pytest
from scipy.optimize import linprog

from optimizer.catalog import build_catalog
from optimizer.inputs import (
    GuardPolicy,
    ObjectiveWeights,
    PlanInputs,
    PowerDomain,
    Reconfiguration,
    SolverOptions,
    larger_or_equal,
    sized_demand_rps,
)
from optimizer.model import build_model
from optimizer.solve import solve_layout
from wattplan.domain import LONG_CONTEXT_TYPE, Layout, LayoutItem, Profile, ServingConfig
from wattplan.errors import CapacityShortfallError, PlanInputError

GPU = "H100-80GB"
TP2 = ServingConfig("m", GPU, 2, 700)
TP4 = ServingConfig("m", GPU, 4, 700)
FREE = Reconfiguration(startup_s=0.0, reshard_s=0.0, clock_change_s=0.0)
EXACT = SolverOptions(mip_gap=1e-9, time_limit_s=30.0)


def _profile(
    config: ServingConfig, capacity: float, idle_w: float, full_w: float, rtype: str = "MM"
) -> Profile:
    curve = ((0.0, idle_w), (capacity, full_w))
    return Profile(config, rtype, capacity, curve, 0.1, 0.02, 1.0, 0.1, "test", "hand")


PROFILES = (_profile(TP2, 4.0, 400.0, 1000.0), _profile(TP4, 10.0, 800.0, 2000.0))


def _inputs(**overrides: object) -> PlanInputs:
    base: dict[str, object] = {
        "window_s": 3600,
        "demand_rps": {("chat", "MM"): 10.0},
        "service_models": {"chat": "m"},
        "profiles": PROFILES,
        "gpu_inventory": {GPU: 8},
        "reconfiguration": FREE,
        "solver": EXACT,
    }
    base.update(overrides)
    return PlanInputs(**base)  # type: ignore[arg-type]


def _shape(solution: object) -> list[tuple[int, int]]:
    return sorted((i.config.tp, i.instances) for i in solution.layout.items)  # type: ignore[attr-defined]


# --- build ---------------------------------------------------------------------------------


def test_build_counts_variables_and_constraints() -> None:
    m = build_model(_inputs())
    assert len(m.COLUMNS) == 2
    # instances + peak load per column (2 x 2), starts: one per TP shape and one per GPU pool
    assert m.nvariables() == 7
    # carry (1 pool) + capacity (2) + one-instance (1) + MIR at delta=4 (10/4 not integral;
    # 10/10 is) + GPU inventory (1: 3 TP2 + 1 TP4 could exceed 8 GPUs) + starts (3)
    assert m.nconstraints() == 9
    assert set(m.cost_terms) == {"energy_kwh", "carbon_kg", "cost_usd", "reconfiguration_margin"}


def test_build_counts_grow_with_spill_mean_and_domains() -> None:
    inputs = _inputs(
        demand_rps={("chat", "SS"): 2.0, ("chat", "MM"): 10.0},
        mean_rps={("chat", "SS"): 1.0, ("chat", "MM"): 6.0},
        power_domains=(
            PowerDomain("row-a", 5000.0, {GPU: 4}),
            PowerDomain("row-b", 5000.0, {GPU: 4}),
        ),
    )
    cat = build_catalog(inputs)
    m = build_model(inputs, cat)
    # SS has no profile: it is a pool node with one spill pair to MM; 2 shapes x 2 domains
    assert cat.nodes == (("chat", "SS"), ("chat", "MM"))
    assert cat.edges == (("chat", "SS", "MM"),)
    assert len(cat.columns) == 4
    # n, peak, mean per column (12) + 1 spill + 3 start groups
    assert m.nvariables() == 16
    names = {c.name: len(c) for c in m.component_objects(pyo_constraint())}
    assert names["c_carry_peak"] == names["c_carry_mean"] == 2
    assert names["c_capacity"] == names["c_mean_capacity"] == 4
    assert names["c_peak_power"] == 2
    assert names["c_gpu_inventory"] == 2


def pyo_constraint() -> type:
    import pyomo.environ as pyo

    return pyo.Constraint


# --- golden instances --------------------------------------------------------------------


def test_golden_one_tp4_instance_beats_three_tp2() -> None:
    # By hand: 3 x TP2 draw 3*400 + 150*10 = 2700 W; 1 x TP4 draws 800 + 120*10 = 2000 W.
    solution = solve_layout(_inputs())
    assert _shape(solution) == [(4, 1)]
    assert solution.prediction.energy_kwh == pytest.approx(2.0, rel=1e-6)
    assert solution.prediction.peak_power_w == pytest.approx(2000.0, rel=1e-6)
    assert solution.prediction.gpus == 4
    assert solution.solver["status"] in ("optimal", "start_within_gap")


def test_energy_uses_the_forecast_mean_and_sizing_the_peak() -> None:
    solution = solve_layout(_inputs(mean_rps={("chat", "MM"): 5.0}))
    # Same layout; energy at half the load: 800 + 120 * 5 = 1400 W for an hour.
    assert solution.prediction.energy_kwh == pytest.approx(1.4, rel=1e-6)
    assert solution.prediction.peak_power_w == pytest.approx(2000.0, rel=1e-6)


def test_carbon_and_cost_terms_follow_energy_and_gpu_hours() -> None:
    solution = solve_layout(
        _inputs(
            carbon_g_per_kwh=250.0,
            electricity_usd_per_mwh=100.0,
            gpu_usd_per_hour={GPU: 2.0},
        )
    )
    assert solution.prediction.carbon_g == pytest.approx(2.0 * 250.0, rel=1e-6)
    # 4 GPU-hours at $2 + 2 kWh at $0.10
    assert solution.prediction.cost_usd == pytest.approx(8.0 + 0.2, rel=1e-6)


def test_cost_weight_prefers_fewer_gpus_over_less_energy() -> None:
    # 10 rps: 3 x TP2 (6 GPUs) draw 300 + 300/3.5 * 10 = 1157 W; 1 x TP4 (4 GPUs) 1500 W
    profiles = (_profile(TP2, 3.5, 100.0, 400.0), _profile(TP4, 10.0, 900.0, 1500.0))
    by_energy = solve_layout(_inputs(profiles=profiles))
    assert _shape(by_energy) == [(2, 3)]
    by_cost = solve_layout(
        _inputs(
            profiles=profiles,
            gpu_usd_per_hour={GPU: 10.0},
            weights=ObjectiveWeights(energy_kwh=0.0, cost_usd=1.0),
        )
    )
    assert _shape(by_cost) == [(4, 1)]  # 4 GPU-hours at $10 instead of 6
    assert by_cost.solver["weights"] == {"energy_kwh": 0.0, "carbon_kg": 0.0, "cost_usd": 1.0}


def test_small_pool_spills_to_a_componentwise_larger_one() -> None:
    # SS has no profile of its own: its load rides in the MM pool (counted as MM load)
    solution = solve_layout(_inputs(demand_rps={("chat", "SS"): 1.0, ("chat", "MM"): 8.0}))
    assert [(i.request_type, i.config.tp, i.instances) for i in solution.layout.items] == [
        ("MM", 4, 1)
    ]
    assert solution.layout.items[0].load_rps == pytest.approx(9.0)


def test_no_spill_where_profiles_say_the_larger_type_is_lighter() -> None:
    # the same TP4 shape serves 10 MM rps but only 6 SM rps: counting SM load as MM load
    # would be optimistic, so SM gets its own instance instead of riding in MM's spare room
    profiles = (_profile(TP4, 10.0, 800.0, 2000.0), _profile(TP4, 6.0, 800.0, 2000.0, "SM"))
    inputs = _inputs(profiles=profiles, demand_rps={("chat", "SM"): 1.0, ("chat", "MM"): 8.0})
    assert build_catalog(inputs).edges == ()
    solution = solve_layout(inputs)
    assert sorted((i.request_type, i.instances) for i in solution.layout.items) == [
        ("MM", 1),
        ("SM", 1),
    ]
    heavier_mm = (_profile(TP4, 10.0, 800.0, 2000.0), _profile(TP4, 12.0, 800.0, 2000.0, "SM"))
    assert build_catalog(replace(inputs, profiles=heavier_mm)).edges == (("chat", "SM", "MM"),)


def test_load_never_spills_to_a_smaller_type() -> None:
    assert larger_or_equal("SM", "LL") and not larger_or_equal("LL", "SM")
    assert not larger_or_equal("SL", "MS") and not larger_or_equal("MS", "SL")
    assert not larger_or_equal("SS", LONG_CONTEXT_TYPE)
    with pytest.raises(PlanInputError, match=r"missing profiles: model 'm' has no profile for LL"):
        solve_layout(_inputs(demand_rps={("chat", "LL"): 1.0}))


def test_long_context_gangs_take_whole_gangs_of_gpus() -> None:
    gang = ServingConfig("m", GPU, 2, 700, None, spp=2, kvp=2)  # 8 GPUs per instance
    profiles = (_profile(gang, 1.0, 800.0, 1600.0, LONG_CONTEXT_TYPE),)
    solution = solve_layout(
        _inputs(
            profiles=profiles,
            demand_rps={("chat", LONG_CONTEXT_TYPE): 1.5},
            gpu_inventory={GPU: 20},
        )
    )
    assert [(i.config.gpus, i.instances) for i in solution.layout.items] == [(8, 2)]
    assert solution.prediction.gpus == 16
    with pytest.raises(CapacityShortfallError):
        # 15 GPUs hold one 8-GPU gang, not two
        solve_layout(
            _inputs(
                profiles=profiles,
                demand_rps={("chat", LONG_CONTEXT_TYPE): 1.5},
                gpu_inventory={GPU: 15},
            )
        )


def test_power_domain_budget_moves_instances_to_a_cheaper_config() -> None:
    # unconstrained, one TP4 (2000 W) beats two TP2 (2 x 1050 W); rows of 4 GPUs limited to
    # 1800 W each cannot hold the TP4: one TP2 goes into each row
    domains = (PowerDomain("row-a", 1800.0, {GPU: 4}), PowerDomain("row-b", 1800.0, {GPU: 4}))
    profiles = (_profile(TP2, 5.0, 500.0, 1050.0), _profile(TP4, 10.0, 800.0, 2000.0))
    free = solve_layout(_inputs(profiles=profiles, gpu_inventory={GPU: 8}))
    assert _shape(free) == [(4, 1)]
    capped = solve_layout(_inputs(profiles=profiles, gpu_inventory={GPU: 8}, power_domains=domains))
    assert _shape(capped) == [(2, 2)]
    placement = capped.policy["power_guard"]["domains"]  # type: ignore[index]
    assert [sum(p["instances"] for p in d["placement"]) for d in placement] == [1, 1]
    assert all(d["planned_peak_w"] <= 1800.0 + 1e-6 for d in placement)
    guard = placement[0]
    assert guard["low_priority_threshold_w"] < guard["all_threshold_w"] <= guard["budget_w"]
    assert capped.policy["power_guard"]["release_fraction"] == GuardPolicy().release_fraction  # type: ignore[index]


def test_envelope_mode_lets_the_instance_loop_pick_clocks() -> None:
    # two clocks of one TP4 config: the low clock carries 6 rps at 1100 W, the top 10 at 2000
    low = _profile(replace(TP4, clock_mhz=1200), 6.0, 600.0, 1100.0)
    top = _profile(replace(TP4, clock_mhz=1980), 10.0, 800.0, 2000.0)
    inputs = _inputs(profiles=(low, top), mean_rps={("chat", "MM"): 4.0})
    envelope = solve_layout(inputs)
    explicit = solve_layout(replace(inputs, solver=replace(EXACT, clock_mode="explicit")))
    # envelope: one instance sized at the top clock, running at 1200 MHz at the mean load
    assert [(i.config.tp, i.instances) for i in envelope.layout.items] == [(4, 1)]
    bands = envelope.policy["clock_policy"][0]["bands"]  # type: ignore[index]
    assert bands[0][1] == 1200 and bands[-1] == [10.0, 1980]
    assert envelope.solver["objective"] <= explicit.solver["objective"] + 1e-9


# --- brute force -------------------------------------------------------------------------


def _random_instance(seed: int) -> PlanInputs:
    """A small instance: SS, SM and MM pools (SS without profiles), two shapes and clocks."""
    rng = np.random.default_rng(seed)
    profiles = []
    for rtype in ("SM", "MM"):
        for tp in (1, 2):
            clocks = (1200, 1980) if tp == 1 else (1980,)
            for clock in clocks:
                cap = round(float(rng.uniform(2.0, 6.0)) * tp * clock / 1980, 3)
                full = 100.0 * tp + float(rng.uniform(150.0, 400.0)) * tp * clock / 1980
                config = ServingConfig("m", GPU, tp, 700, clock)
                profiles.append(_profile(config, cap, 100.0 * tp, round(full, 1), rtype))
    demand = {
        ("chat", "SS"): round(float(rng.uniform(0.2, 2.0)), 3),
        ("chat", "SM"): round(float(rng.uniform(1.0, 6.0)), 3),
        ("chat", "MM"): round(float(rng.uniform(1.0, 6.0)), 3),
    }
    mean = {k: round(v * float(rng.uniform(0.5, 1.0)), 3) for k, v in demand.items()}
    current = Layout(
        (
            LayoutItem(
                "chat", "SM", ServingConfig("m", GPU, 2, 700, 1980), int(rng.integers(0, 3))
            ),
            LayoutItem(
                "chat", "MM", ServingConfig("m", GPU, 1, 700, 1200), int(rng.integers(0, 3))
            ),
        )
    )
    limit = float(rng.uniform(1500.0, 3000.0)) if seed % 2 else None
    inventory = int(rng.integers(6, 10))
    domains = (PowerDomain("row", limit, {GPU: inventory}),) if limit else ()
    return PlanInputs(
        window_s=1800,
        demand_rps=demand,
        mean_rps=mean,
        service_models={"chat": "m"},
        profiles=tuple(profiles),
        gpu_inventory={GPU: inventory},
        current=Layout(tuple(i for i in current.items if i.instances)),
        reconfiguration=Reconfiguration(startup_s=600.0, reshard_s=120.0, clock_change_s=10.0),
        power_domains=domains,
        solver=replace(EXACT, clock_mode="explicit", prune_dominated=False),
    )


def _oracle(inputs: PlanInputs) -> float:
    """Best objective by enumerating instance counts; loads and spill by scipy's LP.

    Independent of the model code: columns, spill pairs, transition charges and the power
    line are rebuilt here from the profiles (linear curves, one domain).
    """
    profiles = list(inputs.profiles)
    domain_limit = inputs.power_domains[0].limit_w if inputs.power_domains else None
    pools = ["SS", "SM", "MM"]
    demand = {t: inputs.demand_rps.get(("chat", t), 0.0) for t in pools}
    share = {t: inputs.mean_rps[("chat", t)] / demand[t] for t in pools}
    cap = {(p.request_type, p.config.tp, p.config.clock_mhz): p.capacity_rps for p in profiles}

    def heavier(a: str, b: str) -> bool:  # every shape profiled for both: cap(b) <= cap(a)
        shapes = {k[1:] for k in cap if k[0] == a} & {k[1:] for k in cap if k[0] == b}
        return all(cap[(b, *k)] <= cap[(a, *k)] for k in shapes)

    pairs = [
        (a, b)
        for a in pools
        for b in pools
        if a != b
        and demand[a] > 0
        and larger_or_equal(a, b)
        and any(p.request_type == b for p in profiles)
        and heavier(a, b)
    ]
    hours = inputs.window_s / 3600
    r = inputs.reconfiguration
    per_gpu_w = statistics.median(p.idle_power_w / p.config.gpus for p in profiles)
    best = math.inf
    ranges = [range(0, 4) for _ in profiles]
    for counts in itertools.product(*ranges):
        gpus = sum(n * p.config.gpus for n, p in zip(counts, profiles, strict=True))
        if gpus > inputs.gpu_inventory[GPU]:
            continue
        planned = Layout(
            tuple(
                LayoutItem("chat", p.request_type, p.config, n)
                for n, p in zip(counts, profiles, strict=True)
                if n
            )
        )

        clock_gpus = sum(
            max(0, v) * g
            for (g, v) in _deltas(inputs.current, planned, lambda c: (c.tp, c.clock_mhz)).values()
        )
        shard_gpus = sum(
            max(0, v) * g for (g, v) in _deltas(inputs.current, planned, lambda c: (c.tp,)).values()
        )
        new_gpus = max(0, planned.gpus - inputs.current.gpus)  # one GPU type, one service
        transition_gpu_s = (
            r.clock_change_s * clock_gpus
            + (r.reshard_s - r.clock_change_s) * shard_gpus
            + (r.startup_s - r.reshard_s) * new_gpus
        )
        # LP: x = [y_c ..., ym_c ..., spill_e ...]
        nc, ne = len(profiles), len(pairs)
        cost = np.zeros(2 * nc + ne)
        for k, p in enumerate(profiles):
            cost[nc + k] = (p.power_at_capacity_w - p.idle_power_w) / p.capacity_rps
        a_eq, b_eq = [], []
        for t in pools:
            for mean in (False, True):
                row = np.zeros(2 * nc + ne)
                for k, p in enumerate(profiles):
                    if p.request_type == t:
                        row[k + (nc if mean else 0)] = 1.0
                for e, (a, b) in enumerate(pairs):
                    if a == t:
                        row[2 * nc + e] += share[t] if mean else 1.0
                    if b == t:
                        row[2 * nc + e] -= share[a] if mean else 1.0
                a_eq.append(row)
                b_eq.append(demand[t] * (share[t] if mean else 1.0))
        a_ub, b_ub = [], []
        if domain_limit is not None:
            row = np.zeros(2 * nc + ne)
            for k, p in enumerate(profiles):
                row[k] = (p.power_at_capacity_w - p.idle_power_w) / p.capacity_rps
            a_ub.append(row)
            b_ub.append(
                domain_limit
                - sum(n * p.idle_power_w for n, p in zip(counts, profiles, strict=True))
            )
        bounds = [(0, n * p.capacity_rps) for n, p in zip(counts, profiles, strict=True)] * 2
        bounds += [(0, None)] * ne
        lp = linprog(
            cost,
            A_ub=np.array(a_ub) if a_ub else None,
            b_ub=np.array(b_ub) if b_ub else None,
            A_eq=np.array(a_eq),
            b_eq=np.array(b_eq),
            bounds=bounds,
            method="highs",
        )
        if lp.status != 0:
            continue
        idle = sum(n * p.idle_power_w for n, p in zip(counts, profiles, strict=True))
        value = (idle + lp.fun) * hours / 1000 + transition_gpu_s * per_gpu_w / 3.6e6
        best = min(best, value)
    return best


def _deltas(current: Layout, planned: Layout, key: object) -> dict[object, tuple[int, int]]:
    """Per shape group: (GPUs per instance, instance count change)."""
    out: dict[object, list[int]] = {}
    for sign, layout in ((-1, current), (1, planned)):
        for i in layout.items:
            k = key(i.config)  # type: ignore[operator]
            entry = out.setdefault(k, [i.config.gpus, 0])
            entry[1] += sign * i.instances
    return {k: (v[0], v[1]) for k, v in out.items()}


@pytest.mark.parametrize("seed", range(6))
def test_small_instances_match_brute_force_enumeration(seed: int) -> None:
    inputs = _random_instance(seed)
    expected = _oracle(inputs)
    if math.isinf(expected):
        with pytest.raises(CapacityShortfallError):
            solve_layout(inputs)
        return
    solution = solve_layout(inputs)
    assert solution.solver["objective"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # the prediction re-evaluates the plan exactly: linear curves leave no hull gap
    check = solution.solver["energy_check"]
    assert check["serving_kwh_packed"] == pytest.approx(check["serving_kwh_hull"], rel=1e-9)  # type: ignore[index]


def test_pruning_dominated_configs_keeps_the_optimum() -> None:
    # TP8 here is dominated by two TP4 (same GPUs, more capacity, less power everywhere)
    tp8 = ServingConfig("m", GPU, 8, 700)
    profiles = (*PROFILES, _profile(tp8, 19.0, 1700.0, 4100.0))
    inputs = _inputs(profiles=profiles, demand_rps={("chat", "MM"): 25.0}, gpu_inventory={GPU: 16})
    pruned = build_catalog(inputs)
    assert pruned.pruned == 1
    assert all(c.config.tp != 8 for c in pruned.columns)
    kept = replace(inputs, solver=replace(EXACT, prune_dominated=False))
    assert build_catalog(kept).pruned == 0
    assert solve_layout(inputs).solver["objective"] == pytest.approx(
        solve_layout(kept).solver["objective"], rel=1e-9
    )


# --- infeasibility -------------------------------------------------------------------------


def test_demand_beyond_inventory_gives_a_degraded_plan_carrying_the_most() -> None:
    with pytest.raises(CapacityShortfallError, match="uncarried load") as err:
        solve_layout(_inputs(gpu_inventory={GPU: 4}, demand_rps={("chat", "MM"): 25.0}))
    degraded = err.value.degraded
    assert degraded is not None and degraded.degraded
    # 4 GPUs carry at most one TP4 (10 rps); the rest is reported, not silently dropped
    assert sum(i.load_rps for i in degraded.layout.items) == pytest.approx(10.0, abs=1e-4)
    assert degraded.policy["shortfall_rps"] == {"chat/MM": pytest.approx(15.0, abs=1e-4)}  # type: ignore[index]
    least = degraded.solver["degraded"]["least_relative_shortfall"]  # type: ignore[index]
    assert least == pytest.approx(0.6, abs=1e-6)


def test_power_budget_below_any_layout_is_infeasible() -> None:
    domains = (PowerDomain("row", 500.0, {GPU: 8}),)
    with pytest.raises(CapacityShortfallError) as err:
        solve_layout(_inputs(power_domains=domains))
    assert err.value.degraded is not None
    assert err.value.degraded.prediction.peak_power_w <= 500.0 + 1e-6


# --- reconfiguration -----------------------------------------------------------------------

RUNNING = Layout((LayoutItem("chat", "MM", TP2, 3),))


def test_tiny_saving_does_not_trigger_a_reshard() -> None:
    # TP4 saves 700 W; over one minute that is 42 kJ, less than re-sharding its 4 GPUs for
    # 90 s at 200 W each (72 kJ; the freed TP2 GPUs cover them, no cold start): keep the TP2s
    reconf = Reconfiguration(startup_s=420.0, reshard_s=90.0, clock_change_s=0.08)
    kept = solve_layout(_inputs(window_s=60, current=RUNNING, reconfiguration=reconf))
    assert _shape(kept) == [(2, 3)]
    assert kept.prediction.instances_started == 0
    assert kept.diff["changes"] == []


def test_large_saving_triggers_a_reshard() -> None:
    # the same switch over two minutes saves 84 kJ > 72 kJ: re-shard
    reconf = Reconfiguration(startup_s=420.0, reshard_s=90.0, clock_change_s=0.08)
    switched = solve_layout(_inputs(window_s=120, current=RUNNING, reconfiguration=reconf))
    assert _shape(switched) == [(4, 1)]
    summary = switched.diff["summary"]
    assert summary["instances_started"] == 1 and summary["instances_stopped"] == 3  # type: ignore[index]
    # the TP4 reuses 4 of the 6 freed GPUs: a re-shard, no cold start
    assert summary["reshard_gpus"] == 4 and summary["cold_start_gpus"] == 0  # type: ignore[index]
    assert switched.prediction.instances_resharded == 1
    check = switched.solver["energy_check"]
    assert check["transition_gpu_s"] == pytest.approx(4 * 90.0)  # type: ignore[index]


def test_hysteresis_needs_the_saving_to_beat_the_cost_by_its_margin() -> None:
    # 1 hour saves 0.7 kWh; the re-shard costs 4 GPUs x 1800 s x 200 W = 0.4 kWh
    reconf = Reconfiguration(startup_s=1800.0, reshard_s=1800.0, clock_change_s=0.08)
    assert _shape(solve_layout(_inputs(current=RUNNING, reconfiguration=reconf))) == [(4, 1)]
    damped = replace(reconf, hysteresis=2.0)  # counts 0.8 kWh > 0.7 kWh saving
    assert _shape(solve_layout(_inputs(current=RUNNING, reconfiguration=damped))) == [(2, 3)]


def test_stagger_cap_limits_changes_per_window() -> None:
    reconf = Reconfiguration(startup_s=0.0, reshard_s=0.0, clock_change_s=0.0, max_changes=2)
    # switching to TP4 needs 1 start + 3 stops = 4 changes: not allowed
    staggered = solve_layout(_inputs(current=RUNNING, reconfiguration=reconf))
    assert _shape(staggered) == [(2, 3)]
    with pytest.raises(CapacityShortfallError):
        # growing to 25 rps needs at least 2 TP4 starts plus stops beyond the cap of 0
        solve_layout(
            _inputs(
                current=RUNNING,
                demand_rps={("chat", "MM"): 25.0},
                gpu_inventory={GPU: 12},
                reconfiguration=replace(reconf, max_changes=0),
            )
        )


def test_repooling_an_instance_is_free() -> None:
    # an MM instance moves to the LL pool of the same shape: a router change, no start cost
    ll = _profile(TP4, 10.0, 800.0, 2000.0, "LL")
    running = Layout((LayoutItem("chat", "MM", TP4, 1),))
    reconf = Reconfiguration(startup_s=3600.0, reshard_s=3600.0, clock_change_s=3600.0)
    solution = solve_layout(
        _inputs(
            profiles=(*PROFILES, ll),
            demand_rps={("chat", "LL"): 9.0},
            current=running,
            reconfiguration=reconf,
        )
    )
    assert [(i.request_type, i.instances) for i in solution.layout.items] == [("LL", 1)]
    assert solution.diff["summary"]["repooled"] == 1  # type: ignore[index]
    assert solution.solver["energy_check"]["transition_gpu_s"] == 0  # type: ignore[index]


# --- solver record and bad input ---------------------------------------------------------


def test_solver_options_and_gap_are_stored_with_the_plan() -> None:
    options = SolverOptions(time_limit_s=7.0, mip_gap=0.02, threads=1, random_seed=3)
    record = solve_layout(_inputs(solver=options)).solver
    assert record["options"]["time_limit_s"] == 7.0  # type: ignore[index]
    assert record["options"]["random_seed"] == 3  # type: ignore[index]
    assert record["gap"] is not None and record["gap"] <= 0.02 + 1e-12
    assert record["size"]["integer_variables"] == 2  # type: ignore[index]
    assert set(record["timing_s"]) >= {"build_s", "translate_s", "total_s"}  # type: ignore[arg-type]


def test_time_limit_returns_the_incumbent_and_its_gap() -> None:
    from optimizer.synthetic import dynamollm_instance

    # explicit clocks: 180 integer columns that HiGHS cannot close to 1e-9 in a second
    inputs = dynamollm_instance(clock_mode="explicit")
    inputs = replace(inputs, solver=replace(inputs.solver, time_limit_s=1.0, mip_gap=1e-9))
    solution = solve_layout(inputs)
    record = solution.solver
    assert record["status"] == "feasible"
    assert record["termination"] in ("maxTimeLimit", "interruptedByDeadline")
    assert record["gap"] is not None and record["gap"] > 0
    assert record["bound"] <= record["objective"]  # type: ignore[operator]
    assert solution.layout.items and solution.prediction.gpus <= 320


def test_invalid_inputs_name_the_offending_keys() -> None:
    with pytest.raises(PlanInputError) as err:
        solve_layout(
            _inputs(
                demand_rps={("chat", "XX"): 1.0, ("mail", "MM"): -1.0, ("chat", "MM"): math.nan},
                gpu_inventory={GPU: 8, "B200": 8},
            )
        )
    message = str(err.value)
    assert "unknown request type 'XX'" in message
    assert "service 'mail' has no model" in message
    assert "demand_rps('mail', 'MM')=-1.0 must be a finite number >= 0" in message
    assert "demand_rps('chat', 'MM')=nan must be a finite number >= 0" in message
    assert "unknown GPU type 'B200'" in message


def test_domains_must_hold_the_whole_inventory() -> None:
    with pytest.raises(PlanInputError, match="power_domains hold 4 H100-80GB GPUs but"):
        solve_layout(_inputs(power_domains=(PowerDomain("row", 1e6, {GPU: 4}),)))


def test_target_utilization_scales_the_sized_load_and_refuses_bad_values() -> None:
    assert sized_demand_rps(8.5, 1.0) == 8.5
    assert sized_demand_rps(8.5, 0.85) == pytest.approx(10.0)
    for bad in (0.0, -0.5, 1.2, math.nan):
        with pytest.raises(PlanInputError, match="target_utilization"):
            sized_demand_rps(8.5, bad)

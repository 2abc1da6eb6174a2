"""Per-service decomposition: the Lagrangian bound is valid, the combined plan feasible."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace

import numpy as np
import pytest
from pyomo.contrib.solver.solvers.highs import Highs

import optimizer.solve
from optimizer.bridge import matrix_form, relaxation, solver_index
from optimizer.catalog import build_catalog
from optimizer.decompose import decompose
from optimizer.heuristic import _Counts, _cover, _Item, rounded_start
from optimizer.inputs import PlanInputs, PowerDomain, Reconfiguration, SolverOptions
from optimizer.model import build_model
from optimizer.solve import solve_layout
from wattplan.domain import Layout, LayoutItem, Profile, ServingConfig

GPU = "H100-80GB"


def _profile(config: ServingConfig, capacity: float, idle_w: float, full_w: float) -> Profile:
    curve = ((0.0, idle_w), (capacity * 0.5, idle_w + 0.7 * (full_w - idle_w)), (capacity, full_w))
    return Profile(config, "MM", capacity, curve, 0.1, 0.02, 1.0, 0.1, "test", "hand")


def _services(seed: int, gpus_per_rps: float = 0.26) -> PlanInputs:
    """Four services on two shapes in two power domains whose GPU rows bind.

    TP2 (0.5 GPU per rps) spends less energy than TP4 (0.38 GPU per rps); with about 0.52
    GPUs per rps in all, the GPU rows bind in the LP relaxation (nonzero duals).
    """
    rng = np.random.default_rng(seed)
    tp2, tp4 = ServingConfig("m", GPU, 2, 700), ServingConfig("m", GPU, 4, 700)
    profiles = (_profile(tp2, 4.0, 100.0, 500.0), _profile(tp4, 10.5, 900.0, 1500.0))
    demand = {(f"s{k}", "MM"): round(float(rng.uniform(8.0, 20.0)), 3) for k in range(4)}
    mean = {k: round(0.4 * v, 3) for k, v in demand.items()}
    current = Layout(
        tuple(LayoutItem(f"s{k}", "MM", tp2, int(rng.integers(0, 3))) for k in range(4))
    )
    gpus = math.ceil(gpus_per_rps * sum(demand.values()))  # per domain
    budget = 2000.0 * gpus  # W per domain, does not bind
    return PlanInputs(
        window_s=1800,
        demand_rps=demand,
        mean_rps=mean,
        service_models={f"s{k}": "m" for k in range(4)},
        profiles=profiles,
        gpu_inventory={GPU: 2 * gpus},
        current=Layout(tuple(i for i in current.items if i.instances)),
        reconfiguration=Reconfiguration(startup_s=300.0, reshard_s=60.0, clock_change_s=1.0),
        power_domains=(
            PowerDomain("row-a", budget, {GPU: gpus}),
            PowerDomain("row-b", budget, {GPU: gpus}),
        ),
        solver=SolverOptions(mip_gap=1e-9, time_limit_s=30.0),
    )


@pytest.mark.parametrize("seed", range(4))
def test_lagrangian_bound_lies_below_the_optimum_and_the_combined_plan_is_feasible(
    seed: int,
) -> None:
    inputs = _services(seed)
    optimum = solve_layout(inputs).solver["objective"]
    cat = build_catalog(inputs)
    m = build_model(inputs, cat)
    opt = Highs()
    opt.set_instance(m)
    index = solver_index(opt, m, cat)
    form = matrix_form(opt._solver_model)  # noqa: SLF001
    relaxed = relaxation(form, 1, 0)
    relaxed.run()
    lp_bound = relaxed.getInfo().objective_function_value + form.offset
    solution = relaxed.getSolution()
    lp_x, duals = np.array(solution.col_value), np.array(solution.row_dual)
    rounding = rounded_start(cat, index, form, relaxed)
    assert rounding.candidates
    found = decompose(
        cat,
        index,
        form,
        lp_x,
        duals,
        rounding.candidates,
        deadline=time.perf_counter() + 10.0,
        share=1.0,
        gap=1e-9,
    )
    assert found.services == 4
    assert found.bound is not None
    assert lp_bound - 1e-7 <= found.bound <= optimum + 1e-7  # type: ignore[operator]
    assert found.start is not None
    assert not form.violations(found.start.x).any()
    assert found.start.objective >= optimum - 1e-7  # type: ignore[operator]


def test_a_solve_through_the_decomposition_keeps_a_valid_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = _services(1)
    optimum = solve_layout(inputs).solver["objective"]
    monkeypatch.setattr(optimizer.solve, "DECOMPOSE_MIN_INTEGER_COLUMNS", 0)
    record = solve_layout(replace(inputs, solver=replace(inputs.solver, mip_gap=0.01))).solver
    assert "decomposition" in record["start"]  # type: ignore[operator]
    assert record["bound"] <= optimum + 1e-7  # type: ignore[operator]
    assert record["objective"] >= optimum - 1e-7  # type: ignore[operator]
    assert record["gap"] is not None and record["gap"] <= 0.01 + 1e-12  # type: ignore[operator]


def _brute_cover(items: list[_Item], residual: float, spill: float, most: int) -> float:
    best = math.inf
    ranges = [range(min(most, i.room, math.ceil(residual / i.capacity - 1e-9)) + 1) for i in items]
    for ks in itertools.product(*ranges):
        covered = sum(k * i.capacity for k, i in zip(ks, items, strict=True))
        cost = sum(k * i.cost for k, i in zip(ks, items, strict=True))
        left = max(residual - covered, 0.0)
        if left > 1e-7:
            cost += left * spill
        best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_residual_cover_is_the_least_priced_combination(seed: int) -> None:
    rng = np.random.default_rng(seed)
    inputs = _services(0)
    cat = build_catalog(inputs)
    column = cat.columns[0]
    counts = _Counts.__new__(_Counts)
    counts.start_cost = lambda c, k=1: 0.0  # type: ignore[method-assign]  # no start costs here
    items = [
        _Item(
            ("s", "MM", str(k)),
            float(rng.uniform(0.1, 8.0)),
            float(rng.uniform(0.05, 2.0)),
            int(rng.integers(1, 5)),
            column,
        )
        for k in range(4)
    ]
    residual = float(rng.uniform(0.05, 9.0))
    spill = float(rng.uniform(0.05, 1.0)) if seed % 2 else math.inf
    choice, spilled = _cover(items, residual, spill, counts)  # type: ignore[arg-type]
    by_option = {i.option: i for i in items}
    cost = sum(k * by_option[o].cost for o, k in choice.items())
    covered = sum(k * by_option[o].capacity for o, k in choice.items())
    assert spilled == pytest.approx(max(residual - covered, 0.0), abs=1e-9)
    if spilled > 1e-7:
        cost += spilled * spill
    assert cost == pytest.approx(_brute_cover(items, residual, spill, 3), rel=1e-9)

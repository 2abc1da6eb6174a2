"""Solve the layout MILP with HiGHS and turn the solution into domain types."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import pyomo.environ as pyo
from pyomo.contrib.solver.common.results import SolutionStatus, TerminationCondition
from pyomo.contrib.solver.solvers.highs import Highs

from optimizer.inputs import PlanInputs
from optimizer.model import build_model, slot_table
from wattplan.domain import Layout, LayoutItem, PlanPrediction
from wattplan.errors import InfeasiblePlanError, SolverError

_INFEASIBLE = {
    TerminationCondition.provenInfeasible,
    TerminationCondition.locallyInfeasible,
    TerminationCondition.infeasibleOrUnbounded,
}


@dataclass(frozen=True)
class Solution:
    """A solved layout with its predicted figures and the solver's record."""

    layout: Layout
    prediction: PlanPrediction
    solver: dict[str, object]


def solve_layout(inputs: PlanInputs) -> Solution:
    """Build and solve the model; return the layout HiGHS found.

    Raises:
        PlanInputError: the inputs are invalid (raised by validation, before solving).
        InfeasiblePlanError: no layout carries the demand within inventory.
        SolverError: HiGHS stopped without a usable solution.
    """
    started = time.perf_counter()
    m = build_model(inputs)
    build_s = time.perf_counter() - started
    opts = inputs.solver
    highs = Highs()
    if not highs.available():
        raise SolverError("HiGHS is not available: install highspy")
    results = highs.solve(
        m,
        time_limit=opts.time_limit_s,
        rel_gap=opts.mip_gap,
        threads=opts.threads,
        solver_options={"random_seed": opts.random_seed},
        raise_exception_on_nonoptimal_result=False,
        load_solutions=False,
    )
    solve_s = time.perf_counter() - started - build_s
    term = results.termination_condition
    if term in _INFEASIBLE:
        raise InfeasiblePlanError(
            "no layout carries the forecast load within the GPU inventory "
            f"({dict(inputs.gpu_inventory)}); the current layout stays. Raise the inventory "
            "or check the forecast and profiles."
        )
    if results.solution_status not in (SolutionStatus.optimal, SolutionStatus.feasible):
        raise SolverError(f"HiGHS stopped with {term.name} and no solution after {solve_s:.1f} s")
    results.solution_loader.load_vars()

    table = slot_table(inputs)
    items = []
    for s in m.SLOTS:
        n = round(pyo.value(m.v_instances[s]))
        if n <= 0:
            continue
        items.append(
            LayoutItem(
                service=s[0],
                request_type=s[1],
                config=table[s].profile.config,
                instances=n,
                load_rps=max(0.0, float(pyo.value(m.v_load_rps[s]))),
            )
        )
    layout = Layout(tuple(items))
    headrooms = [
        1.0
        - item.load_rps
        / (
            table[(item.service, item.request_type, item.config.key)].profile.capacity_rps
            * item.instances
        )
        for item in items
    ]
    current = inputs.current.instances_by_slot()
    planned = layout.instances_by_slot()
    slots = set(current) | set(planned)
    bound = results.objective_bound
    incumbent = results.incumbent_objective
    gap = (
        abs(incumbent - bound) / max(abs(incumbent), 1e-9)
        if incumbent is not None and bound is not None and math.isfinite(bound)
        else None
    )
    prediction = PlanPrediction(
        energy_kwh=float(pyo.value(m.e_energy_kwh)),
        carbon_g=float(pyo.value(m.e_cost_carbon_kg)) * 1000.0,
        cost_usd=float(pyo.value(m.e_cost_cost_usd)),
        gpus=layout.gpus,
        peak_power_w=float(pyo.value(m.e_peak_power_w)),
        min_slo_headroom=min(headrooms, default=1.0),
        instances_started=sum(max(0, planned.get(k, 0) - current.get(k, 0)) for k in slots),
        instances_stopped=sum(max(0, current.get(k, 0) - planned.get(k, 0)) for k in slots),
    )
    solver = {
        "solver": "highs",
        "options": asdict(opts),
        "termination": term.name,
        "objective": incumbent,
        "bound": bound,
        "gap": gap,
        "build_s": round(build_s, 4),
        "solve_s": round(solve_s, 4),
        "variables": m.nvariables(),
        "constraints": m.nconstraints(),
    }
    return Solution(layout, prediction, solver)

"""Solve the layout MILP with HiGHS and turn the solution into a plan.

Steps (timings of each land in the solver record): validate, build the catalog, build the
Pyomo model, translate it once into HiGHS (Pyomo's persistent interface), solve the LP
relaxation and round it into a feasible start (:mod:`optimizer.heuristic`), then run the
MIP from that start under a wall-clock guard. When the start is already within the MIP gap
of the LP bound the MIP run is skipped. When no layout carries the demand, a second model
with shortfall variables finds the plan that carries the most (lexicographically: least
relative shortfall, then least cost), returned inside :class:`CapacityShortfallError`.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import highspy
import numpy as np
import pyomo
import pyomo.environ as pyo
from pyomo.contrib.solver.common.results import Results, SolutionStatus, TerminationCondition
from pyomo.contrib.solver.solvers.highs import Highs

from optimizer.bridge import MatrixForm, SolverIndex, matrix_form, relaxation, solver_index
from optimizer.catalog import Catalog, build_catalog
from optimizer.decompose import decompose
from optimizer.heuristic import Start, rounded_start
from optimizer.inputs import PlanInputs
from optimizer.model import build_model
from optimizer.result import ColumnValues, Solution, build_solution, column_values
from wattplan.errors import CapacityShortfallError, SolverError

__all__ = ["Solution", "solve_layout"]

log = logging.getLogger(__name__)

#: Below this many integer columns HiGHS alone closes the gap quickly: no decomposition.
DECOMPOSE_MIN_INTEGER_COLUMNS = 500
#: After the decomposition, HiGHS's MIP runs only if this share of the time limit is left.
MIP_AFTER_DECOMPOSITION = 0.25

_INFEASIBLE = {
    TerminationCondition.provenInfeasible,
    TerminationCondition.locallyInfeasible,
    TerminationCondition.infeasibleOrUnbounded,
}


@dataclass
class _Run:
    """What one MILP run produced."""

    status: str  # optimal | feasible | start_within_gap | infeasible | no_solution
    termination: str
    x: np.ndarray | None = None
    objective: float | None = None
    bound: float | None = None
    bound_source: str | None = None
    guard_interrupted: bool = False
    timing: dict[str, float] = field(default_factory=dict)
    start: dict[str, object] | None = None
    size: dict[str, int] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """Relative gap between incumbent and bound."""
        if self.objective is None or self.bound is None or not math.isfinite(self.bound):
            return None
        return max(0.0, self.objective - self.bound) / max(abs(self.objective), 1e-9)


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.started = time.perf_counter()
        self.at = self.started + seconds

    def left(self) -> float:
        return max(self.at - time.perf_counter(), 0.05)

    def passed(self) -> bool:
        return time.perf_counter() >= self.at


def solve_layout(inputs: PlanInputs) -> Solution:
    """Build and solve the model; return the plan for the window.

    Raises:
        PlanInputError: the inputs are invalid (raised by validation, before building).
        CapacityShortfallError: no layout carries the forecast load within inventory, power
            budgets and change cap; ``.degraded`` holds the best degraded plan.
        SolverError: HiGHS stopped without a usable solution (e.g. the time limit passed
            before any feasible layout was found).
    """
    # The Pyomo model holds about a million Python objects at fleet size: a full garbage
    # collection in the middle of the solve costs up to a second (measured). Nothing built
    # here forms reference cycles that must go before the solve ends.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _solve_layout(inputs)
    finally:
        if collecting:
            gc.enable()


def _solve_layout(inputs: PlanInputs) -> Solution:
    deadline = _Deadline(inputs.solver.time_limit_s)
    t0 = time.perf_counter()
    inputs.validate()
    catalog = build_catalog(inputs)
    catalog_s = time.perf_counter() - t0
    log.info(
        "optimizer: %d columns (%d candidates, %d pruned), %d pools, %d spill pairs",
        len(catalog.columns),
        catalog.candidates,
        catalog.pruned,
        len(catalog.nodes),
        len(catalog.edges),
    )
    m, run = _solve(inputs, catalog, deadline, degraded=False)
    run.timing["catalog_s"] = round(catalog_s, 4)
    if run.status == "infeasible":
        return _degrade(inputs, catalog, deadline, run)
    if run.x is None:
        raise SolverError(
            f"HiGHS stopped ({run.termination}) without a feasible layout after "
            f"{time.perf_counter() - t0:.1f} s; raise WATTPLAN_SOLVER_TIME_LIMIT_S "
            f"(now {inputs.solver.time_limit_s} s)"
        )
    values = _values(m, catalog, run)
    run.timing["total_s"] = round(time.perf_counter() - t0, 4)
    return build_solution(inputs, catalog, values, _record(inputs, run))


def _solve(
    inputs: PlanInputs, catalog: Catalog, deadline: _Deadline, *, degraded: bool
) -> tuple[pyo.ConcreteModel, _Run]:
    t = time.perf_counter()
    m = build_model(inputs, catalog, degraded=degraded)
    build_s = time.perf_counter() - t
    opt = Highs()
    if not opt.available():
        raise SolverError("HiGHS is not available: install highspy")
    t = time.perf_counter()
    opt.set_instance(m)
    translate_s = time.perf_counter() - t
    index = solver_index(opt, m, catalog)
    form = matrix_form(opt._solver_model)  # noqa: SLF001 (see optimizer.bridge)
    m._wattplan_solver = (opt, index, form)  # noqa: SLF001 (kept for the degraded phases)
    size = {
        "columns": len(catalog.columns),
        "candidate_columns": catalog.candidates,
        "pruned_columns": catalog.pruned,
        "pools": len(catalog.nodes),
        "spill_pairs": len(catalog.edges),
        "variables": index.num_col,
        "integer_variables": int(form.integer.sum()),
        "constraints": index.num_row,
        "nonzeros": int(form.a.nnz),
    }
    if degraded:
        run = _Run("no_solution", "not run", size=size)
        run.timing.update(build_s=round(build_s, 4), translate_s=round(translate_s, 4))
        return m, run
    run = _optimize(inputs, m, opt, index, form, deadline)
    run.size = size
    run.timing.update(build_s=round(build_s, 4), translate_s=round(translate_s, 4))
    return m, run


def _optimize(
    inputs: PlanInputs,
    m: pyo.ConcreteModel,
    opt: Highs,
    index: SolverIndex,
    form: MatrixForm,
    deadline: _Deadline,
) -> _Run:
    """LP relaxation, rounded start, then the MIP from it (skipped when close enough)."""
    options = inputs.solver
    timing: dict[str, float] = {}
    t = time.perf_counter()
    relaxed = relaxation(form, options.threads, options.random_seed)
    relaxed.setOptionValue("time_limit", deadline.left())
    relaxed.run()
    timing["lp_s"] = round(time.perf_counter() - t, 4)
    lp_status = relaxed.getModelStatus()
    if lp_status in (highspy.HighsModelStatus.kInfeasible,):
        return _Run("infeasible", "lp_relaxation_infeasible", timing=timing)
    lp_bound = None
    start: Start | None = None
    candidates: list[np.ndarray] = []
    if lp_status == highspy.HighsModelStatus.kOptimal:
        lp_bound = relaxed.getInfo().objective_function_value + form.offset
        lp_solution = relaxed.getSolution()
        lp_x, lp_duals = np.array(lp_solution.col_value), np.array(lp_solution.row_dual)
    if lp_bound is not None and options.warm_start:
        t = time.perf_counter()
        large = int(form.integer.sum()) >= DECOMPOSE_MIN_INTEGER_COLUMNS
        # at decomposition size each round's rounding is a candidate; fewer rounds suffice
        rounding = rounded_start(
            m.catalog,
            index,
            form,
            relaxed,
            rounds=2 if large else 4,
            deadline=deadline.at,
            threads=options.threads,
        )
        start, candidates = rounding.start, rounding.candidates
        timing["start_s"] = round(time.perf_counter() - t, 4)
    start_record: dict[str, object] | None = None
    bound, bound_source = lp_bound, "lp_relaxation"
    if start is not None:
        start_record = {
            "objective": start.objective,
            "lp_bound": lp_bound,
            "gap": _gap(start.objective, lp_bound),
            "tightening_rounds": start.rounds,
        }
        log.info("optimizer: rounded LP start %.6g, LP bound %.6g", start.objective, lp_bound)
    if (
        lp_bound is not None
        and candidates
        and int(form.integer.sum()) >= DECOMPOSE_MIN_INTEGER_COLUMNS
        and (start is None or _gap(start.objective, bound) > options.mip_gap)
    ):
        t = time.perf_counter()
        found = decompose(
            m.catalog,
            index,
            form,
            lp_x,
            lp_duals,
            candidates,
            deadline=deadline.at - 0.05 * options.time_limit_s,
            share=1.0,
            gap=options.mip_gap / 4,
            workers=options.threads,
            seed=options.random_seed,
        )
        timing["decompose_s"] = round(time.perf_counter() - t, 4)
        if found.bound is not None and (bound is None or found.bound > bound):
            bound, bound_source = found.bound, "lagrangian"
        if found.start is not None and (start is None or found.start.objective < start.objective):
            start = found.start
        start_record = {
            **(start_record or {}),
            "decomposition": {
                "services": found.services,
                "solved_to_gap": found.solved_to_gap,
                "bound": found.bound,
                "objective": found.start.objective if found.start else None,
                "timing_s": found.timing,
            },
        }
        log.info(
            "optimizer: decomposition bound %s, plan %s",
            found.bound,
            found.start.objective if found.start else None,
        )
    if start is not None and bound is not None and _gap(start.objective, bound) <= options.mip_gap:
        return _Run(
            "start_within_gap",
            "start_within_gap",
            start.x,
            start.objective,
            bound,
            bound_source,
            timing=timing,
            start=start_record,
        )
    if (
        start is not None
        and "decompose_s" in timing
        and deadline.left() < MIP_AFTER_DECOMPOSITION * options.time_limit_s
    ):
        # at decomposition size HiGHS spends its first seconds in the root cut loop: a short
        # MIP run after the decomposition changes neither plan nor bound (measured)
        return _Run(
            "feasible",
            "maxTimeLimit",
            start.x,
            start.objective,
            bound,
            bound_source,
            timing=timing,
            start=start_record,
        )
    run = _run_mip(opt, m, inputs, deadline, start)
    run.timing.update(timing)
    run.start = start_record
    if bound is not None and (run.bound is None or bound > run.bound):
        run.bound, run.bound_source = bound, bound_source
    if run.x is None and start is not None and run.status != "infeasible":
        run.status, run.x, run.objective = "feasible", start.x, start.objective
    elif start is not None and run.objective is not None and start.objective < run.objective:
        run.x, run.objective = start.x, start.objective
    return run


def _gap(objective: float, bound: float | None) -> float:
    """Relative gap of ``objective`` over ``bound`` (infinite without a bound)."""
    if bound is None or not math.isfinite(bound):
        return math.inf
    return max(0.0, objective - bound) / max(abs(objective), 1e-9)


def _run_mip(
    opt: Highs,
    m: pyo.ConcreteModel,
    inputs: PlanInputs,
    deadline: _Deadline,
    start: Start | None,
) -> _Run:
    """One HiGHS MIP run from ``start`` with a wall-clock guard; values stay in HiGHS."""
    options = inputs.solver
    highs = opt._solver_model  # noqa: SLF001 (see optimizer.bridge)
    if start is not None:
        solution = highspy.HighsSolution()
        solution.col_value = list(start.x)
        solution.value_valid = True
        highs.setSolution(solution)
    interrupted = {"fired": False}

    def guard(event: highspy.HighsCallbackEvent) -> None:
        # HiGHS checks its own time limit only between some phases (STACK_NOTES.md): stop
        # it from the inside once the wall clock passes the deadline.
        if deadline.passed():
            interrupted["fired"] = True
            event.interrupt()

    # Pyomo warns about HiGHS's interrupt status, which here is our own guard stopping it
    pyomo_log = logging.getLogger("pyomo.contrib.solver.solvers.highs")
    level = pyomo_log.level
    pyomo_log.setLevel(logging.ERROR)
    highs.cbMipInterrupt.subscribe(guard)
    highs.cbSimplexInterrupt.subscribe(guard)  # cut loops run long LPs between MIP polls
    t = time.perf_counter()
    try:
        results: Results = opt.solve(
            m,
            # HiGHS polls its limit (and our guard) only between some steps: leave it a margin
            time_limit=deadline.left() * 0.85,
            rel_gap=options.mip_gap,
            threads=options.threads,
            solver_options={"random_seed": options.random_seed, **options.highs_options},
            raise_exception_on_nonoptimal_result=False,
            load_solutions=False,
        )
    finally:
        highs.cbMipInterrupt.unsubscribe(guard)
        highs.cbSimplexInterrupt.unsubscribe(guard)
        pyomo_log.setLevel(level)
    mip_s = time.perf_counter() - t
    term = results.termination_condition
    # Pyomo maps HiGHS's kInterrupt (our guard) to "unknown": name it
    name = "interruptedByDeadline" if interrupted["fired"] else term.name
    run = _Run("no_solution", name, guard_interrupted=interrupted["fired"])
    run.timing["mip_s"] = round(mip_s, 4)
    if term in _INFEASIBLE:
        run.status = "infeasible"
        return run
    if results.solution_status in (SolutionStatus.optimal, SolutionStatus.feasible):
        run.status = (
            "optimal" if term == TerminationCondition.convergenceCriteriaSatisfied else "feasible"
        )
        run.x = np.array(highs.getSolution().col_value)
        run.objective = results.incumbent_objective
    run.bound = results.objective_bound
    run.bound_source = "highs"
    return run


def _values(m: pyo.ConcreteModel, catalog: Catalog, run: _Run) -> ColumnValues:
    """Per-column values of the run's solution vector."""
    _, index, _ = m._wattplan_solver  # noqa: SLF001
    x = run.x
    assert x is not None
    columns: dict[str, object] = {
        "v_instances": index.instances,
        "v_load_rps": index.load,
        "v_mean_load_rps": index.mean_load,
        "v_spill_rps": index.spill,
    }
    return column_values(catalog, lambda name, i: float(x[columns[name][i]]))  # type: ignore[index]


def _record(inputs: PlanInputs, run: _Run, **extra: object) -> dict[str, object]:
    """The solver record stored with the plan."""
    return {
        "solver": "highs",
        "highs_version": ".".join(str(v) for v in Highs().version()),
        "pyomo_version": pyomo.version.version,
        "options": {**asdict(inputs.solver), "highs_options": dict(inputs.solver.highs_options)},
        "weights": asdict(inputs.weights),
        "reconfiguration": asdict(inputs.reconfiguration),
        "status": run.status,
        "termination": run.termination,
        "objective": run.objective,
        "bound": run.bound,
        "bound_source": run.bound_source,
        "gap": run.gap,
        "guard_interrupted": run.guard_interrupted,
        "start": run.start,
        "timing_s": run.timing,
        "size": run.size,
        **extra,
    }


def _degrade(inputs: PlanInputs, catalog: Catalog, deadline: _Deadline, failed: _Run) -> Solution:
    """Best degraded plan: least relative shortfall, then least cost; raised as an error."""
    log.warning("optimizer: demand exceeds capacity (%s); planning degraded", failed.termination)
    m, run = _solve(inputs, catalog, deadline, degraded=True)
    opt, _, _ = m._wattplan_solver  # noqa: SLF001
    m.objective.deactivate()
    m.shortfall_objective.activate()
    first = _run_mip(opt, m, inputs, deadline, None)
    if first.x is None:
        raise CapacityShortfallError(
            "demand exceeds what the GPU inventory, power budgets and change cap can carry, "
            f"and no degraded plan was found in time ({first.termination}); the current "
            "layout stays",
            degraded=None,
        )
    least = _least_shortfall(m, first.x)
    m.c_least_shortfall = pyo.Constraint(
        expr=m.shortfall_objective.expr <= least * (1 + 1e-7) + 1e-7
    )
    m.shortfall_objective.deactivate()
    m.objective.activate()
    second = _run_mip(opt, m, inputs, deadline, Start(first.x, 0.0, 0))
    best = second if second.x is not None else first
    assert best.x is not None
    values = _values(m, catalog, best)
    x = best.x
    shortfall = {
        node: float(x[opt._pyomo_var_to_solver_var_map[id(v)]])  # noqa: SLF001
        for node, v in m.v_shortfall_rps.items()
    }
    best.timing.update(run.timing)
    best.size = run.size
    record = _record(
        inputs,
        best,
        degraded={"least_relative_shortfall": least, "first_phase": first.termination},
    )
    solution = build_solution(
        inputs, catalog, values, record, degraded=True, shortfall_rps=shortfall
    )
    missing = {f"{s}/{t}": round(v, 4) for (s, t), v in shortfall.items() if v > 1e-6}
    raise CapacityShortfallError(
        "demand exceeds what the GPU inventory, power budgets and change cap can carry: "
        f"uncarried load (rps) {missing}; a degraded plan carrying the rest is attached "
        "(never auto-approved). Raise the inventory or budgets, or check the forecast.",
        degraded=solution,
    )


def _least_shortfall(m: pyo.ConcreteModel, x: np.ndarray) -> float:
    """Value of ``m.shortfall_objective`` at solver vector ``x``."""
    opt, _, _ = m._wattplan_solver  # noqa: SLF001
    var_map = opt._pyomo_var_to_solver_var_map  # noqa: SLF001
    cat: Catalog = m.catalog
    return sum(x[var_map[id(m.v_shortfall_rps[n])]] / cat.demand_rps[n] for n in m.LOADED_NODES)

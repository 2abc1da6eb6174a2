"""Where the Pyomo model's variables and rows sit in the HiGHS instance Pyomo built from it.

Pyomo's persistent HiGHS interface (``pyomo.contrib.solver.solvers.highs.Highs``) translates
the model once into a ``highspy.Highs`` object; the warm start and the LP relaxation work on
that object and its matrix, so the translation (the slow part at fleet size) happens once.
The interface keeps its maps from Pyomo components to HiGHS indexes in private attributes
(pyomo 6.10, pinned in constraints.txt); this module is the only place that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import highspy
import numpy as np
import pyomo.environ as pyo
import scipy.sparse as sp
from pyomo.contrib.solver.solvers.highs import Highs

from optimizer.catalog import Catalog


@dataclass(frozen=True)
class SolverIndex:
    """HiGHS column and row numbers of the model's components (-1: not in the instance).

    Attributes:
        instances: Column of ``v_instances[i]`` per catalog column ``i``.
        load: Column of ``v_load_rps[i]``.
        mean_load: Column holding the mean load of ``i`` (``load`` when mean == peak).
        segments: Column of ``v_segment_rps[i, j]`` per segmented column.
        spill: Column of ``v_spill_rps[e]`` per spill pair.
        started: Column of ``v_started[k]`` per transition group.
        stopped: Column of ``v_stopped[k]`` per finest transition group (stagger cap only).
        shared_rows: Rows that couple services: GPU inventory, GPU limit, peak power,
            change cap.
        power_rows: Row of each power domain's peak-power row.
        num_col: Columns in the instance.
        num_row: Rows in the instance.
    """

    instances: np.ndarray
    load: np.ndarray
    mean_load: np.ndarray
    segments: dict[tuple[int, int], int]
    spill: dict[tuple[str, str, str], int]
    started: np.ndarray
    stopped: dict[int, int]
    shared_rows: np.ndarray
    power_rows: dict[str, int]
    num_col: int
    num_row: int


def solver_index(opt: Highs, m: pyo.ConcreteModel, catalog: Catalog) -> SolverIndex:
    """Map the model's components to the HiGHS instance ``opt`` holds after ``set_instance``.

    Args:
        opt: The persistent interface, ``set_instance(m)`` done.
        m: The model built by :func:`optimizer.model.build_model`.
        catalog: Its catalog.
    """
    var_map: dict[int, int] = opt._pyomo_var_to_solver_var_map  # noqa: SLF001 (see module doc)
    con_map = opt._pyomo_con_to_solver_con_map  # noqa: SLF001

    def col(v: pyo.Var) -> int:
        return var_map.get(id(v), -1)

    n = len(catalog.columns)
    instances = np.array([col(m.v_instances[i]) for i in range(n)], dtype=np.int64)
    load = np.array([col(m.v_load_rps[i]) for i in range(n)], dtype=np.int64)
    mean = (
        load
        if catalog.same_mean
        else np.array([col(m.v_mean_load_rps[i]) for i in range(n)], dtype=np.int64)
    )
    segments = {key: col(v) for key, v in m.v_segment_rps.items()}
    spill = {key: col(v) for key, v in m.v_spill_rps.items()}
    started = np.array([col(m.v_started[k]) for k in m.TRANSITION_GROUPS], dtype=np.int64)
    stopped = {k: col(v) for k, v in m.v_stopped.items()} if hasattr(m, "v_stopped") else {}
    shared: list[int] = []
    for name in ("c_gpu_inventory", "c_peak_power", "c_gpu_limit", "c_max_changes"):
        component = getattr(m, name, None)
        if component is None:
            continue
        shared += [con_map[c] for c in component.values() if c in con_map]
    power_rows = {d: con_map[c] for d, c in m.c_peak_power.items() if c in con_map}
    return SolverIndex(
        instances,
        load,
        mean,
        segments,
        spill,
        started,
        stopped,
        np.array(sorted(shared), dtype=np.int64),
        power_rows,
        opt._solver_model.getNumCol(),  # noqa: SLF001
        opt._solver_model.getNumRow(),  # noqa: SLF001
    )


@dataclass(frozen=True)
class MatrixForm:
    """The instance as arrays: ``min c x + offset`` s.t. ``rl <= A x <= ru``, ``cl <= x <= cu``."""

    a: sp.csr_matrix
    cost: np.ndarray
    offset: float
    col_lower: np.ndarray
    col_upper: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    integer: np.ndarray  # bool per column
    lp: highspy.HighsLp

    def violations(self, x: np.ndarray, tol: float = 1e-6) -> np.ndarray:
        """Per row, how far ``A x`` lies outside its bounds (0 inside), scaled tolerance."""
        activity = self.a @ x
        scale = 1.0 + np.abs(activity)
        over = np.maximum(activity - self.row_upper, 0.0)
        under = np.maximum(self.row_lower - activity, 0.0)
        gap = np.maximum(over, under)
        return np.where(gap > tol * scale, gap, 0.0)

    def objective(self, x: np.ndarray) -> float:
        """``c x + offset``."""
        return float(self.cost @ x + self.offset)


def matrix_form(highs: highspy.Highs) -> MatrixForm:
    """Read the instance's LP data out of HiGHS."""
    lp = highs.getLp()
    matrix = lp.a_matrix_
    data = (np.array(matrix.value_), np.array(matrix.index_), np.array(matrix.start_))
    shape = (lp.num_row_, lp.num_col_)
    if matrix.format_ == highspy.MatrixFormat.kRowwise:
        a = sp.csr_matrix(data, shape=shape)
    else:
        a = sp.csc_matrix(data, shape=shape).tocsr()
    integrality = list(lp.integrality_)
    integer = np.array(
        [t == highspy.HighsVarType.kInteger for t in integrality] or [False] * lp.num_col_
    )
    return MatrixForm(
        a,
        np.array(lp.col_cost_),
        float(lp.offset_),
        np.array(lp.col_lower_),
        np.array(lp.col_upper_),
        np.array(lp.row_lower_),
        np.array(lp.row_upper_),
        integer,
        lp,
    )


def relaxation(form: MatrixForm, threads: int, seed: int) -> highspy.Highs:
    """A new HiGHS instance holding the LP relaxation (integrality dropped), not yet run."""
    lp = form.lp
    integrality = lp.integrality_
    lp.integrality_ = []
    relaxed = highspy.Highs()
    relaxed.setOptionValue("output_flag", False)
    relaxed.setOptionValue("threads", threads)
    relaxed.setOptionValue("random_seed", seed)
    relaxed.passModel(lp)
    lp.integrality_ = integrality
    return relaxed

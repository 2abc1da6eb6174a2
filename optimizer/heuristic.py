"""A feasible start for HiGHS: the LP relaxation rounded pool by pool (docs/optimizer.md).

At fleet size HiGHS on its own finds no feasible layout for a long time (STACK_NOTES.md),
while the LP relaxation is within a few percent of the optimum. So this module decides only
the integer instance counts and leaves everything continuous to the LP:

1. solve the LP relaxation; its duals price the shared GPU and power rows;
2. per service, visit pools from the smallest request type up; round each serving shape's
   LP instance count down; carry what is left of the pool's LP load by the least priced
   combination (energy, GPU price, shared-row prices, start costs) of up to three more
   instances of each shape and spill of the rest to the cheapest larger pool of the service
   (an exact search, :func:`_cover`, where a greedy choice covered small remainders with
   several tiny instances);
3. place each shape's instances in its power domains, most power-hungry first, always in
   the domain with the most power headroom left;
4. fix the counts and re-solve the LP: loads, spill, mean loads and start counts come out
   optimal for those counts. The LP with the shared rows left free is a *candidate* for
   :mod:`optimizer.decompose` (feasible for every service's own rows); if a power row is
   over its budget, the relaxation's power rows are lowered by the excess and the rounding
   repeated.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import highspy
import numpy as np

from optimizer.bridge import MatrixForm, SolverIndex, relaxation
from optimizer.catalog import Catalog, Column
from wattplan.domain import REQUEST_TYPES

Option = tuple[str, str, str]  # (service, request type, config key): a shape across domains


@dataclass(frozen=True)
class Start:
    """A feasible solution vector, its objective and how it was found."""

    x: np.ndarray
    objective: float
    rounds: int


@dataclass
class Rounding:
    """What :func:`rounded_start` found.

    Attributes:
        start: A solution feasible for every row, or ``None``.
        candidates: Per round, the rounded counts with the loads the LP gives them when the
            power rows are left free: feasible for every row of each service, possibly over
            a power budget (:mod:`optimizer.decompose` combines them per service).
    """

    start: Start | None = None
    candidates: list[np.ndarray] = field(default_factory=list)


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a . b`` without BLAS.

    OpenBLAS runs long dot products on its own threads, which on a busy machine right after
    a HiGHS run stalled for up to a second (measured on the fleet instance); an elementwise
    product and sum stays on this thread.
    """
    return float(np.multiply(a, b).sum())


def objective(form: MatrixForm, x: np.ndarray) -> float:
    """The instance's objective at ``x`` (``c x + offset``), computed with :func:`dot`."""
    return dot(form.cost, x) + form.offset


def _type_rank(rtype: str) -> int:
    """Visiting order of types: sum of class positions, so smaller types come first (LC,
    which exchanges no load, last)."""
    if rtype not in REQUEST_TYPES:
        return 10
    return "SML".index(rtype[0]) + "SML".index(rtype[1])


class _Counts:
    """Integer counts per shape option, with the start-cost bookkeeping per group."""

    def __init__(self, cat: Catalog, index: SolverIndex, priced: np.ndarray) -> None:
        self.cat = cat
        self.index = index
        self.priced = priced
        self.position = {key: k for k, key in enumerate(group_keys(cat))}
        self.groups: dict[int, float] = defaultdict(float)
        self.count: dict[Option, int] = {}

    def _units(self, level: int, column: Column) -> int:
        return column.gpus if self.cat.levels[level].in_gpus else 1

    def add(self, option: Option, column: Column, instances: int) -> None:
        """Record ``instances`` more of ``option`` (``column`` is any of its columns)."""
        self.count[option] = self.count.get(option, 0) + instances
        for level, group in enumerate(column.groups):
            self.groups[self.position[(level, group)]] += instances * self._units(level, column)

    def start_cost(self, column: Column, instances: int = 1) -> float:
        """Priced start cost of ``instances`` more of ``column`` given the counts so far."""
        cost = 0.0
        for level, group in enumerate(column.groups):
            k = self.position[(level, group)]
            applied = self.cat.levels[level].current.get(group, 0)
            units = self._units(level, column) * instances
            extra = max(0.0, self.groups[k] + units - max(applied, self.groups[k]))
            cost += self.priced[self.index.started[k]] * extra
        return cost


def group_keys(cat: Catalog) -> list[tuple[int, tuple]]:
    """Transition groups in the model's order (``m.transition_groups``)."""
    keys = {(level, group) for c in cat.columns for level, group in enumerate(c.groups)}
    return sorted(keys, key=repr)


def decide_counts(
    cat: Catalog,
    index: SolverIndex,
    form: MatrixForm,
    lp_x: np.ndarray,
    duals: np.ndarray,
) -> dict[Option, int]:
    """Integer instance count per shape option (summed over domains) from an LP solution.

    Args:
        cat: The catalog.
        index: Solver positions of the model's components.
        form: The instance's matrix form.
        lp_x: LP relaxation column values.
        duals: LP relaxation row duals (HiGHS signs).
    """
    rows = index.shared_rows
    priced = form.cost - (form.a[rows].T @ duals[rows] if len(rows) else 0.0)
    options: dict[Option, list[Column]] = defaultdict(list)
    for c in cat.columns:
        options[(c.service, c.request_type, c.config.key)].append(c)
    by_pool: dict[tuple[str, str], list[Option]] = defaultdict(list)
    for opt in options:
        by_pool[(opt[0], opt[1])].append(opt)
    counts = _Counts(cat, index, priced)
    pairs = set(cat.edges)  # the spill the model allows
    lp_n = {o: sum(lp_x[index.instances[c.index]] for c in cs) for o, cs in options.items()}
    for opt, cs in options.items():
        counts.add(opt, cs[0], math.floor(lp_n[opt] + 1e-6))
    load = {
        pool: sum(lp_x[index.load[c.index]] for o in opts for c in options[o])
        for pool, opts in by_pool.items()
    }

    def cheapest(opts: list[Option], residual: float) -> tuple[Option | None, float]:
        best, best_value = None, math.inf
        for o in opts:
            if counts.count[o] + 1 > sum(c.upper_bound for c in options[o]):
                continue
            c = min(options[o], key=lambda c: priced[index.instances[c.index]])
            covered = min(c.envelope.capacity_rps, residual)
            value = (priced[index.instances[c.index]] + counts.start_cost(c)) / covered
            if value < best_value:
                best, best_value = o, value
        return best, best_value

    # smaller types first: a remainder too small to pay for an instance moves up (spill)
    for pool in sorted(by_pool, key=lambda p: (p[0], _type_rank(p[1]), p[1])):
        opts = by_pool[pool]
        residual = load[pool] - sum(
            counts.count[o] * options[o][0].envelope.capacity_rps for o in opts
        )
        if residual <= 1e-7:
            continue
        # what the remainder costs per rps in the cheapest pool it may spill to
        spill_to, spill_value = None, math.inf
        for other in by_pool:
            if (pool[0], pool[1], other[1]) not in pairs or other[0] != pool[0]:
                continue
            o, value = cheapest(by_pool[other], math.inf)
            if o is not None and value < spill_value:
                spill_to, spill_value = other, value
        choice, spilled = _cover(
            [
                _Item(
                    o,
                    options[o][0].envelope.capacity_rps,
                    min(priced[index.instances[c.index]] for c in options[o]),
                    sum(c.upper_bound for c in options[o]) - counts.count[o],
                    options[o][0],
                )
                for o in opts
            ],
            residual,
            spill_value,
            counts,
        )
        for o, k in choice.items():
            counts.add(o, options[o][0], k)
        if spilled > 1e-7 and spill_to is not None:
            load[spill_to] += spilled
    return counts.count


@dataclass(frozen=True)
class _Item:
    """One shape option of a pool as the covering search sees it."""

    option: Option
    capacity: float
    cost: float  # priced cost of one instance (without start costs)
    room: int  # instances the option's columns can still take
    column: Column


def _cover(
    items: list[_Item],
    residual: float,
    spill_value: float,
    counts: _Counts,
    most: int = 3,
) -> tuple[dict[Option, int], float]:
    """Least priced way to carry ``residual`` rps: more instances, or spill what is left.

    An exact search over up to ``most`` more instances of each option (pruned by the best
    cost per rps), where whatever the chosen instances leave uncovered spills to the
    cheapest larger pool at ``spill_value`` per rps (infinite: no spill). Counting the cost
    of every combination, not instance by instance, avoids covering a small remainder with
    several tiny instances (the greedy pitfall).

    Returns:
        Instances to add per option, and the rps left to spill.
    """
    items = [i for i in items if i.room > 0 and i.capacity > 0]
    costs = {
        (i.option, k): k * i.cost + counts.start_cost(i.column, k)
        for i in items
        for k in range(1, min(most, i.room, math.ceil(residual / i.capacity - 1e-9)) + 1)
    }
    rate = min([spill_value, *(costs[(i.option, 1)] / min(i.capacity, residual) for i in items)])
    best: tuple[float, dict[Option, int], float] = (math.inf, {}, residual)
    chosen: dict[Option, int] = {}

    def search(at: int, left: float, cost: float) -> None:
        nonlocal best
        if left <= 1e-7:
            if cost < best[0]:
                best = (cost, dict(chosen), 0.0)
            return
        if cost + left * rate >= best[0]:
            return
        if at == len(items):
            total = cost + left * spill_value
            if total < best[0]:
                best = (total, dict(chosen), left)
            return
        item = items[at]
        k = 1
        while (item.option, k) in costs:
            chosen[item.option] = k
            search(at + 1, left - k * item.capacity, cost + costs[(item.option, k)])
            k += 1
        chosen.pop(item.option, None)
        search(at + 1, left, cost)

    search(0, residual, 0.0)
    if math.isinf(best[0]):
        return {}, residual  # nothing fits: the fixed-count LP reports it
    return best[1], best[2]


def place_counts(
    cat: Catalog, counts: dict[Option, int], lp_x: np.ndarray, index: SolverIndex
) -> tuple[np.ndarray, dict[str, float]]:
    """Instances per catalog column: each option's count spread over its power domains.

    Instances go one at a time, most power-hungry shape first, into the domain with the
    most power headroom (fraction of its limit) that still has GPUs of the type (when none
    has, into the one with the most GPUs left: the counts stay whole, the GPU row fails).

    Returns:
        The count per catalog column, and the estimated peak power (W) per domain.
    """
    limit = {d.name: d.limit_w for d in cat.domains}
    gpus_left = {(d.name, g): n for d in cat.domains for g, n in d.gpus.items()}
    power = {d.name: 0.0 for d in cat.domains}
    per_column = np.zeros(len(cat.columns), dtype=np.int64)
    options: dict[Option, list[Column]] = defaultdict(list)
    for c in cat.columns:
        options[(c.service, c.request_type, c.config.key)].append(c)
    pool_load: dict[tuple[str, str], float] = defaultdict(float)
    pool_capacity: dict[tuple[str, str], float] = defaultdict(float)
    for o, cs in options.items():
        pool_load[(o[0], o[1])] += sum(lp_x[index.load[c.index]] for c in cs)
        pool_capacity[(o[0], o[1])] += counts.get(o, 0) * cs[0].envelope.capacity_rps

    def instance_w(o: Option) -> float:
        env = options[o][0].envelope
        pool = (o[0], o[1])
        rate = env.capacity_rps * min(1.0, pool_load[pool] / max(pool_capacity[pool], 1e-9))
        return env.upper_a_w + env.upper_b_w_per_rps * rate

    for o in sorted(counts, key=lambda o: (-instance_w(o), o)):
        watts = instance_w(o)
        for _ in range(counts[o]):
            room = [c for c in options[o] if per_column[c.index] < c.upper_bound]
            fits = [c for c in room if gpus_left.get((c.domain, c.gpu_type), 0) >= c.gpus]
            if not room:
                break
            if not fits:
                # over the inventory: placed anyway where most GPUs are left, so that every
                # service keeps its capacity (the GPU row then fails; optimizer.decompose
                # still uses the counts per service)
                best = max(room, key=lambda c: gpus_left.get((c.domain, c.gpu_type), 0))
            else:
                best = max(fits, key=lambda c: _headroom(limit[c.domain], power[c.domain], watts))
            per_column[best.index] += 1
            gpus_left[(best.domain, best.gpu_type)] -= best.gpus
            power[best.domain] += watts
    return per_column, power


def _headroom(limit: float | None, used: float, watts: float) -> float:
    if limit is None:
        return math.inf
    return (limit - used - watts) / limit


def rounded_start(
    cat: Catalog,
    index: SolverIndex,
    form: MatrixForm,
    relaxed: highspy.Highs,
    rounds: int = 4,
    deadline: float | None = None,
    threads: int = 1,
) -> Rounding:
    """Round the (solved) LP relaxation into a feasible start (module docstring).

    Args:
        cat: The catalog.
        index: Solver positions of the model's components.
        form: The instance's matrix form (original bounds).
        relaxed: The LP relaxation, already run once; its bounds change here.
        rounds: Times the power rows may be lowered and the LP re-solved.
        deadline: ``time.perf_counter()`` value after which no new round starts.
        threads: HiGHS threads (every HiGHS instance of a process must use the same).

    Returns:
        The :class:`Rounding`: a start feasible for every row when one was found, and the
        candidates of every round.
    """
    found = Rounding()
    cols = index.instances.astype(np.int32)
    upper = form.row_upper.copy()
    rows = np.array(sorted(index.power_rows.values()), dtype=np.int32)
    shared = index.shared_rows.astype(np.int32)
    free = np.full(len(shared), highspy.kHighsInf)
    # the counts are fixed on a copy, so that the relaxation keeps its own basis (re-solving
    # it with lowered rows from there is fast) and the copy starts from the same one
    fixer = relaxation(form, threads, 0)
    for attempt in range(rounds + 1):
        if relaxed.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return found
        solution = relaxed.getSolution()
        lp_x = np.array(solution.col_value)
        counts = decide_counts(cat, index, form, lp_x, np.array(solution.row_dual))
        per_column, _ = place_counts(cat, counts, lp_x, index)
        fixed = per_column.astype(float)
        fixer.setBasis(relaxed.getBasis())
        fixer.changeColsBounds(len(cols), cols, fixed, fixed)
        if len(shared):
            # first with the shared rows free: feasible for every service's own rows (a
            # candidate for optimizer.decompose); it says how far over its budget each power
            # row is with these counts
            fixer.changeRowsBounds(len(shared), shared, -free, free)  # type: ignore[attr-defined]
            fixer.run()
            if fixer.getModelStatus() != highspy.HighsModelStatus.kOptimal:
                return found  # a service's own rows fail: nothing to lower
            x = np.array(fixer.getSolution().col_value)
            x[cols] = fixed
            found.candidates.append(x)
            if not form.violations(x).any():
                found.start = Start(x, objective(form, x), attempt)
                return found
            fixer.changeRowsBounds(  # type: ignore[attr-defined]  # missing from highspy's stubs
                len(shared), shared, form.row_lower[shared], form.row_upper[shared]
            )
        fixer.run()  # with the rows: the loads may still fit the budgets
        if fixer.getModelStatus() == highspy.HighsModelStatus.kOptimal:
            z = np.array(fixer.getSolution().col_value)
            z[cols] = fixed
            if not form.violations(z).any():
                found.start = Start(z, objective(form, z), attempt)
                found.candidates.append(z)
                return found
        if not len(shared):
            return found
        over = np.maximum(form.a[rows] @ x - form.row_upper[rows], 0.0)
        if (
            not over.any()
            or attempt == rounds
            or (deadline is not None and time.perf_counter() > deadline)
        ):
            return found
        # the next LP leaves the excess free
        upper[rows] -= over
        relaxed.changeRowsBounds(  # type: ignore[attr-defined]
            len(rows), rows, form.row_lower[rows], upper[rows]
        )
        relaxed.run()
    return found

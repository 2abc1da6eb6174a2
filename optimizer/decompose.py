"""Per-service decomposition: a Lagrangian bound and a combined plan (docs/optimizer.md).

Services couple only through the shared rows: GPU inventory per (domain, GPU type), the
cluster GPU limit, peak power per domain and the change cap. Priced by the LP relaxation's
duals ``y`` on those rows, the MILP falls apart into one small MILP per service, and

    L(y) = sum_s min { (c - A_shared' y) x_s : x_s feasible for service s's own rows }
           + sum_r y_r b_r

is a lower bound on the optimum for any ``y`` of the right signs (Lagrangian relaxation).
Each service's MILP is solved by HiGHS under a short time limit; its *dual bound* (not its
incumbent) enters the sum, so the bound stays valid when a service stops early. With the LP
duals, ``L >= `` the LP bound up to each service's own integrality gap, which the shared LP
averages away.

Before solving, the columns of one shape in one pool that differ only by power domain are
merged when one of them is no dearer on every variable at these prices (its upper bounds
become the sum): a relaxation of the service's problem, so the bound stays valid, and it
removes symmetric copies that slow HiGHS down.

The services' solutions together may break a shared row (they only saw its price). A plan
is then combined from candidates per service (the service MILP's solution and each round
of the rounded start, :mod:`optimizer.heuristic`): a small multiple-choice MILP picks one
candidate per service so that the shared rows hold with each power domain's GPUs and budget
pooled with the domains sharing its GPU types; instances are then placed in domains and the
loads re-solved with the counts fixed. If that breaks a row the pooled rows did not see,
each pooled row is lowered by its members' excess and the choice repeated; if no choice
fits, the prices of the rows the cheapest choice breaks are raised and the services solved
again.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import highspy
import numpy as np
import scipy.sparse as sp

from optimizer.bridge import MatrixForm, SolverIndex, relaxation
from optimizer.catalog import Catalog, Column
from optimizer.heuristic import Option, Start, dot, group_keys, objective, place_counts

_INF = highspy.kHighsInf

#: A service MILP given less time than this is not run (its LP value bounds it).
MIN_SERVICE_S = 0.03
#: Times the shared rows' prices are raised when no choice of candidates fits them.
REPAIR_STEPS = 3
#: Seconds kept for combining the services' plans (measured 0.2-0.6 s at fleet size).
COMBINE_RESERVE_S = 0.6


@dataclass
class Decomposition:
    """What the decomposition found.

    Attributes:
        bound: Lagrangian lower bound (objective units), ``None`` when not run.
        start: The combined plan, feasible for every row, or ``None``.
        services: Services solved.
        solved_to_gap: Services whose MILP closed its gap (the rest stopped at the limit).
        timing: Seconds per phase.
    """

    bound: float | None = None
    start: Start | None = None
    services: int = 0
    solved_to_gap: int = 0
    timing: dict[str, float] = field(default_factory=dict)


def column_owner(cat: Catalog, index: SolverIndex) -> np.ndarray:
    """Service number (position in ``cat.services``) of every solver column, -1 for none."""
    owner = np.full(index.num_col, -1, dtype=np.int64)
    number = {s: k for k, s in enumerate(cat.services)}
    keys = group_keys(cat)  # transition groups; each key starts with its service
    pairs: list[tuple[int, str]] = []
    for c in cat.columns:
        pairs += [(int(col), c.service) for col in _variables(c, index)]
    pairs += [(col, cat.columns[i].service) for (i, _), col in index.segments.items()]
    pairs += [(col, service) for (service, _, _), col in index.spill.items()]
    pairs += [(int(col), str(keys[k][1][0])) for k, col in enumerate(index.started)]
    pairs += [(col, str(keys[k][1][0])) for k, col in index.stopped.items()]
    for col, service in pairs:
        if col >= 0:  # -1: not in the instance
            owner[col] = number[service]
    return owner


def _prices(form: MatrixForm, rows: np.ndarray, duals: np.ndarray) -> tuple[np.ndarray, float]:
    """Multipliers of the right sign for the shared rows, and ``sum_r y_r b_r``."""
    y = np.zeros(len(rows))
    constant = 0.0
    for k, r in enumerate(rows):
        d = float(duals[r])
        bound = form.row_upper[r] if d < 0 else form.row_lower[r]
        if d == 0.0 or not math.isfinite(bound):
            continue
        y[k] = d
        constant += d * bound
    return y, constant


def _variables(c: Column, index: SolverIndex) -> list[int]:
    """Solver columns of catalog column ``c``: instances, load, mean load, segments."""
    cols = [int(index.instances[c.index]), int(index.load[c.index])]
    if index.mean_load[c.index] != index.load[c.index]:
        cols.append(int(index.mean_load[c.index]))
    j = 0
    while (c.index, j) in index.segments:
        cols.append(index.segments[(c.index, j)])
        j += 1
    return cols


def _merged_upper(
    cat: Catalog, index: SolverIndex, form: MatrixForm, priced: np.ndarray
) -> tuple[np.ndarray, dict[int, int]]:
    """Column upper bounds with dominated domain copies of a shape merged into another.

    Returns:
        The upper bounds, and for each merged catalog column the one it went into.
    """
    upper = form.col_upper.copy()
    into: dict[int, int] = {}
    copies: dict[Option, list[Column]] = defaultdict(list)
    for c in cat.columns:
        copies[(c.service, c.request_type, c.config.key)].append(c)
    for cs in copies.values():
        if len(cs) < 2:
            continue
        variables = {c.index: np.array(_variables(c, index)) for c in cs}
        keep = min(cs, key=lambda c: float(priced[variables[c.index]].sum()))
        kv = variables[keep.index]
        for c in cs:
            v = variables[c.index]
            if c is keep or len(v) != len(kv) or np.any(priced[kv] > priced[v] + 1e-12):
                continue
            upper[kv] += form.col_upper[v]
            upper[v] = 0.0
            into[c.index] = keep.index
    return upper, into


@dataclass(frozen=True)
class _Service:
    cols: np.ndarray
    lp: highspy.HighsLp


def _service_models(
    form: MatrixForm,
    owner: np.ndarray,
    shared: np.ndarray,
    priced: np.ndarray,
    upper: np.ndarray,
    services: int,
) -> list[_Service] | None:
    """One HiGHS model per service (its own rows, priced costs); None if rows mix services."""
    a = form.a.tocsc()
    own = np.ones(a.shape[0], dtype=bool)
    own[shared] = False
    csr = form.a.tocsr()
    models = []
    for s in range(services):
        cols = np.flatnonzero(owner == s)
        block = a[:, cols]
        rows = np.flatnonzero(own & (np.diff(block.tocsr().indptr) > 0))
        if np.any(owner[csr[rows].indices] != s):
            return None
        block = sp.csc_matrix(block[rows])
        lp = highspy.HighsLp()
        lp.num_col_ = len(cols)
        lp.num_row_ = len(rows)
        lp.col_cost_ = priced[cols]
        lp.col_lower_ = form.col_lower[cols]
        lp.col_upper_ = upper[cols]
        lp.row_lower_ = form.row_lower[rows]
        lp.row_upper_ = form.row_upper[rows]
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = block.indptr
        lp.a_matrix_.index_ = block.indices
        lp.a_matrix_.value_ = block.data
        lp.integrality_ = [
            highspy.HighsVarType.kInteger if form.integer[c] else highspy.HighsVarType.kContinuous
            for c in cols
        ]
        models.append(_Service(cols, lp))
    return models


def _solve_service(
    service: _Service,
    start: np.ndarray | None,
    time_limit: float,
    gap: float,
    seed: int,
    threads: int,
) -> tuple[float | None, np.ndarray | None, bool]:
    """Dual bound, solution (service columns) and whether the gap closed."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", threads)  # every HiGHS instance of a process: the same
    h.setOptionValue("random_seed", seed)
    h.setOptionValue("time_limit", max(time_limit, 0.01))
    h.setOptionValue("mip_rel_gap", gap)
    h.passModel(service.lp)
    if start is not None:
        solution = highspy.HighsSolution()
        solution.col_value = list(start)
        solution.value_valid = True
        h.setSolution(solution)
    h.run()
    status = h.getModelStatus()
    if status in (
        highspy.HighsModelStatus.kInfeasible,
        highspy.HighsModelStatus.kUnboundedOrInfeasible,
    ):
        return None, None, False
    info = h.getInfo()
    bound = float(info.mip_dual_bound)
    x = np.array(h.getSolution().col_value) if info.primal_solution_status == 2 else None
    return (bound if math.isfinite(bound) else None), x, status == highspy.HighsModelStatus.kOptimal


def _merge_start(
    x: np.ndarray, cols: np.ndarray, into: dict[int, int], cat: Catalog, index: SolverIndex
) -> np.ndarray:
    """``x`` on the service's columns, merged domain copies moved onto the kept ones."""
    y = x.copy()
    for gone, kept in into.items():
        v = np.array(_variables(cat.columns[gone], index))
        kv = np.array(_variables(cat.columns[kept], index))
        y[kv] += y[v]
        y[v] = 0.0
    return y[cols]


def _pools(cat: Catalog) -> list[tuple[set[str], set[str]]]:
    """Domains joined when they share a GPU type: (domains, GPU types) per pool of domains."""
    pools: list[tuple[set[str], set[str]]] = []
    for d in cat.domains:
        domains, types = {d.name}, set(d.gpus)
        for p in [p for p in pools if p[1] & types]:
            pools.remove(p)
            domains |= p[0]
            types |= p[1]
        pools.append((domains, types))
    return pools


class _Usage:
    """Per candidate, what it takes of the pooled shared rows.

    Rows: GPUs per (pool of domains, GPU type) and power per pool of domains (each pool's
    domains and budgets summed), then the shared rows that span every domain as they are
    (cluster GPU limit, change cap).
    """

    def __init__(self, cat: Catalog, index: SolverIndex, form: MatrixForm, shared: np.ndarray):
        self.form = form
        self.limit: list[float] = []
        self.members: dict[int, list[int]] = {}  # pooled row -> the model's shared rows
        self.gpu_columns: list[tuple[np.ndarray, int]] = []
        self.pooled_power: list[tuple[np.ndarray, int]] = []
        power_rows = set(index.power_rows.values())
        cell_of = {int(index.instances[c.index]): (c.domain, c.gpu_type) for c in cat.columns}
        cells: dict[tuple[str, str], list[int]] = defaultdict(list)
        direct = []
        for r in shared.tolist():
            if r in power_rows:
                continue
            found = {cell_of.get(int(c)) for c in form.a[r].indices}
            if None in found or len(found) > 1:  # spans cells: cluster GPU limit, change cap
                direct.append(r)
            else:
                cells[found.pop()].append(r)  # type: ignore[index]
        limits = {d.name: d.limit_w for d in cat.domains}
        for domains, types in _pools(cat):
            for g in sorted(types):
                mask = np.zeros(index.num_col)
                for c in cat.columns:
                    if c.domain in domains and c.gpu_type == g:
                        mask[index.instances[c.index]] = c.gpus
                self.members[len(self.limit)] = [r for d in domains for r in cells[(d, g)]]
                self.gpu_columns.append((mask, len(self.limit)))
                self.limit.append(sum(d.gpus.get(g, 0) for d in cat.domains if d.name in domains))
            rows = [index.power_rows[d] for d in sorted(domains) if d in index.power_rows]
            if rows and all(limits[d] is not None for d in domains):
                self.members[len(self.limit)] = rows
                self.pooled_power.append((np.array(rows, dtype=np.int64), len(self.limit)))
                self.limit.append(float(form.row_upper[rows].sum()))
        self.direct = np.array(direct, dtype=np.int64)
        self.base = len(self.limit)
        self.limit += [float(form.row_upper[r]) for r in direct]

    def rows_of(self, pooled: np.ndarray) -> np.ndarray:
        """The model's shared rows behind pooled rows ``pooled``."""
        rows: list[int] = []
        for k in pooled.tolist():
            rows += self.members.get(k, [])
            if k >= self.base:
                rows.append(int(self.direct[k - self.base]))
        return np.array(sorted(set(rows)), dtype=np.int64)

    def of(self, x: np.ndarray) -> np.ndarray:
        """Usage of each pooled row by ``x``."""
        usage = np.zeros(len(self.limit))
        for mask, k in self.gpu_columns:
            usage[k] = dot(mask, x)
        for rows, k in self.pooled_power:
            usage[k] = float((self.form.a[rows] @ x).sum())
        if len(self.direct):
            usage[self.base :] = self.form.a[self.direct] @ x
        return usage


def _choose(
    costs: list[list[float]], usage: list[list[np.ndarray]], limit: np.ndarray, threads: int
) -> list[int] | None:
    """One candidate per service, least total cost, pooled rows within ``limit``."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", threads)
    h.setOptionValue("time_limit", 2.0)
    h.setOptionValue("mip_rel_gap", 1e-6)
    where: list[tuple[int, int]] = []
    for s, cs in enumerate(costs):
        for k, cost in enumerate(cs):
            h.addVar(0.0, 1.0)
            h.changeColCost(len(where), cost)
            h.changeColIntegrality(len(where), highspy.HighsVarType.kInteger)
            where.append((s, k))
    for s in range(len(costs)):
        idx = np.array([j for j, (t, _) in enumerate(where) if t == s], dtype=np.int32)
        h.addRow(1.0, 1.0, len(idx), idx, np.ones(len(idx)))
    idx = np.arange(len(where), dtype=np.int32)
    for r, bound in enumerate(limit):
        h.addRow(-_INF, float(bound), len(idx), idx, np.array([usage[s][k][r] for s, k in where]))
    h.run()
    if h.getModelStatus() not in (
        highspy.HighsModelStatus.kOptimal,
        highspy.HighsModelStatus.kTimeLimit,
    ):
        return None
    if h.getInfo().primal_solution_status != 2:
        return None
    z = np.array(h.getSolution().col_value)
    choice = [0] * len(costs)
    for j, (s, k) in enumerate(where):
        if z[j] > 0.5:
            choice[s] = k
    return choice


def decompose(
    cat: Catalog,
    index: SolverIndex,
    form: MatrixForm,
    lp_x: np.ndarray,
    lp_duals: np.ndarray,
    candidates: list[np.ndarray],
    *,
    deadline: float,
    share: float,
    gap: float,
    workers: int = 1,
    seed: int = 0,
) -> Decomposition:
    """Lagrangian bound from per-service MILPs at the LP prices, and a combined plan.

    Args:
        cat: The catalog.
        index: Solver positions of the model's components.
        form: The instance's matrix form.
        lp_x: Column values of the LP relaxation.
        lp_duals: Its row duals (HiGHS signs).
        candidates: Solution vectors feasible for every service's own rows (the rounding
            rounds); the first also starts each service's MILP.
        deadline: ``time.perf_counter()`` value by which everything here ends.
        share: Fraction of the time left given to the service MILPs.
        gap: Relative gap at which a service MILP stops.
        workers: Service MILPs solved at once (HiGHS releases the GIL); also the HiGHS
            threads option of every instance made here (a process's instances must agree).
        seed: HiGHS random seed.
    """
    found = Decomposition()
    t = time.perf_counter()
    owner = column_owner(cat, index)
    services = len(cat.services)
    if services < 2 or np.any(owner < 0):
        return found
    shared = index.shared_rows
    y, constant = _prices(form, shared, lp_duals)
    priced = form.cost - (form.a[shared].T @ y if len(shared) else 0.0)
    upper, into = _merged_upper(cat, index, form, priced)
    models = _service_models(form, owner, shared, priced, upper, services)
    if models is None:
        return found
    found.services = services
    found.timing["setup_s"] = round(time.perf_counter() - t, 4)

    t = time.perf_counter()
    first = candidates[0] if candidates else None
    # each service's LP value at these prices bounds its MILP (LP duality); the rounded
    # start's value there says how much its MILP can gain: time goes where the gap is
    lp_value = [dot(priced[m.cols], lp_x[m.cols]) for m in models]
    gaps = [
        max(dot(priced[m.cols], first[m.cols]) - v, 0.0) if first is not None else 1.0
        for m, v in zip(models, lp_value, strict=True)
    ]
    results: list[tuple[float | None, np.ndarray | None, bool]] = [(None, None, False)] * services
    budget = max(deadline - t - COMBINE_RESERVE_S, 0.0) * share
    _run_services(models, results, gaps, budget, first, into, cat, index, gap, seed, workers)
    found.timing["services_s"] = round(time.perf_counter() - t, 4)
    found.solved_to_gap = sum(1 for r in results if r[2])
    bounds = [
        max(r[0], v) if r[0] is not None else v for r, v in zip(results, lp_value, strict=True)
    ]
    found.bound = float(sum(bounds)) + constant + form.offset

    t = time.perf_counter()
    usage = _Usage(cat, index, form, shared)
    options: list[list[np.ndarray]] = [[] for _ in range(services)]
    for x in candidates:
        for s in range(services):
            options[s].append(np.where(owner == s, x, 0.0))

    def add(results: list[tuple[float | None, np.ndarray | None, bool]]) -> None:
        for s, (_, xs, _) in enumerate(results):
            if xs is not None:
                x = np.zeros(index.num_col)
                x[models[s].cols] = xs
                options[s].append(x)

    add(results)
    if all(options):
        found.start = _combine(cat, index, form, options, usage, deadline, workers)
    # No choice of candidates fits the shared rows: raise the prices of the pooled rows the
    # cheapest choice breaks and solve the services again (a Lagrangian heuristic step)
    for step in range(1, REPAIR_STEPS + 1):
        if found.start is not None or not all(options) or time.perf_counter() > deadline:
            break
        broken = _broken_rows(form, usage, options)
        if not len(broken):
            break
        raise_ = np.isin(shared, broken)
        y[raise_] = 2.0 * y[raise_] - _unit_price(form, broken, options) * step
        priced = form.cost - form.a[shared].T @ y
        for model in models:
            model.lp.col_cost_ = priced[model.cols]
        again: list[tuple[float | None, np.ndarray | None, bool]] = [(None, None, False)] * services
        left = max(deadline - time.perf_counter() - COMBINE_RESERVE_S, 0.0) / 2
        _run_services(
            models, again, [1.0] * services, left, None, into, cat, index, gap, seed, workers
        )
        add(again)
        found.start = _combine(cat, index, form, options, usage, deadline, workers)
    found.timing["combine_s"] = round(time.perf_counter() - t, 4)
    return found


def _run_services(
    models: list[_Service],
    results: list[tuple[float | None, np.ndarray | None, bool]],
    gaps: list[float],
    budget: float,
    first: np.ndarray | None,
    into: dict[int, int],
    cat: Catalog,
    index: SolverIndex,
    gap: float,
    seed: int,
    workers: int,
) -> None:
    """Solve the service MILPs into ``results``, time shared in proportion to ``gaps``."""
    t = time.perf_counter()

    def run(s: int, limit: float) -> None:
        start = _merge_start(first, models[s].cols, into, cat, index) if first is not None else None
        results[s] = _solve_service(models[s], start, limit, gap, seed, workers)

    order = sorted(range(len(models)), key=lambda s: -gaps[s])
    if workers > 1:
        total = sum(gaps) or 1.0
        with ThreadPoolExecutor(workers) as pool:
            futures = [
                pool.submit(run, s, limit)
                for s in order
                if (limit := budget * workers * gaps[s] / total) >= MIN_SERVICE_S
            ]
            for future in futures:
                future.result()
        return
    waiting = sum(gaps)
    for s in order:
        left = budget - (time.perf_counter() - t)
        limit = left * gaps[s] / waiting if waiting > 0 else 0.0
        waiting -= gaps[s]
        if limit >= MIN_SERVICE_S:
            run(s, limit)


def _cheapest(form: MatrixForm, options: list[list[np.ndarray]]) -> np.ndarray:
    """Sum over services of each one's least-cost candidate."""
    return np.sum([min(xs, key=lambda x: objective(form, x)) for xs in options], axis=0)


def _broken_rows(form: MatrixForm, usage: _Usage, options: list[list[np.ndarray]]) -> np.ndarray:
    """Shared rows in the pooled rows that the cheapest choice of candidates breaks."""
    x = _cheapest(form, options)
    over = usage.of(x) > np.array(usage.limit) * (1 + 1e-9) + 1e-9
    return usage.rows_of(np.flatnonzero(over))


def _unit_price(form: MatrixForm, rows: np.ndarray, options: list[list[np.ndarray]]) -> float:
    """A price step for rows: a quarter of the plan's cost per unit of their activity."""
    x = _cheapest(form, options)
    activity = float(np.abs(form.a[rows] @ x).sum())
    return 0.25 * abs(objective(form, x)) / max(activity, 1e-9)


def _combine(
    cat: Catalog,
    index: SolverIndex,
    form: MatrixForm,
    options: list[list[np.ndarray]],
    usage: _Usage,
    deadline: float,
    threads: int,
    rounds: int = 3,
) -> Start | None:
    """Pick a candidate per service, place the instances, re-solve the loads (module doc)."""
    costs = [[objective(form, x) for x in xs] for xs in options]
    used = [[usage.of(x) for x in xs] for xs in options]
    limit = np.array(usage.limit, dtype=float)
    cols = index.instances.astype(np.int32)
    fixer = relaxation(form, threads, 0)
    shared = index.shared_rows.astype(np.int32)
    free = np.full(len(shared), _INF)
    best: Start | None = None
    for attempt in range(rounds):
        if attempt and time.perf_counter() > deadline:
            break
        choice = _choose(costs, used, limit, threads)
        if choice is None:
            break
        x = np.sum([options[s][k] for s, k in enumerate(choice)], axis=0)
        counts: dict[Option, int] = defaultdict(int)
        for c in cat.columns:
            counts[(c.service, c.request_type, c.config.key)] += int(
                round(x[index.instances[c.index]])
            )
        per_column, _ = place_counts(cat, dict(counts), x, index)
        fixed = per_column.astype(float)
        fixer.changeColsBounds(len(cols), cols, fixed, fixed)
        fixer.changeRowsBounds(  # type: ignore[attr-defined]
            len(shared), shared, form.row_lower[shared], form.row_upper[shared]
        )
        fixer.run()
        if fixer.getModelStatus() == highspy.HighsModelStatus.kOptimal:
            z = np.array(fixer.getSolution().col_value)
            z[cols] = fixed
            if not form.violations(z).any():
                best = Start(z, objective(form, z), 0)
                break
        if not len(shared):
            break
        # placement in domains or the loads broke a row the pooled rows did not see: lower
        # each pooled row by its members' excess and choose again
        fixer.changeRowsBounds(len(shared), shared, -free, free)  # type: ignore[attr-defined]
        fixer.run()
        if fixer.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            break
        z = np.array(fixer.getSolution().col_value)
        z[cols] = fixed
        over = dict(
            zip(
                shared.tolist(),
                np.maximum(form.a[shared] @ z - form.row_upper[shared], 0.0).tolist(),
                strict=True,
            )
        )
        for k, rows in usage.members.items():
            limit[k] -= sum(over.get(r, 0.0) for r in rows) + 1e-6
        for k, r in enumerate(usage.direct.tolist()):
            limit[usage.base + k] -= over.get(r, 0.0) + 1e-6
        usage.limit = limit.tolist()  # what placement taught holds for later choices too
    return best

"""The two simulation modes: per request (traces) and per window (rates).

Both replay a :class:`~simulator.schedule.Schedule` with the instance model of
:mod:`simulator.model`:

- **Routing.** A request of pool ``(service, type)`` goes to the layout's pool of that
  type, else to the service's all-types pool (``POOL_ALL``), else it is *unserved* (no
  instance for it: it counts as an SLO miss with infinite latency). Inside a pool, an
  instance gets a share of each type in proportion to its capacity for that type, so all
  instances of a pool run at the same utilisation ``u``.
- **Queueing.** Each pool has a FIFO backlog (fluid, in instance-seconds of work): work
  beyond ``saturation`` x the available instances waits; the wait adds to TTFT.
- **Reconfiguration.** From :func:`simulator.schedule.transition`: cold-started instances
  are started ``startup_s`` ahead of their step (powered at loaded-idle, serving nothing,
  their GPU-hours counted); re-sharded and re-clocked ones serve nothing for the first
  ``reshard_s``/``clock_change_s`` of their step.
- **Energy.** Per instance, the profile's power curve at the instance's rate per type
  (mixed pools weight the types by their share of the instance's work), integrated over
  time; powered-but-not-serving time at loaded-idle power.

The per-request mode measures load in buckets of ``load_window_s`` and draws each
request's latency from its instance's profile at that bucket's utilisation with
deterministic quasi-random scores. The per-window mode evaluates the same model in
closed form per window, integrating over the bucket-to-bucket fluctuation of the load
(Gauss-Hermite nodes for a normal approximation of the counts with variance
``cv^2 x mean``), so the two agree on a workload expressible in both.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from simulator.model import (
    FREE_RECONFIGURATION,
    POOL_ALL,
    ProfileTable,
    ReconfigCosts,
    lognormal_cdf,
    quasi_normal,
    quasi_uniform,
)
from simulator.schedule import Changes, PoolKey, Schedule, transition
from simulator.workload import Pool, RateWorkload, RequestTrace
from wattplan.domain import Layout
from wattplan.errors import InputDataError

Progress = Callable[[str], None]

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(7)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()
#: Latency grid (s) on which the per-window mode inverts its mixture CDFs.
_GRID = np.geomspace(1e-3, 1e4, 161)


@dataclass(frozen=True, eq=False)
class SimResult:
    """What one replay measured.

    Arrays indexed ``[pool, step]`` use the workload's pools; ``run_*`` arrays are over the
    whole run per pool. Latencies are NaN where a pool had no request, ``inf`` where its
    requests were unserved. ``rerouted`` counts requests whose type had no pool in the
    layout and went to another pool of their service.
    """

    mode: str
    policy: str
    start_at: datetime
    step_s: int
    pools: tuple[Pool, ...]
    requests: np.ndarray
    met: np.ndarray
    unserved: np.ndarray
    rerouted: np.ndarray
    ttft_p50_s: np.ndarray
    ttft_p99_s: np.ndarray
    tbt_p50_s: np.ndarray
    tbt_p99_s: np.ndarray
    run_ttft_p50_s: np.ndarray
    run_ttft_p99_s: np.ndarray
    run_tbt_p50_s: np.ndarray
    run_tbt_p99_s: np.ndarray
    energy_j: np.ndarray
    reconfig_energy_j: np.ndarray
    gpu_s: np.ndarray
    gpus: np.ndarray
    changes: Changes
    wall_s: float
    notes: tuple[str, ...] = field(default=())
    detail: dict[str, object] | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        """Number of steps."""
        return int(self.energy_j.size)

    def attainment(self) -> np.ndarray:
        """Share of each pool's requests that met both SLOs (NaN without requests)."""
        total = self.requests.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, self.met.sum(axis=1) / total, np.nan)


# --- the schedule as arrays ------------------------------------------------------------------


@dataclass
class _Groups:
    """Every (step, pool, config) group of instances, flattened."""

    step: list[int] = field(default_factory=list)
    pool: list[int] = field(default_factory=list)
    config: list[int] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    downtime_s: list[float] = field(default_factory=list)
    startup_s: list[float] = field(default_factory=list)
    own_type: list[int] = field(default_factory=list)  # governed type; -1: not governed

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "step": np.array(self.step, dtype=np.int64),
            "pool": np.array(self.pool, dtype=np.int64),
            "config": np.array(self.config, dtype=np.int64),
            "count": np.array(self.count, dtype=np.float64),
            "downtime_s": np.array(self.downtime_s, dtype=np.float64),
            "startup_s": np.array(self.startup_s, dtype=np.float64),
            "own_type": np.array(self.own_type, dtype=np.int64),
        }


@dataclass
class _Compiled:
    """The schedule as arrays.

    Requests of one workload pool may be split over several pools (the plan's dispatch):
    each (workload pool, compiled pool) pair that ever carries a share is a *route* ``v``;
    ``route[k, v]`` is its pool at step ``k`` (-1 when it carries nothing then) and
    ``share[k, v]`` the part of the workload pool's requests it takes.
    """

    steps: int
    pool_keys: list[PoolKey]
    route: np.ndarray  # (steps, routes) -> compiled pool or -1
    share: np.ndarray  # (steps, routes): share of its workload pool's requests
    route_wp: np.ndarray  # route -> workload pool
    g: dict[str, np.ndarray]  # flattened groups
    by_step_pool: dict[tuple[int, int], list[int]]  # -> group indices
    changes: Changes
    wp_type: np.ndarray  # workload pool -> table type index
    spilled: np.ndarray  # (steps, workload pools): rerouted (no pool for the type)

    @property
    def route_type(self) -> np.ndarray:
        """Table type index of each route."""
        return self.wp_type[self.route_wp]

    def served(self) -> np.ndarray:
        """(steps, workload pools): some pool takes the workload pool's requests."""
        out = np.zeros((self.steps, self.wp_type.size), dtype=bool)
        for v, w in enumerate(self.route_wp):
            out[:, w] |= self.route[:, v] >= 0
        return out


def _targets(
    layout: Layout,
    service: str,
    rtype: str,
    present: dict[PoolKey, list],  # type: ignore[type-arg]
    keys: dict[PoolKey, int],
) -> list[tuple[int, float]]:
    """``[(compiled pool, share)]`` from the layout's dispatch for a type (empty: none).

    Shares to pools the layout does not run are dropped and the rest renormalised.
    """
    out = [
        (keys[(service, pool)], share)
        for pool, share in layout.dispatch_of(service, rtype)
        if share > 0 and (service, pool) in present
    ]
    total = sum(share for _, share in out)
    return [(p, share / total) for p, share in out] if total > 0 else []


def _compile(
    schedule: Schedule,
    table: ProfileTable,
    pools: Sequence[Pool],
    costs: ReconfigCosts,
    steps: int,
) -> _Compiled:
    if len(schedule.layouts) < steps:
        raise InputDataError(
            f"schedule of {schedule.policy!r} has {len(schedule.layouts)} layouts, the workload "
            f"needs {steps} steps of {schedule.step_s} s"
        )
    costs = FREE_RECONFIGURATION if schedule.free_reconfiguration else costs
    wp_type = np.array([table.type(t) for _, t in pools], dtype=np.int64)
    keys: dict[PoolKey, int] = {}
    routes: dict[tuple[int, int], int] = {}  # (workload pool, compiled pool) -> route
    taken: list[tuple[int, int, int, float]] = []  # (step, route, pool, share)
    spilled = np.zeros((steps, len(pools)), dtype=bool)
    groups = _Groups()
    by_step_pool: dict[tuple[int, int], list[int]] = defaultdict(list)
    changes = Changes()
    previous: Layout = schedule.layouts[0]  # the run starts in the first layout (warm)
    for k in range(steps):
        layout = schedule.layouts[k]
        spare = None if schedule.inventory_gpus is None else schedule.inventory_gpus - previous.gpus
        present, step_changes = transition(previous, layout, costs, spare)
        if k > 0:
            changes.add(step_changes)
        for key, gs in present.items():
            p = keys.setdefault(key, len(keys))
            for grp in gs:
                c = table.config(grp.config.key)
                by_step_pool[(k, p)].append(len(groups.step))
                groups.step.append(k)
                groups.pool.append(p)
                groups.config.append(c)
                groups.count.append(grp.instances)
                groups.downtime_s.append(min(grp.downtime_s, schedule.step_s) if k else 0.0)
                groups.startup_s.append(grp.startup_s if k else 0.0)
                governed = schedule.clock_governor and key[1] != POOL_ALL
                groups.own_type.append(table.type(key[1]) if governed else -1)
        for w, (service, rtype) in enumerate(pools):
            targets = _targets(layout, service, rtype, present, keys)
            if not targets:
                target = keys.get((service, rtype)) if (service, rtype) in present else None
                if target is None and (service, POOL_ALL) in present:
                    target = keys[(service, POOL_ALL)]
                if target is None:
                    target = _spill_pool(
                        k, service, int(wp_type[w]), present, keys, by_step_pool, groups, table
                    )
                    spilled[k, w] = target is not None
                if target is not None:
                    targets = [(target, 1.0)]
            for target, share in targets:
                v = routes.setdefault((w, target), len(routes))
                taken.append((k, v, target, share))
                for gi in by_step_pool[(k, target)]:
                    table.require(groups.config[gi], int(wp_type[w]))
        previous = layout
    route = np.full((steps, len(routes)), -1, dtype=np.int64)
    shares = np.zeros((steps, len(routes)))
    for k, v, target, sh in taken:
        route[k, v] = target
        shares[k, v] = sh
    route_wp = np.array([w for w, _ in sorted(routes, key=routes.__getitem__)], dtype=np.int64)
    return _Compiled(
        steps,
        list(keys),
        route,
        shares,
        route_wp,
        groups.arrays(),
        dict(by_step_pool),
        changes,
        wp_type,
        spilled,
    )


#: Weyl sequence step (golden ratio) that splits a type's requests over its routes.
_SPLIT_STEP = (math.sqrt(5.0) - 1.0) / 2.0


def _pick_routes(comp: _Compiled, k: np.ndarray, wp: np.ndarray) -> np.ndarray:
    """Route of each request: by its type's shares at its step, deterministic and even.

    Requests of a split type are spread over its routes by a Weyl sequence on their index
    (not one of the R3 coordinates the latency draws use); an unsplit type takes its one
    route; a type without any route gets -1.
    """
    n_v = comp.route_wp.size
    out = np.full(k.size, -1, dtype=np.int64)
    if n_v == 0:
        return out
    by_wp: list[list[int]] = [[] for _ in range(comp.wp_type.size)]
    for v, w in enumerate(comp.route_wp):
        by_wp[int(w)].append(v)
    width = max(len(vs) for vs in by_wp) if by_wp else 1
    slots = np.full((comp.wp_type.size, width), -1, dtype=np.int64)
    for w, vs in enumerate(by_wp):
        slots[w, : len(vs)] = vs
    safe_slots = np.where(slots >= 0, slots, 0)
    shares = np.where(slots[None, :, :] >= 0, comp.share[:, safe_slots], 0.0)  # (steps, wp, M)
    edges = np.cumsum(shares, axis=2)
    cell_edges = edges[k, wp]  # (n, M)
    total = cell_edges[:, -1]
    draw = np.modf(0.5 + (np.arange(k.size) + 1.0) * _SPLIT_STEP)[0] * total
    pick = np.minimum((draw[:, None] >= cell_edges).sum(axis=1), width - 1)
    chosen = slots[wp, pick]
    return np.where(total > 0, chosen, -1)


def _spill_pool(
    k: int,
    service: str,
    rtype: int,
    present: dict[PoolKey, list],  # type: ignore[type-arg]
    keys: dict[PoolKey, int],
    by_step_pool: dict[tuple[int, int], list[int]],
    groups: _Groups,
    table: ProfileTable,
) -> int | None:
    """The service's pool with the most capacity for a type that has no pool of its own.

    A router sends such requests somewhere rather than dropping them: to the pool of the
    same service whose instances (all profiled for the type) carry most of it.
    """
    best, best_cap = None, 0.0
    for key in present:
        if key[0] != service:
            continue
        p = keys[key]
        members = by_step_pool[(k, p)]
        caps = [table.capacity_rps[groups.config[i], rtype] * groups.count[i] for i in members]
        if not caps or any(np.isnan(c) for c in caps):
            continue
        if sum(caps) > best_cap:
            best, best_cap = p, sum(caps)
    return best


def _step_accounting(
    comp: _Compiled, table: ProfileTable, step_s: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per step: start-up energy, start-up GPU-seconds, GPUs held, GPU-seconds serving."""
    g = comp.g
    gpus = table.gpus[g["config"]] * g["count"]
    idle = table.config_idle_w[g["config"]]
    startup_j = np.bincount(g["step"], g["count"] * idle * g["startup_s"], minlength=comp.steps)
    startup_gpu_s = np.bincount(g["step"], gpus * g["startup_s"], minlength=comp.steps)
    held = np.bincount(g["step"], gpus, minlength=comp.steps)
    return startup_j, startup_gpu_s, held, held * step_s


# --- per-request mode ------------------------------------------------------------------------


def simulate_requests(
    trace: RequestTrace,
    schedule: Schedule,
    table: ProfileTable,
    costs: ReconfigCosts | None = None,
    *,
    progress: Progress | None = None,
    detail: bool = False,
) -> SimResult:
    """Replay a request trace against a schedule, request by request (vectorised).

    With ``detail``, the result's ``detail`` holds each request's ``ttft_s``, ``tbt_s``,
    ``group`` (-1: unserved) and ``config`` (the governed variant), the instance groups
    (``groups``: step, pool, config, count, ...), ``pool_keys``, each group's
    ``instance_w`` per load bucket of its step, ``utilisation`` per pool and bucket, and
    ``bucket_s`` (what the digital twin writes out).

    Raises:
        InputDataError: the schedule is too short for the trace, uses a config without a
            profile, or routes a type to a config not profiled for it.
    """
    started = time.perf_counter()
    costs = costs or ReconfigCosts()
    model = table.model
    step_s = schedule.step_s
    steps = max(1, math.ceil(trace.duration_s / step_s - 1e-9))
    comp = _compile(schedule, table, trace.pools, costs, steps)
    g = comp.g
    per_step = max(1, round(step_s / model.load_window_s))
    bucket_s = step_s / per_step
    nb = steps * per_step
    n_pools = max(len(comp.pool_keys), 1)
    n_wp = len(trace.pools)
    t = trace.arrival_s
    wp = trace.pool_code.astype(np.int64)
    k = np.minimum((t // step_s).astype(np.int64), steps - 1)
    b = np.minimum((t // bucket_s).astype(np.int64), nb - 1)
    offset = t - k * step_s
    v = _pick_routes(comp, k, wp)
    p = np.full(v.size, -1, dtype=np.int64)
    p[v >= 0] = comp.route[k[v >= 0], v[v >= 0]]
    served = p >= 0
    rtype = comp.wp_type[wp]

    # Each request picks a group (config) of its pool in proportion to capacity, among the
    # groups already serving at its arrival (re-sharded/re-clocked ones serve after their
    # downtime).
    gid = _assign_groups(comp, table, k, v, offset, served, len(trace))
    safe = np.where(gid >= 0, gid, g["config"].size)  # -1 (unserved) -> a padding entry
    config = np.append(g["config"], 0)[safe]
    cap = table.capacity_rps[config, rtype]
    work = np.where(served, 1.0 / cap, 0.0)  # instance-seconds
    cell = np.where(served, p, 0) * nb + b
    work_pb = np.bincount(cell[served], work[served], minlength=n_pools * nb).reshape(n_pools, nb)

    available, full = _instances_per_bucket(comp, per_step, bucket_s, n_pools, nb)
    boost = np.array(
        [table.boost(int(c), int(t)) for c, t in zip(g["config"], g["own_type"], strict=True)]
    )
    reach, _ = _instances_per_bucket(comp, per_step, bucket_s, n_pools, nb, boost)
    pool_requests = np.bincount(p[served], minlength=n_pools)
    spans = _smoothing_buckets(pool_requests / max(trace.duration_s, 1.0), bucket_s, model)
    work_pb = _trailing_mean(work_pb, spans)
    available = _trailing_mean(available, spans)
    reach = _trailing_mean(reach, spans)
    # FIFO backlog per pool (Lindley, vectorised): Q_b = S_b - min(0, min_{j<=b} S_j).
    room = model.saturation * reach * bucket_s
    cum = np.cumsum(work_pb - room, axis=1)
    backlog = cum - np.minimum(np.minimum.accumulate(cum, axis=1), 0.0)
    before = np.concatenate([np.zeros((n_pools, 1)), backlog[:, :-1]], axis=1)
    backlog_mid = 0.5 * (before + backlog)
    with np.errstate(invalid="ignore", divide="ignore"):
        util = np.where(available > 0, work_pb / (available * bucket_s), model.saturation)
        util = np.where(backlog_mid > 1e-9, model.saturation, util)
        wait_pb = np.where(full > 0, backlog_mid / ((model.saturation) * full), 0.0)

    u_r = util.ravel()[cell]
    wait_r = wait_pb.ravel()[cell]
    wait_r = wait_r + _downtime_residual(
        comp, boost, k, p, offset, served, work_pb, bucket_s, per_step, model.saturation
    )
    own = np.append(g["own_type"], -1)[safe]
    config, u_r = table.govern(config, own, u_r)
    z_ttft, z_tbt = quasi_normal(len(trace), 0), quasi_normal(len(trace), 1)
    med, sig = table.latency(config, rtype, u_r, "ttft")
    ttft = np.where(served, med * np.exp(sig * z_ttft) + wait_r, np.inf)
    med, sig = table.latency(config, rtype, u_r, "tbt")
    tbt = np.where(served, med * np.exp(sig * z_tbt), np.inf)
    met = (
        served & (ttft <= table.ttft_slo_s[config, rtype]) & (tbt <= table.tbt_slo_s[config, rtype])
    )
    if progress:
        progress(f"per-request: {len(trace):,} requests replayed")

    cells = wp * steps + k
    size = n_wp * steps
    requests = np.bincount(cells, minlength=size).reshape(n_wp, steps).astype(float)
    met_n = np.bincount(cells, met, minlength=size).reshape(n_wp, steps)
    unserved = np.bincount(cells, ~served, minlength=size).reshape(n_wp, steps).astype(float)
    q_ttft = _grouped_quantiles(cells, ttft, size, (0.5, 0.99))
    q_tbt = _grouped_quantiles(cells, tbt, size, (0.5, 0.99))
    run_ttft = _grouped_quantiles(wp, ttft, n_wp, (0.5, 0.99))
    run_tbt = _grouped_quantiles(wp, tbt, n_wp, (0.5, 0.99))

    # Energy: per (pool, config) over every bucket where that config serves the pool.
    type_work = np.bincount(
        (cell * n_wp + wp)[served], work[served], minlength=n_pools * nb * n_wp
    ).reshape(n_pools, nb, n_wp)
    energy, instance_w = _request_energy(
        comp, table, util, type_work, per_step, bucket_s, n_pools, nb
    )
    startup_j, startup_gpu_s, held, gpu_s = _step_accounting(comp, table, step_s)
    return SimResult(
        "per-request",
        schedule.policy,
        trace.start_at,
        step_s,
        trace.pools,
        requests,
        met_n.astype(float),
        unserved,
        requests * comp.spilled.T,
        q_ttft[0].reshape(n_wp, steps),
        q_ttft[1].reshape(n_wp, steps),
        q_tbt[0].reshape(n_wp, steps),
        q_tbt[1].reshape(n_wp, steps),
        run_ttft[0],
        run_ttft[1],
        run_tbt[0],
        run_tbt[1],
        energy + startup_j,
        startup_j,
        gpu_s + startup_gpu_s,
        held,
        comp.changes,
        time.perf_counter() - started,
        schedule.notes,
        {
            "ttft_s": ttft,
            "tbt_s": tbt,
            "group": gid,
            "config": config,
            "groups": g,
            "pool_keys": comp.pool_keys,
            "instance_w": instance_w,
            "utilisation": util,
            "bucket_s": bucket_s,
        }
        if detail
        else None,
    )


def _downtime_residual(
    comp: _Compiled,
    boost: np.ndarray,
    k: np.ndarray,
    p: np.ndarray,
    offset: np.ndarray,
    served: np.ndarray,
    work_pb: np.ndarray,
    bucket_s: float,
    per_step: int,
    sat: float,
) -> np.ndarray:
    """Extra wait of requests arriving while part of their pool is down (re-shard, clock).

    The backlog (bucket level) already holds the work that piles up; a request arriving
    during the downtime also waits for the rest of it, in proportion to the capacity down,
    when the instances still up cannot keep pace.
    """
    g = comp.g
    down = g["downtime_s"] >= 1.0
    out = np.zeros(offset.size)
    if not down.any():
        return out
    shape = (work_pb.shape[0], comp.steps)
    reach_all, reach_up, longest = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    np.add.at(reach_all, (g["pool"], g["step"]), boost * g["count"])
    np.add.at(reach_up, (g["pool"][~down], g["step"][~down]), (boost * g["count"])[~down])
    np.maximum.at(longest, (g["pool"], g["step"]), np.where(down, g["downtime_s"], 0.0))
    rate = work_pb.reshape(shape[0], comp.steps, per_step).sum(axis=2) / (per_step * bucket_s)
    with np.errstate(invalid="ignore", divide="ignore"):
        up_share = np.where(reach_all > 0, reach_up / reach_all, 1.0)
        short = rate > sat * reach_up
    pp = np.where(served, p, 0)
    residual = np.maximum(longest[pp, k] - offset, 0.0) * (1.0 - up_share[pp, k])
    return np.where(served & short[pp, k], residual, 0.0)


def _smoothing_buckets(rate_rps: np.ndarray, bucket_s: float, model: object) -> np.ndarray:
    """Buckets each pool's load is averaged over: enough for ``load_window_requests``."""
    need = getattr(model, "load_window_requests", 1.0)
    with np.errstate(divide="ignore"):
        spans = np.ceil(need / np.maximum(rate_rps * bucket_s, 1e-9))
    return np.clip(spans, 1, 10_000).astype(np.int64)


def _trailing_mean(values: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Per row, the mean over the trailing ``spans[row]`` columns (fewer at the start)."""
    out = values.astype(float).copy()
    for row, span in enumerate(spans):
        if span <= 1:
            continue
        cum = np.concatenate([[0.0], np.cumsum(values[row])])
        idx = np.arange(1, values.shape[1] + 1)
        lo = np.maximum(idx - span, 0)
        out[row] = (cum[idx] - cum[lo]) / (idx - lo)
    return out


def _assign_groups(
    comp: _Compiled,
    table: ProfileTable,
    k: np.ndarray,
    wp: np.ndarray,
    offset: np.ndarray,
    served: np.ndarray,
    n: int,
) -> np.ndarray:
    """Group index of each request (-1 when unserved), capacity-proportional, quasi-random.

    ``wp`` holds each request's route (-1: none).
    """
    g = comp.g
    steps, n_wp = comp.route.shape
    route_type = comp.route_type
    rank = np.full((steps, n_wp, 2), -1, dtype=np.int64)
    late_from = np.zeros((steps, n_wp))
    edges: list[np.ndarray] = []
    members: list[np.ndarray] = []
    blocks = 0
    for kk in range(steps):
        for w in range(n_wp):
            p = int(comp.route[kk, w])
            if p < 0:
                continue
            gi = np.array(comp.by_step_pool[(kk, p)], dtype=np.int64)
            weight = g["count"][gi] * table.capacity_rps[g["config"][gi], route_type[w]]
            down = g["downtime_s"][gi]
            early = np.where(down >= 1.0, 0.0, weight)
            segments = [weight]
            if early.sum() > 0 and (down >= 1.0).any():
                late_from[kk, w] = float(down.max())
                segments = [early, weight]
            for seg, wts in enumerate(segments):
                rank[kk, w, seg] = blocks
                edges.append(blocks + np.cumsum(wts) / wts.sum())
                members.append(gi)
                blocks += 1
    gid = np.full(n, -1, dtype=np.int64)
    if not edges:
        return gid
    flat_edges = np.concatenate(edges)
    flat_members = np.concatenate(members)
    wp = np.maximum(wp, 0)  # unserved requests are masked below
    segment = np.where(offset < late_from[k, wp], 0, 1)
    seg_rank = np.where(rank[k, wp, 1] >= 0, rank[k, wp, segment], rank[k, wp, 0])
    draw = seg_rank + quasi_uniform(n, 2)
    pos = np.searchsorted(flat_edges, draw, side="right")
    pos = np.minimum(pos, flat_edges.size - 1)
    gid[served] = flat_members[pos[served]]
    return gid


def _instances_per_bucket(
    comp: _Compiled,
    per_step: int,
    bucket_s: float,
    n_pools: int,
    nb: int,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Serving (available) and all instances per pool and bucket (optionally weighted)."""
    g = comp.g
    count = g["count"] if weight is None else g["count"] * weight
    full = np.zeros((n_pools, comp.steps))
    np.add.at(full, (g["pool"], g["step"]), count)
    full_b = np.repeat(full, per_step, axis=1)
    available = full_b.copy()
    j = np.arange(per_step)
    for i in np.nonzero(g["downtime_s"] > 0)[0]:
        frac = np.clip(((j + 1) * bucket_s - g["downtime_s"][i]) / bucket_s, 0.0, 1.0)
        s = int(g["step"][i]) * per_step
        available[g["pool"][i], s : s + per_step] -= count[i] * (1.0 - frac)
    return np.maximum(available, 0.0), full_b


def _availability(comp: _Compiled, per_step: int, bucket_s: float) -> np.ndarray:
    """Per group and bucket of its step: the share of the bucket its instances serve."""
    g = comp.g
    j = np.arange(per_step)
    return np.clip(((j[None, :] + 1) * bucket_s - g["downtime_s"][:, None]) / bucket_s, 0.0, 1.0)


def _request_energy(
    comp: _Compiled,
    table: ProfileTable,
    util: np.ndarray,
    type_work: np.ndarray,
    per_step: int,
    bucket_s: float,
    n_pools: int,
    nb: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Serving energy per step (J), and each group's instance power (W) per bucket of its step."""
    g = comp.g
    avail = _availability(comp, per_step, bucket_s)  # (groups, per_step)
    buckets = g["step"][:, None] * per_step + np.arange(per_step)[None, :]  # (groups, per_step)
    pool_b = g["pool"][:, None]
    total_work = type_work.sum(axis=2)
    power = np.zeros(avail.shape)
    u = util[pool_b, buckets]
    for c in np.unique(g["config"]):
        rows = np.nonzero(g["config"] == c)[0]
        share_sum = np.zeros((rows.size, per_step))
        acc = np.zeros((rows.size, per_step))
        variant, _ = table.govern(np.full(u[rows].shape, c), g["own_type"][rows][:, None], u[rows])
        for w in range(type_work.shape[2]):
            tw = type_work[g["pool"][rows][:, None], buckets[rows], w]
            if not tw.any():
                continue
            t = int(comp.wp_type[w])
            total = total_work[g["pool"][rows][:, None], buckets[rows]]
            with np.errstate(invalid="ignore", divide="ignore"):
                share = np.where(total > 0, tw / total, 0.0)
            rate = np.minimum(u[rows], table.model.saturation) * table.capacity_rps[c, t]
            for v in np.unique(variant):
                here = variant == v
                acc[here] += share[here] * table.power_w(int(v), t, rate[here])
            share_sum += share
        idle = table.config_idle_w[variant]
        power[rows] = acc + (1.0 - share_sum) * idle
    idle_g = table.config_idle_w[g["config"]][:, None]
    instance_w = avail * power + (1.0 - avail) * idle_g
    per_group = g["count"][:, None] * instance_w * bucket_s
    return np.bincount(g["step"], per_group.sum(axis=1), minlength=comp.steps), instance_w


def _grouped_quantiles(
    groups: np.ndarray, values: np.ndarray, size: int, qs: Sequence[float]
) -> list[np.ndarray]:
    """Per group, the ``q`` quantiles of ``values`` (closest rank above; NaN if empty)."""
    order = np.lexsort((values, groups))
    sorted_groups = groups[order]
    sorted_values = values[order]
    counts = np.bincount(groups, minlength=size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = []
    for q in qs:
        idx = starts + np.maximum(np.ceil(q * counts).astype(np.int64) - 1, 0)
        vals = np.full(size, np.nan)
        has = counts > 0
        vals[has] = sorted_values[np.minimum(idx[has], sorted_values.size - 1)]
        out.append(vals)
    del sorted_groups
    return out


# --- per-window mode -------------------------------------------------------------------------


def simulate_rates(
    workload: RateWorkload,
    schedule: Schedule,
    table: ProfileTable,
    costs: ReconfigCosts | None = None,
    *,
    progress: Progress | None = None,
) -> SimResult:
    """Replay a rate workload against a schedule, window by window (closed form).

    Raises:
        InputDataError: the schedule's step is not the workload's window, the schedule is
            too short, or it uses configs without profiles.
    """
    started = time.perf_counter()
    costs = costs or ReconfigCosts()
    model = table.model
    if schedule.step_s != workload.window_s:
        raise InputDataError(
            f"schedule step {schedule.step_s} s differs from the workload's "
            f"{workload.window_s}-s windows"
        )
    step_s = workload.window_s
    steps = workload.windows
    comp = _compile(schedule, table, workload.pools, costs, steps)
    g = comp.g
    # Everything below works per route (a workload pool's share in one pool: the plan's
    # dispatch may split a type over pools); results go back to workload pools at the end.
    n_types = len(workload.pools)
    n_wp = comp.route_wp.size
    wp_type = comp.route_type
    n_pools = max(len(comp.pool_keys), 1)
    sat = model.saturation  # the backlog starts at saturation
    per_step = max(1, round(step_s / model.load_window_s))
    bucket_s = step_s / per_step
    lam = comp.share.T * workload.rate_rps[comp.route_wp]  # (routes, steps)
    cv2 = (workload.cv**2)[comp.route_wp]

    # Pool capacity per route and step: C[w, k] = sum_g n_g cap[c_g, type(w)].
    route = comp.route.T  # (routes, steps)
    cap_g = table.capacity_rps[g["config"][:, None], wp_type[None, :]]  # (groups, routes)
    capacity = np.zeros((n_wp, steps))
    for w in range(n_wp):
        mine = g["pool"] == route[w, g["step"]]
        np.add.at(capacity[w], g["step"][mine], (g["count"] * cap_g[:, w])[mine])
    full = np.zeros((n_pools, steps))
    np.add.at(full, (g["pool"], g["step"]), g["count"])
    up = np.zeros((n_pools, steps))
    np.add.at(up, (g["pool"], g["step"]), g["count"] * (1.0 - g["downtime_s"] / step_s))
    boost = np.array(
        [table.boost(int(c), int(t)) for c, t in zip(g["config"], g["own_type"], strict=True)]
    )
    reach = np.zeros((n_pools, steps))
    np.add.at(reach, (g["pool"], g["step"]), boost * g["count"] * (1.0 - g["downtime_s"] / step_s))
    served = route >= 0  # (wp, steps)
    pool_of = np.where(served, route, 0)
    pool_requests = np.bincount(pool_of[served], (lam * step_s)[served], minlength=n_pools)
    spans = _smoothing_buckets(pool_requests / max(workload.duration_s, 1.0), bucket_s, model)
    window_s = np.minimum(spans[pool_of] * bucket_s, step_s)  # (wp, steps)
    with np.errstate(invalid="ignore", divide="ignore"):
        share_u = np.where(served & (capacity > 0), lam / capacity, 0.0)  # (wp, steps)
        var_u = np.where(served & (capacity > 0), cv2 * lam / (capacity**2 * window_s), 0.0)
    u_full = np.zeros((n_pools, steps))
    np.add.at(u_full, (pool_of[served], np.nonzero(served)[1]), share_u[served])
    var_pool = np.zeros((n_pools, steps))
    np.add.at(var_pool, (pool_of[served], np.nonzero(served)[1]), var_u[served])
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = np.where(full > 0, up / full, 0.0)
        u_mean = np.where(alpha > 0, u_full / alpha, np.where(u_full > 0, sat, 0.0))
        sd = np.where(alpha > 0, np.sqrt(var_pool) / alpha, 0.0)

    # Fluid backlog across windows, in instance-seconds (governed instances may boost).
    drift = (u_full * full - sat * reach) * step_s
    backlog = np.zeros((n_pools, steps))
    for pi in range(n_pools):
        cum = np.cumsum(drift[pi])
        backlog[pi] = cum - np.minimum(np.minimum.accumulate(cum), 0.0)
    before = np.concatenate([np.zeros((n_pools, 1)), backlog[:, :-1]], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        wait_mean = np.where(full > 0, 0.5 * (before + backlog) / ((sat) * full), 0.0)
    saturated = 0.5 * (before + backlog) > 1e-9

    # Nodes of the load's bucket-to-bucket fluctuation: a log-normal with the load's mean
    # and variance (non-negative, skewed like bursty counts), Gauss-Hermite in log space.
    with np.errstate(invalid="ignore", divide="ignore"):
        s2 = np.log1p(np.where(u_mean > 0, (sd / u_mean) ** 2, 0.0))
        mu = np.log(np.maximum(u_mean, 1e-300)) - s2 / 2
    u_nodes = np.where(
        u_mean[..., None] > 0, np.exp(mu[..., None] + np.sqrt(s2)[..., None] * _NODES), 0.0
    )  # (pools, steps, J)
    with np.errstate(invalid="ignore", divide="ignore"):
        limit = np.where(full > 0, sat * reach / np.maximum(full * alpha, 1e-12), sat)
    u_nodes = np.where(saturated[..., None], limit[..., None], u_nodes)
    node_wait = wait_mean[..., None] + np.maximum(u_nodes - limit[..., None], 0.0) * bucket_s / (
        2.0 * limit[..., None]
    )
    req_w = _WEIGHTS * np.maximum(u_nodes, 1e-12)
    req_w = req_w / req_w.sum(axis=2, keepdims=True)
    caught, caught_top = _downtime_waits(comp, boost, u_full * full, sat, step_s, n_pools)

    # Components: (group, workload pool) pairs where the group serves that pool's type.
    comp_g, comp_w = np.nonzero(g["pool"][:, None] == route[:, g["step"]].T)
    k_c = g["step"][comp_g]
    p_c = g["pool"][comp_g]
    c_c = g["config"][comp_g]
    t_c = wp_type[comp_w]
    with np.errstate(invalid="ignore", divide="ignore"):
        mix = (
            g["count"][comp_g] * cap_g[comp_g, comp_w] / capacity[comp_w, k_c]
        )  # share of w's requests
    requests = lam * step_s
    req_c = mix * requests[comp_w, k_c]
    own_c = g["own_type"][comp_g]
    v_c, u_c = table.govern(c_c[:, None], own_c[:, None], u_nodes[p_c, k_c])  # (components, J)
    u_c = np.minimum(u_c, sat)
    wait_c = node_wait[p_c, k_c]
    weights_c = req_w[p_c, k_c] * req_c[:, None]
    share_c = caught[p_c, k_c][:, None]  # requests caught by a downtime backlog
    med_a, sig_a = table.latency(v_c, t_c[:, None], u_c, "ttft")
    med_b, sig_b = table.latency(v_c, t_c[:, None], u_c, "tbt")
    slo_a = table.ttft_slo_s[v_c, t_c[:, None]]
    slo_b = table.tbt_slo_s[v_c, t_c[:, None]]
    ok_a = lognormal_cdf(slo_a - wait_c, med_a, sig_a)
    ok_b = lognormal_cdf(slo_b, med_b, sig_b)
    hit = np.nonzero(share_c[:, 0] > 0)[0]  # components with caught requests
    extra = caught_top[p_c[hit], k_c[hit]][:, None, None] * _UNIFORM  # (hit, 1, 4)
    ok_caught = np.zeros(ok_a.shape)
    ok_caught[hit] = lognormal_cdf(
        slo_a[hit, :, None] - wait_c[hit, :, None] - extra,
        med_a[hit, :, None],
        sig_a[hit, :, None],
    ).mean(axis=2)
    ok_ttft = (1.0 - share_c) * ok_a + share_c * ok_caught
    cells = comp_w * steps + k_c
    size = n_wp * steps
    met = np.bincount(cells, (weights_c * ok_ttft * ok_b).sum(axis=1), minlength=size).reshape(
        n_wp, steps
    )

    # Mixture CDFs on the latency grid, per (pool, step) cell, in chunks.
    cdf_a = np.zeros((size, _GRID.size))
    cdf_b = np.zeros((size, _GRID.size))
    chunk = max(1, 200_000 // (_GRID.size * _NODES.size))
    grid = _GRID[None, None, :]
    base_w = weights_c * (1.0 - share_c)
    for lo in range(0, comp_g.size, chunk):
        sl = slice(lo, lo + chunk)
        fa = lognormal_cdf(grid - wait_c[sl, :, None], med_a[sl, :, None], sig_a[sl, :, None])
        fb = lognormal_cdf(grid, med_b[sl, :, None], sig_b[sl, :, None])
        np.add.at(cdf_a, cells[sl], (base_w[sl, :, None] * fa).sum(axis=1))
        np.add.at(cdf_b, cells[sl], (weights_c[sl, :, None] * fb).sum(axis=1))
    caught_w = weights_c * share_c / _UNIFORM.size
    for offset in _UNIFORM:
        for lo in range(0, hit.size, chunk):
            rows = hit[lo : lo + chunk]
            top = caught_top[p_c[rows], k_c[rows]][:, None, None]
            shift = wait_c[rows, :, None] + top * offset
            fa = lognormal_cdf(grid - shift, med_a[rows, :, None], sig_a[rows, :, None])
            np.add.at(cdf_a, cells[rows], (caught_w[rows, :, None] * fa).sum(axis=1))
    # Back from routes to workload pools.
    met = _per_pool(met, comp.route_wp, n_types)
    cdf_a = _per_pool(cdf_a.reshape(n_wp, steps, _GRID.size), comp.route_wp, n_types)
    cdf_b = _per_pool(cdf_b.reshape(n_wp, steps, _GRID.size), comp.route_wp, n_types)
    n_wp, size = n_types, n_types * steps
    cdf_a, cdf_b = cdf_a.reshape(size, -1), cdf_b.reshape(size, -1)
    requests = workload.rate_rps * step_s
    unserved = np.where(comp.served().T, 0.0, requests)
    total = requests.reshape(size)
    if progress:
        progress(f"per-window: {steps} windows x {n_wp} pools evaluated")
    q_ttft = [_invert(cdf_a, total, q) for q in (0.5, 0.99)]
    q_tbt = [_invert(cdf_b, total, q) for q in (0.5, 0.99)]
    run_a = cdf_a.reshape(n_wp, steps, -1).sum(axis=1)
    run_b = cdf_b.reshape(n_wp, steps, -1).sum(axis=1)
    run_total = requests.sum(axis=1)
    run_q_ttft = [_invert(run_a, run_total, q) for q in (0.5, 0.99)]
    run_q_tbt = [_invert(run_b, run_total, q) for q in (0.5, 0.99)]

    # Energy: instance power at each node's load, weighted by the node's time share.
    work_share = np.where(served, share_u, 0.0)  # (wp, steps): type w's part of pool utilisation
    power = np.zeros((g["step"].size, _NODES.size))
    share_sum = np.zeros(g["step"].size)
    with np.errstate(invalid="ignore", divide="ignore"):
        work_c = np.where(u_full[p_c, k_c] > 0, work_share[comp_w, k_c] / u_full[p_c, k_c], 0.0)
    u_power = np.minimum(u_nodes[p_c, k_c], sat)
    governed = table.govern(c_c[:, None], own_c[:, None], u_nodes[p_c, k_c])[0]
    idle_nodes = np.zeros((g["step"].size, _NODES.size))
    idle_nodes[comp_g] = table.config_idle_w[governed]
    for c in np.unique(c_c):
        for t in np.unique(t_c[c_c == c]):
            sel = np.nonzero((c_c == c) & (t_c == t))[0]
            rate = u_power[sel] * table.capacity_rps[c, t]
            watts = np.zeros(rate.shape)
            for v in np.unique(governed[sel]):
                here = governed[sel] == v
                watts[here] = table.power_w(int(v), int(t), rate[here])
            np.add.at(power, comp_g[sel], work_c[sel, None] * watts)
            np.add.at(share_sum, comp_g[sel], work_c[sel])
    idle = table.config_idle_w[g["config"]]
    no_component = np.ones(g["step"].size, dtype=bool)
    no_component[comp_g] = False
    idle_nodes[no_component] = idle[no_component, None]
    power += (1.0 - np.minimum(share_sum, 1.0))[:, None] * idle_nodes
    mean_power = (power * _WEIGHTS).sum(axis=1)
    serving = g["count"] * ((step_s - g["downtime_s"]) * mean_power + g["downtime_s"] * idle)
    energy = np.bincount(g["step"], serving, minlength=steps)
    startup_j, startup_gpu_s, held, gpu_s = _step_accounting(comp, table, step_s)
    return SimResult(
        "per-window",
        schedule.policy,
        workload.start_at,
        step_s,
        workload.pools,
        requests,
        met,
        unserved,
        requests * comp.spilled.T,
        q_ttft[0].reshape(n_wp, steps),
        q_ttft[1].reshape(n_wp, steps),
        q_tbt[0].reshape(n_wp, steps),
        q_tbt[1].reshape(n_wp, steps),
        run_q_ttft[0],
        run_q_ttft[1],
        run_q_tbt[0],
        run_q_tbt[1],
        energy + startup_j,
        startup_j,
        gpu_s + startup_gpu_s,
        held,
        comp.changes,
        time.perf_counter() - started,
        schedule.notes,
    )


def _per_pool(values: np.ndarray, route_wp: np.ndarray, n_types: int) -> np.ndarray:
    """Sum per-route rows (first axis) into their workload pools."""
    out = np.zeros((n_types, *values.shape[1:]))
    np.add.at(out, route_wp, values)
    return out


#: Quadrature of a uniform wait on [0, W]: midpoints of four equal slices.
_UNIFORM = np.array([0.125, 0.375, 0.625, 0.875])


def _downtime_waits(
    comp: _Compiled,
    boost: np.ndarray,
    work_rate: np.ndarray,
    sat: float,
    step_s: int,
    n_pools: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Share of a window's requests caught by a downtime backlog, and their largest wait.

    Fluid FIFO: work arrives at ``work_rate``; during the downtime ``d`` (re-shard, clock
    change at the window's start) the pool serves at ``r1`` (its instances not in
    downtime), then at ``r2``. When ``work_rate > r1`` a backlog builds and drains; the
    waits of the requests caught in it rise linearly to ``W = d (1 - r1 / rate)`` and fall
    back to 0, so they are uniform on ``[0, W]``, and those requests are the share
    ``d (r2 - r1) / (r2 - rate) / step`` of the window's.

    Returns:
        (share, W), each of shape (pools, steps); 0 where no downtime.
    """
    g = comp.g
    down = g["downtime_s"] >= 1.0
    shape = (n_pools, comp.steps)
    if not down.any():
        return np.zeros(shape), np.zeros(shape)
    reach_all, reach_up, longest = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    np.add.at(reach_all, (g["pool"], g["step"]), boost * g["count"])
    np.add.at(reach_up, (g["pool"][~down], g["step"][~down]), (boost * g["count"])[~down])
    np.maximum.at(longest, (g["pool"], g["step"]), np.where(down, g["downtime_s"], 0.0))
    r1, r2 = sat * reach_up, sat * reach_all
    with np.errstate(invalid="ignore", divide="ignore"):
        caught = (longest > 0) & (work_rate > r1)
        span = np.where(r2 > work_rate, longest * (r2 - r1) / (r2 - work_rate), step_s)
        share = np.where(caught, np.minimum(span / step_s, 1.0), 0.0)
        top = np.where(caught, longest * (1.0 - r1 / np.maximum(work_rate, 1e-12)), 0.0)
    return share, top


def _invert(cdf: np.ndarray, total: np.ndarray, q: float) -> np.ndarray:
    """Quantile ``q`` of each row's mixture CDF (rows weighted by ``total``), log-interpolated.

    NaN where a row has no requests; ``inf`` where its served mass never reaches ``q``
    (unserved requests, or latencies past the grid).
    """
    out = np.full(cdf.shape[0], np.nan)
    has = total > 0
    if not has.any():
        return out
    f = cdf[has] / total[has, None]
    above = f >= q
    idx = np.where(above.any(axis=1), above.argmax(axis=1), -1)
    res = np.full(idx.size, np.inf)
    ok = idx >= 0
    i = idx[ok]
    lo = np.maximum(i - 1, 0)
    f_lo, f_hi = f[ok, lo], f[ok, i]
    x_lo, x_hi = np.log(_GRID[lo]), np.log(_GRID[i])
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(f_hi > f_lo, (q - f_lo) / (f_hi - f_lo), 1.0)
    res[ok] = np.exp(x_lo + np.clip(frac, 0.0, 1.0) * (x_hi - x_lo))
    out[has] = res
    return out

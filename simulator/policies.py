"""Policies: each turns a workload's observed load into a layout per simulation step.

Registered by name in :data:`POLICIES` (DOMAIN.md section 9 for the baselines):

- ``singlepool``: one pool per service serving every type, the largest TP (TP8 where the
  profiles have it) at the fastest clock, sized for the trace's peak; static.
- ``multipool``: one pool per request type, same config, each sized for its type's peak;
  static.
- ``scaleinst``: MultiPool's config; instance counts from the forecast peak every
  ``cluster_period_s``.
- ``scaleshard``: MultiPool's GPUs per pool; the TP degree (all instances of a pool alike)
  chosen every ``pool_period_s`` for the least power at the forecast load.
- ``scalefreq``: MultiPool's layout; every step, the slowest clock (or lowest power cap)
  whose SLO capacity carries the forecast load, and the instance-level governor.
- ``heuristic``: DynamoLLM-style hierarchy: GPUs per pool from the forecast peak every
  ``cluster_period_s`` (the fewest GPUs of any TP at the fastest clock), the TP within
  those GPUs every ``pool_period_s``, the slowest sufficient clock every step, and the
  instance-level governor between steps.
- ``wattplan``: the project's forecaster and MILP (:mod:`simulator.wattplan_policy`), one
  plan per ``plan_window_s``, counting start-up costs against the running layout, each
  pool sized for its planned rate over ``target_utilization``, and an out-of-cycle
  re-plan of the rest of a window when a pool's observed rate beats its planned rate
  (``surge_replan``); the serving side runs the instance-level governor.
- ``oracle``: the same MILP given each window's true peak and mean load, with free
  reconfiguration: a lower bound, not a plan anyone can run.

The instance-level clock governor (``Schedule.clock_governor``, DynamoLLM's 5-second loop,
which a batch planner hands to the serving side): each instance of a per-type pool runs the
slowest clock/cap variant of its shape that carries its current load.

Causality: a decision that starts instances (cluster level, wattplan) is made
``startup_s`` before its step and sees only steps that ended by then; clock and TP
changes see every step before their own. Step 0 is visible to all (the run starts with a
cluster sized for its opening load).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta

import numpy as np

from forecasting.selection import ForecastConfig
from forecasting.series import LoadSeries
from simulator import wattplan_policy
from simulator.grid import Grid
from simulator.model import POOL_ALL, ProfileTable, ReconfigCosts, shape_of, speed_key
from simulator.schedule import Schedule
from simulator.workload import LoadView
from wattplan.domain import Layout, LayoutItem, LoadForecast, Profile, ServingConfig, TypeWindow
from wattplan.errors import InputDataError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PolicyContext:
    """What every policy may use.

    Attributes:
        view: Observed load per pool and step (policies read only the past of it, except the
            static peak-sized baselines and the oracle, whose definitions need the future).
        table: Profiles as arrays.
        profiles: The profiles themselves (the MILP reads them).
        service_models: Model serving each service.
        gpu_type: GPU type planned for.
        gpu_inventory: GPUs the cluster has.
        costs: Reconfiguration costs.
        plan_window_s: Window of one wattplan/oracle plan (a multiple of the step).
        cluster_period_s: Period of instance-count decisions (heuristic, ScaleInst).
        pool_period_s: Period of TP decisions (heuristic, ScaleShard).
        forecast_quantile: Quantile of the forecaster's peak-growth headroom.
        history_s: History the forecaster sees.
        grid: Carbon and prices for the MILP's figures (None: zeros).
        solver_time_limit_s: HiGHS time limit per plan.
        solver_mip_gap: HiGHS relative gap.
        forecast_config: The DAG's forecaster settings for the wattplan policy
            (``wattplan.jobs.forecast_config``; None: defaults at ``forecast_quantile``).
        forecast_refits_per_run: Most forecast series refitted per wattplan plan.
        target_utilization: Planning headroom of the wattplan policy's plans
            (``WATTPLAN_TARGET_UTILIZATION``); the oracle plans at 1.
        surge_replan: The wattplan policy re-plans the rest of a window out of cycle when
            a pool's observed rate exceeds its planned rate (``_plan_windows``).
        progress: Sink for progress lines.
    """

    view: LoadView
    table: ProfileTable
    profiles: tuple[Profile, ...]
    service_models: Mapping[str, str]
    gpu_type: str
    gpu_inventory: int
    costs: ReconfigCosts
    plan_window_s: int
    cluster_period_s: int = 1800
    pool_period_s: int = 300
    forecast_quantile: float = 0.95
    history_s: int = 7200
    grid: Grid | None = None
    solver_time_limit_s: float = 20.0
    solver_mip_gap: float = 0.01
    forecast_config: ForecastConfig | None = None
    forecast_refits_per_run: int = 2
    target_utilization: float = 1.0
    surge_replan: bool = True
    progress: Progress | None = field(default=None, compare=False)

    @property
    def step_s(self) -> int:
        """Simulation step."""
        return self.view.step_s

    @property
    def lead_steps(self) -> int:
        """Steps between a start decision and the step it serves (start-up time)."""
        return max(1, math.ceil(self.costs.startup_s / self.step_s - 1e-9))

    def steps_of(self, seconds: int) -> int:
        """A period in whole steps (at least one)."""
        return max(1, round(seconds / self.step_s))

    def say(self, line: str) -> None:
        """Report progress."""
        if self.progress:
            self.progress(line)


# --- helpers ---------------------------------------------------------------------------------


def _pools_by_service(view: LoadView) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for w, (service, _) in enumerate(view.pools):
        out.setdefault(service, []).append(w)
    return out


def _shapes(ctx: PolicyContext, service: str) -> dict[tuple[str, str, int, int, int], list[int]]:
    """Config indices of the service's model on the GPU type, by shape, slowest first."""
    model = ctx.service_models.get(service)
    if model is None:
        raise InputDataError(
            f"service {service!r} has no model; set WATTPLAN_SERVICE_MODELS "
            f"(e.g. {service}=llama2-70b) or pass --model"
        )
    configs = ctx.table.configs_for(model, [ctx.gpu_type])
    if not configs:
        raise InputDataError(f"no profile for model {model!r} on {ctx.gpu_type}")
    shapes: dict[tuple[str, str, int, int, int], list[int]] = {}
    for c in configs:
        shapes.setdefault(shape_of(ctx.table.configs[c]), []).append(c)
    for variants in shapes.values():
        variants.sort(key=lambda c: speed_key(ctx.table.configs[c]))
    return shapes


def _largest_shape(shapes: Mapping[tuple[str, str, int, int, int], list[int]]) -> list[int]:
    """The variants of the TP8 shape (no gang), else of the shape with the most GPUs."""
    plain = [s for s in shapes if s[3] == 1 and s[4] == 1]
    tp8 = [s for s in plain if s[2] == 8]
    pick = tp8[0] if tp8 else max(plain or list(shapes), key=lambda s: s[2] * s[3] * s[4])
    return shapes[pick]


def _type_index(ctx: PolicyContext, w: int) -> int:
    return ctx.table.type(ctx.view.pools[w][1])


def instances_needed(table: ProfileTable, config: int, demand: Mapping[int, float]) -> float:
    """Instances of ``config`` whose SLO capacity carries ``demand`` (type index -> rps).

    ``inf`` when the config has no profile for a type with demand; 0 without demand.
    """
    load = 0.0
    for t, rate in demand.items():
        if rate <= 0:
            continue
        cap = table.capacity_rps[config, t]
        if np.isnan(cap):
            return math.inf
        load += rate / cap
    return math.ceil(load - 1e-9) if load > 0 else 0


def pool_power_w(
    table: ProfileTable, config: int, instances: int, demand: Mapping[int, float]
) -> float:
    """Power of ``instances`` of ``config`` carrying ``demand`` (capacity-proportional split)."""
    if instances <= 0:
        return 0.0
    util = sum(rate / table.capacity_rps[config, t] for t, rate in demand.items() if rate > 0)
    u = util / instances
    if util <= 0:
        return instances * float(table.config_idle_w[config])
    watts = 0.0
    for t, rate in demand.items():
        if rate <= 0:
            continue
        share = rate / table.capacity_rps[config, t] / util
        watts += share * float(
            table.power_w(config, t, np.array([min(u, 1.0) * table.capacity_rps[config, t]]))[0]
        )
    return instances * watts


def _config(ctx: PolicyContext, c: int) -> ServingConfig:
    return ctx.table.configs[c]


class Forecaster:
    """The project's forecaster on the view's history, through :mod:`wattplan_policy`."""

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.history_steps = max(1, ctx.history_s // ctx.step_s)

    def planned(self, w: int, visible_end: int, first: int, steps: int) -> LoadForecast:
        """Forecast pool ``w`` for steps ``[first, first + steps)`` from steps before a cut.

        Only steps before ``visible_end`` are read.

        With nothing visible yet, step 0 is used (the run starts sized for its opening).
        """
        view = self.ctx.view
        end = max(1, min(visible_end, view.steps))
        begin = max(0, end - self.history_steps)
        service, rtype = view.pools[w]
        history = [
            TypeWindow(
                service,
                rtype,
                view.step_start(i),
                view.step_s,
                round(float(view.mean_rps[w, i]) * view.step_s),
                0,
                0,
                float(view.peak_rps[w, i]),
                float(view.mean_rps[w, i]),
            )
            for i in range(begin, end)
        ]
        horizon = max(first + steps - end, 1) * view.step_s
        return wattplan_policy.forecast_pool(
            history, view.step_start(end), horizon, self.ctx.forecast_quantile
        )


class WindowForecaster:
    """The DAG's forecaster (:class:`wattplan_policy.DagForecaster`) on the view's history.

    Series are per planning window (``plan_window_s``), built from the steps visible at
    decision time the way ``series_from_type_windows`` builds them from ingest windows (the
    mean over observed steps, the highest step peak; a window partly visible is partly
    observed, one not visible at all is missing). The forecaster works on epoch-aligned
    windows, so the view's clock is moved back to the last window boundary (less than one
    window; the time of day moves by that much).
    """

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        view = ctx.view
        self.window = ctx.steps_of(ctx.plan_window_s)
        self.window_s = self.window * view.step_s
        shift_s = view.start_at.timestamp() % self.window_s
        self.origin = view.start_at - timedelta(seconds=shift_s)
        self.first_step = round(self.origin.timestamp()) // self.window_s
        self.history_windows = max(1, ctx.history_s // self.window_s)
        config = ctx.forecast_config or ForecastConfig(quantile=ctx.forecast_quantile)
        self.dag = wattplan_policy.DagForecaster(config, ctx.forecast_refits_per_run)
        self.windows = [
            [
                TypeWindow(
                    service,
                    rtype,
                    self.origin + timedelta(seconds=i * view.step_s),
                    view.step_s,
                    round(float(view.mean_rps[w, i]) * view.step_s),
                    0,
                    0,
                    float(view.peak_rps[w, i]),
                    float(view.mean_rps[w, i]),
                )
                for i in range(view.steps)
            ]
            for w, (service, rtype) in enumerate(view.pools)
        ]

    def forecasts(self, visible_end: int, k: int) -> list[LoadForecast]:
        """Every pool's forecast for the planning window from step ``k`` (a window start).

        Only steps before ``visible_end`` are read (step 0 always: the run starts sized for
        its opening load; the first window is then forecast from it as the next one).
        """
        view = self.ctx.view
        end = max(1, min(visible_end, view.steps))
        at = -(-end // self.window)  # windows with a visible step
        target = max(k // self.window, at)
        first = max(0, at - self.history_windows)
        lo, hi = first * self.window, at * self.window
        series = []
        for w, (service, rtype) in enumerate(view.pools):
            mean = np.full(hi - lo, np.nan)
            peak = np.full(hi - lo, np.nan)
            mean[: end - lo] = view.mean_rps[w, lo:end]
            peak[: end - lo] = view.peak_rps[w, lo:end]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows stay NaN
                series.append(
                    LoadSeries(
                        service,
                        rtype,
                        self.first_step + first,
                        self.window_s,
                        np.nanmean(mean.reshape(-1, self.window), axis=1),
                        np.nanmax(peak.reshape(-1, self.window), axis=1),
                    )
                )
        windows = [x for per_pool in self.windows for x in per_pool[lo:end]]
        return self.dag.forecast(series, windows, self.first_step + at, self.first_step + target)


def _static(
    ctx: PolicyContext, name: str, items: list[LayoutItem], notes: tuple[str, ...] = ()
) -> Schedule:
    layout = Layout(tuple(i for i in items if i.instances > 0))
    return Schedule(
        name,
        ctx.view.start_at,
        ctx.step_s,
        (layout,) * ctx.view.steps,
        inventory_gpus=ctx.gpu_inventory,
        notes=notes,
    )


# --- the policies ----------------------------------------------------------------------------


def single_pool(ctx: PolicyContext) -> Schedule:
    """SinglePool: every type of a service on one TP8 pool at max clock, peak-sized."""
    items = []
    for service, ws in _pools_by_service(ctx.view).items():
        config = _largest_shape(_shapes(ctx, service))[-1]
        need = max(
            instances_needed(
                ctx.table, config, {_type_index(ctx, w): float(ctx.view.peak_rps[w, k]) for w in ws}
            )
            for k in range(ctx.view.steps)
        )
        if math.isinf(need):
            raise InputDataError(
                f"{_config(ctx, config).key} lacks a profile for a type of {service}"
            )
        items.append(LayoutItem(service, POOL_ALL, _config(ctx, config), max(int(need), 1)))
    return _static(ctx, "singlepool", items)


def _multipool_items(ctx: PolicyContext) -> list[LayoutItem]:
    items = []
    for service, ws in _pools_by_service(ctx.view).items():
        config = _largest_shape(_shapes(ctx, service))[-1]
        for w in ws:
            t = _type_index(ctx, w)
            need = instances_needed(ctx.table, config, {t: float(ctx.view.peak_rps[w].max())})
            if math.isinf(need):
                continue  # no profile: the type spills to another pool of the service
            items.append(LayoutItem(service, ctx.view.pools[w][1], _config(ctx, config), int(need)))
    return items


def multi_pool(ctx: PolicyContext) -> Schedule:
    """MultiPool: one TP8 pool per type at max clock, each sized for its type's peak."""
    return _static(ctx, "multipool", _multipool_items(ctx))


def _per_step(
    ctx: PolicyContext,
    name: str,
    decide: Callable[[int, dict[int, tuple[int, int]]], dict[int, tuple[int, int]]],
    governor: bool = False,
) -> Schedule:
    """Run ``decide(k, state) -> state`` over the steps; state: pool -> (config, instances)."""
    state: dict[int, tuple[int, int]] = {}
    layouts = []
    for k in range(ctx.view.steps):
        state = fit_inventory(ctx, decide(k, state))
        layouts.append(
            Layout(
                tuple(
                    LayoutItem(ctx.view.pools[w][0], ctx.view.pools[w][1], _config(ctx, c), n)
                    for w, (c, n) in sorted(state.items())
                    if n > 0
                )
            )
        )
    return Schedule(
        name,
        ctx.view.start_at,
        ctx.step_s,
        tuple(layouts),
        clock_governor=governor,
        inventory_gpus=ctx.gpu_inventory,
    )


def fit_inventory(
    ctx: PolicyContext, state: dict[int, tuple[int, int]]
) -> dict[int, tuple[int, int]]:
    """Trim instance counts until the layout fits the cluster's GPUs.

    One instance at a time from the pool holding the most GPUs (never below one instance),
    as an operator would when the forecast asks for more than the cluster has.
    """
    counts = dict(state)

    def gpus(w: int) -> int:
        c, n = counts[w]
        return n * int(ctx.table.gpus[c])

    total = sum(gpus(w) for w in counts)
    while total > ctx.gpu_inventory:
        w = max((w for w in counts if counts[w][1] > 1), key=gpus, default=None)
        if w is None:
            break
        c, n = counts[w]
        counts[w] = (c, n - 1)
        total -= int(ctx.table.gpus[c])
    return counts


def scale_inst(ctx: PolicyContext) -> Schedule:
    """ScaleInst: MultiPool's config; instances from the forecast peak every cluster period."""
    fc = Forecaster(ctx)
    period, lead = ctx.steps_of(ctx.cluster_period_s), ctx.lead_steps
    configs = {
        w: _largest_shape(_shapes(ctx, service))[-1]
        for service, ws in _pools_by_service(ctx.view).items()
        for w in ws
    }

    def decide(k: int, state: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
        if k % period:
            return state
        new = {}
        for w, c in configs.items():
            rate = fc.planned(w, k - lead, k, period).planned_rate_rps
            need = instances_needed(ctx.table, c, {_type_index(ctx, w): rate})
            if not math.isinf(need):
                new[w] = (c, int(need))
        return new

    return _per_step(ctx, "scaleinst", decide)


def _best_shape(
    ctx: PolicyContext,
    shapes: Mapping[tuple[str, str, int, int, int], list[int]],
    gpus: int,
    t: int,
    load: float,
    current: tuple[int, int] | None = None,
    period_s: float = 0.0,
) -> tuple[int, int]:
    """Within ``gpus`` GPUs: the shape (at max clock) with the least power carrying ``load``.

    With ``current`` (the pool's running config and count), the pool keeps its shape while
    that still carries the load, unless the power saved over ``period_s`` beats what the
    re-shard costs (its instances idle for ``reshard_s``): DOMAIN.md section 6's rule.
    """
    best: tuple[float, int, int] | None = None
    fallback: tuple[float, int, int] | None = None
    for variants in shapes.values():
        c = variants[-1]
        g = int(ctx.table.gpus[c])
        n = gpus // g
        cap = ctx.table.capacity_rps[c, t]
        if n < 1 or np.isnan(cap):
            continue
        capacity = n * cap
        if fallback is None or capacity > fallback[0]:
            fallback = (capacity, c, n)
        if capacity >= load:
            watts = pool_power_w(ctx.table, c, n, {t: load})
            if best is None or watts < best[0]:
                best = (watts, c, n)
    if best is not None and current is not None:
        c_now = ctx.table.variants(current[0])[-1]  # its shape at max clock
        n_now = gpus // int(ctx.table.gpus[c_now])
        if n_now >= 1 and n_now * ctx.table.capacity_rps[c_now, t] >= load:
            now_w = pool_power_w(ctx.table, c_now, n_now, {t: load})
            cost_j = best[2] * float(ctx.table.config_idle_w[best[1]]) * ctx.costs.reshard_s
            if (now_w - best[0]) * period_s <= cost_j:
                return c_now, n_now
    if best is not None:
        return best[1], best[2]
    if fallback is not None:
        return fallback[1], fallback[2]
    raise InputDataError(f"no shape fits in {gpus} GPUs for type {ctx.table.types[t]}")


def _slowest_clock(ctx: PolicyContext, config: int, instances: int, t: int, load: float) -> int:
    """The clock/cap variant of ``config``'s shape that carries ``load`` at the least power.

    DynamoLLM's rule is the slowest sufficient clock; where power grows with the clock that
    is the same choice, and where the profiles say otherwise the cheaper variant wins.
    """
    per_instance = load / max(instances, 1)
    variant, _ = ctx.table.govern(
        np.array([config]),
        np.array([t]),
        np.array([per_instance / ctx.table.capacity_rps[config, t]]),
    )
    return int(variant[0])


def scale_shard(ctx: PolicyContext) -> Schedule:
    """ScaleShard: MultiPool's GPUs per pool; TP chosen every pool period at max clock."""
    fc = Forecaster(ctx)
    period = ctx.steps_of(ctx.pool_period_s)
    budget = {}
    shapes_of = {}
    for item in _multipool_items(ctx):
        w = ctx.view.pools.index((item.service, item.request_type))
        budget[w] = item.instances * int(ctx.table.gpus[ctx.table.config(item.config.key)])
        shapes_of[w] = _shapes(ctx, item.service)

    def decide(k: int, state: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
        if k % period:
            return state
        new = {}
        for w, gpus in budget.items():
            if gpus <= 0:
                continue
            load = fc.planned(w, k, k, period).planned_rate_rps
            new[w] = _best_shape(
                ctx,
                shapes_of[w],
                gpus,
                _type_index(ctx, w),
                load,
                state.get(w),
                period * ctx.step_s,
            )
        return new

    return _per_step(ctx, "scaleshard", decide)


def scale_freq(ctx: PolicyContext) -> Schedule:
    """ScaleFreq: MultiPool's layout; every step, the slowest clock carrying the forecast load."""
    fc = Forecaster(ctx)
    base = {
        ctx.view.pools.index((i.service, i.request_type)): (
            ctx.table.config(i.config.key),
            i.instances,
        )
        for i in _multipool_items(ctx)
    }

    def decide(k: int, state: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
        new = {}
        for w, (c, n) in base.items():
            load = fc.planned(w, k, k, 1).planned_rate_rps
            new[w] = (_slowest_clock(ctx, c, n, _type_index(ctx, w), load), n)
        return new

    return _per_step(ctx, "scalefreq", decide, governor=True)


def heuristic(ctx: PolicyContext) -> Schedule:
    """DynamoLLM-style hierarchy: GPUs per pool, then TP, then clock (module docstring)."""
    fc = Forecaster(ctx)
    cluster, pool, lead = (
        ctx.steps_of(ctx.cluster_period_s),
        ctx.steps_of(ctx.pool_period_s),
        ctx.lead_steps,
    )
    shapes_of = {
        w: _shapes(ctx, service) for service, ws in _pools_by_service(ctx.view).items() for w in ws
    }
    budget: dict[int, int] = {}
    shape_choice: dict[int, tuple[int, int]] = {}

    def decide(k: int, state: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
        if k % cluster == 0:
            for w, shapes in shapes_of.items():
                t = _type_index(ctx, w)
                peak = fc.planned(w, k - lead, k, cluster).planned_rate_rps
                options = []
                for variants in shapes.values():
                    c = variants[-1]
                    need = instances_needed(ctx.table, c, {t: peak})
                    if not math.isinf(need):
                        options.append((need * int(ctx.table.gpus[c]), -int(ctx.table.gpus[c])))
                budget[w] = int(min(options)[0]) if options else 0
        new = {}
        for w, gpus in budget.items():
            if gpus <= 0:
                continue
            t = _type_index(ctx, w)
            if k % pool == 0 or w not in shape_choice:
                load = fc.planned(w, k, k, pool).planned_rate_rps
                shape_choice[w] = _best_shape(
                    ctx, shapes_of[w], gpus, t, load, shape_choice.get(w), pool * ctx.step_s
                )
            c, n = shape_choice[w]
            load = fc.planned(w, k, k, 1).planned_rate_rps
            new[w] = (_slowest_clock(ctx, c, n, t, load), n)
        return new

    return _per_step(ctx, "heuristic", decide, governor=True)


def _milp_profiles(ctx: PolicyContext) -> tuple[Profile, ...]:
    models = set(ctx.service_models.values())
    return tuple(
        p for p in ctx.profiles if p.config.model in models and p.config.gpu_type == ctx.gpu_type
    )


def _surge_floor(
    ctx: PolicyContext, forecasts: list[LoadForecast], seen: int, visible_end: int
) -> list[LoadForecast] | None:
    """The plan's forecasts floored at the busiest rate seen since, if one was exceeded.

    Steps ``[seen, visible_end)`` became visible after the plan in force was made. When a
    pool's busiest-minute rate in them exceeds the rate the plan was asked to carry (its
    forecast's planned rate), that forecast's planned rate (and peak) is raised to the
    observed rate; None when no pool's was exceeded.
    """
    if visible_end <= seen:
        return None
    index = {pool: w for w, pool in enumerate(ctx.view.pools)}
    out = []
    surged = False
    for f in forecasts:
        w = index.get((f.service, f.request_type))
        if w is None:
            out.append(f)
            continue
        seen_peak = float(ctx.view.peak_rps[w, seen:visible_end].max())
        if seen_peak > f.planned_rate_rps * (1 + 1e-9):
            surged = True
            f = replace(
                f, planned_rate_rps=seen_peak, peak_rate_rps=max(f.peak_rate_rps, seen_peak)
            )
        out.append(f)
    return out if surged else None


def _plan_windows(
    ctx: PolicyContext,
    name: str,
    forecasts_for: Callable[[int, int], list[LoadForecast]],
    startup_s: float,
    free: bool,
    target_utilization: float = 1.0,
    surge_lead: int | None = None,
) -> Schedule:
    """One MILP plan per planning window; with ``surge_lead``, out-of-cycle surge re-plans.

    ``forecasts_for(k, steps)`` gives the forecasts of the window of ``steps`` steps from
    step ``k``; a plan for a window from step ``k`` has seen steps before ``k - surge_lead``
    (``forecasts_for`` enforces its own causality). With ``surge_lead``, at every later
    step ``j`` of the window the steps before ``j - surge_lead`` not yet seen by the plan in
    force are checked (:func:`_surge_floor`): when a pool's busiest-minute rate exceeded
    its planned rate, the rest of the window is re-planned from the running layout with
    that pool's planned rate floored at the observed rate (start-up costs counted, made
    ``surge_lead`` steps ahead of ``j`` like a regular plan).
    """
    window = ctx.steps_of(ctx.plan_window_s)
    profiles = _milp_profiles(ctx)
    current = Layout()
    layouts: list[Layout] = []
    solves = kept = shrunk = replans = 0
    solve_s = forecast_s = 0.0
    notes: list[str] = []
    decisions = math.ceil(ctx.view.steps / window)
    planned = np.zeros((len(ctx.view.pools), ctx.view.steps))
    fitted = np.ones(ctx.view.steps)
    index = {pool: w for w, pool in enumerate(ctx.view.pools)}

    def plan(k: int, steps: int, forecasts: list[LoadForecast]) -> tuple[Layout, dict[str, object]]:
        nonlocal solve_s
        at = ctx.view.step_start(k)
        carbon = price = 0.0
        if ctx.grid is not None:
            carbon = float(ctx.grid.carbon.at([at])[0])
            price = float(ctx.grid.price.at([at])[0])
        request = wattplan_policy.PlanRequest(
            window_s=steps * ctx.step_s,
            service_models=ctx.service_models,
            profiles=profiles,
            gpu_type=ctx.gpu_type,
            gpu_inventory=ctx.gpu_inventory,
            current=current,
            startup_s=startup_s,
            carbon_g_per_kwh=carbon,
            electricity_usd_per_mwh=price,
            gpu_usd_per_hour=ctx.grid.gpu_usd_per_hour if ctx.grid else 0.0,
            time_limit_s=ctx.solver_time_limit_s,
            mip_gap=ctx.solver_mip_gap,
            target_utilization=target_utilization,
        )
        t0 = time.perf_counter()
        layout, record = wattplan_policy.solve(forecasts, request)
        solve_s += time.perf_counter() - t0
        demand_share = record.get("demand_share", 1.0)
        assert isinstance(demand_share, int | float)
        fitted[k : k + steps] = 0.0 if record.get("kept_current") else float(demand_share)
        for f in forecasts:
            if (f.service, f.request_type) in index:
                planned[index[(f.service, f.request_type)], k : k + steps] = f.planned_rate_rps
        if record.get("kept_current") and len(notes) < 5:
            notes.append(f"window {at.isoformat()}: {record.get('reason')}")
        return layout, record

    for i, k in enumerate(range(0, ctx.view.steps, window)):
        steps = min(window, ctx.view.steps - k)
        t0 = time.perf_counter()
        forecasts = forecasts_for(k, steps)
        forecast_s += time.perf_counter() - t0
        layout, record = plan(k, steps, forecasts)
        solves += 1
        kept += bool(record.get("kept_current"))
        shrunk += "demand_share" in record and not record.get("kept_current")
        current = layout
        layouts.extend([layout] * steps)
        lead = surge_lead if surge_lead is not None else 0
        seen = max(1, k - lead)
        for j in range(k + 1, k + steps) if surge_lead is not None else ():
            visible_end = max(1, j - lead)
            floored = _surge_floor(ctx, forecasts, seen, visible_end)
            seen = max(seen, visible_end)
            if floored is None:
                continue
            forecasts = floored
            layout, record = plan(j, k + steps - j, forecasts)
            replans += 1
            kept += bool(record.get("kept_current"))
            shrunk += "demand_share" in record and not record.get("kept_current")
            current = layout
            layouts[j : k + steps] = [layout] * (k + steps - j)
        if decisions >= 10 and (i + 1) % max(1, decisions // 10) == 0:
            ctx.say(f"{name}: planned {i + 1}/{decisions} windows ({solve_s:.0f} s in the MILP)")
    if kept:
        notes.append(
            f"{kept} of {solves + replans} plans kept the running layout (no feasible plan)"
        )
    if shrunk:
        notes.append(
            f"{shrunk} of {solves + replans} plans planned a share of the forecast: all of it "
            "did not fit the cluster"
        )
    decided: dict[str, float] = {
        "plans": solves,
        "kept_running_layout": kept,
        "shrunk_to_fit": shrunk,
        "solver_s": round(solve_s, 2),
        "forecast_s": round(forecast_s, 2),
    }
    if surge_lead is not None:
        decided["surge_replans"] = replans
    return Schedule(
        name,
        ctx.view.start_at,
        ctx.step_s,
        tuple(layouts),
        free_reconfiguration=free,
        clock_governor=True,
        inventory_gpus=ctx.gpu_inventory,
        notes=tuple(notes),
        decisions=decided,
        planned_rps=planned,
        planned_share=fitted,
    )


def wattplan(ctx: PolicyContext) -> Schedule:
    """The project's forecaster + MILP, one plan per window, start-up costs counted.

    The plan for a window is made ``startup_s`` before it (new instances must be up at its
    start), by the DAG's forecaster on the planning-window series visible then.
    """
    fc = WindowForecaster(ctx)
    lead = ctx.lead_steps

    def forecasts(k: int, steps: int) -> list[LoadForecast]:
        return fc.forecasts(k - lead, k)

    schedule = _plan_windows(
        ctx,
        "wattplan",
        forecasts,
        ctx.costs.startup_s,
        free=False,
        target_utilization=ctx.target_utilization,
        surge_lead=lead if ctx.surge_replan else None,
    )
    dag = fc.dag
    schedule.decisions.update(
        forecast_runs=dag.runs,
        forecast_refits=dag.refits,
        forecast_fallbacks=dag.fallbacks,
    )
    models = ", ".join(f"{m} {n}" for m, n in sorted(dag.models.items(), key=lambda x: -x[1]))
    return replace(
        schedule, notes=(*schedule.notes, f"forecast models used (pool x plan): {models}")
    )


def oracle(ctx: PolicyContext) -> Schedule:
    """The MILP with each window's true peak and mean, and free reconfiguration."""
    view = ctx.view

    def forecasts(k: int, steps: int) -> list[LoadForecast]:
        out = []
        for w, (service, rtype) in enumerate(view.pools):
            peak = float(view.peak_rps[w, k : k + steps].max())
            mean = float(view.mean_rps[w, k : k + steps].mean())
            out.append(
                LoadForecast(
                    service,
                    rtype,
                    view.step_start(k),
                    steps * view.step_s,
                    mean,
                    peak,
                    peak,
                    1.0,
                    "oracle",
                )
            )
        return out

    return _plan_windows(ctx, "oracle", forecasts, 0.0, free=True)


#: Policies by name, in the order results are reported.
POLICIES: dict[str, Callable[[PolicyContext], Schedule]] = {
    "singlepool": single_pool,
    "multipool": multi_pool,
    "scaleinst": scale_inst,
    "scaleshard": scale_shard,
    "scalefreq": scale_freq,
    "heuristic": heuristic,
    "wattplan": wattplan,
    "oracle": oracle,
}


def run_policy(name: str, ctx: PolicyContext) -> Schedule:
    """The schedule of a registered policy.

    Raises:
        InputDataError: unknown policy name.
    """
    try:
        policy = POLICIES[name]
    except KeyError:
        raise InputDataError(
            f"unknown policy {name!r}; choose from {', '.join(POLICIES)}"
        ) from None
    return policy(ctx)

"""The one place where the simulator calls the project's forecaster and optimizer.

The wattplan policy plans through the same code the ``plan_cluster`` DAG runs
(``wattplan.jobs.forecast_load`` and ``propose_plan``): :class:`DagForecaster` runs
``forecasting.planning.plan_forecasts`` (statsmodels candidates selected per series by
backtest, refitted at most ``forecast_refits_per_run`` series per run when due, filtered
through stored parameters in between, persistence-peak fallback for short histories) on
planning-window series, keeping the series states between runs as the DAG keeps them in
PostgreSQL; :func:`solve` runs ``optimizer.solve.solve_layout`` on
:class:`~optimizer.inputs.PlanInputs` built the way ``propose_plan`` builds them.

The forecast-driven baselines (ScaleInst, ScaleShard, ScaleFreq, the heuristic) forecast
every simulation step with :func:`forecast_pool` (``forecasting.peak``: persistence of the
last peak times a quantile of its growth), which is cheap enough to call per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from forecasting.peak import ForecastSpec, forecast_peak
from forecasting.planning import StateKey, plan_forecasts
from forecasting.selection import ForecastConfig, SeriesState
from forecasting.series import LoadSeries
from optimizer.inputs import PlanInputs, Reconfiguration, SolverOptions, sized_demand_rps
from optimizer.solve import solve_layout
from wattplan.domain import Layout, LoadForecast, Profile, TypeWindow
from wattplan.errors import InfeasiblePlanError, SolverError


@dataclass
class DagForecaster:
    """``plan_forecasts`` run after run, with the series states kept in memory.

    Attributes:
        config: The forecaster's settings (``wattplan.jobs.forecast_config``).
        max_refreshes: Most series refitted per run (``WATTPLAN_FORECAST_REFITS_PER_RUN``).
        states: Series states by (service, request type, target), as the DAG stores them.
        runs: Runs so far; ``refits``: series refitted; ``fallbacks``: pool forecasts
            with a fallback reason (the persistence peak for a short or not yet fitted
            history, a baseline selected for want of history, the level-shift guard).
        models: Pool forecasts per model that made them.
    """

    config: ForecastConfig
    max_refreshes: int = 2
    states: dict[StateKey, SeriesState] = field(default_factory=dict)
    runs: int = 0
    refits: int = 0
    fallbacks: int = 0
    models: dict[str, int] = field(default_factory=dict)

    def forecast(
        self,
        series: Sequence[LoadSeries],
        windows: Sequence[TypeWindow],
        at_step: int,
        target_step: int,
    ) -> list[LoadForecast]:
        """Forecasts of every pool for the planning window at epoch step ``target_step``.

        Args:
            series: Per-pool planning-window series ending just before ``at_step`` (the
                last window may be partly observed, as when the DAG runs early).
            windows: The observed (ingest) windows the series were built from; the
                fallback forecaster reads them.
            at_step: Epoch step of the first window not in ``series``.
            target_step: Epoch step of the planned window (``>= at_step``): forecast
                ``target_step - at_step + 1`` windows ahead.
        """
        horizon = target_step - at_step + 1
        config = (
            self.config if horizon == self.config.horizon else replace(self.config, horizon=horizon)
        )
        result = plan_forecasts(
            windows, series, self.states, at_step, config, max_refreshes=self.max_refreshes
        )
        self.states = {(s.service, s.request_type, s.target): s for s in result.states}
        self.runs += 1
        self.refits += len(result.refreshed)
        out = []
        for record in result.records:
            if record.horizon_steps != horizon:
                continue
            if record.fallback_reason:
                self.fallbacks += 1
            model = record.forecast.method
            self.models[model] = self.models.get(model, 0) + 1
            out.append(record.forecast)
        return out


@dataclass(frozen=True)
class PlanRequest:
    """What one planning call needs besides the forecasts.

    Attributes:
        window_s: Length of the planned window.
        service_models: Model serving each service.
        profiles: Candidate profiles (only the services' models on ``gpu_type``).
        gpu_type: GPU type of the inventory.
        gpu_inventory: GPUs available.
        current: Layout running now (start-up costs are counted against it).
        startup_s: Cold-start time of an instance (0: free reconfiguration).
        carbon_g_per_kwh: Grid carbon intensity over the window.
        electricity_usd_per_mwh: Electricity price over the window.
        gpu_usd_per_hour: Price of one GPU-hour.
        time_limit_s: Solver time limit.
        mip_gap: Solver relative gap.
        shrink_when_infeasible: When no layout carries the forecast within the inventory,
            plan the largest uniform share of it that fits (the whole cluster, used as
            well as it can be) instead of keeping the running layout as the DAG does today.
        target_utilization: Planning headroom (``WATTPLAN_TARGET_UTILIZATION``): each pool
            is sized for its planned rate over this (``optimizer.inputs.sized_demand_rps``).
    """

    window_s: int
    service_models: Mapping[str, str]
    profiles: tuple[Profile, ...]
    gpu_type: str
    gpu_inventory: int
    current: Layout
    startup_s: float
    carbon_g_per_kwh: float = 0.0
    electricity_usd_per_mwh: float = 0.0
    gpu_usd_per_hour: float = 0.0
    time_limit_s: float = 20.0
    mip_gap: float = 0.01
    shrink_when_infeasible: bool = True
    target_utilization: float = 1.0


def forecast_pool(
    history: Sequence[TypeWindow], window_start: datetime, window_s: int, quantile: float
) -> LoadForecast:
    """Forecast one pool's load for ``[window_start, window_start + window_s)``.

    The persistence-peak forecaster (``forecasting.peak``) the DAG falls back to, with the
    settings' forecast quantile: what the per-step baselines use.
    """
    return forecast_peak(history, window_start, window_s, ForecastSpec(quantile=quantile))


def solve(
    forecasts: Sequence[LoadForecast], request: PlanRequest
) -> tuple[Layout, dict[str, object]]:
    """The layout ``propose_plan`` would propose for these forecasts.

    When no layout carries the forecast within the inventory and
    ``request.shrink_when_infeasible`` is set, the forecast is scaled down uniformly (first
    to what the inventory carries at the best capacity per GPU, then by 10% steps, at most
    four solves) and the record holds ``demand_share``. Otherwise, or when even that fails,
    the current layout stays, as the DAG keeps the last applied plan.

    Returns:
        The layout and the solver record (``kept_current`` and ``reason`` when it stayed).
    """
    share = 1.0
    reason = ""
    for _ in range(4):
        try:
            layout, record = _solve_once(forecasts, request, share)
        except (InfeasiblePlanError, SolverError) as exc:
            reason = str(exc)
            if not request.shrink_when_infeasible:
                break
            share *= _fitting_share(forecasts, request) if share == 1.0 else 0.9
            continue
        if share < 1.0:
            record = {**record, "demand_share": round(share, 4), "reason": reason}
        return layout, record
    return request.current, {"kept_current": True, "reason": reason}


def _solve_once(
    forecasts: Sequence[LoadForecast], request: PlanRequest, share: float
) -> tuple[Layout, dict[str, object]]:
    inputs = PlanInputs(
        window_s=request.window_s,
        demand_rps={
            (f.service, f.request_type): share
            * sized_demand_rps(f.planned_rate_rps, request.target_utilization)
            for f in forecasts
        },
        mean_rps={
            (f.service, f.request_type): share * min(f.mean_rate_rps, f.planned_rate_rps)
            for f in forecasts
        },
        service_models=dict(request.service_models),
        profiles=request.profiles,
        gpu_inventory={request.gpu_type: request.gpu_inventory},
        current=request.current,
        carbon_g_per_kwh=request.carbon_g_per_kwh,
        electricity_usd_per_mwh=request.electricity_usd_per_mwh,
        gpu_usd_per_hour={request.gpu_type: request.gpu_usd_per_hour},
        reconfiguration=Reconfiguration(  # free reconfiguration (the oracle): all zero
            startup_s=request.startup_s,
            reshard_s=min(90.0, request.startup_s),
            clock_change_s=min(0.08, request.startup_s),
        ),
        solver=SolverOptions(time_limit_s=request.time_limit_s, mip_gap=request.mip_gap),
    )
    solution = solve_layout(inputs)
    return solution.layout, dict(solution.solver)


def _fitting_share(forecasts: Sequence[LoadForecast], request: PlanRequest) -> float:
    """Share of the forecast the inventory can carry at the best capacity per GPU (a bound)."""
    gpus_needed = 0.0
    for f in forecasts:
        model = request.service_models.get(f.service)
        per_gpu = [
            p.capacity_rps
            / (p.config.tp * getattr(p.config, "spp", 1) * getattr(p.config, "kvp", 1))
            for p in request.profiles
            if p.config.model == model and p.request_type == f.request_type
        ]
        if per_gpu and f.planned_rate_rps > 0:
            sized = sized_demand_rps(f.planned_rate_rps, request.target_utilization)
            gpus_needed += sized / max(per_gpu)
    if gpus_needed <= 0:
        return 0.9
    return min(0.98, 0.98 * request.gpu_inventory / gpus_needed)

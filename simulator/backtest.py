"""``wattplan backtest``: run policies on a workload in the simulator and compare them.

Prints per policy: energy (kWh), energy saved vs SinglePool, SLO attainment per type, P99
TTFT/TBT, GPU-hours, carbon (kg), cost ($) and reconfigurations; writes ``results.json``,
per-step CSVs and plots (energy and GPUs over time per policy) to the output folder.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from simulator.engine import SimResult, simulate_rates, simulate_requests
from simulator.grid import Grid, load_grid
from simulator.model import ProfileTable, ReconfigCosts
from simulator.policies import POLICIES, PolicyContext, run_policy
from simulator.policies import _largest_shape as largest_shape
from simulator.policies import _shapes as shapes_of
from simulator.schedule import Schedule
from simulator.workload import BUNDLED, LoadView, RateWorkload, RequestTrace, load_workload, view_of
from wattplan.domain import Profile
from wattplan.errors import InputDataError, WattplanError
from wattplan.jobs import forecast_config
from wattplan.settings import Settings

J_PER_KWH = 3.6e6
GPUS_PER_SERVER = 8


def _say(line: str) -> None:
    print(f"backtest: {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BacktestConfig:
    """One backtest run's choices (the command's options, resolved)."""

    workload: str
    policies: tuple[str, ...]
    servers: float
    out_dir: Path | None
    step_s: int | None = None
    window_s: int | None = None
    hours: float | None = None
    model: str | None = None
    profiles_path: Path | None = None
    profiles_from_db: bool = False
    seed: int = 0
    surge_replan: bool = True


def load_profile_set(settings: Settings, config: BacktestConfig) -> list[Profile]:
    """Profiles from a CSV (default: the settings' profile table) or from the database."""
    if config.profiles_from_db:
        from wattplan import jobs, store

        engine = jobs.engine_for(settings)
        try:
            with engine.connect() as conn:
                found = store.read_profiles(conn, settings.profile_version)
        finally:
            engine.dispose()
        if not found:
            raise InputDataError(
                f"no profiles of version {settings.profile_version!r} in the database: run the "
                "reference_data DAG or use --profiles PATH"
            )
        return found
    from profiles import load_profiles

    return load_profiles(config.profiles_path or settings.profiles_path)


def service_models(
    settings: Settings, table: ProfileTable, services: Sequence[str], model: str | None
) -> tuple[dict[str, str], list[str]]:
    """Model per service: ``--model``, else WATTPLAN_SERVICE_MODELS, else the profiles' first.

    Returns:
        The mapping and notes on services that fell back to the profile set's first model.
    """
    known = dict(settings.service_models)
    notes = []
    models_on_gpu = [c.model for c in table.configs if c.gpu_type == settings.gpu_type]
    if not models_on_gpu:
        raise InputDataError(f"the profile set has no config on {settings.gpu_type}")
    out = {}
    for service in services:
        if model:
            out[service] = model
        elif service in known and known[service] in models_on_gpu:
            out[service] = known[service]
        else:
            out[service] = models_on_gpu[0]
            notes.append(
                f"service {service!r} served by {models_on_gpu[0]} (first model of the profile set)"
            )
    return out, notes


def _singlepool_servers(
    view: LoadView, ctx_table: ProfileTable, models: dict[str, str], gpu_type: str
) -> float:
    """Servers (8 GPUs) SinglePool needs at the view's peak, fractional."""
    total = 0.0
    for service in {s for s, _ in view.pools}:
        dummy = PolicyContext(
            view, ctx_table, (), models, gpu_type, 0, ReconfigCosts(), view.step_s
        )
        config = largest_shape(shapes_of(dummy, service))[-1]
        ws = [w for w, (s, _) in enumerate(view.pools) if s == service]
        util = 0.0
        for k in range(view.steps):
            u = sum(
                float(view.peak_rps[w, k])
                / ctx_table.capacity_rps[config, ctx_table.type(view.pools[w][1])]
                for w in ws
            )
            util = max(util, u)
        total += util * float(ctx_table.gpus[config]) / GPUS_PER_SERVER
    return total


def run_backtest(config: BacktestConfig, settings: Settings) -> dict[str, Any]:
    """Load, scale, plan and simulate; return the results document (see module docstring)."""
    started = time.perf_counter()
    profiles = load_profile_set(settings, config)
    table = ProfileTable(profiles)
    _say(f"loading workload {config.workload}")
    workload = load_workload(config.workload, settings.data_dir)
    if isinstance(workload, RateWorkload):
        step_s = workload.window_s
        if config.hours:
            workload = workload.sliced(0, max(1, int(config.hours * 3600 // workload.window_s)))
    else:
        step_s = config.step_s or settings.ingest_window_s
        if config.hours:
            workload = workload.sliced(0.0, config.hours * 3600)
    if config.step_s and config.step_s != step_s:
        raise InputDataError(
            f"--step-s {config.step_s}: a rate workload's step is its window ({step_s} s)"
        )
    default_window = 300 if isinstance(workload, RequestTrace) else settings.window_s
    window_s = config.window_s or default_window
    if window_s % step_s:
        raise InputDataError(f"--window-s {window_s} must be a multiple of the step ({step_s} s)")
    services = sorted({s for s, _ in workload.pools})
    models, notes = service_models(settings, table, services, config.model)
    view = view_of(workload, step_s)
    factor = 1.0
    if config.servers > 0:
        original = workload
        # SinglePool rounds its instances up: aim inside (N - 1, N]. Copies of a trace's
        # requests land at random, so the peak moves a little with the factor: re-measure.
        target = config.servers - 0.3
        for _ in range(8):
            servers = _singlepool_servers(view, table, models, settings.gpu_type)
            if servers <= 0:
                raise InputDataError("the workload carries no load to scale")
            if config.servers - 0.95 < servers <= config.servers - 1e-3:
                break
            factor *= target / servers
            workload = (
                original.scaled(factor)
                if isinstance(original, RateWorkload)
                else original.scaled(factor, config.seed)
            )
            view = view_of(workload, step_s)
    _say(
        f"{describe(workload)}; load x{factor:.3g}; steps of {step_s} s; "
        f"plan windows of {window_s} s"
    )
    grid = load_grid(settings.data_dir, settings.carbon_zone, settings.gpu_type)
    costs = ReconfigCosts(startup_s=settings.startup_s)

    def context(inventory: int) -> PolicyContext:
        return PolicyContext(
            view=view,
            table=table,
            profiles=tuple(profiles),
            service_models=models,
            gpu_type=settings.gpu_type,
            gpu_inventory=inventory,
            costs=costs,
            plan_window_s=window_s,
            forecast_quantile=settings.forecast_quantile,
            history_s=settings.history_s,
            grid=grid,
            solver_time_limit_s=settings.solver_time_limit_s,
            solver_mip_gap=settings.solver_mip_gap,
            forecast_config=forecast_config(settings),
            forecast_refits_per_run=settings.forecast_refits_per_run,
            target_utilization=settings.target_utilization,
            surge_replan=config.surge_replan,
            progress=_say,
        )

    # The cluster holds what the static baselines need (SinglePool, MultiPool): every
    # policy plans within those GPUs.
    inventory = max(
        run_policy(name, context(0)).layouts[0].gpus for name in ("singlepool", "multipool")
    )
    ctx = context(inventory)
    results: dict[str, SimResult] = {}
    schedules = {}
    for name in config.policies:
        t0 = time.perf_counter()
        _say(f"policy {name}: planning")
        schedule = run_policy(name, ctx)
        plan_s = time.perf_counter() - t0
        if isinstance(workload, RateWorkload):
            result = simulate_rates(workload, schedule, table, costs, progress=_say)
        else:
            result = simulate_requests(workload, schedule, table, costs, progress=_say)
        _say(
            f"policy {name}: planned in {plan_s:.1f} s, simulated in {result.wall_s:.2f} s, "
            f"{result.energy_j.sum() / J_PER_KWH:,.1f} kWh"
        )
        results[name] = result
        schedules[name] = (schedule, plan_s)
    document = summarise(results, schedules, workload, grid, factor, inventory, window_s, notes)
    labels = _label(workload.pools)
    for name, (schedule, _) in schedules.items():
        causes = miss_causes(results[name], schedule, view.peak_rps)
        if causes is not None:
            document["policies"][name]["slo_miss_causes"] = dict(zip(labels, causes, strict=True))
    document["elapsed_s"] = round(time.perf_counter() - started, 2)
    if config.out_dir is not None:
        write_outputs(config.out_dir, document, results, grid)
        _say(f"wrote {config.out_dir}")
    return document


MISS_CAUSES = (
    "under_forecast",
    "cluster_too_small",
    "after_under_forecast",
    "reconfiguration",
    "other",
)


def miss_causes(
    result: SimResult, schedule: Schedule, peak_rps: np.ndarray
) -> list[dict[str, float]] | None:
    """Per type, the share of its requests that missed an SLO, by cause (planning policies).

    Each step's misses of a type count as: ``under_forecast`` where the forecast the plan
    in force was made from lies below the step's busiest-minute rate of the type;
    ``cluster_too_small`` where the forecast covered it but the share of it that fitted
    the cluster did not; ``after_under_forecast`` in the step after an under-provisioned
    step that missed (its backlog drains); ``reconfiguration`` in a step whose layout
    changed (start-ups, re-shards, clock changes); ``other`` otherwise (the plan covered
    the load and the layout stood still). None for policies without a recorded forecast.
    """
    planned, share = schedule.planned_rps, schedule.planned_share
    if planned is None or share is None:
        return None
    out = []
    for w in range(len(result.pools)):
        missed = result.requests[w] - result.met[w]
        total = max(float(result.requests[w].sum()), 1e-12)
        counts = dict.fromkeys(MISS_CAUSES, 0.0)
        short_before = False
        for k in range(result.steps):
            peak = float(peak_rps[w, k])
            under = planned[w, k] < peak
            short = planned[w, k] * share[k] < peak
            m = float(missed[k])
            if m > 1e-9:
                if under:
                    cause = "under_forecast"
                elif short:
                    cause = "cluster_too_small"
                elif short_before:
                    cause = "after_under_forecast"
                elif k > 0 and schedule.layouts[k] != schedule.layouts[k - 1]:
                    cause = "reconfiguration"
                else:
                    cause = "other"
                counts[cause] += m
            short_before = short and m > 0.01 * float(result.requests[w, k])
        out.append({c: round(v / total, 5) for c, v in counts.items()})
    return out


def describe(workload: RequestTrace | RateWorkload) -> str:
    """One line about a workload."""
    if isinstance(workload, RateWorkload):
        return (
            f"{workload.name}: {workload.windows} windows of {workload.window_s} s, "
            f"{len(workload.pools)} pools, "
            f"{float((workload.rate_rps * workload.window_s).sum()):,.0f} requests"
        )
    return (
        f"{workload.name}: {len(workload):,} requests over {workload.duration_s / 3600:.2f} h, "
        f"{len(workload.pools)} pools"
    )


def _label(pools: Sequence[tuple[str, str]]) -> list[str]:
    services = {s for s, _ in pools}
    return [t if len(services) == 1 else f"{s}/{t}" for s, t in pools]


def _num(value: float, digits: int = 4) -> float | str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if math.isinf(value):
        return "inf"
    return round(float(value), digits)


def summarise(
    results: dict[str, SimResult],
    schedules: dict[str, Any],
    workload: RequestTrace | RateWorkload,
    grid: Grid,
    factor: float,
    inventory: int,
    window_s: int,
    notes: list[str],
) -> dict[str, Any]:
    """The results document: per policy figures, targets, and per-step series."""
    any_result = next(iter(results.values()))
    times = [
        any_result.start_at + timedelta(seconds=k * any_result.step_s)
        for k in range(any_result.steps)
    ]
    carbon = grid.carbon.at(times)
    price = grid.price.at(times)
    labels = _label(any_result.pools)
    base = results.get("singlepool")
    policies: dict[str, Any] = {}
    for name, r in results.items():
        kwh = r.energy_j / J_PER_KWH
        gpu_h = r.gpu_s / 3600
        att = r.attainment()
        energy = float(kwh.sum())
        gpu_usd = float(gpu_h.sum()) * grid.gpu_usd_per_hour
        power_usd = float((kwh * price).sum()) / 1000
        schedule, plan_s = schedules[name]
        policies[name] = {
            "energy_kwh": round(energy, 3),
            "saving_vs_singlepool": _num(1 - energy / (base.energy_j.sum() / J_PER_KWH))
            if base
            else None,
            "slo_attainment": {lab: _num(a, 5) for lab, a in zip(labels, att, strict=True)},
            "slo_attainment_min": _num(float(np.nanmin(att)), 5)
            if np.isfinite(att).any()
            else None,
            "slo_attainment_all": _num(float(r.met.sum() / max(r.requests.sum(), 1e-12)), 5),
            "ttft_p99_s": {lab: _num(v) for lab, v in zip(labels, r.run_ttft_p99_s, strict=True)},
            "tbt_p99_s": {lab: _num(v) for lab, v in zip(labels, r.run_tbt_p99_s, strict=True)},
            "ttft_p50_s": {lab: _num(v) for lab, v in zip(labels, r.run_ttft_p50_s, strict=True)},
            "tbt_p50_s": {lab: _num(v) for lab, v in zip(labels, r.run_tbt_p50_s, strict=True)},
            "gpu_hours": round(float(gpu_h.sum()), 3),
            "mean_gpus": round(float(r.gpus.mean()), 2),
            "peak_gpus": int(r.gpus.max()),
            "carbon_kg": round(float((kwh * carbon).sum()) / 1000, 3),
            "cost_usd": round(gpu_usd + power_usd, 2),
            "cost_gpu_usd": round(gpu_usd, 2),
            "cost_electricity_usd": round(power_usd, 2),
            "reconfigurations": {
                "total": r.changes.total,
                "cold_starts": r.changes.cold_starts,
                "reshards": r.changes.reshards,
                "clock_changes": r.changes.clock_changes,
                "moves": r.changes.moves,
                "stops": r.changes.stops,
            },
            "reconfiguration_energy_kwh": round(float(r.reconfig_energy_j.sum()) / J_PER_KWH, 3),
            "requests": round(float(r.requests.sum())),
            "unserved_requests": round(float(r.unserved.sum())),
            "rerouted_requests": round(float(r.rerouted.sum())),
            "plan_s": round(plan_s, 2),
            "simulate_s": round(r.wall_s, 3),
            "decisions": schedule.decisions,
            "notes": list(schedule.notes),
            "series": {
                "energy_kwh": [round(float(x), 4) for x in kwh],
                "gpus": [int(x) for x in r.gpus],
            },
        }
    return {
        "workload": {
            "name": workload.name,
            "mode": any_result.mode,
            "pools": labels,
            "start_at": any_result.start_at.isoformat(),
            "steps": any_result.steps,
            "step_s": any_result.step_s,
            "plan_window_s": window_s,
            "load_factor": round(factor, 6),
            "cluster_gpus": inventory,
            "requests": round(float(any_result.requests.sum())),
            "notes": list(workload.notes) + notes + grid.carbon.notes[:1] + grid.price.notes[:1],
        },
        "grid": {
            "zone": grid.zone,
            "gpu_type": grid.gpu_type,
            "gpu_usd_per_hour": grid.gpu_usd_per_hour,
        },
        "policies": policies,
        "targets": targets(policies),
    }


def targets(policies: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for the wattplan policy, where the needed policies ran."""
    w = policies.get("wattplan")
    if w is None:
        return {}
    out: dict[str, Any] = {
        "slo_attainment_min": w["slo_attainment_min"],
        "slo_attainment_every_type_ge_0.99": (w["slo_attainment_min"] or 0) >= 0.99,
    }
    if w["saving_vs_singlepool"] is not None:
        out["saving_vs_singlepool"] = w["saving_vs_singlepool"]
        out["saving_ge_0.5"] = w["saving_vs_singlepool"] >= 0.5
    if "heuristic" in policies:
        out["beats_heuristic_energy"] = w["energy_kwh"] < policies["heuristic"]["energy_kwh"]
    if "oracle" in policies:
        gap = w["energy_kwh"] / policies["oracle"]["energy_kwh"] - 1
        out["energy_over_oracle"] = round(gap, 4)
        out["within_10pct_of_oracle"] = gap <= 0.10
    return out


def write_outputs(
    out_dir: Path, document: dict[str, Any], results: dict[str, SimResult], grid: Grid
) -> None:
    """``results.json``, ``steps.csv`` and ``backtest.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    any_result = next(iter(results.values()))
    with (out_dir / "steps.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["policy", "step_start", "energy_kwh", "gpus", "requests", "slo_met"])
        for name, r in results.items():
            for k in range(r.steps):
                at = any_result.start_at + timedelta(seconds=k * r.step_s)
                writer.writerow(
                    [
                        name,
                        at.isoformat(),
                        round(float(r.energy_j[k]) / J_PER_KWH, 5),
                        int(r.gpus[k]),
                        round(float(r.requests[:, k].sum()), 2),
                        round(float(r.met[:, k].sum()), 2),
                    ]
                )
    plot(out_dir / "backtest.png", document, results)


def plot(path: Path, document: dict[str, Any], results: dict[str, SimResult]) -> None:
    """Energy per step and GPUs in use over time, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    any_result = next(iter(results.values()))
    hours = np.arange(any_result.steps) * any_result.step_s / 3600
    for name, r in results.items():
        summary = document["policies"][name]
        top.plot(
            hours,
            r.energy_j / J_PER_KWH / (r.step_s / 3600),
            label=f"{name} ({summary['energy_kwh']:,.0f} kWh)",
            lw=1,
        )
        bottom.plot(hours, r.gpus, label=name, lw=1)
    top.set_ylabel("GPU power (kW)")
    bottom.set_ylabel("GPUs in use")
    bottom.set_xlabel(f"hours since {document['workload']['start_at'][:16]}")
    top.set_title(
        f"wattplan backtest: {document['workload']['name']} ({document['workload']['mode']})"
    )
    top.legend(fontsize=7, ncol=2)
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(document: dict[str, Any]) -> str:
    """The results as a Markdown table (one row per policy)."""
    lines = [
        "| policy | energy kWh | saving vs SinglePool | SLO attainment (min type) | "
        "P99 TTFT max s | "
        "P99 TBT max s | GPU-hours | carbon kg | cost $ | reconfigurations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in document["policies"].items():
        att = p["slo_attainment"]
        worst = (
            min((v, k) for k, v in att.items() if v is not None)
            if any(v is not None for v in att.values())
            else (None, "-")
        )
        saving = p["saving_vs_singlepool"]
        lines.append(
            f"| {name} | {p['energy_kwh']:,.1f} | {'' if saving is None else f'{saving:.1%}'} | "
            f"{'' if worst[0] is None else f'{worst[0]:.2%} ({worst[1]})'} | "
            f"{_worst(p['ttft_p99_s'])} | "
            f"{_worst(p['tbt_p99_s'])} | {p['gpu_hours']:,.1f} | {p['carbon_kg']:,.1f} | "
            f"{p['cost_usd']:,.0f} | {p['reconfigurations']['total']} |"
        )
    return "\n".join(lines)


def _worst(values: dict[str, Any]) -> str:
    nums = [v for v in values.values() if v is not None]
    if not nums:
        return "-"
    if "inf" in nums:
        return "inf"
    return f"{max(nums):.3f}"


def build_parser() -> argparse.ArgumentParser:
    """Options of ``wattplan backtest``."""
    parser = argparse.ArgumentParser(
        prog="wattplan backtest",
        description="Replay a workload in the cluster simulator under each policy and compare "
        "energy, SLO attainment, GPU-hours, carbon and cost. Request traces (Azure CSV, "
        "JSONL) run per request; ServeGen rate folders run per window.",
    )
    parser.add_argument(
        "--workload",
        required=True,
        help=f"one of {', '.join(BUNDLED)}, or the path of an Azure trace (.csv), a JSONL "
        "request log, a folder of them, or a ServeGen model folder",
    )
    parser.add_argument(
        "--policies",
        default="all",
        help=f"comma-separated policies or 'all' ({', '.join(POLICIES)})",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=40.0,
        help="cluster size: scale the load so SinglePool needs this many 8-GPU servers at the "
        "peak (default 40, as DynamoLLM's week-long simulation); 0 keeps the load as it is",
    )
    parser.add_argument("--out", type=Path, help="folder for results.json, steps.csv, backtest.png")
    parser.add_argument("--json", action="store_true", help="print the results document as JSON")
    parser.add_argument("--hours", type=float, help="replay only the first HOURS of the workload")
    parser.add_argument(
        "--step-s",
        type=int,
        help="simulation step for request traces (default WATTPLAN_INGEST_WINDOW_S, 300)",
    )
    parser.add_argument(
        "--window-s",
        type=int,
        help="wattplan/oracle plan window (default 300 for request traces, WATTPLAN_WINDOW_S "
        "for rate workloads)",
    )
    parser.add_argument(
        "--model", help="model serving every service (default WATTPLAN_SERVICE_MODELS)"
    )
    parser.add_argument(
        "--profiles", type=Path, help="profile CSV (default WATTPLAN_PROFILES_PATH)"
    )
    parser.add_argument(
        "--profiles-from-db",
        action="store_true",
        help="read the profiles of WATTPLAN_PROFILE_VERSION from the database instead",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the load scaling (request traces)"
    )
    parser.add_argument(
        "--no-surge-replan",
        action="store_true",
        help="wattplan policy: no out-of-cycle re-plan when a pool's observed rate exceeds "
        "its planned rate (one plan per window only)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wattplan backtest``."""
    args = build_parser().parse_args(argv)
    names = (
        tuple(POLICIES)
        if args.policies == "all"
        else tuple(p.strip() for p in args.policies.split(",") if p.strip())
    )
    try:
        unknown = [n for n in names if n not in POLICIES]
        if unknown:
            raise InputDataError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
        if args.scale < 0:
            raise InputDataError("--scale must be >= 0")
        config = BacktestConfig(
            workload=args.workload,
            policies=names,
            servers=args.scale,
            out_dir=args.out,
            step_s=args.step_s,
            window_s=args.window_s,
            hours=args.hours,
            model=args.model,
            profiles_path=args.profiles,
            profiles_from_db=args.profiles_from_db,
            seed=args.seed,
            surge_replan=not args.no_surge_replan,
        )
        document = run_backtest(config, Settings.from_env())
    except WattplanError as exc:
        print(f"wattplan backtest: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        printed = json.loads(json.dumps(document))
        for p in printed["policies"].values():
            p.pop("series", None)  # per-step series: in results.json
        print(json.dumps(printed, indent=2))
    else:
        print(format_table(document))
        if document["targets"]:
            print(json.dumps(document["targets"], indent=2))
    return 0

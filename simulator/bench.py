"""``wattplan bench sim``: simulator speed in both modes, as JSON figures.

- per request: arrivals drawn from the bundled ServeGen rates (Poisson where cv is 1,
  Gamma renewal otherwise; drawing is not timed), replayed against the DynamoLLM-style
  heuristic's schedule (per-type pools, re-shards, clock changes, the governor); target
  1 million requests per minute.
- per window: the whole bundled ServeGen workload (10 days of 10-minute windows, every
  type) against the same policy's schedule; target under 10 seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from profiles import load_profiles
from simulator.engine import simulate_rates, simulate_requests
from simulator.model import ProfileTable, ReconfigCosts
from simulator.policies import PolicyContext, run_policy
from simulator.workload import RateWorkload, load_workload, view_of
from wattplan.settings import Settings


def _schedule(
    workload: RateWorkload, table: ProfileTable, profiles: list[Any], settings: Settings
) -> Any:
    from simulator.backtest import service_models

    models, _ = service_models(settings, table, sorted({s for s, _ in workload.pools}), None)
    ctx = PolicyContext(
        view_of(workload, workload.window_s),
        table,
        tuple(profiles),
        models,
        settings.gpu_type,
        10**6,
        ReconfigCosts(startup_s=settings.startup_s),
        settings.window_s,
    )
    return run_policy("heuristic", ctx)


def run_sim_bench(requests: int, repeat: int, settings: Settings) -> dict[str, Any]:
    """Time both modes; the median of ``repeat`` runs each."""
    profiles = load_profiles(settings.profiles_path)
    table = ProfileTable(profiles)
    full = load_workload("servegen", settings.data_dir)
    assert isinstance(full, RateWorkload)
    schedule = _schedule(full, table, profiles, settings)
    window_times = []
    for _ in range(repeat):
        result = simulate_rates(full, schedule, table)
        window_times.append(result.wall_s)
    # Enough windows of the (scaled) rates to hold the requested number of requests.
    per_window = float(full.rate_rps[:, :144].sum() * full.window_s) / 144
    factor = requests / (per_window * 144)
    day = full.sliced(0, 144).scaled(factor)
    trace = day.to_requests(seed=0)
    day_schedule = _schedule(day, table, profiles, settings)
    request_times = []
    for _ in range(repeat):
        result = simulate_requests(trace, day_schedule, table)
        request_times.append(result.wall_s)
    rq_s = statistics.median(request_times)
    win_s = statistics.median(window_times)
    return {
        "per_request": {
            "requests": len(trace),
            "hours": day.duration_s / 3600,
            "seconds": round(rq_s, 3),
            "requests_per_minute": round(len(trace) / rq_s * 60),
            "target_requests_per_minute": 1_000_000,
            "meets_target": len(trace) / rq_s * 60 >= 1_000_000,
        },
        "per_window": {
            "windows": full.windows,
            "pools": len(full.pools),
            "seconds": round(win_s, 3),
            "target_s": 10.0,
            "meets_target": win_s < 10.0,
        },
        "runs": repeat,
        "policy": "heuristic",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wattplan bench sim``."""
    parser = argparse.ArgumentParser(prog="wattplan bench sim", description=__doc__)
    parser.add_argument("--requests", type=int, default=2_000_000, help="per-request size")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (median)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.repeat < 1:
        parser.error("--requests and --repeat must be positive")
    started = time.perf_counter()
    print("bench sim: timing both simulator modes", file=sys.stderr, flush=True)
    figures = run_sim_bench(args.requests, args.repeat, Settings.from_env())
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        r, w = figures["per_request"], figures["per_window"]
        print(
            f"per request: {r['requests']:,} requests in {r['seconds']} s = "
            f"{r['requests_per_minute']:,} requests/min; per window: {w['windows']} windows x "
            f"{w['pools']} pools in {w['seconds']} s"
        )
    return 0

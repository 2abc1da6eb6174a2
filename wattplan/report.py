"""Plan reports: predicted figures of a plan against the load that actually arrived."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from wattplan import store


def plan_report(conn: Connection, plan_id: str) -> dict[str, Any]:
    """Summarise one plan: GPUs, predicted energy/carbon/cost, and an SLO-attainment estimate.

    The estimate replays the requests logged in the plan's window minute by minute: a request
    counts as within SLO when its pool's arrival rate in that minute stayed within the pool's
    planned SLO capacity (instances x profile capacity), moved by the load the plan spills
    from smaller to larger pools (``policy["spill"]``: the sending pool is credited with it,
    the receiving pool keeps the rest for its own type). Requests of a pool the plan neither
    serves nor spills count as missed.
    """
    plan, status = store.read_plan(conn, plan_id)
    end = plan.window_start + timedelta(seconds=plan.window_s)
    capacity = {
        (row.service, row.request_type): float(row.capacity_rps)
        for row in conn.execute(
            sa.text(
                "SELECT i.service, i.request_type, sum(i.instances * p.capacity_rps)"
                " AS capacity_rps FROM plan_items i JOIN profiles p ON p.config_key = i.config_key"
                " AND p.request_type = i.request_type"
                " AND p.version = :v"
                " WHERE i.plan_id = :p GROUP BY i.service, i.request_type"
            ),
            {"p": plan_id, "v": plan.solver.get("profile_version", "v0")},
        )
    }
    spills: list[dict[str, Any]] = list(plan.policy.get("spill", []))  # type: ignore[call-overload]
    for spill in spills:
        rps = float(spill["rps"])
        origin = (spill["service"], spill["from"])
        target = (spill["service"], spill["to"])
        capacity[origin] = capacity.get(origin, 0.0) + rps
        capacity[target] = capacity.get(target, 0.0) - rps
    minutes = conn.execute(
        sa.text(
            "SELECT service, request_type, date_trunc('minute', arrived_at) AS minute,"
            " count(*) AS n FROM request_logs WHERE arrived_at >= :s AND arrived_at < :e"
            " GROUP BY 1, 2, 3"
        ),
        {"s": plan.window_start, "e": end},
    ).all()
    pools: dict[tuple[str, str], dict[str, float]] = {}
    for service, rtype, _, n in minutes:
        pool = pools.setdefault(
            (service, rtype), {"requests": 0, "within_slo": 0, "actual_peak_rps": 0.0}
        )
        rate = n / 60.0
        pool["requests"] += n
        pool["actual_peak_rps"] = max(pool["actual_peak_rps"], rate)
        if rate <= capacity.get((service, rtype), 0.0) + 1e-9:
            pool["within_slo"] += n
    forecasts = {
        (f.service, f.request_type): f.planned_rate_rps
        for f in store.read_forecasts(conn, plan.cluster, plan.window_start, plan.window_s)
    }
    total = sum(p["requests"] for p in pools.values())
    within = sum(p["within_slo"] for p in pools.values())
    per_pool = [
        {
            "service": service,
            "request_type": rtype,
            "planned_rps": round(forecasts.get((service, rtype), 0.0), 4),
            "capacity_rps": round(capacity.get((service, rtype), 0.0), 4),
            "actual_peak_rps": round(p["actual_peak_rps"], 4),
            "requests": int(p["requests"]),
            "slo_attainment_estimate": round(p["within_slo"] / p["requests"], 4),
        }
        for (service, rtype), p in sorted(pools.items())
    ]
    pred = plan.prediction
    return {
        "plan_id": plan_id,
        "cluster": plan.cluster,
        "status": status.value,
        "window_start": plan.window_start.isoformat(),
        "window_s": plan.window_s,
        "gpus": pred.gpus,
        "instances": sum(i.instances for i in plan.layout.items),
        "predicted_energy_kwh": round(pred.energy_kwh, 3),
        "predicted_carbon_kg": round(pred.carbon_g / 1000.0, 3),
        "predicted_cost_usd": round(pred.cost_usd, 2),
        "predicted_peak_power_kw": round(pred.peak_power_w / 1000.0, 2),
        "min_slo_headroom": round(pred.min_slo_headroom, 3),
        "instances_started": pred.instances_started,
        "instances_stopped": pred.instances_stopped,
        "actual_requests": total,
        "slo_attainment_estimate": round(within / total, 4) if total else None,
        "solver": {k: plan.solver.get(k) for k in ("termination", "gap", "solve_s", "notes")},
        "pools": per_pool,
    }


def write_report(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write a plan report as JSON and Markdown; return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"plan_{report['plan_id']}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Plan {report['plan_id']} ({report['status']})",
        "",
        f"Window {report['window_start']} + {report['window_s']} s, cluster {report['cluster']}.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for key in (
        "gpus",
        "instances",
        "predicted_energy_kwh",
        "predicted_carbon_kg",
        "predicted_cost_usd",
        "predicted_peak_power_kw",
        "min_slo_headroom",
        "actual_requests",
        "slo_attainment_estimate",
    ):
        lines.append(f"| {key} | {report[key]} |")
    lines += [
        "",
        "| service | type | planned rps | capacity rps | actual peak rps | requests | SLO est. |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["pools"]:
        lines.append(
            f"| {p['service']} | {p['request_type']} | {p['planned_rps']} | {p['capacity_rps']} "
            f"| {p['actual_peak_rps']} | {p['requests']} | {p['slo_attainment_estimate']} |"
        )
    md_path = stem.with_suffix(".md")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path

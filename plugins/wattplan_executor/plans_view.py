"""A page in Airflow's UI listing wattplan's plans: window, status, figures, decisions.

Served by the api-server as a FastAPI plugin app under ``/wattplan`` and linked from the
UI's *Browse* menu (``plugins/wattplan_plugin.py``). Plugin apps are not behind Airflow's
authentication by themselves, so every route here requires the caller's Airflow login (the
UI's session cookie or a bearer token) through Airflow's own ``get_user`` dependency.
The api-server needs ``WATTPLAN_DATABASE_URL`` in its environment (``wattplan airflow
start`` sets it).
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from airflow.api_fastapi.core_api.security import get_user
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from wattplan import store

_COLUMNS = (
    "plan",
    "cluster",
    "window (UTC)",
    "status",
    "GPUs",
    "kWh",
    "kg CO2eq",
    "$",
    "SLO headroom",
    "decisions",
    "why",
)
_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}"
    "table{border-collapse:collapse;font-size:14px}"
    "th,td{border-bottom:1px solid #ddd;padding:6px 10px;text-align:left;vertical-align:top}"
    "th{background:#f4f4f6}td.n{text-align:right}"
    ".applied{color:#1a7f37}.rejected,.failed{color:#cf222e}.proposed{color:#9a6700}"
)


def _cells(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    start = row["window_start_at"]
    end = start + timedelta(seconds=int(row["window_s"]))
    return [
        ("", row["plan_id"]),
        ("", row["cluster"]),
        ("", f"{start:%Y-%m-%d %H:%M}–{end:%H:%M}"),
        (row["status"], row["status"]),
        ("n", f"{row['gpus']}"),
        ("n", f"{row['predicted_energy_kwh']:.2f}"),
        ("n", f"{row['predicted_carbon_g'] / 1000:.2f}"),
        ("n", f"{row['predicted_cost_usd']:.2f}"),
        ("n", f"{row['min_slo_headroom']:.0%}"),
        ("", row["decisions"] or ""),
        ("", row["status_reason"] or ""),
    ]


def render_plans(rows: Sequence[Mapping[str, Any]]) -> str:
    """The HTML page of a plan listing (every value escaped)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{html.escape(css)}">{html.escape(str(text))}</td>'
            for css, text in _cells(row)
        )
        + "</tr>"
        for row in rows
    )
    empty = "" if rows else "<p>No plans yet: run the plan_cluster DAG.</p>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>wattplan plans</title>"
        f"<style>{_STYLE}</style></head><body><h2>wattplan plans</h2>{empty}"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></body></html>"
    )


def create_app(database_url: Callable[[], str | None] | None = None) -> FastAPI:
    """The FastAPI app of the page.

    Args:
        database_url: Returns wattplan's database URL (default: ``WATTPLAN_DATABASE_URL``).
    """
    app = FastAPI(title="wattplan plans")
    engines: dict[str, sa.Engine] = {}
    get_url = database_url or (lambda: os.environ.get("WATTPLAN_DATABASE_URL"))

    def summaries(limit: int) -> list[dict[str, object]]:
        url = get_url()
        if not url:
            raise HTTPException(
                status_code=503,
                detail="WATTPLAN_DATABASE_URL is not set in the api-server's environment",
            )
        if url not in engines:
            from wattplan import db

            engines[url] = db.create_engine(url)
        with engines[url].connect() as conn:
            return store.read_plan_summaries(conn, limit)

    @app.get("/", response_class=HTMLResponse, dependencies=[Depends(get_user)])
    def plans_page(limit: int = 100) -> str:
        return render_plans(summaries(min(max(limit, 1), 1000)))

    @app.get("/plans.json", dependencies=[Depends(get_user)])
    def plans_json(limit: int = 100) -> list[dict[str, object]]:
        return summaries(min(max(limit, 1), 1000))

    return app

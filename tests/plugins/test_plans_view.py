"""The plans page of the Airflow UI plugin, on a real database."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from airflow.api_fastapi.core_api.security import get_user
from fastapi.testclient import TestClient
from wattplan_executor.plans_view import create_app

from wattplan import store
from wattplan.domain import Layout, LayoutItem, Plan, PlanPrediction, PlanStatus, ServingConfig

W = datetime(2023, 11, 16, 18, 30, tzinfo=UTC)


def _store(engine: sa.Engine) -> None:
    layout = Layout((LayoutItem("chat", "SS", ServingConfig("m", "H100", 4, 490), 2),))
    for plan_id, status in (("p-<b>1</b>", PlanStatus.PROPOSED), ("p2", PlanStatus.APPLIED)):
        plan = Plan(
            plan_id, "demo", W, 1800, layout, PlanPrediction(1.5, 300.0, 20.0, 8, 2e3, 0.25)
        )
        with engine.begin() as conn:
            store.write_plan(conn, plan, created_at=W)
            store.set_plan_status(conn, plan_id, status, W, "why not")
    with engine.begin() as conn:
        store.record_approval(conn, "p2", "approved", "alice", W, "")


def test_plans_page_needs_an_airflow_login(engine: sa.Engine, database_url: str) -> None:
    client = TestClient(create_app(lambda: database_url))
    assert client.get("/").status_code == 401
    assert client.get("/plans.json").status_code == 401


def test_plans_page_lists_plans_with_status_and_decisions(
    engine: sa.Engine, database_url: str
) -> None:
    _store(engine)
    app = create_app(lambda: database_url)
    app.dependency_overrides[get_user] = lambda: "a logged-in user"
    client = TestClient(app)
    page = client.get("/")
    assert page.status_code == 200
    assert "p-&lt;b&gt;1&lt;/b&gt;" in page.text and "<b>1</b>" not in page.text
    assert '<td class="applied">applied</td>' in page.text
    assert "approved by alice" in page.text
    rows = client.get("/plans.json").json()
    assert [(r["plan_id"], r["status"], r["decisions"]) for r in rows] == [
        ("p-<b>1</b>", "proposed", None),
        ("p2", "applied", "approved by alice"),
    ]


def test_plans_page_says_when_the_database_is_not_configured() -> None:
    app = create_app(lambda: None)
    app.dependency_overrides[get_user] = lambda: "a logged-in user"
    response = TestClient(app).get("/")
    assert response.status_code == 503
    assert "WATTPLAN_DATABASE_URL" in response.json()["detail"]


def test_plugin_registers_the_page_and_its_menu_entry() -> None:
    from wattplan_plugin import WattplanPlugin

    (app,) = WattplanPlugin.fastapi_apps
    assert app["url_prefix"] == "/wattplan"
    (view,) = WattplanPlugin.external_views
    assert (view["href"], view["category"]) == ("/wattplan/", "browse")

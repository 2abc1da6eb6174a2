"""Airflow plugin entry of wattplan.

Airflow 3 has no hook or operator registration: DAGs import ``wattplan_executor`` directly
(``plugins/`` is on ``sys.path``). The plugin adds a page listing wattplan's plans to the UI:
a FastAPI app served by the api-server under ``/wattplan`` (behind Airflow's login) and a
*Browse -> wattplan plans* entry that shows it.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from wattplan_executor.plans_view import create_app


class WattplanPlugin(AirflowPlugin):
    """The ``wattplan`` Airflow plugin: the plans page."""

    name = "wattplan"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/wattplan", "name": "wattplan plans"}]
    external_views = [
        {
            "name": "wattplan plans",
            "href": "/wattplan/",
            "destination": "nav",
            "category": "browse",
            "url_route": "wattplan_plans",
        }
    ]

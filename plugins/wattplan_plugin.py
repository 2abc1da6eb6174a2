"""Airflow plugin entry of wattplan.

Airflow 3 has no hook or operator registration: DAGs import ``wattplan_executor`` directly
(``plugins/`` is on ``sys.path``). This class only makes the plugin visible in
``airflow plugins`` and is the place for future macros, listeners or FastAPI apps.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


class WattplanPlugin(AirflowPlugin):
    """The ``wattplan`` Airflow plugin (no components yet)."""

    name = "wattplan"

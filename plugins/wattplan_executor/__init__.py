"""Executor plugin: push approved layouts to serving clusters (hook, operator, sensor).

Modules import each other by absolute name (``wattplan_executor.hooks``) because Airflow's
plugin loader also imports every ``.py`` file under ``plugins/`` as a top-level module, where
relative imports would fail.
"""

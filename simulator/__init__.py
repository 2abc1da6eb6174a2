"""Cluster simulator: replay a workload against a sequence of layouts with the profiles.

Two modes share one instance model (:mod:`simulator.model`): per request for request
traces (:func:`simulator.engine.simulate_requests`) and per window for rate workloads
(:func:`simulator.engine.simulate_rates`). Policies that produce the layout sequences are
in :mod:`simulator.policies`; ``wattplan backtest`` (:mod:`simulator.backtest`) runs them.
See ``docs/simulator.md``.
"""

"""Policies: sizing rules, the wattplan MILP through the adapter, causality, the oracle."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from simulator.engine import simulate_rates
from simulator.model import POOL_ALL, ProfileTable, ReconfigCosts, shape_of
from simulator.policies import POLICIES, PolicyContext, run_policy
from simulator.workload import LoadView, view_of
from tests.simulator.conftest import GPU, MODEL, config, rate_workload
from wattplan.domain import Layout
from wattplan.errors import InputDataError


def _context(table: ProfileTable, profiles, view: LoadView, **kwargs: object) -> PolicyContext:
    base = {
        "view": view,
        "table": table,
        "profiles": tuple(profiles),
        "service_models": {"svc": MODEL},
        "gpu_type": GPU,
        "gpu_inventory": 1000,
        "costs": ReconfigCosts(),
        "plan_window_s": 1800,
    }
    base.update(kwargs)
    return PolicyContext(**base)  # type: ignore[arg-type]


def _capacity(table: ProfileTable, layout: Layout, rtype: str) -> float:
    """Capacity for ``rtype`` where the engine routes it: its own pool (or the all-types
    pool), else -- the optimizer spilled it -- the pool with the most capacity for it."""
    t = table.type(rtype)
    by_pool: dict[str, float] = {}
    for i in layout.items:
        cap = i.instances * table.capacity_rps[table.config(i.config.key), t]
        by_pool[i.request_type] = by_pool.get(i.request_type, 0.0) + float(np.nan_to_num(cap))
    own = sum(c for p, c in by_pool.items() if p in (rtype, POOL_ALL))
    return own if own > 0 else max(by_pool.values(), default=0.0)


RATES = {"SS": [8.0, 12.0, 20.0, 16.0, 10.0, 8.0] * 2, "MM": [2.0] * 12}


def test_singlepool_is_one_largest_pool_sized_for_the_peak(table, profiles) -> None:
    view = view_of(rate_workload(RATES, cv=0.0), 600)  # cv 0: the peak is the mean
    schedule = run_policy("singlepool", _context(table, profiles, view))
    (item,) = schedule.layouts[0].items
    assert (item.request_type, item.config.key) == (POOL_ALL, config(4, 700).key)
    # TP4 at 700 W: SS 18 rps, MM 9 rps per instance; the peak step needs 20/18 + 2/9.
    assert item.instances == math.ceil(20 / 18 + 2 / 9)
    assert len(set(schedule.layouts)) == 1


def test_multipool_sizes_each_type_for_its_own_peak(table, profiles) -> None:
    view = view_of(rate_workload(RATES, cv=0.0), 600)
    layout = run_policy("multipool", _context(table, profiles, view)).layouts[0]
    counts = {i.request_type: i.instances for i in layout.items}
    assert counts == {"SS": math.ceil(20 / 18), "MM": math.ceil(2 / 9)}


@pytest.mark.parametrize("name", ["scaleinst", "scaleshard", "scalefreq", "heuristic"])
def test_forecast_policies_cover_a_steady_load(table, profiles, name: str) -> None:
    view = view_of(rate_workload({"SS": [9.0] * 12, "MM": [3.0] * 12}, cv=0.0), 600)
    schedule = run_policy(name, _context(table, profiles, view))
    assert len(schedule.layouts) == 12
    for layout in schedule.layouts:
        assert _capacity(table, layout, "SS") >= 9.0
        assert _capacity(table, layout, "MM") >= 3.0


def test_wattplan_plans_through_the_milp_and_covers_a_steady_load(table, profiles) -> None:
    workload = rate_workload({"SS": [9.0] * 12, "MM": [3.0] * 12}, cv=0.0)
    view = view_of(workload, 600)
    schedule = run_policy("wattplan", _context(table, profiles, view))
    assert schedule.decisions["plans"] == 4 and schedule.decisions["kept_running_layout"] == 0
    # the DAG's forecaster ran once per plan; two hours are too short for its models
    assert schedule.decisions["forecast_runs"] == 4
    assert schedule.decisions["forecast_fallbacks"] == 4 * 2  # every pool, every plan
    assert any("forecast models used" in note for note in schedule.notes)
    assert schedule.clock_governor and not schedule.free_reconfiguration
    for layout in schedule.layouts:
        # the MILP may carry SS load in the MM pool (spill): check what the plan carries
        assert sum(i.load_rps for i in layout.items) >= 9.0 + 3.0 - 1e-6
    # and the simulator routes it the way the plan carries it (the plan's dispatch)
    result = simulate_rates(workload, schedule, table)
    assert result.attainment().min() > 0.99 and result.rerouted.sum() == 0
    # a steady load keeps its instances (the MILP may relabel an instance's pool among the
    # pools its load can spill to: moving an instance between a service's pools is free;
    # the planned clock follows the forecast's headroom, which narrows as history grows)
    configs = {
        tuple(sorted((shape_of(i.config), i.instances) for i in layout.items))
        for layout in schedule.layouts
    }
    assert len(configs) == 1


def test_wattplan_target_utilization_caps_the_planned_utilization(table, profiles) -> None:
    view = view_of(rate_workload({"SS": [8.0] * 6}, cv=0.0), 600)
    t = table.type("SS")

    def capacity(layout: Layout) -> float:  # one type: every pool may carry it (spill)
        return sum(
            i.instances * float(np.nan_to_num(table.capacity_rps[table.config(i.config.key), t]))
            for i in layout.items
        )

    loose = run_policy("wattplan", _context(table, profiles, view))
    assert (
        min(
            capacity(layout) / planned
            for layout, planned in zip(loose.layouts, loose.planned_rps[0], strict=True)
        )
        < 1 / 0.8
    )  # at SLO capacity, the plan runs above 80% of it
    tight = run_policy("wattplan", _context(table, profiles, view, target_utilization=0.8))
    for layout, planned in zip(tight.layouts, tight.planned_rps[0], strict=True):
        assert planned >= 8.0 - 1e-9
        assert capacity(layout) >= planned / 0.8 - 1e-6
    # the oracle is a bound: it plans at SLO capacity whatever the headroom
    oracle = run_policy("oracle", _context(table, profiles, view, target_utilization=0.8))
    assert oracle.layouts == run_policy("oracle", _context(table, profiles, view)).layouts


def test_wattplan_replans_out_of_cycle_when_a_surge_beats_the_plan(table, profiles) -> None:
    # Windows of three 600 s steps; the load triples at step 3, just as window [3, 6) starts.
    # Its plan was made at step 2 seeing steps 0-1; at step 5 (lead: one step) step 3 is
    # visible and beats the planned rate, so steps 5 and on are re-planned for it.
    rates = {"SS": [4.0, 4.0, 4.0, 14.0, 14.0, 14.0, 14.0, 14.0, 14.0]}
    view = view_of(rate_workload(rates, cv=0.0), 600)
    once = run_policy("wattplan", _context(table, profiles, view, surge_replan=False))
    again = run_policy("wattplan", _context(table, profiles, view))
    assert "surge_replans" not in once.decisions
    assert again.decisions["surge_replans"] >= 1 and again.decisions["plans"] == 3
    assert again.layouts[:5] == once.layouts[:5]  # nothing before the re-plan changes
    assert _capacity(table, once.layouts[5], "SS") < 14.0
    assert _capacity(table, again.layouts[5], "SS") >= 14.0
    assert again.planned_rps[0, 5] >= 14.0 and once.planned_rps[0, 5] < 14.0
    # no surge, no re-plan
    steady = view_of(rate_workload({"SS": [4.0] * 9}, cv=0.0), 600)
    assert run_policy("wattplan", _context(table, profiles, steady)).decisions["surge_replans"] == 0


def test_wattplan_keeps_the_running_layout_when_nothing_fits(table, profiles) -> None:
    view = view_of(rate_workload({"SS": [9.0] * 6}, cv=0.0), 600)
    schedule = run_policy("wattplan", _context(table, profiles, view, gpu_inventory=1))
    assert schedule.decisions["kept_running_layout"] == 2
    assert all(layout == Layout() for layout in schedule.layouts)
    assert any("GPU inventory" in note for note in schedule.notes)


def test_wattplan_plans_what_fits_when_the_forecast_exceeds_the_cluster(table, profiles) -> None:
    view = view_of(rate_workload({"SS": [30.0] * 3}, cv=0.0), 600)  # needs 3 x TP2 + headroom
    schedule = run_policy("wattplan", _context(table, profiles, view, gpu_inventory=4))
    assert schedule.decisions["shrunk_to_fit"] == 1
    assert schedule.layouts[0].gpus == 4
    assert _capacity(table, schedule.layouts[0], "SS") > 0


def test_decisions_never_read_load_they_could_not_have_seen(table, profiles) -> None:
    rates = {"SS": [9.0, 10.0, 11.0, 12.0, 10.0, 9.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0]}
    view = view_of(rate_workload(rates, cv=0.0), 600)
    later = dataclasses.replace(view, mean_rps=view.mean_rps.copy(), peak_rps=view.peak_rps.copy())
    later.mean_rps[:, 7:] *= 5
    later.peak_rps[:, 7:] *= 5
    for name in ("scaleinst", "heuristic", "wattplan"):
        a = run_policy(name, _context(table, profiles, view))
        b = run_policy(name, _context(table, profiles, later))
        # Steps before 8 are decided with data up to step 6 at most (lead of one step for
        # starts, none for clocks), so they cannot differ.
        assert a.layouts[:8] == b.layouts[:8], name
        assert a.layouts != b.layouts, name


def test_oracle_covers_every_windows_true_peak_with_free_changes(table, profiles) -> None:
    view = view_of(rate_workload(RATES, cv=0.0), 600)
    schedule = run_policy("oracle", _context(table, profiles, view))
    assert schedule.free_reconfiguration
    for k, layout in enumerate(schedule.layouts):
        first = k - k % 3
        peaks = [float(view.peak_rps[w, first : first + 3].max()) for w in range(len(view.pools))]
        # the MILP may carry a type's load in a larger type's pool (spill)
        assert sum(i.load_rps for i in layout.items) >= sum(peaks) - 1e-6


def test_every_registered_policy_runs_and_unknown_names_are_refused(table, profiles) -> None:
    view = view_of(rate_workload(RATES), 600)
    ctx = _context(table, profiles, view)
    for name in POLICIES:
        schedule = run_policy(name, ctx)
        assert len(schedule.layouts) == view.steps and schedule.policy == name
    with pytest.raises(InputDataError, match="unknown policy"):
        run_policy("nope", ctx)
    with pytest.raises(InputDataError, match="has no model"):
        run_policy("singlepool", _context(table, profiles, view, service_models={}))


def test_view_values_are_not_mutated(table, profiles) -> None:
    view = view_of(rate_workload(RATES), 600)
    before = view.peak_rps.copy()
    run_policy("heuristic", _context(table, profiles, view))
    assert np.array_equal(before, view.peak_rps)


@pytest.mark.parametrize("name", ["scaleinst", "heuristic"])
def test_dynamic_policies_stay_within_the_cluster(table, profiles, name: str) -> None:
    view = view_of(rate_workload({"SS": [40.0] * 6, "MM": [20.0] * 6}, cv=0.0), 600)
    schedule = run_policy(name, _context(table, profiles, view, gpu_inventory=12))
    assert max(layout.gpus for layout in schedule.layouts) <= 12
    unbounded = run_policy(name, _context(table, profiles, view))
    assert max(layout.gpus for layout in unbounded.layouts) > 12  # the cap did bind


def test_a_pool_keeps_its_tp_while_a_reshard_would_not_pay_off(table, profiles) -> None:
    rates = {"SS": [9.0, 9.5, 9.0, 9.5, 9.0, 9.5] * 2}
    view = view_of(rate_workload(rates, cv=0.0), 600)
    schedule = run_policy("heuristic", _context(table, profiles, view))
    shapes = {item.config.tp for layout in schedule.layouts for item in layout.items}
    assert len(shapes) == 1

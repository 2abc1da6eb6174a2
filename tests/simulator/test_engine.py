"""The two simulation modes: agreement, energy, queueing, routing and reconfiguration."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from simulator.engine import SimResult, simulate_rates, simulate_requests
from simulator.model import POOL_ALL, ProfileTable, ReconfigCosts
from simulator.schedule import Schedule
from tests.simulator.conftest import START, config, layout, rate_workload
from wattplan.domain import DispatchShare, Layout, LayoutItem
from wattplan.errors import InputDataError


def _schedule(layouts: list[Layout], step_s: int = 600, **kwargs: object) -> Schedule:
    return Schedule("test", START, step_s, tuple(layouts), **kwargs)  # type: ignore[arg-type]


def _both(workload, schedule, table, seed: int = 7) -> tuple[SimResult, SimResult]:
    by_window = simulate_rates(workload, schedule, table)
    by_request = simulate_requests(workload.to_requests(seed=seed), schedule, table)
    return by_window, by_request


def test_the_two_modes_agree_on_a_workload_expressible_in_both(table: ProfileTable) -> None:
    rates = {
        "SS": [6.0] * 6 + [12.0] * 6,
        "MM": [3.0] * 12,
        "LS": [0.3] * 6 + [0.6] * 6,
    }
    workload = rate_workload(rates)
    small = layout(SS=(config(2), 1), MM=(config(4), 1), LS=(config(4), 1))
    big = layout(SS=(config(2), 2), MM=(config(4), 1), LS=(config(4), 1))
    schedule = _schedule([small] * 6 + [big] * 6)
    window, request = _both(workload, schedule, table)
    assert window.changes == request.changes and window.changes.cold_starts == 1
    assert request.gpu_s.sum() == pytest.approx(window.gpu_s.sum())
    # Energy: the per-request run draws its own Poisson counts, so allow their noise.
    assert request.energy_j.sum() == pytest.approx(window.energy_j.sum(), rel=0.02)
    att_w, att_r = window.attainment(), request.attainment()
    assert np.abs(att_w - att_r).max() < 0.005
    for p in range(3):
        assert request.run_ttft_p50_s[p] == pytest.approx(window.run_ttft_p50_s[p], rel=0.05)
        assert request.run_ttft_p99_s[p] == pytest.approx(window.run_ttft_p99_s[p], rel=0.10)
        assert request.run_tbt_p50_s[p] == pytest.approx(window.run_tbt_p50_s[p], rel=0.05)
    assert request.requests.sum() == pytest.approx(window.requests.sum(), rel=0.01)


def test_the_modes_agree_on_an_overloaded_pool(table: ProfileTable) -> None:
    workload = rate_workload({"SS": [25.0] * 3})  # 2.5x one TP2 instance's capacity
    schedule = _schedule([layout(SS=(config(2), 1))] * 3)
    window, request = _both(workload, schedule, table)
    assert window.attainment()[0] < 0.05 and request.attainment()[0] < 0.05
    assert window.run_ttft_p99_s[0] > 60 and request.run_ttft_p99_s[0] > 60
    # Saturated: power at capacity all the time.
    assert window.energy_j.sum() == pytest.approx(1000.0 * 1800, rel=1e-3)
    assert request.energy_j.sum() == pytest.approx(1000.0 * 1800, rel=1e-3)


def test_energy_is_the_power_curve_integrated_over_time(table: ProfileTable) -> None:
    workload = rate_workload({"SS": [5.0] * 6})  # one TP2 at half its 10 rps capacity
    schedule = _schedule([layout(SS=(config(2), 1))] * 6)
    window, request = _both(workload, schedule, table)
    expected_j = (200.0 + 0.5 * 800.0) * 3600
    assert window.energy_j.sum() == pytest.approx(expected_j, rel=1e-3)
    drawn_rps = request.requests.sum() / 3600  # the Poisson draw's own rate
    assert request.energy_j.sum() == pytest.approx((200.0 + drawn_rps * 80.0) * 3600, rel=2e-3)
    assert window.gpu_s.sum() == 2 * 3600
    assert window.attainment()[0] > 0.999 and request.attainment()[0] > 0.999


def test_a_cold_start_draws_idle_power_ahead_of_its_window(table: ProfileTable) -> None:
    workload = rate_workload({"SS": [5.0, 5.0]})
    one, two = layout(SS=(config(4), 1)), layout(SS=(config(4), 2))
    costs = ReconfigCosts(startup_s=420.0)
    result = simulate_rates(workload, _schedule([one, two]), table, costs)
    assert result.reconfig_energy_j.tolist() == [0.0, 400.0 * 420.0]
    assert result.gpu_s.tolist() == [4 * 600, 8 * 600 + 4 * 420]
    free = simulate_rates(workload, _schedule([one, two], free_reconfiguration=True), table, costs)
    assert free.reconfig_energy_j.sum() == 0.0


def test_a_reshard_leaves_the_pool_without_service_for_its_downtime(table: ProfileTable) -> None:
    workload = rate_workload({"SS": [8.0, 8.0]})
    before, after = layout(SS=(config(2), 2)), layout(SS=(config(4), 1))
    schedule = _schedule([before, after])
    window, request = _both(workload, schedule, table)
    assert window.changes.reshards == 1
    for r in (window, request):
        att = r.met[0] / r.requests[0]
        assert att[0] > 0.99
        assert att[1] < 0.95  # requests of the first 90 s wait for the re-sharded instance


def test_a_type_without_a_pool_spills_to_another_pool_of_its_service(table: ProfileTable) -> None:
    workload = rate_workload({"SS": [2.0], "MM": [1.0]})
    schedule = _schedule([layout(SS=(config(4), 1))])
    window, request = _both(workload, schedule, table)
    for r in (window, request):
        assert r.rerouted[1].sum() == pytest.approx(r.requests[1].sum())
        assert r.unserved.sum() == 0
        assert r.attainment()[1] > 0.99


def test_the_plans_dispatch_splits_a_type_over_pools_in_both_modes(table: ProfileTable) -> None:
    # SS: 14 rps; its own TP2 pool carries 6 (60% of 10), 8 spill to the MS pool (TP4 for
    # MS carries 9, MS itself brings 3.5 rps). Without the dispatch SS alone overloads TP2.
    workload = rate_workload({"SS": [14.0] * 6, "MS": [3.5] * 6})
    items = layout(SS=(config(2), 1), MS=(config(4), 2)).items
    shares = (
        DispatchShare("svc", "SS", "SS", 6.0 / 14.0),
        DispatchShare("svc", "SS", "MS", 8.0 / 14.0),
    )
    split = _schedule([Layout(items, shares)] * 6)
    window, request = _both(workload, split, table)
    for r in (window, request):
        assert r.attainment().min() > 0.99
        assert r.rerouted.sum() == 0 and r.unserved.sum() == 0
    assert request.energy_j.sum() == pytest.approx(window.energy_j.sum(), rel=0.02)
    att_w, att_r = window.attainment(), request.attainment()
    assert np.abs(att_w - att_r).max() < 0.005
    for p in range(2):
        assert request.run_ttft_p99_s[p] == pytest.approx(window.run_ttft_p99_s[p], rel=0.10)
    # The same instances without the dispatch: SS's pool is overloaded.
    alone = simulate_rates(workload, _schedule([Layout(items)] * 6), table)
    assert alone.attainment()[0] < 0.5


def test_requests_without_any_instance_are_unserved(table: ProfileTable) -> None:
    workload = rate_workload({"SS": [2.0]})
    schedule = _schedule([Layout()])
    window, request = _both(workload, schedule, table)
    for r in (window, request):
        assert r.unserved[0].sum() == pytest.approx(r.requests[0].sum())
        assert r.attainment()[0] == 0.0
        assert r.run_ttft_p99_s[0] == np.inf


def test_one_pool_serves_every_type_of_a_service(table: ProfileTable) -> None:
    workload = rate_workload({"SS": [5.0] * 2, "MS": [2.5] * 2})  # u = 0.5 + 0.5 on one TP2
    schedule = _schedule([Layout((LayoutItem("svc", POOL_ALL, config(2), 2),))] * 2)
    window, request = _both(workload, schedule, table)
    # Two instances at u = 0.5 each: power 200 + 0.5 x 800 = 600 W each.
    assert window.energy_j.sum() == pytest.approx(2 * 600.0 * 1200, rel=1e-3)
    assert request.energy_j.sum() == pytest.approx(2 * 600.0 * 1200, rel=0.02)


def test_the_governor_runs_a_cheaper_cap_at_low_load(table: ProfileTable) -> None:
    workload = rate_workload({"SS": [3.0] * 3})
    plain = _schedule([layout(SS=(config(2, 700), 1))] * 3)
    governed = dataclasses.replace(plain, clock_governor=True)
    for simulate in (simulate_rates, simulate_requests):
        source = workload if simulate is simulate_rates else workload.to_requests(seed=1)
        a = simulate(source, plain, table)  # type: ignore[operator]
        b = simulate(source, governed, table)  # type: ignore[operator]
        assert b.energy_j.sum() < 0.9 * a.energy_j.sum()
        assert b.attainment()[0] > 0.999


def test_configs_without_a_profile_for_the_routed_type_are_refused(table: ProfileTable) -> None:
    other = dataclasses.replace(config(8), model="other")
    schedule = _schedule([layout(SS=(other, 1))])
    with pytest.raises(InputDataError, match="no profile describes"):
        simulate_rates(rate_workload({"SS": [1.0]}), schedule, table)
    with pytest.raises(InputDataError, match="layouts"):
        simulate_rates(rate_workload({"SS": [1.0, 1.0]}), _schedule([Layout()]), table)

"""The plan's dispatch: the optimizer's spill travels with the layout as per-type shares."""

from __future__ import annotations

import pytest

from optimizer.inputs import PlanInputs, Reconfiguration, SolverOptions
from optimizer.result import ColumnValues, dispatch_shares
from optimizer.solve import solve_layout
from wattplan.domain import DispatchShare, Profile, ServingConfig

GPU = "H100-80GB"
TP4 = ServingConfig("m", GPU, 4, 700)
FREE = Reconfiguration(startup_s=0.0, reshard_s=0.0, clock_change_s=0.0)


def _inputs(demand: dict[tuple[str, str], float]) -> PlanInputs:
    profile = Profile(
        TP4, "MM", 10.0, ((0.0, 800.0), (10.0, 2000.0)), 0.1, 0.02, 1.0, 0.1, "t", "h"
    )
    return PlanInputs(
        window_s=3600,
        demand_rps=demand,
        service_models={"chat": "m"},
        profiles=(profile,),
        gpu_inventory={GPU: 8},
        reconfiguration=FREE,
        solver=SolverOptions(mip_gap=1e-9, time_limit_s=30.0),
    )


def test_a_type_spilled_whole_is_dispatched_to_the_larger_pool() -> None:
    solution = solve_layout(_inputs({("chat", "SS"): 1.0, ("chat", "MM"): 8.0}))
    assert [i.request_type for i in solution.layout.items] == ["MM"]
    assert solution.layout.dispatch == (DispatchShare("chat", "SS", "MM", 1.0),)
    assert solution.layout.dispatch_of("chat", "SS") == (("MM", 1.0),)
    assert solution.layout.dispatch_of("chat", "MM") == ()  # not split: its own pool


def test_shares_are_the_spill_over_what_the_plan_carries() -> None:
    inputs = _inputs({("chat", "SS"): 8.0, ("chat", "SM"): 2.0, ("chat", "MM"): 4.0})
    values = ColumnValues((), (), (), {("chat", "SS", "MM"): 2.0, ("chat", "SM", "MM"): 2.0})
    shares = dispatch_shares(inputs, values)
    assert shares == (
        DispatchShare("chat", "SM", "MM", 1.0),
        DispatchShare("chat", "SS", "MM", 0.25),
        DispatchShare("chat", "SS", "SS", 0.75),
    )
    # A degraded plan's shortfall is not carried anywhere: shares of what is carried.
    degraded = dispatch_shares(inputs, values, {("chat", "SS"): 2.0})
    assert [d.share for d in degraded if d.request_type == "SS"] == [
        pytest.approx(2.0 / 6.0),
        pytest.approx(4.0 / 6.0),
    ]

"""The layout MILP: build counts, hand-solved golden instances, infeasibility, bad input."""

from __future__ import annotations

import pytest

from optimizer.inputs import PlanInputs
from optimizer.model import build_model
from optimizer.solve import solve_layout
from wattplan.domain import Layout, LayoutItem, Profile, ServingConfig
from wattplan.errors import InfeasiblePlanError, PlanInputError

TP2 = ServingConfig("m", "H100-80GB", 2, 700)
TP4 = ServingConfig("m", "H100-80GB", 4, 700)


def _profile(config: ServingConfig, capacity: float, idle_w: float, full_w: float) -> Profile:
    return Profile(config, "MM", capacity, idle_w, full_w, 0.1, 0.02, 1.0, 0.1, "test", "hand")


PROFILES = (_profile(TP2, 4.0, 400.0, 1000.0), _profile(TP4, 10.0, 800.0, 2000.0))


def _inputs(**overrides: object) -> PlanInputs:
    base: dict[str, object] = {
        "window_s": 3600,
        "demand_rps": {("chat", "MM"): 10.0},
        "service_models": {"chat": "m"},
        "profiles": PROFILES,
        "gpu_inventory": {"H100-80GB": 8},
        "startup_s": 0.0,
    }
    base.update(overrides)
    return PlanInputs(**base)  # type: ignore[arg-type]


def test_build_counts_variables_and_constraints() -> None:
    m = build_model(_inputs())
    assert len(m.SLOTS) == 2
    assert m.nvariables() == 6  # instances, load, started per slot
    # demand (1 pool) + capacity (2) + GPU budget (1 type) + started (2)
    assert m.nconstraints() == 6
    assert set(m.cost_terms) == {"energy_kwh", "carbon_kg", "cost_usd"}


def test_golden_one_tp4_instance_beats_three_tp2() -> None:
    # By hand: 3 x TP2 draw 3*400 + 150*10 = 2700 W; 1 x TP4 draws 800 + 120*10 = 2000 W.
    solution = solve_layout(_inputs())
    assert [(i.config.tp, i.instances) for i in solution.layout.items] == [(4, 1)]
    assert solution.prediction.energy_kwh == pytest.approx(2.0, rel=1e-6)
    assert solution.prediction.peak_power_w == pytest.approx(2000.0, rel=1e-6)
    assert solution.prediction.gpus == 4
    assert solution.solver["termination"] == "convergenceCriteriaSatisfied"


def test_energy_uses_the_forecast_mean_and_sizing_the_peak() -> None:
    solution = solve_layout(_inputs(mean_rps={("chat", "MM"): 5.0}))
    # Same layout; energy at half the load: 800 + 120 * 5 = 1400 W for an hour.
    assert solution.prediction.energy_kwh == pytest.approx(1.4, rel=1e-6)
    assert solution.prediction.peak_power_w == pytest.approx(2000.0, rel=1e-6)


def test_costly_start_up_keeps_the_running_layout() -> None:
    current = Layout((LayoutItem("chat", "MM", TP2, 3),))
    # Switching saves 0.7 kWh of serving energy but a TP4 cold start of 3600 s costs 0.8 kWh.
    kept = solve_layout(_inputs(current=current, startup_s=3600.0))
    assert [(i.config.tp, i.instances) for i in kept.layout.items] == [(2, 3)]
    assert kept.prediction.instances_started == 0
    # With a 420 s start (0.093 kWh) switching pays off.
    switched = solve_layout(_inputs(current=current, startup_s=420.0))
    assert [(i.config.tp, i.instances) for i in switched.layout.items] == [(4, 1)]
    assert (switched.prediction.instances_started, switched.prediction.instances_stopped) == (1, 3)


def test_carbon_and_cost_terms_follow_energy_and_gpu_hours() -> None:
    solution = solve_layout(
        _inputs(
            carbon_g_per_kwh=250.0,
            electricity_usd_per_mwh=100.0,
            gpu_usd_per_hour={"H100-80GB": 2.0},
        )
    )
    assert solution.prediction.carbon_g == pytest.approx(2.0 * 250.0, rel=1e-6)
    # 4 GPU-hours at $2 + 2 kWh at $0.10
    assert solution.prediction.cost_usd == pytest.approx(8.0 + 0.2, rel=1e-6)


def test_demand_beyond_inventory_is_infeasible() -> None:
    with pytest.raises(InfeasiblePlanError, match="current layout stays"):
        solve_layout(_inputs(gpu_inventory={"H100-80GB": 3}))


def test_invalid_inputs_name_the_offending_keys() -> None:
    with pytest.raises(PlanInputError) as err:
        solve_layout(_inputs(demand_rps={("chat", "XX"): 1.0, ("mail", "MM"): -1.0}))
    message = str(err.value)
    assert "unknown request type 'XX'" in message
    assert "service 'mail' has no model" in message
    assert "must be >= 0" in message

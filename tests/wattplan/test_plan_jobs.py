"""Planning jobs on a real database: degraded plans are stored whole and never auto-approved."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from wattplan import jobs, store
from wattplan.domain import LoadForecast, PlanStatus, Profile, ServingConfig
from wattplan.errors import ConfigError
from wattplan.settings import Settings

WINDOW = datetime(2023, 11, 16, 18, 30, tzinfo=UTC)
TP4 = ServingConfig("m", "H100-80GB", 4, 700)
GANG = ServingConfig("m", "H100-80GB", 2, 700, None, spp=2, kvp=2)


def _profile(config: ServingConfig, rtype: str = "MM") -> Profile:
    curve = ((0.0, 800.0), (4.0, 1500.0), (10.0, 2000.0))
    return Profile(config, rtype, 10.0, curve, 0.1, 0.02, 1.0, 0.1, "t1", "hand", 0.05, 0.01)


def _seed(engine: sa.Engine, peak_rps: float) -> Settings:
    settings = replace(
        Settings.from_env({}),
        target_utilization=1.0,  # sized at SLO capacity: the counts below are exact
        cluster="c1",
        gpu_inventory=8,
        profile_version="t1",
        service_models=(("chat", "m"),),
        auto_approve=True,
    )
    forecast = LoadForecast(
        "chat", "MM", WINDOW, settings.window_s, 12.0, peak_rps, peak_rps, 0.95, "test"
    )
    with engine.begin() as conn:
        store.write_profiles(conn, [_profile(TP4), _profile(GANG, "LC")])
        store.write_forecasts(conn, settings.cluster, [forecast], made_at=WINDOW)
    return settings


def test_profiles_round_trip_with_curves_and_gangs(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        store.write_profiles(conn, [_profile(TP4), _profile(GANG, "LC")])
        read = store.read_profiles(conn, "t1")
    assert sorted(read, key=lambda p: p.request_type) == [_profile(GANG, "LC"), _profile(TP4)]
    assert read[0].config.gpus in (4, 8)


def test_plan_is_stored_with_policy_diff_and_auto_approved(engine: sa.Engine) -> None:
    settings = _seed(engine, peak_rps=15.0)
    plan_id = jobs.propose_plan(engine, settings, WINDOW)
    plan, status = jobs.load_plan(engine, plan_id)
    assert status is PlanStatus.PROPOSED and not plan.degraded
    assert [(i.config.tp, i.instances) for i in plan.layout.items] == [(4, 2)]
    assert plan.policy["clock_policy"][0]["instances"] == 2  # type: ignore[index]
    assert plan.diff["summary"]["instances_started"] == 2  # type: ignore[index]
    assert plan.solver["options"]["clock_mode"] == "envelope"  # type: ignore[index]
    assert jobs.decide_approval(engine, settings, plan_id, WINDOW).route == "auto"
    # the same inputs give the same plan id and store nothing new
    assert jobs.propose_plan(engine, settings, WINDOW) == plan_id


def test_degraded_plan_is_stored_and_never_auto_approved(engine: sa.Engine) -> None:
    settings = _seed(engine, peak_rps=35.0)  # 8 GPUs carry two TP4: 20 of 35 rps
    plan_id = jobs.propose_plan(engine, settings, WINDOW)
    plan, status = jobs.load_plan(engine, plan_id)
    assert plan.degraded and status is PlanStatus.PROPOSED
    assert sum(i.load_rps for i in plan.layout.items) == pytest.approx(20.0, abs=1e-4)
    assert plan.policy["shortfall_rps"] == {"chat/MM": pytest.approx(15.0, abs=1e-4)}  # type: ignore[index]
    decision = jobs.decide_approval(engine, settings, plan_id, WINDOW)
    assert decision.route == "human" and "degraded" in decision.rule
    with engine.connect() as conn:
        approvals = conn.execute(sa.text("SELECT count(*) FROM plan_approvals")).scalar_one()
    assert approvals == 0
    # a person may still approve it
    jobs.record_decision(engine, plan_id, "approved", "operator", WINDOW, "accept the shortfall")
    assert jobs.decide_approval(engine, settings, plan_id, WINDOW).route == "auto"


def test_target_utilization_gives_each_pool_headroom_over_its_forecast(
    engine: sa.Engine,
) -> None:
    settings = _seed(engine, peak_rps=8.5)  # one TP4 (10 rps of SLO capacity) carries it
    at_capacity = jobs.load_plan(engine, jobs.propose_plan(engine, settings, WINDOW))[0]
    assert [(i.config.tp, i.instances) for i in at_capacity.layout.items] == [(4, 1)]
    headroom = replace(settings, target_utilization=0.8)  # sized for 8.5 / 0.8 = 10.6 rps
    plan = jobs.load_plan(engine, jobs.propose_plan(engine, headroom, WINDOW))[0]
    assert [(i.config.tp, i.instances) for i in plan.layout.items] == [(4, 2)]
    assert plan.plan_id != at_capacity.plan_id  # the headroom is part of the input digest
    with pytest.raises(ConfigError, match="WATTPLAN_TARGET_UTILIZATION=0.3"):
        Settings.from_env({"WATTPLAN_TARGET_UTILIZATION": "0.3"})


def test_optimizer_settings_are_read_and_checked() -> None:
    settings = Settings.from_env(
        {
            "WATTPLAN_RESHARD_S": "60",
            "WATTPLAN_MAX_CHANGES": "4",
            "WATTPLAN_POWER_BUDGET_W": "50000",
            "WATTPLAN_OBJECTIVE_WEIGHTS": "energy_kwh=1;cost_usd=0.5",
        }
    )
    assert (settings.reshard_s, settings.max_changes, settings.power_budget_w) == (60.0, 4, 50000.0)
    assert dict(settings.objective_weights) == {"energy_kwh": "1", "cost_usd": "0.5"}
    assert Settings.from_env({}).max_changes is None
    with pytest.raises(ConfigError, match="WATTPLAN_HYSTERESIS=0.5 must be >= 1"):
        Settings.from_env({"WATTPLAN_HYSTERESIS": "0.5"})
    with pytest.raises(ConfigError, match="unknown term 'joules'"):
        Settings.from_env({"WATTPLAN_OBJECTIVE_WEIGHTS": "joules=1"})

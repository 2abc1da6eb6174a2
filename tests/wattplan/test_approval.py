"""The approval policy, layout changes pool by pool, and the figures a person reads."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from wattplan.approval import (
    AUTO,
    HUMAN,
    ApprovalPolicy,
    Prices,
    approval_body,
    decide,
    evaluate_layout,
    plan_is_degraded,
)
from wattplan.changes import describe_change, plan_moves
from wattplan.domain import Layout, LayoutItem, Plan, PlanPrediction, Profile, ServingConfig
from wattplan.errors import ConfigError
from wattplan.settings import Settings

TP4 = ServingConfig("llama2-70b", "H100-80GB", 4, 490)
TP4_SLOW = ServingConfig("llama2-70b", "H100-80GB", 4, 400, 1410)
TP8 = ServingConfig("llama2-70b", "H100-80GB", 8, 490)
W0 = datetime(2023, 11, 16, 18, 30, tzinfo=UTC)


def layout(*items: tuple[str, ServingConfig, int]) -> Layout:
    """A layout from (pool "service/type", config, instances)."""
    return Layout(
        tuple(LayoutItem(*pool.split("/"), config, n) for pool, config, n in items)  # type: ignore[call-arg]
    )


def make_profile(
    config: ServingConfig, request_type: str, capacity: float, idle_w: float, full_w: float
) -> Profile:
    """A profile with a straight power line from idle to capacity (whichever way the Profile
    type spells its power curve)."""
    fields = {f.name for f in dataclasses.fields(Profile)}
    values: dict[str, object] = {
        "config": config,
        "request_type": request_type,
        "capacity_rps": capacity,
        "ttft_p99_s": 1.0,
        "tbt_p99_s": 0.1,
        "ttft_slo_s": 5.0,
        "tbt_slo_s": 0.5,
        "version": "t",
        "source": "test",
    }
    if "power_curve" in fields:
        values["power_curve"] = ((0.0, idle_w), (capacity, full_w))
    else:
        values.update(idle_power_w=idle_w, power_at_capacity_w=full_w)
    return Profile(**values)  # type: ignore[arg-type]


def test_clock_change_is_a_retune_and_tp_change_a_restart() -> None:
    before = layout(("chat/SS", TP4, 3))
    clock = describe_change(before, layout(("chat/SS", TP4, 1), ("chat/SS", TP4_SLOW, 2)))
    assert (clock.started, clock.stopped, clock.retuned, clock.is_clock_only) == (0, 0, 2, True)
    reshard = describe_change(before, layout(("chat/SS", TP8, 1)))
    assert (reshard.started, reshard.stopped, reshard.retuned) == (1, 3, 0)
    assert not reshard.is_clock_only
    assert describe_change(before, before).is_noop


def test_moves_name_pools_and_counts() -> None:
    moves = plan_moves(
        layout(("chat/SS", TP4, 2)), layout(("chat/SS", TP4, 1), ("code/LL", TP8, 2))
    )
    assert [(m.kind, m.service, m.request_type, m.instances) for m in moves] == [
        ("stop", "chat", "SS", 1),
        ("start", "code", "LL", 2),
    ]


@pytest.mark.parametrize(
    ("policy", "after", "degraded", "route", "rule"),
    [
        (ApprovalPolicy(), [("chat/SS", TP4_SLOW, 2)], False, AUTO, "clock_only"),
        (
            ApprovalPolicy(clock_only=False),
            [("chat/SS", TP4_SLOW, 2)],
            False,
            HUMAN,
            "needs_person",
        ),
        (ApprovalPolicy(), [("chat/SS", TP4, 2)], False, AUTO, "no_change"),
        (ApprovalPolicy(), [("chat/SS", TP4, 3)], False, HUMAN, "needs_person"),
        (
            ApprovalPolicy(max_instance_changes=2),
            [("chat/SS", TP4, 4)],
            False,
            AUTO,
            "small_change",
        ),
        (
            ApprovalPolicy(max_instance_changes=1),
            [("chat/SS", TP4, 4)],
            False,
            HUMAN,
            "needs_person",
        ),
        (ApprovalPolicy(approve_all=True), [("chat/SS", TP4, 9)], False, AUTO, "auto_approve"),
        # Degraded plans and large changes always go to a person, whatever else is allowed.
        (ApprovalPolicy(approve_all=True), [("chat/SS", TP4, 2)], True, HUMAN, "degraded"),
        (
            ApprovalPolicy(approve_all=True, large_change_instances=4),
            [("chat/SS", TP4, 7)],
            False,
            HUMAN,
            "large_change",
        ),
    ],
)
def test_policy_rules(
    policy: ApprovalPolicy, after: list, degraded: bool, route: str, rule: str
) -> None:
    change = describe_change(layout(("chat/SS", TP4, 2)), layout(*after))
    verdict = decide(policy, change, degraded=degraded)
    assert (verdict.route, verdict.rule) == (route, rule)
    assert verdict.reason


def _plan(**solver: object) -> Plan:
    prediction = PlanPrediction(1.0, 200.0, 10.0, 8, 900.0, 0.3)
    return Plan("p", "demo", W0, 1800, layout(("chat/SS", TP4, 2)), prediction, dict(solver))


def test_degraded_flag_is_read_from_wherever_the_optimizer_puts_it() -> None:
    assert not plan_is_degraded(_plan())
    assert plan_is_degraded(_plan(degraded=True))
    assert plan_is_degraded(_plan(status="degraded"))

    @dataclasses.dataclass(frozen=True)
    class FlaggedPlan(Plan):
        degraded: bool = False

    flagged = FlaggedPlan(**{f.name: getattr(_plan(), f.name) for f in dataclasses.fields(Plan)})
    assert not plan_is_degraded(flagged)
    assert plan_is_degraded(dataclasses.replace(flagged, degraded=True))


def test_evaluation_matches_a_hand_computed_oracle() -> None:
    profiles = {(TP4.key, "SS"): make_profile(TP4, "SS", 2.0, 200.0, 600.0)}
    figures = evaluate_layout(
        layout(("chat/SS", TP4, 2)),
        peak_rps={("chat", "SS"): 3.0, ("code", "LL"): 1.0},
        mean_rps={("chat", "SS"): 2.0},
        profiles=profiles,
        window_s=1800,
        prices=Prices(carbon_g_per_kwh=250.0, electricity_usd_per_mwh=100.0, gpu_usd_per_hour=2.0),
    )
    # 1 rps per instance -> 400 W each -> 800 W for half an hour.
    assert figures.energy_kwh == pytest.approx(0.4)
    assert figures.carbon_kg == pytest.approx(0.1)
    assert figures.cost_usd == pytest.approx(8 * 0.5 * 2.0 + 0.4 * 0.1)
    # code/LL has load and no instance: headroom -1; chat/SS 1 - 3/4.
    assert (figures.min_slo_headroom, figures.tightest_pool) == (-1.0, ("code", "LL"))


def test_load_beyond_a_pool_spills_to_larger_pools_as_the_optimizer_plans_it() -> None:
    profiles = {
        (TP4.key, t): make_profile(TP4, t, cap, 200.0, 600.0)
        for t, cap in (("SS", 2.0), ("MM", 1.0), ("LL", 0.5))
    }
    kwargs = dict(
        # chat/SS: 5 rps on 4 rps of SS capacity; chat/SM has no pool (-> MM); code/MM
        # has no larger pool with room.
        peak_rps={("chat", "SS"): 5.0, ("chat", "SM"): 0.5, ("code", "MM"): 1.0},
        mean_rps={("chat", "SS"): 5.0, ("chat", "SM"): 0.5, ("code", "MM"): 1.0},
        profiles=profiles,
        window_s=3600,
        prices=Prices(),
    )
    figures = evaluate_layout(
        layout(("chat/SS", TP4, 2), ("chat/MM", TP4, 2), ("chat/LL", TP4, 2)), **kwargs
    )
    # SS carries 4 of 5; 1 rps goes to MM (the smallest larger pool, 2 rps), then SM's
    # 0.5 rps: MM carries 1.5 of 2 (headroom 25%); LL nothing. code/MM: nowhere: -1.
    assert (figures.min_slo_headroom, figures.tightest_pool) == (-1.0, ("code", "MM"))
    without_code = {
        k: {p: v for p, v in d.items() if p[0] == "chat"}
        for k, d in kwargs.items()
        if k.endswith("rps")
    }
    figures = evaluate_layout(
        layout(("chat/SS", TP4, 2), ("chat/MM", TP4, 2), ("chat/LL", TP4, 2)),
        **{**kwargs, **without_code},
    )
    assert figures.min_slo_headroom == pytest.approx(0.0)  # SS full
    assert figures.tightest_pool == ("chat", "SS")
    # Energy follows the routed mean load: SS 2 x power(2 rps), MM 2 x power(0.75 rps),
    # LL 2 x power(0): 600 W at capacity, 200 W idle, linear between.
    watts = 2 * 600.0 + 2 * (200.0 + 400.0 * 0.75) + 2 * 200.0
    assert figures.energy_kwh == pytest.approx(watts / 1000.0)


def test_unprofiled_config_makes_energy_unknown_not_zero() -> None:
    figures = evaluate_layout(
        layout(("chat/SS", TP8, 1)),
        peak_rps={},
        mean_rps={},
        profiles={},
        window_s=1800,
        prices=Prices(),
    )
    assert figures.energy_kwh is None and figures.unprofiled == (f"chat/SS/{TP8.key}",)


def test_body_shows_each_pool_before_and_after_and_the_figures() -> None:
    profiles = {(c.key, "SS"): make_profile(c, "SS", 2.0, 200.0, 600.0) for c in (TP4, TP8)}
    current, planned = layout(("chat/SS", TP4, 2)), layout(("chat/SS", TP8, 1), ("code/SS", TP4, 1))
    change = describe_change(current, planned)
    kwargs = dict(
        peak_rps={("chat", "SS"): 3.0, ("code", "SS"): 1.0},
        mean_rps={("chat", "SS"): 2.0, ("code", "SS"): 1.0},
        profiles=profiles,
        window_s=1800,
        prices=Prices(250.0, 100.0, 2.0),
    )
    body = approval_body(
        dataclasses.replace(_plan(), layout=planned),
        change,
        decide(ApprovalPolicy(), change, degraded=False),
        current=evaluate_layout(current, **kwargs),  # type: ignore[arg-type]
        planned=evaluate_layout(planned, **kwargs),  # type: ignore[arg-type]
        prices=Prices(250.0, 100.0, 2.0),
        timeout_s=900,
        current_plan_id="p0",
    )
    assert "| chat / SS | 2 × llama2-70b tp4 490 W | 1 × llama2-70b tp8 490 W | " in body
    assert "+1 started, −2 stopped" in body
    assert "| code / SS | – | 1 × llama2-70b tp4 490 W | +1 started, +4 GPUs |" in body
    assert "| GPUs | 8 | 12 | +4 |" in body
    assert "| energy in the window (kWh) | 0.40 |" in body
    assert "| lowest SLO headroom | -100% (code/SS) | -50% (chat/SS) | |" in body
    assert "no answer within 15 min." in body


def test_settings_read_and_check_the_approval_policy() -> None:
    settings = Settings.from_env(
        {
            "WATTPLAN_AUTO_APPROVE_CLOCK_ONLY": "false",
            "WATTPLAN_AUTO_APPROVE_MAX_INSTANCE_CHANGES": "3",
            "WATTPLAN_APPROVAL_LARGE_CHANGE_INSTANCES": "10",
            "WATTPLAN_APPROVAL_TIMEOUT_S": "600",
        }
    )
    assert ApprovalPolicy.from_settings(settings) == ApprovalPolicy(False, False, 3, 10)
    assert settings.approval_timeout_s == 600
    with pytest.raises(ConfigError, match="WATTPLAN_APPROVAL_TIMEOUT_S=3600 must be"):
        Settings.from_env({"WATTPLAN_APPROVAL_TIMEOUT_S": "3600"})
    with pytest.raises(ConfigError, match="LARGE_CHANGE_INSTANCES=2 must be at least"):
        Settings.from_env(
            {
                "WATTPLAN_APPROVAL_LARGE_CHANGE_INSTANCES": "2",
                "WATTPLAN_AUTO_APPROVE_MAX_INSTANCE_CHANGES": "5",
            }
        )

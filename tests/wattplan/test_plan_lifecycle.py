"""A plan's life in PostgreSQL: policy, a person's answer, timeout, supersession, expiry."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from wattplan import jobs, store
from wattplan.domain import (
    Layout,
    LayoutItem,
    LoadForecast,
    Plan,
    PlanPrediction,
    PlanStatus,
    ServingConfig,
)
from wattplan.settings import Settings

TP4 = ServingConfig("llama2-70b", "H100-80GB", 4, 490)
TP4_SLOW = ServingConfig("llama2-70b", "H100-80GB", 4, 400, 1410)
W1 = datetime(2023, 11, 16, 18, 30, tzinfo=UTC)
W2 = W1 + timedelta(minutes=30)
SETTINGS = Settings()  # the default policy: clock-only changes, nothing else, by itself


def plan(plan_id: str, window: datetime, *items: tuple[ServingConfig, int], **solver: Any) -> Plan:
    layout = Layout(tuple(LayoutItem("chat", "SS", c, n, load_rps=1.0) for c, n in items))
    prediction = PlanPrediction(1.5, 300.0, 20.0, layout.gpus, 2000.0, 0.25)
    return Plan(
        plan_id, "demo", window, 1800, layout, prediction, {"carbon_g_per_kwh": 200.0, **solver}
    )


def store_plan(engine: sa.Engine, p: Plan) -> str:
    with engine.begin() as conn:
        store.write_plan(conn, p, created_at=p.window_start)
        store.write_forecasts(
            conn,
            "demo",
            [LoadForecast("chat", "SS", p.window_start, 1800, 2.0, 3.0, 3.0, 0.95, "test")],
            made_at=p.window_start,
        )
    return p.plan_id


def running(engine: sa.Engine, plan_id: str | None, *items: tuple[ServingConfig, int]) -> None:
    """Record that the cluster ran a layout just before W1."""
    layout = Layout(tuple(LayoutItem("chat", "SS", c, n) for c, n in items))
    with engine.begin() as conn:
        store.write_applied_state(conn, "demo", W1 - timedelta(minutes=5), plan_id, layout)


def status(engine: sa.Engine, plan_id: str) -> PlanStatus:
    return jobs.load_plan(engine, plan_id)[1]


def approvals(engine: sa.Engine, plan_id: str) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [(by, decision) for _, by, decision, _ in store.read_approvals(conn, plan_id)]


def answer(chosen: str, user: str | None = "alice", timed_out: bool = False) -> dict[str, Any]:
    return {
        "chosen": chosen,
        "user": user,
        "user_id": user,
        "responded_at": (W1 + timedelta(minutes=3)).isoformat(),
        "timed_out": timed_out,
    }


def test_clock_only_change_is_approved_by_policy(engine: sa.Engine) -> None:
    running(engine, "p0", (TP4, 2))
    pid = store_plan(engine, plan("p1", W1, (TP4_SLOW, 2)))
    decision = jobs.decide_approval(engine, SETTINGS, pid, W1)
    assert (decision.route, decision.rule) == ("auto", "clock_only")
    assert status(engine, pid) is PlanStatus.APPROVED
    assert approvals(engine, pid) == [("policy:clock_only", "approved")]
    assert jobs.check_push(engine, pid, W1 + timedelta(seconds=5)) is None


def test_instance_changes_wait_for_a_person_who_approves(engine: sa.Engine) -> None:
    running(engine, "p0", (TP4, 2))
    pid = store_plan(engine, plan("p1", W1, (TP4, 3)))
    decision = jobs.decide_approval(engine, SETTINGS, pid, W1)
    assert (decision.route, decision.rule) == ("human", "needs_person")
    assert status(engine, pid) is PlanStatus.PROPOSED
    assert decision.subject.startswith("Approve plan p1 for cluster demo (2023-11-16 18:30")
    assert "| chat / SS | 2 × llama2-70b tp4 490 W | 3 × llama2-70b tp4 490 W | +1 started" in (
        decision.body
    )
    assert "The cluster now runs plan `p0`" in decision.body
    assert (
        jobs.check_push(engine, pid, W1) == "plan p1 is proposed; only an approved plan is pushed"
    )

    assert jobs.record_response(engine, pid, answer("Approve"), W1, "run-1") is True
    assert status(engine, pid) is PlanStatus.APPROVED
    with engine.connect() as conn:
        ((decided_at, by, decision_, comment),) = store.read_approvals(conn, pid)
    assert (by, decision_, decided_at) == ("alice", "approved", W1 + timedelta(minutes=3))
    assert comment == "answered Approve in Airflow run run-1"


def test_rejection_and_timeout_keep_the_plan_off_the_cluster(engine: sa.Engine) -> None:
    for pid, response, who in (
        ("p1", answer("Reject"), "alice"),
        ("p2", answer("Reject", user=None, timed_out=True), "airflow:timeout"),
    ):
        store_plan(engine, plan(pid, W1, (TP4, 3)))
        jobs.decide_approval(engine, SETTINGS, pid, W1)
        assert jobs.record_response(engine, pid, response, W1, "run") is False
        assert status(engine, pid) is PlanStatus.REJECTED
        assert approvals(engine, pid) == [(who, "rejected")]
        assert "rejected" in (jobs.check_push(engine, pid, W1) or "")


def test_newer_plan_supersedes_an_unanswered_one_and_a_late_answer_changes_nothing(
    engine: sa.Engine,
) -> None:
    old = store_plan(engine, plan("p1", W1, (TP4, 3)))
    assert jobs.decide_approval(engine, SETTINGS, old, W1).route == "human"
    new = store_plan(engine, plan("p2", W2, (TP4, 4)))
    assert jobs.decide_approval(engine, SETTINGS, new, W2).route == "human"
    assert status(engine, old) is PlanStatus.SUPERSEDED

    # The person answers the old request after all: recorded, but the old plan stays out.
    assert jobs.record_response(engine, old, answer("Approve"), W2, "run-old") is False
    with engine.connect() as conn:
        ((_, by, decision, comment),) = store.read_approvals(conn, old)
    assert (by, decision) == ("alice", "approved")
    assert "answer arrived when the plan was superseded: it changes nothing" in comment
    assert status(engine, old) is PlanStatus.SUPERSEDED
    assert jobs.check_push(engine, old, W1) is not None
    assert jobs.decide_approval(engine, SETTINGS, old, W1).route == "skip"


def test_approved_plan_whose_window_passed_is_not_pushed(engine: sa.Engine) -> None:
    pid = store_plan(engine, plan("p1", W1, (TP4, 3)))
    jobs.decide_approval(engine, SETTINGS, pid, W1)
    jobs.record_response(engine, pid, answer("Approve"), W1, "run")
    assert jobs.check_push(engine, pid, W1 + timedelta(minutes=29)) is None
    why = jobs.check_push(engine, pid, W1 + timedelta(minutes=30))
    assert why is not None and "its window ended at 2023-11-16T19:00:00+00:00" in why
    assert status(engine, pid) is PlanStatus.SUPERSEDED


def test_plan_asked_about_after_its_window_is_skipped(engine: sa.Engine) -> None:
    pid = store_plan(engine, plan("p1", W1, (TP4, 3)))
    decision = jobs.decide_approval(engine, SETTINGS, pid, W2)
    assert (decision.route, decision.rule) == ("skip", "superseded")
    assert approvals(engine, pid) == []


def test_degraded_plan_is_never_approved_by_policy(engine: sa.Engine) -> None:
    running(engine, "p0", (TP4, 2))
    pid = store_plan(engine, plan("p1", W1, (TP4_SLOW, 2), degraded=True))
    settings = dataclasses.replace(SETTINGS, auto_approve=True)
    decision = jobs.decide_approval(engine, settings, pid, W1)
    assert (decision.route, decision.rule) == ("human", "degraded")
    assert approvals(engine, pid) == []


def test_second_decision_on_the_same_plan_pushes_at_most_once(engine: sa.Engine) -> None:
    settings = dataclasses.replace(SETTINGS, auto_approve=True)
    pid = store_plan(engine, plan("p1", W1, (TP4, 3)))
    assert jobs.decide_approval(engine, settings, pid, W1).rule == "auto_approve"
    assert jobs.decide_approval(engine, settings, pid, W1).rule == "already_approved"
    with engine.begin() as conn:
        store.set_plan_status(conn, pid, PlanStatus.APPLIED, W1, "test")
    assert jobs.decide_approval(engine, settings, pid, W1).route == "skip"
    assert jobs.check_push(engine, pid, W1) == "plan p1 is applied; only an approved plan is pushed"
    assert approvals(engine, pid) == [("policy:auto_approve", "approved")]


def test_another_plan_for_an_applied_window_is_skipped(engine: sa.Engine) -> None:
    settings = dataclasses.replace(SETTINGS, auto_approve=True)
    first = store_plan(engine, plan("p1", W1, (TP4, 3)))
    jobs.decide_approval(engine, settings, first, W1)
    with engine.begin() as conn:
        store.set_plan_status(conn, first, PlanStatus.APPLIED, W1, "test")
    again = store_plan(engine, plan("p1b", W1, (TP4, 4)))
    decision = jobs.decide_approval(engine, settings, again, W1)
    assert decision.route == "skip" and "p1" in decision.reason


def test_marking_the_approval_task_success_counts_as_an_approval(engine: sa.Engine) -> None:
    pid = store_plan(engine, plan("p1", W1, (TP4, 3)))
    jobs.decide_approval(engine, SETTINGS, pid, W1)
    assert jobs.record_response(engine, pid, None, W1, "run-9") is True
    assert approvals(engine, pid) == [("airflow:marked-success", "approved")]


def test_cli_decision_on_a_decided_plan_is_refused(engine: sa.Engine) -> None:
    pid = store_plan(engine, plan("p1", W1, (TP4, 3)))
    jobs.record_decision(engine, pid, "rejected", "bob", W1, "not today")
    with pytest.raises(ValueError, match="only a proposed plan can be decided"):
        jobs.record_decision(engine, pid, "approved", "bob", W1)

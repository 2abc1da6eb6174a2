"""The reference cluster agent over real HTTP on loopback, plus its pure layout rules."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.server import main, run_in_thread
from agent.state import (
    AgentState,
    ChangeRequest,
    StateFileError,
    StateStore,
    apply_changes,
    parse_item,
    submit_plan,
)
from wattplan.domain import Layout

TOKEN = "agent-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def item(service: str = "chat", request_type: str = "SS", **overrides: Any) -> dict[str, Any]:
    """One wire item; ``tp=4`` so each instance holds four GPUs."""
    base = {
        "service": service,
        "request_type": request_type,
        "model": "llama2-70b",
        "gpu_type": "H100-80GB",
        "tp": 4,
        "power_cap_w": 490,
        "clock_mhz": None,
        "instances": 1,
    }
    return {**base, **overrides}


def version_of(plan_id: str) -> int:
    """Plans ``p1``, ``p2``, ... carry versions 1, 2, ..."""
    return int("".join(ch for ch in plan_id if ch.isdigit()) or 1)


def post(
    client: httpx.Client,
    plan_id: str,
    changes: list[dict[str, Any]],
    base: str | None = None,
    version: int | None = None,
) -> httpx.Response:
    return client.post(
        f"/v1/plans/{plan_id}/changes",
        json={
            "version": version_of(plan_id) if version is None else version,
            "base_plan_id": base,
            "changes": changes,
        },
    )


@pytest.fixture
def start_agent() -> Iterator[Any]:
    """Start agents on free loopback ports; all are stopped at teardown."""
    stops = []

    def start(**kwargs: Any) -> tuple[httpx.Client, Any]:
        kwargs = {"cluster": "test", "token": TOKEN, "gpu_capacity": 16, **kwargs}
        base_url, stop = run_in_thread(**kwargs)
        stops.append(stop)
        client = httpx.Client(base_url=base_url, headers=AUTH, timeout=5.0)
        return client, stop

    yield start
    for stop in stops:
        stop(wait=False)  # shutting down takes ~0.2 s; let it overlap the next test


@pytest.fixture
def client(start_agent: Any) -> httpx.Client:
    return start_agent()[0]


def wait_for_status(client: httpx.Client, plan_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5.0
    while True:
        body = client.get(f"/v1/plans/{plan_id}").json()
        if body["status"] == status or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def test_healthz_answers_without_token(client: httpx.Client) -> None:
    with httpx.Client(base_url=client.base_url) as anonymous:
        response = anonymous.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", f"Basic {TOKEN}", TOKEN])
def test_v1_routes_refuse_missing_or_wrong_token_with_401(
    client: httpx.Client, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    with httpx.Client(base_url=client.base_url, headers=headers) as other:
        assert other.get("/v1/layout").status_code == 401
        assert other.get("/v1/plans/p1").status_code == 401
        response = other.post(
            "/v1/plans/p1/changes", json={"version": 1, "base_plan_id": None, "changes": []}
        )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/v1/layout").json()["plan_id"] is None  # nothing was applied


def test_agent_without_token_needs_no_auth(start_agent: Any) -> None:
    client, _ = start_agent(token=None)
    with httpx.Client(base_url=client.base_url) as anonymous:
        assert anonymous.get("/v1/layout").status_code == 200


def test_new_agent_runs_no_plan_and_no_items(client: httpx.Client) -> None:
    assert client.get("/v1/layout").json() == {
        "cluster": "test",
        "plan_id": None,
        "gpus": 0,
        "items": [],
    }


def test_accepted_changes_become_the_actual_layout_in_sorted_order(client: httpx.Client) -> None:
    changes = [item("search", instances=1), item("chat", "SM", tp=2, instances=2), item("chat")]
    response = post(client, "p1", changes)
    assert response.status_code == 202
    assert response.json() == {"plan_id": "p1", "status": "applied"}
    layout = client.get("/v1/layout").json()
    assert layout["plan_id"] == "p1"
    assert layout["gpus"] == 4 + 2 * 2 + 4
    assert [(i["service"], i["request_type"]) for i in layout["items"]] == [
        ("chat", "SM"),
        ("chat", "SS"),
        ("search", "SS"),
    ]
    assert client.get("/v1/plans/p1").json()["applied_at"] is not None


def test_instances_are_target_counts_and_zero_removes_the_slot(client: httpx.Client) -> None:
    post(client, "p1", [item("chat", instances=3), item("search", instances=1)])
    response = post(client, "p2", [item("chat", instances=2), item("search", instances=0)], "p1")
    assert response.status_code == 202
    layout = client.get("/v1/layout").json()
    assert [(i["service"], i["instances"]) for i in layout["items"]] == [("chat", 2)]
    assert layout["plan_id"] == "p2"


def test_same_plan_id_twice_applies_once(client: httpx.Client) -> None:
    first = post(client, "p1", [item(instances=2)])
    applied_at = client.get("/v1/plans/p1").json()["applied_at"]
    second = post(client, "p1", [item(instances=2)])
    assert (first.status_code, second.status_code) == (202, 200)
    assert second.json() == {"plan_id": "p1", "status": "applied"}
    assert client.get("/v1/plans/p1").json()["applied_at"] == applied_at
    assert client.get("/v1/layout").json()["gpus"] == 8


def test_same_plan_id_with_a_different_body_is_refused_with_409(client: httpx.Client) -> None:
    post(client, "p1", [item(instances=2)])
    response = post(client, "p1", [item(instances=3)])
    assert response.status_code == 409
    assert "different body" in response.json()["detail"]


def test_stale_base_plan_is_refused_with_409(client: httpx.Client) -> None:
    post(client, "p1", [item(instances=1)])
    response = post(client, "p2", [item(instances=2)], base="p0")
    assert response.status_code == 409
    assert "runs plan 'p1'" in response.json()["detail"]
    assert client.get("/v1/layout").json()["plan_id"] == "p1"


V = {"version": 1, "base_plan_id": None}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**V, "changes": [item(instances=-1)]}, "changes[0].instances"),
        ({**V, "changes": [item(tp=3)]}, "changes[0].tp"),
        ({**V, "changes": [item(tp="4")]}, "changes[0].tp"),
        ({**V, "changes": [item(colour="red")]}, "changes[0].colour"),
        (
            {**V, "changes": [{k: v for k, v in item().items() if k != "model"}]},
            "changes[0].model",
        ),
        ({**V, "changes": [item(), item()]}, "changes[1]"),
        ({"version": 1, "changes": []}, "base_plan_id"),
        ({"base_plan_id": None, "changes": []}, "version"),
        ({"version": 0, "base_plan_id": None, "changes": []}, "version"),
        ({"version": "7", "base_plan_id": None, "changes": []}, "version"),
        ({"version": True, "base_plan_id": None, "changes": []}, "version"),
        (V, "changes"),
        ({**V, "changes": [], "force": True}, "force"),
        ({**V, "changes": {}}, "changes"),
        ([], "body"),
    ],
)
def test_invalid_body_is_refused_with_422_naming_the_field(
    client: httpx.Client, body: Any, field: str
) -> None:
    response = client.post("/v1/plans/p1/changes", json=body)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(f"{field}:")
    assert client.get("/v1/plans/p1").status_code == 404  # the plan id stays free


def test_body_that_is_not_json_is_refused_with_422(client: httpx.Client) -> None:
    response = client.post("/v1/plans/p1/changes", content=b"{not json")
    assert response.status_code == 422
    assert "JSON" in response.json()["detail"]


def test_change_beyond_gpu_capacity_is_refused_with_422(client: httpx.Client) -> None:
    response = post(client, "p1", [item(instances=5)])  # 5 x tp4 = 20 GPUs > 16
    assert response.status_code == 422
    assert "gpu_capacity=16" in response.json()["detail"]
    assert client.get("/v1/layout").json()["gpus"] == 0


def test_empty_change_set_is_applied_as_noop(client: httpx.Client) -> None:
    post(client, "p1", [item(instances=2)])
    response = post(client, "p2", [], base="p1")
    assert response.status_code == 202
    assert response.json()["status"] == "applied"
    layout = client.get("/v1/layout").json()
    assert (layout["plan_id"], layout["gpus"]) == ("p2", 8)


def test_unknown_plan_is_404(client: httpx.Client) -> None:
    response = client.get("/v1/plans/never-sent")
    assert response.status_code == 404
    assert "never-sent" in response.json()["detail"]


def test_status_goes_from_applying_to_applied_after_the_delay(start_agent: Any) -> None:
    client, _ = start_agent(apply_delay_s=0.3)
    response = post(client, "p1", [item(instances=2)])
    assert response.json() == {"plan_id": "p1", "status": "applying"}
    body = client.get("/v1/plans/p1").json()
    assert (body["plan_id"], body["version"], body["status"], body["applied_at"]) == (
        "p1",
        1,
        "applying",
        None,
    )
    assert client.get("/v1/layout").json()["plan_id"] is None  # not applied yet
    assert wait_for_status(client, "p1", "applied")["status"] == "applied"
    assert client.get("/v1/layout").json()["gpus"] == 8


def test_another_plan_is_refused_with_409_while_one_is_applying(start_agent: Any) -> None:
    client, _ = start_agent(apply_delay_s=30)
    post(client, "p1", [item(instances=1)])
    response = post(client, "p2", [item(instances=2)])
    assert response.status_code == 409
    assert "still applying plan 'p1'" in response.json()["detail"]


def test_state_survives_agent_restart(start_agent: Any, tmp_path: Path) -> None:
    state_path = tmp_path / "agent-state.json"
    client, stop = start_agent(state_path=state_path)
    post(client, "p1", [item(instances=2), item("search", tp=1)])
    before = client.get("/v1/layout").json()
    plan = client.get("/v1/plans/p1").json()
    stop()

    client, _ = start_agent(state_path=state_path)
    assert client.get("/v1/layout").json() == before
    assert client.get("/v1/plans/p1").json() == plan
    assert post(client, "p1", [item(instances=2), item("search", tp=1)]).status_code == 200


def test_plan_left_applying_is_applied_after_restart(start_agent: Any, tmp_path: Path) -> None:
    state_path = tmp_path / "agent-state.json"
    client, stop = start_agent(state_path=state_path, apply_delay_s=30)
    post(client, "p1", [item(instances=2)])
    stop()  # before the simulated backend finished

    client, _ = start_agent(state_path=state_path)
    assert client.get("/v1/plans/p1").json()["status"] == "applied"
    assert client.get("/v1/layout").json()["gpus"] == 8


def test_plan_that_no_longer_fits_after_restart_fails(start_agent: Any, tmp_path: Path) -> None:
    state_path = tmp_path / "agent-state.json"
    client, stop = start_agent(state_path=state_path, apply_delay_s=30)
    post(client, "p1", [item(instances=2)])
    stop()

    client, _ = start_agent(state_path=state_path, gpu_capacity=4)
    assert client.get("/v1/plans/p1").json()["status"] == "failed"
    assert client.get("/v1/layout").json() == {
        "cluster": "test",
        "plan_id": None,
        "gpus": 0,
        "items": [],
    }


def test_state_file_of_another_cluster_is_refused(tmp_path: Path) -> None:
    state_path = tmp_path / "agent-state.json"
    store = StateStore("east", 16, state_path)
    store.submit("p1", {"version": 1, "base_plan_id": None, "changes": [item()]})
    assert json.loads(state_path.read_text())["cluster"] == "east"
    with pytest.raises(StateFileError, match="belongs to cluster 'east'"):
        StateStore("west", 16, state_path)


def test_apply_changes_sets_targets_and_keeps_unnamed_slots() -> None:
    layout = apply_changes(Layout(), [parse_item(item("chat", instances=2)), parse_item(item("b"))])
    changed = apply_changes(layout, [parse_item(item("chat", instances=0))])
    assert [(i.service, i.instances) for i in changed.items] == [("b", 1)]
    assert apply_changes(changed, []) == changed


def test_repeated_request_leaves_the_state_untouched() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, tzinfo=UTC)
    request = ChangeRequest(version=1, base_plan_id=None, changes=(parse_item(item()),))
    state, _, created = submit_plan(AgentState("c"), "p1", request, gpu_capacity=8, now=now)
    again, _, created_again = submit_plan(state, "p1", request, gpu_capacity=8, now=now)
    assert (created, created_again) == (True, False)
    assert again is state


def test_main_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--host",
        "--port",
        "--cluster",
        "--token",
        "--backend",
        "--gpu-capacity",
        "--max-unavailable",
        "--state-path",
        "--command-template",
    ):
        assert option in out


# --- versions, staggered waves, status, resume ------------------------------------------------


def test_stale_version_is_refused_with_409_and_not_applied(client: httpx.Client) -> None:
    assert post(client, "p5", [item(instances=1)]).status_code == 202
    response = post(client, "p4", [item(instances=2)], base="p5")
    assert response.status_code == 409
    assert "version 4 is stale" in response.json()["detail"]
    assert post(client, "p6", [item(instances=2)], base="p5", version=5).status_code == 409
    layout = client.get("/v1/layout").json()
    assert (layout["plan_id"], layout["gpus"]) == ("p5", 4)
    assert client.get("/v1/plans/p4").status_code == 404


def test_status_reports_desired_and_actual_while_applying(start_agent: Any) -> None:
    client, _ = start_agent(apply_delay_s=0.5)
    post(client, "p1", [item(instances=2)])
    status = client.get("/v1/status").json()
    assert status["applying"]["plan_id"] == "p1"
    assert [s["kind"] for s in status["applying"]["in_flight"]] == ["start", "start"]
    assert (status["desired"]["gpus"], status["actual"]["gpus"]) == (8, 0)
    assert status["plan_version"] == 1
    wait_for_status(client, "p1", "applied")
    status = client.get("/v1/status").json()
    assert status["applying"] is None
    assert status["desired"] == status["actual"]
    assert [(i["instance_id"], i["gpus"]) for i in status["instances"]] == [
        ("i00001", [0, 1, 2, 3]),
        ("i00002", [4, 5, 6, 7]),
    ]


def test_apply_is_staggered_one_instance_of_a_pool_at_a_time(start_agent: Any) -> None:
    client, _ = start_agent(gpu_capacity=32)
    post(client, "p1", [item(instances=3), item("code", instances=2)])
    slow = {"power_cap_w": 400, "clock_mhz": 1410}
    changes = [item(instances=0), item(instances=3, **slow), item("code", instances=0)]
    changes.append(item("code", instances=2, **slow))
    assert post(client, "p2", changes, base="p1").json()["status"] == "applied"
    journal = client.get("/v1/journal", params={"plan_id": "p2"}).json()["entries"]
    per_wave: dict[int, list[str]] = {}
    for entry in journal:
        per_wave.setdefault(entry["wave"], []).append(entry["service"])
        assert entry["kind"] == "retune"
    assert per_wave == {1: ["chat", "code"], 2: ["chat", "code"], 3: ["chat"]}
    assert len({e["instance_id"] for e in journal}) == 5  # each instance retuned once


def test_agent_restarted_mid_apply_resumes_to_the_desired_state(
    start_agent: Any, tmp_path: Path
) -> None:
    state_path = tmp_path / "agent-state.json"
    client, stop = start_agent(state_path=state_path, apply_delay_s=0.4)
    post(client, "p1", [item(instances=3)])
    wait_for_status(client, "p1", "applied")
    slow = {"power_cap_w": 400, "clock_mhz": 1410}
    post(client, "p2", [item(instances=0), item(instances=3, **slow)], base="p1")
    deadline = time.monotonic() + 5
    while client.get("/v1/plans/p2").json()["waves"] < 1:  # first retune done
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stop()  # during the second wave
    saved = json.loads(state_path.read_text())
    assert saved["plans"][-1]["status"] == "applying"
    assert len(saved["in_flight"]) == 1  # the interrupted wave is announced, not lost

    client, _ = start_agent(state_path=state_path, apply_delay_s=0.05)
    assert wait_for_status(client, "p2", "applied")["waves"] == 3
    layout = client.get("/v1/layout").json()
    assert [(i["clock_mhz"], i["instances"]) for i in layout["items"]] == [(1410, 3)]
    journal = client.get("/v1/journal", params={"plan_id": "p2"}).json()["entries"]
    assert sorted(e["instance_id"] for e in journal) == ["i00001", "i00002", "i00003"]
    assert [e["wave"] for e in journal] == [1, 2, 3]

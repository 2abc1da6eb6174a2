"""The executor plugin (hook, push, operator, sensor) against a real agent on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowFailException
from wattplan_executor.codec import layout_from_dict, layout_to_dict
from wattplan_executor.diff import diff_layout
from wattplan_executor.exceptions import (
    STATUS_ERRORS,
    ClusterAuthError,
    ClusterInvalidError,
    ClusterNotFoundError,
    ClusterPermanentError,
    ClusterStaleError,
    ClusterTransientError,
    error_for_status,
)
from wattplan_executor.hooks import ServingClusterHook
from wattplan_executor.operators import PlanAppliedSensor, PushPlanOperator, push_layout

from agent.server import run_in_thread
from wattplan.domain import Layout, LayoutItem, ServingConfig
from wattplan.errors import ClusterError

TOKEN = "hook-test-token"
CONN_ID = "wattplan_test_cluster"

TP4 = ServingConfig(model="llama2-70b", gpu_type="H100-80GB", tp=4, power_cap_w=490)
TP2 = ServingConfig(model="llama2-70b", gpu_type="H100-80GB", tp=2, power_cap_w=400, clock_mhz=1410)


def layout(*items: tuple[str, ServingConfig, int]) -> Layout:
    """A layout from (service, config, instances) triples, all of request type SS."""
    return Layout(tuple(LayoutItem(s, "SS", config, n, load_rps=1.5) for s, config, n in items))


def set_connection(
    monkeypatch: pytest.MonkeyPatch, base_url: str, token: str = TOKEN, conn_id: str = CONN_ID
) -> ServingClusterHook:
    """Define the Airflow Connection in the environment and return a hook on it."""
    parts = urlsplit(base_url)
    conn = {
        "conn_type": "http",
        "host": parts.hostname,
        "port": parts.port,
        "password": token,
        "extra": {"backoff_s": 0.01},  # retries stay, waits are short
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return ServingClusterHook(conn_id, timeout_s=5.0)


@pytest.fixture
def start_agent() -> Iterator[Callable[..., tuple[str, Callable[..., None]]]]:
    stops: list[Callable[..., None]] = []

    def start(**kwargs: Any) -> tuple[str, Callable[..., None]]:
        base_url, stop = run_in_thread(**{"cluster": "test", "token": TOKEN, **kwargs})
        stops.append(stop)
        return base_url, stop

    yield start
    for stop in stops:
        stop(wait=False)  # shutting down takes ~0.2 s; let it overlap the next test


@pytest.fixture
def hook(start_agent: Any, monkeypatch: pytest.MonkeyPatch) -> ServingClusterHook:
    base_url, _ = start_agent()
    return set_connection(monkeypatch, base_url)


@pytest.fixture
def answering(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], ServingClusterHook]]:
    """A tiny loopback server that answers every request with one status (e.g. 503)."""
    servers: list[ThreadingHTTPServer] = []

    def start(status: int) -> ServingClusterHook:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = json.dumps({"detail": f"answering {status}"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        return set_connection(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """A loopback server answering from a script of (status, body, headers), then the last
    entry for ever; it counts requests."""
    servers: list[ThreadingHTTPServer] = []

    def start(*script: tuple[int, dict[str, Any], dict[str, str]]) -> Any:
        answers = list(script)
        seen: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                seen.append(f"{self.command} {self.path}")
                status, payload, headers = answers.pop(0) if len(answers) > 1 else answers[0]
                body = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer()

            do_GET = _answer

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        set_connection(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        return seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- connection and hook -------------------------------------------------------------------


def test_connection_from_environment_works_outside_a_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_connection(monkeypatch, "http://127.0.0.1:1234")
    conn = BaseHook.get_connection(CONN_ID)
    assert (conn.host, conn.port, conn.password, conn.conn_type) == (
        "127.0.0.1",
        1234,
        TOKEN,
        "http",
    )


def test_hook_declares_the_provider_attributes() -> None:
    assert ServingClusterHook.conn_name_attr == "serving_cluster_conn_id"
    assert ServingClusterHook.default_conn_name == "wattplan_cluster_default"
    assert ServingClusterHook.conn_type == "http"
    assert ServingClusterHook.hook_name == "wattplan serving cluster"
    assert ServingClusterHook().serving_cluster_conn_id == "wattplan_cluster_default"


def test_hook_reads_the_empty_layout_of_a_new_cluster(hook: ServingClusterHook) -> None:
    assert hook.get_layout() == (None, Layout())


def test_test_connection_reports_success_and_a_wrong_token(
    start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, _ = start_agent()
    ok, message = set_connection(monkeypatch, base_url).test_connection()
    assert ok, message
    ok, message = set_connection(monkeypatch, base_url, token="wrong-token").test_connection()
    assert not ok
    assert "401" in message


# --- push -----------------------------------------------------------------------------------


def test_push_sends_only_the_difference(hook: ServingClusterHook) -> None:
    first = layout(("chat", TP4, 2), ("search", TP2, 1))
    assert push_layout(hook, "p1", first, 1) == {"plan_id": "p1", "changes": 2, "status": "applied"}

    second = layout(("chat", TP4, 2), ("search", TP2, 3), ("code", TP2, 1))
    assert push_layout(hook, "p2", second, 2)["changes"] == 2  # chat is unchanged
    plan_id, actual = hook.get_layout()
    assert plan_id == "p2"
    assert diff_layout(actual, second) == []


def test_a_long_context_gang_reaches_the_agent_whole(hook: ServingClusterHook) -> None:
    gang = ServingConfig("llama2-70b", "H100-80GB", 4, 700, None, spp=2, kvp=2)  # 16 GPUs
    desired = Layout(
        (LayoutItem("chat", "LC", gang, 1), LayoutItem("chat", "SS", TP4, 1, load_rps=1.5))
    )
    push_layout(hook, "p1", desired, 1)
    plan_id, actual = hook.get_layout()
    assert plan_id == "p1" and diff_layout(actual, desired) == []
    assert {i.config.key: i.config.gpus for i in actual.items} == {gang.key: 16, TP4.key: 4}
    wire = hook._request("GET", "/v1/layout")
    items = {item["request_type"]: item for item in wire["items"]}
    assert (items["LC"]["spp"], items["LC"]["kvp"]) == (2, 2)
    assert "spp" not in items["SS"]  # written only for a gang: older agents still agree
    assert layout_from_dict(layout_to_dict(desired)) == desired


def test_push_is_noop_when_cluster_already_matches(hook: ServingClusterHook) -> None:
    desired = layout(("chat", TP4, 2))
    push_layout(hook, "p1", desired, 1)
    result = push_layout(hook, "p2", desired, 2)
    assert result == {"plan_id": "p2", "changes": 0, "status": "applied"}
    assert hook.get_layout()[0] == "p1"  # nothing was sent under p2
    with pytest.raises(ClusterNotFoundError):
        hook.get_plan_status("p2")


def test_push_removes_slots_the_plan_drops(hook: ServingClusterHook) -> None:
    push_layout(hook, "p1", layout(("chat", TP4, 2), ("search", TP2, 1)), 1)
    push_layout(hook, "p2", layout(("chat", TP4, 1)), 2)
    assert hook.get_layout()[1] == Layout((LayoutItem("chat", "SS", TP4, 1),))


def test_retried_push_with_the_same_plan_id_applies_once(hook: ServingClusterHook) -> None:
    changes = diff_layout(Layout(), layout(("chat", TP4, 2)))
    assert hook.push_changes("p1", None, changes, 1) == "applied"
    # A retry whose first answer was lost sends the same body again: accepted, not re-applied.
    assert hook.push_changes("p1", None, changes, 1) == "applied"
    assert hook.get_layout()[1].gpus == 8


def test_stale_base_plan_maps_to_stale_error(hook: ServingClusterHook) -> None:
    push_layout(hook, "p1", layout(("chat", TP4, 1)), 1)
    with pytest.raises(ClusterStaleError, match="runs plan 'p1'") as info:
        hook.push_changes("p2", "p0", diff_layout(Layout(), layout(("chat", TP4, 2))), 2)
    assert isinstance(info.value, ClusterError)


def test_change_beyond_capacity_maps_to_invalid_error(
    start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, _ = start_agent(gpu_capacity=4)
    hook = set_connection(monkeypatch, base_url)
    with pytest.raises(ClusterInvalidError, match="gpu_capacity=4"):
        push_layout(hook, "p1", layout(("chat", TP4, 2)), 1)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_5xx_maps_to_transient_error(answering: Any, status: int) -> None:
    hook = answering(status)
    with pytest.raises(ClusterTransientError, match=f"answering {status}"):
        hook.get_layout()


def test_unreachable_cluster_maps_to_transient_error(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = set_connection(monkeypatch, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ClusterTransientError, match="cannot reach"):
        hook.get_layout()


EMPTY_LAYOUT = {"cluster": "c", "plan_id": None, "gpus": 0, "items": []}


def test_transient_errors_are_retried_with_exponential_backoff(scripted: Any) -> None:
    seen = scripted(
        (503, {"detail": "busy"}, {}),
        (502, {"detail": "gateway"}, {}),
        (200, EMPTY_LAYOUT, {}),
    )
    waits: list[float] = []
    hook = ServingClusterHook(CONN_ID, max_attempts=4, backoff_s=0.5, sleep=waits.append)
    assert hook.get_layout() == (None, Layout())
    assert waits == [0.5, 1.0]
    assert seen == ["GET /v1/layout"] * 3


def test_retry_after_header_sets_the_wait_within_the_cap(scripted: Any) -> None:
    scripted((429, {"detail": "slow down"}, {"Retry-After": "7"}), (200, EMPTY_LAYOUT, {}))
    waits: list[float] = []
    ServingClusterHook(CONN_ID, backoff_s=0.5, sleep=waits.append).get_layout()
    assert waits == [7.0]
    scripted((503, {"detail": "later"}, {"Retry-After": "3600"}), (200, EMPTY_LAYOUT, {}))
    waits.clear()
    ServingClusterHook(CONN_ID, backoff_s=0.5, sleep=waits.append).get_layout()
    assert waits == [30.0]  # MAX_BACKOFF_S


def test_transient_errors_give_up_after_max_attempts(scripted: Any) -> None:
    seen = scripted((503, {"detail": "down for maintenance"}, {}))
    waits: list[float] = []
    hook = ServingClusterHook(CONN_ID, max_attempts=3, backoff_s=1.0, sleep=waits.append)
    with pytest.raises(ClusterTransientError, match="gave up after 3 attempt") as info:
        hook.get_layout()
    assert "down for maintenance" in str(info.value)
    assert waits == [1.0, 2.0]
    assert len(seen) == 3


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, ClusterAuthError), (409, ClusterStaleError), (422, ClusterInvalidError)],
)
def test_permanent_errors_fail_at_once_without_retry(
    scripted: Any, status: int, error: type
) -> None:
    seen = scripted((status, {"detail": f"refused with {status}"}, {}))
    waits: list[float] = []
    hook = ServingClusterHook(CONN_ID, max_attempts=5, sleep=waits.append)
    with pytest.raises(error, match=f"HTTP {status}: POST /v1/plans/p1/changes .*refused"):
        hook.push_changes("p1", None, [], 1)
    assert (len(seen), waits) == (1, [])


def test_push_body_carries_version_base_plan_and_changes(hook: ServingClusterHook) -> None:
    changes = diff_layout(Layout(), layout(("chat", TP4, 1)))
    assert hook.push_changes("p7", None, changes, 1_700_000_000) == "applied"
    assert hook.get_plan_status("p7") == "applied"
    with pytest.raises(ClusterStaleError, match="version 1699999999 is stale"):
        hook.push_changes("p8", "p7", [], 1_699_999_999)


def test_bad_retry_settings_in_the_connection_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_connection(monkeypatch, "http://127.0.0.1:1")
    with pytest.raises(ClusterPermanentError, match="max_attempts >= 1"):
        ServingClusterHook(CONN_ID, max_attempts=0).get_layout()


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, ClusterInvalidError),
        (401, ClusterAuthError),
        (403, ClusterAuthError),
        (404, ClusterNotFoundError),
        (409, ClusterStaleError),
        (422, ClusterInvalidError),
        (429, ClusterTransientError),
        (503, ClusterTransientError),
        (599, ClusterTransientError),
        (418, ClusterPermanentError),
    ],
)
def test_status_table_maps_codes_to_typed_errors(status: int, error: type) -> None:
    exc = error_for_status(status, "detail")
    assert type(exc) is error
    assert isinstance(exc, ClusterError)
    assert str(status) in str(exc)


def test_every_mapped_4xx_except_408_and_429_is_permanent() -> None:
    for status, error in STATUS_ERRORS.items():
        transient = status >= 500 or status in (408, 429)
        assert issubclass(error, ClusterTransientError) == transient, status
        assert issubclass(error, ClusterPermanentError) != transient, status


# --- operator -------------------------------------------------------------------------------


def test_operator_stores_only_its_arguments() -> None:
    op = PushPlanOperator(
        task_id="push",
        plan_id="{{ run_id }}",
        desired=layout(("chat", TP4, 1)),
        version=1,
        serving_cluster_conn_id="not_defined_anywhere",
    )  # no Connection needed to build it
    assert op.template_fields == ("plan_id",)
    assert op.desired == layout_to_dict(layout(("chat", TP4, 1)))
    json.dumps(op.desired)


def test_operator_pushes_and_returns_a_small_summary(hook: ServingClusterHook) -> None:
    desired = layout(("chat", TP4, 2))
    op = PushPlanOperator(
        task_id="push",
        plan_id="p1",
        desired=layout_to_dict(desired),
        version=1,
        serving_cluster_conn_id=CONN_ID,
    )
    assert op.execute(context={}) == {"plan_id": "p1", "changes": 1, "status": "applied"}
    assert op.execute(context={}) == {"plan_id": "p1", "changes": 0, "status": "applied"}


def test_wrong_token_fails_at_once_without_retry(
    start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, _ = start_agent()
    hook = set_connection(monkeypatch, base_url, token="wrong-token")
    with pytest.raises(ClusterAuthError):
        hook.get_layout()
    op = PushPlanOperator(
        task_id="push",
        plan_id="p1",
        desired=layout(("chat", TP4, 1)),
        version=1,
        serving_cluster_conn_id=CONN_ID,
        retries=3,
    )
    # AirflowFailException makes Airflow fail the task without using its retries.
    with pytest.raises(AirflowFailException, match="401") as info:
        op.execute(context={})
    assert isinstance(info.value.__cause__, ClusterAuthError)


def test_invalid_layout_fails_at_once(hook: ServingClusterHook) -> None:
    bad = layout_to_dict(layout(("chat", TP4, 1)))
    bad["items"][0]["tp"] = 3
    op = PushPlanOperator(
        task_id="push", plan_id="p1", desired=bad, version=1, serving_cluster_conn_id=CONN_ID
    )
    with pytest.raises(AirflowFailException, match=r"changes\[0\]\.tp"):
        op.execute(context={})


def test_transient_error_propagates_so_airflow_retries(answering: Any) -> None:
    answering(503)
    op = PushPlanOperator(
        task_id="push",
        plan_id="p1",
        desired=layout(("chat", TP4, 1)),
        version=1,
        serving_cluster_conn_id=CONN_ID,
        retries=3,
    )
    with pytest.raises(ClusterTransientError):
        op.execute(context={})


# --- sensor ---------------------------------------------------------------------------------


def test_sensor_defaults_to_reschedule_mode() -> None:
    sensor = PlanAppliedSensor(task_id="wait", plan_id="p1")
    assert sensor.mode == "reschedule"
    assert sensor.template_fields == ("plan_id", "desired")


def test_sensor_pokes_false_while_applying_then_true(
    start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, _ = start_agent(apply_delay_s=0.3)
    hook = set_connection(monkeypatch, base_url)
    assert push_layout(hook, "p1", layout(("chat", TP4, 1)), 1)["status"] == "applying"
    sensor = PlanAppliedSensor(task_id="wait", plan_id="p1", serving_cluster_conn_id=CONN_ID)
    assert sensor.poke(context={}) is False
    deadline = time.monotonic() + 5.0
    while not sensor.poke(context={}):
        assert time.monotonic() < deadline, "plan was not applied in time"
        time.sleep(0.05)


def test_sensor_fails_at_once_when_the_plan_failed(
    start_agent: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state_path = tmp_path / "agent-state.json"
    base_url, stop = start_agent(apply_delay_s=30, state_path=state_path)
    push_layout(set_connection(monkeypatch, base_url), "p1", layout(("chat", TP4, 2)), 1)
    stop()
    # Restarted with fewer GPUs, the agent cannot finish the plan and marks it failed.
    base_url, _ = start_agent(state_path=state_path, gpu_capacity=4)
    set_connection(monkeypatch, base_url)
    sensor = PlanAppliedSensor(task_id="wait", plan_id="p1", serving_cluster_conn_id=CONN_ID)
    with pytest.raises(AirflowFailException, match="failed"):
        sensor.poke(context={})


def test_sensor_keeps_poking_while_the_cluster_is_down(answering: Any) -> None:
    answering(503)
    sensor = PlanAppliedSensor(task_id="wait", plan_id="p1", serving_cluster_conn_id=CONN_ID)
    assert sensor.poke(context={}) is False


def test_sensor_fails_at_once_for_an_unknown_plan(hook: ServingClusterHook) -> None:
    sensor = PlanAppliedSensor(task_id="wait", plan_id="p9", serving_cluster_conn_id=CONN_ID)
    with pytest.raises(AirflowFailException, match="does not know it"):
        sensor.poke(context={})


def test_sensor_accepts_a_noop_push_when_given_the_layout(hook: ServingClusterHook) -> None:
    desired = layout(("chat", TP4, 1))
    push_layout(hook, "p1", desired, 1)
    assert push_layout(hook, "p2", desired, 2)["changes"] == 0
    sensor = PlanAppliedSensor(
        task_id="wait", plan_id="p2", desired=desired, serving_cluster_conn_id=CONN_ID
    )
    assert sensor.poke(context={}) is True
    other = PlanAppliedSensor(
        task_id="wait",
        plan_id="p3",
        desired=layout(("chat", TP4, 2)),
        serving_cluster_conn_id=CONN_ID,
    )
    with pytest.raises(AirflowFailException, match="neither knows"):
        other.poke(context={})


# --- pure parts -----------------------------------------------------------------------------


def test_diff_is_empty_when_layouts_match_ignoring_load_and_order() -> None:
    a = layout(("chat", TP4, 2), ("search", TP2, 1))
    b = Layout(
        tuple(reversed([LayoutItem(i.service, "SS", i.config, i.instances) for i in a.items]))
    )
    assert diff_layout(a, b) == []


def test_diff_gives_target_counts_and_zero_for_dropped_slots() -> None:
    actual = layout(("chat", TP4, 2), ("search", TP2, 1))
    desired = layout(("chat", TP4, 3), ("code", TP2, 1))
    assert [(c["service"], c["instances"]) for c in diff_layout(actual, desired)] == [
        ("chat", 3),
        ("code", 1),
        ("search", 0),
    ]
    assert set(diff_layout(actual, desired)[0]) == {
        "service",
        "request_type",
        "model",
        "gpu_type",
        "tp",
        "power_cap_w",
        "clock_mhz",
        "instances",
    }


def test_layout_round_trips_through_json() -> None:
    original = layout(("chat", TP4, 2), ("search", TP2, 1))
    assert layout_from_dict(json.loads(json.dumps(layout_to_dict(original)))) == original


def test_plugin_module_defines_the_wattplan_plugin() -> None:
    from wattplan_plugin import WattplanPlugin

    assert WattplanPlugin.name == "wattplan"

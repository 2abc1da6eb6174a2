"""The hook: the only code that speaks a serving cluster's HTTP API."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from airflow.sdk import BaseHook

from wattplan.domain import Layout
from wattplan.errors import PlanInputError
from wattplan_executor.codec import layout_from_dict
from wattplan_executor.exceptions import (
    ClusterPermanentError,
    ClusterTransientError,
    error_for_status,
)

#: Seconds a whole request may take unless the Connection's extra sets ``timeout_s``.
DEFAULT_TIMEOUT_S = 10.0
#: Seconds to open a TCP connection (capped by the request timeout).
CONNECT_TIMEOUT_S = 5.0
#: Tries per request unless the Connection's extra sets ``max_attempts``.
DEFAULT_MAX_ATTEMPTS = 4
#: First wait between tries (doubled after each), unless the extra sets ``backoff_s``.
DEFAULT_BACKOFF_S = 1.0
#: Longest wait between two tries (also caps a ``Retry-After`` header).
MAX_BACKOFF_S = 30.0


class ServingClusterHook(BaseHook):
    """Talk to one serving cluster's agent (``/v1`` API) over HTTP with a bearer token.

    The Airflow Connection gives ``host``, ``port``, ``schema`` (``http`` or ``https``,
    default ``http``) and ``password`` (the bearer token); its extra may set ``timeout_s``,
    ``max_attempts`` and ``backoff_s``.
    Example, as an environment variable::

        AIRFLOW_CONN_WATTPLAN_CLUSTER_DEFAULT='{"conn_type": "http", "host": "127.0.0.1",
            "port": 8765, "password": "<token>"}'

    The hook keeps no state but the connection id: every call reads the Connection and opens
    a fresh HTTP client with explicit timeouts. Transient failures (timeout, connection
    refused or reset, 408, 429, 5xx) are tried again up to ``max_attempts`` times in all,
    waiting ``backoff_s``, then twice as long after each failure (at most
    :data:`MAX_BACKOFF_S`; a ``Retry-After`` header is honoured within that cap); after the
    last try :class:`~wattplan_executor.exceptions.ClusterTransientError` is raised, so that
    Airflow's task retries apply next. Retrying a push is safe: the plan id is its
    idempotency key. Refusals (401, 403, 404, 409, 400/422) raise a
    :class:`~wattplan_executor.exceptions.ClusterPermanentError` at once, never retried.

    Connections outside a running task: in Airflow 3.3 ``BaseHook.get_connection`` goes
    through the Task SDK. Inside a task it asks the supervisor (Execution API) after the
    environment. Outside a task (tests, scripts, the demo) there is no supervisor, so the SDK
    reads only ``AIRFLOW_CONN_<CONN_ID>`` environment variables (URI or JSON) and any
    configured external secrets backend, never the metadata database (unless the process
    sets ``_AIRFLOW_PROCESS_CONTEXT=server``). Define the Connection in the environment to
    use the hook there; nothing else is needed.

    Args:
        serving_cluster_conn_id: Airflow Connection id of the cluster.
        timeout_s: Seconds per request; overrides the Connection's ``timeout_s`` extra.
        max_attempts: Tries per request (1: no retry); overrides the extra's ``max_attempts``.
        backoff_s: First wait between tries; overrides the extra's ``backoff_s``.
        sleep: Waits between tries (tests pass a recorder).
    """

    conn_name_attr = "serving_cluster_conn_id"
    default_conn_name = "wattplan_cluster_default"
    conn_type = "http"
    hook_name = "wattplan serving cluster"

    def __init__(
        self,
        serving_cluster_conn_id: str = default_conn_name,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        backoff_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self.serving_cluster_conn_id = serving_cluster_conn_id
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.sleep = sleep

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Relabel the Connection form fields for this hook (used by a provider package)."""
        return {
            "hidden_fields": ["login"],
            "relabeling": {"password": "Bearer token", "schema": "Scheme (http or https)"},
        }

    def _settings(self) -> _ConnSettings:
        conn = self.get_connection(self.serving_cluster_conn_id)
        scheme = (conn.schema or "http").lower()
        host = conn.host or ""
        if "://" in host:  # a host given as a URL carries its own scheme
            scheme, _, host = host.partition("://")
        if scheme not in ("http", "https"):
            raise ClusterPermanentError(
                f"connection {self.serving_cluster_conn_id!r}: schema {scheme!r} must be "
                "'http' or 'https'"
            )
        host = host.rstrip("/")
        if not host:
            raise ClusterPermanentError(
                f"connection {self.serving_cluster_conn_id!r} has no host; set it to the "
                "agent's address"
            )
        port = f":{conn.port}" if conn.port else ""
        extra = conn.extra_dejson
        try:
            timeout_s = float(
                self.timeout_s
                if self.timeout_s is not None
                else extra.get("timeout_s", DEFAULT_TIMEOUT_S)
            )
            attempts = int(
                self.max_attempts
                if self.max_attempts is not None
                else extra.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
            )
            backoff_s = float(
                self.backoff_s
                if self.backoff_s is not None
                else extra.get("backoff_s", DEFAULT_BACKOFF_S)
            )
        except (TypeError, ValueError) as exc:
            raise ClusterPermanentError(
                f"connection {self.serving_cluster_conn_id!r}: timeout_s, max_attempts and "
                f"backoff_s in its extra must be numbers ({exc})"
            ) from exc
        if timeout_s <= 0 or attempts < 1 or backoff_s < 0:
            raise ClusterPermanentError(
                f"connection {self.serving_cluster_conn_id!r}: needs timeout_s > 0, "
                f"max_attempts >= 1 and backoff_s >= 0 (got {timeout_s}, {attempts}, {backoff_s})"
            )
        return _ConnSettings(
            f"{scheme}://{host}{port}", conn.password or None, timeout_s, attempts, backoff_s
        )

    @contextmanager
    def _client(self, conn: _ConnSettings) -> Iterator[httpx.Client]:
        headers = {"Accept": "application/json"}
        if conn.token:
            headers["Authorization"] = f"Bearer {conn.token}"
        timeout = httpx.Timeout(conn.timeout_s, connect=min(CONNECT_TIMEOUT_S, conn.timeout_s))
        with httpx.Client(base_url=conn.base_url, headers=headers, timeout=timeout) as client:
            yield client

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        conn = self._settings()
        what = f"{method} {path} on cluster connection {self.serving_cluster_conn_id!r}"
        for attempt in range(1, conn.max_attempts + 1):
            try:
                return self._request_once(conn, what, method, path, body)
            except ClusterTransientError as exc:
                if attempt == conn.max_attempts:
                    raise ClusterTransientError(
                        f"{exc} (gave up after {conn.max_attempts} attempt(s))"
                    ) from exc
                wait_s = min(conn.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                if exc.retry_after_s is not None:
                    wait_s = min(max(wait_s, exc.retry_after_s), MAX_BACKOFF_S)
                self.log.warning(
                    "%s; attempt %d of %d, trying again in %.1f s",
                    exc,
                    attempt,
                    conn.max_attempts,
                    wait_s,
                )
                self.sleep(wait_s)
        raise AssertionError("unreachable")  # pragma: no cover

    def _request_once(
        self,
        conn: _ConnSettings,
        what: str,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
    ) -> Any:
        with self._client(conn) as client:
            try:
                response = client.request(method, path, json=body)
            except httpx.TimeoutException as exc:
                raise ClusterTransientError(f"{what} timed out: {exc!r}") from exc
            except httpx.TransportError as exc:
                raise ClusterTransientError(
                    f"{what}: cannot reach {client.base_url}: {exc!r}"
                ) from exc
        if response.status_code >= 400:
            error = error_for_status(response.status_code, f"{what}: {_detail(response)}")
            if isinstance(error, ClusterTransientError):
                error.retry_after_s = _retry_after(response)
            raise error
        try:
            return response.json()
        except ValueError as exc:
            raise ClusterPermanentError(
                f"{what} answered HTTP {response.status_code} with a body that is not JSON"
            ) from exc

    def get_layout(self) -> tuple[str | None, Layout]:
        """Read what the cluster runs.

        Returns:
            ``(plan_id, layout)``: the last plan the cluster applied (``None`` if none) and
            its actual layout.

        Raises:
            ClusterTransientError: the cluster did not answer; retry.
            ClusterPermanentError: the cluster refused, or answered a malformed layout.
        """
        body = self._request("GET", "/v1/layout")
        try:
            layout = layout_from_dict(body)
        except PlanInputError as exc:
            raise ClusterPermanentError(
                f"GET /v1/layout answered a malformed layout: {exc}"
            ) from exc
        plan_id = body.get("plan_id")
        if plan_id is not None and not isinstance(plan_id, str):
            raise ClusterPermanentError(f"GET /v1/layout answered plan_id={plan_id!r}")
        return plan_id, layout

    def push_changes(
        self,
        plan_id: str,
        base_plan_id: str | None,
        changes: Sequence[Mapping[str, Any]],
        version: int,
        policy: Mapping[str, Any] | None = None,
    ) -> str:
        """Send target-count changes under ``plan_id`` (the idempotency key).

        Args:
            plan_id: Id of the plan; sending the same changes again is harmless.
            base_plan_id: The plan the cluster ran when the changes were computed.
            changes: Items whose ``instances`` is the slot's target count.
            version: The plan's version; the cluster refuses one not above the last it took.
            policy: The plan's runtime policy (clock policy, power guard) for the cluster's
                control loops; not sent when ``None``.

        Returns:
            The plan's status: ``applying`` or ``applied``.

        Raises:
            ClusterTransientError: the cluster did not answer; retry.
            ClusterStaleError: the cluster now runs another plan, took a newer version, or the
                id was reused.
            ClusterInvalidError: the cluster rejected the changes (bad field, too many GPUs).
            ClusterAuthError: the token is missing or wrong.
        """
        payload: dict[str, Any] = {
            "version": version,
            "base_plan_id": base_plan_id,
            "changes": [dict(change) for change in changes],
        }
        if policy is not None:
            payload["policy"] = dict(policy)
        body = self._request("POST", f"/v1/plans/{quote(plan_id, safe='')}/changes", payload)
        return _status(body)

    def get_plan_status(self, plan_id: str) -> str:
        """Return ``applying``, ``applied`` or ``failed`` for a plan the cluster accepted.

        Raises:
            ClusterNotFoundError: the cluster never accepted ``plan_id``.
            ClusterTransientError: the cluster did not answer; retry.
        """
        return _status(self._request("GET", f"/v1/plans/{quote(plan_id, safe='')}"))

    def test_connection(self) -> tuple[bool, str]:
        """Check that the cluster answers and accepts the token.

        Returns:
            ``(ok, message)`` as Airflow's "Test connection" expects.
        """
        try:
            plan_id, layout = self.get_layout()
        except Exception as exc:  # the UI shows any failure as a message
            return False, str(exc)
        return True, f"cluster answers: runs plan {plan_id!r} on {layout.gpus} GPUs"


@dataclass(frozen=True)
class _ConnSettings:
    base_url: str
    token: str | None
    timeout_s: float
    max_attempts: int
    backoff_s: float


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else response.text[:300] or response.reason_phrase


def _status(body: Any) -> str:
    status = body.get("status") if isinstance(body, Mapping) else None
    if not isinstance(status, str):
        raise ClusterPermanentError(f"the cluster answered without a plan status: {body!r}")
    return status

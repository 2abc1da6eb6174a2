"""FastAPI layer of the cluster agent: routes, bearer auth and the simulated backend.

Routes (every ``/v1`` route needs ``Authorization: Bearer <token>`` when a token is set):

- ``GET /healthz`` -> ``{"status": "ok"}``
- ``GET /v1/layout`` -> ``{"cluster", "plan_id", "gpus", "items": [...]}`` (actual layout)
- ``POST /v1/plans/{plan_id}/changes`` with ``{"base_plan_id", "changes": [...]}`` -> 202
  ``{"plan_id", "status"}`` when accepted, 200 for a repeat of the same request
- ``GET /v1/plans/{plan_id}`` -> ``{"plan_id", "status", "applied_at"}``

Errors answer ``{"detail": "<what is wrong and how to fix it>"}`` with the status from
:data:`ERROR_STATUS`.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from agent.state import (
    APPLYING,
    FAILED,
    AgentError,
    CapacityError,
    ChangeSetError,
    PlanConflictError,
    PlanRecord,
    StalePlanError,
    StateStore,
    UnknownPlanError,
    item_to_dict,
)

log = logging.getLogger(__name__)

#: HTTP status of each agent error; the first matching class in an error's MRO wins.
ERROR_STATUS: dict[type[AgentError], int] = {
    ChangeSetError: 422,
    CapacityError: 422,
    PlanConflictError: 409,
    StalePlanError: 409,
    UnknownPlanError: 404,
}


class SimulatedBackend:
    """Applies accepted plans by completing them in the store after ``apply_delay_s``.

    With no delay a plan is applied before the request returns; with a delay a daemon timer
    completes it later, so its status goes ``applying`` -> ``applied``.

    Args:
        store: The state store to complete plans in.
        apply_delay_s: Seconds between accepting and applying a plan.
    """

    def __init__(self, store: StateStore, apply_delay_s: float = 0.0) -> None:
        self.store = store
        self.apply_delay_s = apply_delay_s
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()

    def start(self, plan_id: str) -> PlanRecord:
        """Start applying an accepted plan and return its record as of now."""
        if self.apply_delay_s <= 0:
            return self._complete(plan_id)
        timer = threading.Timer(self.apply_delay_s, self._finish, args=(plan_id,))
        timer.daemon = True
        with self._lock:
            self._timers[plan_id] = timer
        timer.start()
        return self.store.plan(plan_id)

    def _complete(self, plan_id: str) -> PlanRecord:
        record = self.store.complete(plan_id)
        if record.status == FAILED:
            log.warning("plan %s failed: %s", plan_id, record.message)
        else:
            log.info("plan %s %s", plan_id, record.status)
        return record

    def _finish(self, plan_id: str) -> None:
        try:
            self._complete(plan_id)
        except Exception:  # a background thread has no caller to raise to
            log.exception("applying plan %s failed; it stays 'applying' until restart", plan_id)
        finally:
            with self._lock:
                self._timers.pop(plan_id, None)

    def resume(self) -> None:
        """Restart plans that were still applying when the agent last stopped."""
        for plan in self.store.snapshot().plans:
            if plan.status == APPLYING:
                log.info("resuming plan %s", plan.plan_id)
                self.start(plan.plan_id)

    def stop(self) -> None:
        """Cancel pending applications; they resume at the next start (state file kept)."""
        with self._lock:
            timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()


def _status_of(exc: AgentError) -> int:
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


def _require_token(request: Request) -> None:
    expected: str | None = request.app.state.token
    if not expected:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong bearer token; send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _plan_body(record: PlanRecord) -> dict[str, Any]:
    return {
        "plan_id": record.plan_id,
        "status": record.status,
        "applied_at": record.applied_at.isoformat() if record.applied_at else None,
    }


def create_app(
    *,
    cluster: str = "demo",
    token: str | None = None,
    gpu_capacity: int = 64,
    apply_delay_s: float = 0.0,
    state_path: Path | str | None = None,
) -> FastAPI:
    """Build the agent's FastAPI application.

    Args:
        cluster: Name of the serving cluster.
        token: Bearer token every ``/v1`` route requires; ``None`` or empty disables auth.
        gpu_capacity: GPUs the cluster has; change sets that need more are refused.
        apply_delay_s: Seconds the simulated backend takes to apply a plan.
        state_path: JSON file that keeps the state across restarts; ``None``: memory only.

    Returns:
        The application; plans left applying by a previous run resume at startup.

    Raises:
        StateFileError: the state file is unreadable or belongs to another cluster.
    """
    store = StateStore(cluster, gpu_capacity, state_path)
    backend = SimulatedBackend(store, apply_delay_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(backend.resume)
        yield
        backend.stop()

    app = FastAPI(title=f"wattplan cluster agent ({cluster})", lifespan=lifespan)
    app.state.token = token
    app.state.store = store
    app.state.backend = backend

    @app.exception_handler(AgentError)
    async def agent_error(_: Request, exc: AgentError) -> JSONResponse:
        return JSONResponse(status_code=_status_of(exc), content={"detail": str(exc)})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_require_token)])

    @v1.get("/layout")
    def get_layout() -> dict[str, Any]:
        state = store.snapshot()
        return {
            "cluster": state.cluster,
            "plan_id": state.applied_plan_id,
            "gpus": state.layout.gpus,
            "items": [item_to_dict(item) for item in state.layout.items],
        }

    @v1.post("/plans/{plan_id}/changes")
    async def post_changes(plan_id: str, request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise ChangeSetError(f"body: not valid JSON ({exc})") from exc
        record, created = await run_in_threadpool(store.submit, plan_id, body)
        if created and record.status == APPLYING:
            record = await run_in_threadpool(backend.start, plan_id)
        return JSONResponse(
            status_code=202 if created else 200,
            content={"plan_id": record.plan_id, "status": record.status},
        )

    @v1.get("/plans/{plan_id}")
    def get_plan(plan_id: str) -> dict[str, Any]:
        return _plan_body(store.plan(plan_id))

    app.include_router(v1)
    return app

"""FastAPI layer of the cluster agent: routes, bearer auth, the apply loop's lifecycle.

Routes (every ``/v1`` route needs ``Authorization: Bearer <token>`` when a token is set):

- ``GET /healthz`` -> ``{"status": "ok"}``
- ``GET /v1/layout`` -> ``{"cluster", "plan_id", "gpus", "items": [...]}`` (actual layout)
- ``GET /v1/status`` -> desired and actual layout, the plan being applied, its wave in
  flight, the running instances
- ``POST /v1/plans/{plan_id}/changes`` with ``{"version", "base_plan_id", "changes": [...]}``
  -> 202 ``{"plan_id", "status"}`` when accepted, 200 for a repeat of the same request
- ``GET /v1/plans/{plan_id}`` -> ``{"plan_id", "version", "status", "accepted_at",
  "applied_at", "waves", "message"}``
- ``GET /v1/journal[?plan_id=...]`` -> ``{"entries": [...]}``: the steps completed, in order

Errors answer ``{"detail": "<what is wrong and how to fix it>"}`` with the status from
:data:`ERROR_STATUS`: 401 bad token, 404 unknown plan, 409 stale version or base plan, plan
id reused or another plan applying, 422 malformed body or too many GPUs.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from agent.backends import Backend, SimulatedBackend
from agent.control import ControlLoops, ControlSettings, planned_loads
from agent.runner import Applier
from agent.state import (
    APPLYING,
    AgentError,
    AgentState,
    CapacityError,
    ChangeSetError,
    PlanConflictError,
    PlanRecord,
    StalePlanError,
    StateStore,
    UnknownPlanError,
    _utc_now,
    instance_to_dict,
    item_to_dict,
    step_to_dict,
)
from agent.twin import TwinTelemetry
from wattplan.domain import Layout

log = logging.getLogger(__name__)

#: HTTP status of each agent error; the first matching class in an error's MRO wins.
ERROR_STATUS: dict[type[AgentError], int] = {
    ChangeSetError: 422,
    CapacityError: 422,
    PlanConflictError: 409,
    StalePlanError: 409,
    UnknownPlanError: 404,
}
#: How long a POST waits for an instant backend to finish before answering ``applying``.
SYNC_APPLY_S = 5.0


#: Versions below this are not Unix times of a window start (before 2001): no twin telemetry.
_MIN_WINDOW_VERSION = 10**9


def _twin_writer(telemetry: TwinTelemetry) -> Callable[[AgentState, PlanRecord], None]:
    def write(state: AgentState, record: PlanRecord) -> None:
        version = record.request.version
        if version < _MIN_WINDOW_VERSION:
            log.warning(
                "plan %s: version %d is not a window start; no telemetry", record.plan_id, version
            )
            return
        start = datetime.fromtimestamp(version, UTC)
        policy = record.request.policy
        # Instances the plan's policy gives no load to (NaN) get the twin's stand-in power.
        loads = planned_loads(policy, state.instances, math.nan) if policy is not None else None
        path = telemetry.write_window(state.instances, start, loads)
        log.info("plan %s: twin telemetry in %s", record.plan_id, path)
        if telemetry.clock_replay is not None:
            changes = telemetry.clock_replay.run(state.instances, record.request.policy, start)
            log.info("plan %s: %d clock changes replayed on the twin", record.plan_id, len(changes))

    return write


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
        "version": record.request.version,
        "status": record.status,
        "accepted_at": record.accepted_at.isoformat(),
        "applied_at": record.applied_at.isoformat() if record.applied_at else None,
        "waves": record.waves,
        "message": record.message,
    }


def _layout_body(layout: Layout) -> dict[str, Any]:
    return {"gpus": layout.gpus, "items": [item_to_dict(item) for item in layout.items]}


def create_app(
    *,
    cluster: str = "demo",
    token: str | None = None,
    gpu_capacity: int = 64,
    apply_delay_s: float = 0.0,
    state_path: Path | str | None = None,
    max_unavailable: int = 1,
    backend: Backend | None = None,
    clock: Callable[[], datetime] = _utc_now,
    telemetry: TwinTelemetry | None = None,
    control: ControlSettings | None = None,
) -> FastAPI:
    """Build the agent's FastAPI application.

    Args:
        cluster: Name of the serving cluster.
        token: Bearer token every ``/v1`` route requires; ``None`` or empty disables auth.
        gpu_capacity: GPUs the cluster has; change sets that need more are refused.
        apply_delay_s: Seconds each wave takes in the default simulated backend.
        state_path: JSON file that keeps the state across restarts; ``None``: memory only.
        max_unavailable: Most instances of one pool disrupted at once while applying.
        backend: Where waves run; default a :class:`SimulatedBackend` with ``apply_delay_s``.
        clock: Source of acceptance and application times.
        telemetry: With the simulated backend, writes the GPU samples of each applied plan's
            window (:mod:`agent.twin`); the plan's version is taken as its window start.
        control: Run the clock loop and the power guard (:mod:`agent.control`) with these
            settings; ``None``: no instance-level control.

    Returns:
        The application; a plan left applying by a previous run resumes at startup.

    Raises:
        StateFileError: the state file is unreadable or belongs to another cluster.
    """
    store = StateStore(cluster, gpu_capacity, state_path, clock, max_unavailable)
    backend = backend if backend is not None else SimulatedBackend(apply_delay_s)
    applier = Applier(store, backend, _twin_writer(telemetry) if telemetry else None)
    instant = isinstance(backend, SimulatedBackend) and backend.wave_s == 0
    loops = ControlLoops(store, backend, control) if control is not None else None  # type: ignore[arg-type]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(applier.start)
        try:
            if loops is not None:
                loops.start()
            yield
        finally:
            # default clocks back on every GPU the loops locked, also after an error
            if loops is not None:
                await run_in_threadpool(loops.stop)
            await run_in_threadpool(applier.stop)
            backend.close()

    app = FastAPI(title=f"wattplan cluster agent ({cluster})", lifespan=lifespan)
    app.state.token = token
    app.state.store = store
    app.state.backend = backend
    app.state.applier = applier
    app.state.control = loops

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
            **_layout_body(state.layout),
        }

    @v1.get("/status")
    def get_status() -> dict[str, Any]:
        state = store.snapshot()
        applying = state.applying()
        return {
            "cluster": state.cluster,
            "backend": backend.name,
            "gpu_capacity": store.gpu_capacity,
            "max_unavailable": store.max_unavailable,
            "plan_version": state.version,
            "applied_plan_id": state.applied_plan_id,
            "applying": None
            if applying is None
            else {
                "plan_id": applying.plan_id,
                "waves_done": applying.waves,
                "in_flight": [step_to_dict(step) for step in state.in_flight],
            },
            "desired": _layout_body(state.desired),
            "actual": _layout_body(state.layout),
            "instances": [instance_to_dict(inst) for inst in state.instances],
            "control": None
            if loops is None
            else {
                "clocks_mhz": loops.clocks(),
                "power_guard_levels": dict(loops.guard_levels),
                "clock_changes": len(loops.recorder.recent),
                "metrics_failures": loops.metrics_failures(),
            },
        }

    @v1.post("/plans/{plan_id}/changes")
    async def post_changes(plan_id: str, request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise ChangeSetError(f"body: not valid JSON ({exc})") from exc
        record, created = await run_in_threadpool(store.submit, plan_id, body)
        if created and record.status == APPLYING:
            applier.poke()
            if instant:
                await run_in_threadpool(applier.wait_idle, SYNC_APPLY_S)
            record = store.plan(plan_id)
        return JSONResponse(
            status_code=202 if created else 200,
            content={"plan_id": record.plan_id, "status": record.status},
        )

    @v1.get("/plans/{plan_id}")
    def get_plan(plan_id: str) -> dict[str, Any]:
        return _plan_body(store.plan(plan_id))

    @v1.get("/journal")
    def get_journal(plan_id: str | None = None) -> dict[str, Any]:
        entries = store.snapshot().journal
        return {
            "entries": [
                {
                    "plan_id": e.plan_id,
                    "wave": e.wave,
                    "done_at": e.done_at.isoformat(),
                    **step_to_dict(e.step),
                }
                for e in entries
                if plan_id is None or e.plan_id == plan_id
            ]
        }

    app.include_router(v1)
    return app

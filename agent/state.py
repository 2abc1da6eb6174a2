"""Cluster agent state: pure layout rules, plus a small thread-safe store that persists them.

Wire format of one item, in change sets and in ``GET /v1/layout``::

    {"service": "chat", "request_type": "SS", "model": "llama2-70b", "gpu_type": "H100-80GB",
     "tp": 4, "power_cap_w": 490, "clock_mhz": null, "instances": 2}

A *slot* is everything but ``instances``: (service, request type, serving config). In a change
set ``instances`` is the slot's *target* count (0 removes the slot), so applying the same change
set twice gives the same layout.

Everything above :class:`StateStore` is a pure function over frozen values; the store is the one
place that holds a lock, reads the clock and writes the state file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wattplan.domain import Layout, LayoutItem, ServingConfig, digest
from wattplan.errors import WattplanError

APPLYING = "applying"
APPLIED = "applied"
FAILED = "failed"
PLAN_STATUSES: tuple[str, ...] = (APPLYING, APPLIED, FAILED)

#: Tensor-parallel degrees a serving config may use.
VALID_TP: tuple[int, ...] = (1, 2, 4, 8)
#: Fields of one wire item, in output order.
ITEM_FIELDS: tuple[str, ...] = (
    "service",
    "request_type",
    "model",
    "gpu_type",
    "tp",
    "power_cap_w",
    "clock_mhz",
    "instances",
)
_OPTIONAL_ITEM_FIELDS = frozenset({"clock_mhz"})
#: Fields of a change-set body.
REQUEST_FIELDS: tuple[str, ...] = ("base_plan_id", "changes")
#: Plans remembered for idempotency; older finished plans are forgotten first.
PLAN_HISTORY = 1000
#: Version of the state file layout.
STATE_FILE_VERSION = 1
_MAX_PLAN_ID_CHARS = 200


class AgentError(WattplanError):
    """Root of the errors the cluster agent reports to its callers."""


class ChangeSetError(AgentError, ValueError):
    """A change-set body or plan id is malformed; the message names the offending field."""


class CapacityError(AgentError, ValueError):
    """A change set would use more GPUs than the cluster has."""


class PlanConflictError(AgentError, RuntimeError):
    """A plan id was reused with a different body, or another plan is still applying."""


class StalePlanError(AgentError, RuntimeError):
    """A change set was computed against a plan the cluster no longer runs."""


class UnknownPlanError(AgentError, LookupError):
    """The agent has never accepted a plan with this id."""


class StateFileError(AgentError, ValueError):
    """The state file cannot be read or belongs to another cluster."""


@dataclass(frozen=True)
class ChangeRequest:
    """A validated change set: target counts for slots, against a base plan.

    Attributes:
        base_plan_id: The plan the sender believes the cluster runs (``None``: none yet).
        changes: One item per slot; ``instances`` is the slot's target count.
    """

    base_plan_id: str | None
    changes: tuple[LayoutItem, ...] = ()

    @property
    def fingerprint(self) -> str:
        """Digest of the request, independent of the order of its changes."""
        items = [item_to_dict(item) for item in sorted(self.changes, key=item_sort_key)]
        return digest({"base_plan_id": self.base_plan_id, "changes": items})


@dataclass(frozen=True)
class PlanRecord:
    """What the agent knows about one plan it accepted.

    Attributes:
        plan_id: The plan id (the idempotency key).
        request: The change set that came with it.
        status: ``applying``, ``applied`` or ``failed``.
        accepted_at: When the agent accepted it.
        applied_at: When it finished applying, or ``None``.
        message: Why it failed, empty otherwise.
    """

    plan_id: str
    request: ChangeRequest
    status: str
    accepted_at: datetime
    applied_at: datetime | None = None
    message: str = ""


@dataclass(frozen=True)
class AgentState:
    """Everything the agent knows: the actual layout, its plan and the plans it accepted.

    Attributes:
        cluster: Name of the serving cluster.
        applied_plan_id: Last plan that finished applying, or ``None``.
        layout: What the cluster runs now.
        plans: Accepted plans, oldest first.
    """

    cluster: str
    applied_plan_id: str | None = None
    layout: Layout = Layout()
    plans: tuple[PlanRecord, ...] = ()

    def plan(self, plan_id: str) -> PlanRecord | None:
        """Return the record of ``plan_id``, or ``None`` when it was never accepted."""
        return next((plan for plan in self.plans if plan.plan_id == plan_id), None)

    def applying(self) -> PlanRecord | None:
        """Return the plan being applied now, if any (there is at most one)."""
        return next((plan for plan in self.plans if plan.status == APPLYING), None)


# ---------------------------------------------------------------------------------------------
# Validation and wire format


def _field_error(where: str, message: str) -> ChangeSetError:
    return ChangeSetError(f"{where}: {message}")


def _require_str(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise _field_error(f"{where}.{key}", f"must be a non-empty string, got {value!r}")
    return value


def _require_int(raw: Mapping[str, Any], key: str, where: str, *, minimum: int) -> int:
    value = raw[key]
    # bool is an int subclass; ``true`` is never a valid count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field_error(f"{where}.{key}", f"must be an integer, got {value!r}")
    if value < minimum:
        raise _field_error(f"{where}.{key}", f"must be >= {minimum}, got {value}")
    return value


def parse_item(raw: object, where: str = "item") -> LayoutItem:
    """Validate one wire item and return it as a :class:`LayoutItem`.

    Args:
        raw: The decoded JSON object.
        where: Path of the item in the body, used in error messages (``changes[2]``).

    Returns:
        The item; ``load_rps`` is 0 (the agent does not track load).

    Raises:
        ChangeSetError: a field is missing, unknown or out of range; the message names it.
    """
    if not isinstance(raw, Mapping):
        raise _field_error(where, f"must be an object with fields {', '.join(ITEM_FIELDS)}")
    unknown = sorted(set(raw) - set(ITEM_FIELDS))
    if unknown:
        raise _field_error(f"{where}.{unknown[0]}", f"unknown field; allowed: {ITEM_FIELDS}")
    missing = [key for key in ITEM_FIELDS if key not in raw and key not in _OPTIONAL_ITEM_FIELDS]
    if missing:
        raise _field_error(f"{where}.{missing[0]}", "missing required field")
    tp = _require_int(raw, "tp", where, minimum=1)
    if tp not in VALID_TP:
        raise _field_error(f"{where}.tp", f"must be one of {VALID_TP}, got {tp}")
    clock_mhz = raw.get("clock_mhz")
    if clock_mhz is not None:
        clock_mhz = _require_int(raw, "clock_mhz", where, minimum=1)
    config = ServingConfig(
        model=_require_str(raw, "model", where),
        gpu_type=_require_str(raw, "gpu_type", where),
        tp=tp,
        power_cap_w=_require_int(raw, "power_cap_w", where, minimum=1),
        clock_mhz=clock_mhz,
    )
    return LayoutItem(
        service=_require_str(raw, "service", where),
        request_type=_require_str(raw, "request_type", where),
        config=config,
        instances=_require_int(raw, "instances", where, minimum=0),
    )


def item_to_dict(item: LayoutItem) -> dict[str, Any]:
    """Return the wire form of one item (``load_rps`` is not part of it)."""
    return {
        "service": item.service,
        "request_type": item.request_type,
        "model": item.config.model,
        "gpu_type": item.config.gpu_type,
        "tp": item.config.tp,
        "power_cap_w": item.config.power_cap_w,
        "clock_mhz": item.config.clock_mhz,
        "instances": item.instances,
    }


def item_sort_key(item: LayoutItem) -> tuple[str, str, str, str, int, int, int]:
    """Deterministic order of items: by service, request type, then serving config."""
    config = item.config
    return (
        item.service,
        item.request_type,
        config.model,
        config.gpu_type,
        config.tp,
        config.power_cap_w,
        config.clock_mhz or 0,
    )


def validate_plan_id(plan_id: str) -> str:
    """Return ``plan_id`` if it is usable as an idempotency key.

    Raises:
        ChangeSetError: it is empty, longer than 200 characters or contains whitespace.
    """
    if not plan_id or len(plan_id) > _MAX_PLAN_ID_CHARS:
        raise _field_error("plan_id", f"must have 1 to {_MAX_PLAN_ID_CHARS} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in plan_id):
        raise _field_error("plan_id", "must not contain whitespace or control characters")
    return plan_id


def parse_change_request(body: object) -> ChangeRequest:
    """Validate a ``POST /v1/plans/{plan_id}/changes`` body.

    Args:
        body: The decoded JSON body: ``{"base_plan_id": str | null, "changes": [item, ...]}``.

    Returns:
        The validated request.

    Raises:
        ChangeSetError: the body is malformed, or two changes name the same slot; the message
            names the offending field.
    """
    if not isinstance(body, Mapping):
        raise _field_error("body", f"must be an object with fields {', '.join(REQUEST_FIELDS)}")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise _field_error(unknown[0], f"unknown field; allowed: {REQUEST_FIELDS}")
    missing = [key for key in REQUEST_FIELDS if key not in body]
    if missing:
        raise _field_error(missing[0], "missing required field (use null for no base plan)")
    base_plan_id = body["base_plan_id"]
    if base_plan_id is not None and (not isinstance(base_plan_id, str) or not base_plan_id):
        raise _field_error(
            "base_plan_id", f"must be a non-empty string or null, not {base_plan_id!r}"
        )
    raw_changes = body["changes"]
    if not isinstance(raw_changes, list):
        raise _field_error("changes", "must be a list of items")
    changes = tuple(parse_item(raw, f"changes[{i}]") for i, raw in enumerate(raw_changes))
    seen: dict[tuple[str, str, ServingConfig], int] = {}
    for i, item in enumerate(changes):
        slot = (item.service, item.request_type, item.config)
        if slot in seen:
            raise _field_error(f"changes[{i}]", f"names the same slot as changes[{seen[slot]}]")
        seen[slot] = i
    return ChangeRequest(base_plan_id=base_plan_id, changes=changes)


# ---------------------------------------------------------------------------------------------
# Layout rules


def apply_changes(layout: Layout, changes: Iterable[LayoutItem]) -> Layout:
    """Set each changed slot to its target count; slots not named keep theirs.

    Args:
        layout: The current layout.
        changes: Items whose ``instances`` is the slot's target count (0 removes the slot).

    Returns:
        The new layout, without empty slots, in :func:`item_sort_key` order.
    """
    counts: dict[tuple[str, str, ServingConfig], int] = {}
    for item in layout.items:
        slot = (item.service, item.request_type, item.config)
        counts[slot] = counts.get(slot, 0) + item.instances
    for change in changes:
        counts[(change.service, change.request_type, change.config)] = change.instances
    items = [
        LayoutItem(service=service, request_type=request_type, config=config, instances=count)
        for (service, request_type, config), count in counts.items()
        if count > 0
    ]
    return Layout(items=tuple(sorted(items, key=item_sort_key)))


def check_capacity(layout: Layout, gpu_capacity: int) -> None:
    """Raise unless ``layout`` fits in ``gpu_capacity`` GPUs.

    Raises:
        CapacityError: the layout needs more GPUs than the cluster has.
    """
    if layout.gpus > gpu_capacity:
        raise CapacityError(
            f"changes: the layout after this change needs {layout.gpus} GPUs but the cluster "
            f"has gpu_capacity={gpu_capacity}; remove instances or use a lower tp"
        )


def submit_plan(
    state: AgentState,
    plan_id: str,
    request: ChangeRequest,
    *,
    gpu_capacity: int,
    now: datetime,
) -> tuple[AgentState, PlanRecord, bool]:
    """Accept a change set under ``plan_id``, or return the earlier outcome of the same one.

    The plan id is the idempotency key: the same id with the same body returns the existing
    record unchanged. An empty change set is applied at once.

    Args:
        state: The current state.
        plan_id: Idempotency key of the change set.
        request: The validated change set.
        gpu_capacity: GPUs the cluster has.
        now: Acceptance time.

    Returns:
        ``(new_state, record, created)``; ``created`` is False for a repeated request.

    Raises:
        PlanConflictError: the id was used with a different body, or another plan is applying.
        StalePlanError: ``request.base_plan_id`` is not the plan the cluster runs.
        CapacityError: the resulting layout does not fit in ``gpu_capacity``.
    """
    existing = state.plan(plan_id)
    if existing is not None:
        if existing.request.fingerprint == request.fingerprint:
            return state, existing, False
        raise PlanConflictError(
            f"plan_id {plan_id!r} was already submitted with a different body; "
            "a plan id names one change set, use a new plan id"
        )
    busy = state.applying()
    if busy is not None:
        raise PlanConflictError(
            f"cluster {state.cluster!r} is still applying plan {busy.plan_id!r}; "
            "wait until it is applied, then read the layout and diff again"
        )
    if request.base_plan_id != state.applied_plan_id:
        raise StalePlanError(
            f"base_plan_id {request.base_plan_id!r} is stale: cluster {state.cluster!r} runs "
            f"plan {state.applied_plan_id!r}; read GET /v1/layout and diff again"
        )
    check_capacity(apply_changes(state.layout, request.changes), gpu_capacity)
    record = PlanRecord(plan_id=plan_id, request=request, status=APPLYING, accepted_at=now)
    plans = _trim_history((*state.plans, record))
    new_state = replace(state, plans=plans)
    if not request.changes:
        new_state = complete_plan(new_state, plan_id, gpu_capacity=gpu_capacity, now=now)
    result = new_state.plan(plan_id)
    assert result is not None
    return new_state, result, True


def complete_plan(
    state: AgentState, plan_id: str, *, gpu_capacity: int, now: datetime
) -> AgentState:
    """Finish applying ``plan_id``: the actual layout becomes the planned one.

    A plan that no longer fits (the agent restarted with fewer GPUs) is marked failed and the
    layout is left as it was. Completing a finished plan changes nothing.

    Raises:
        UnknownPlanError: the plan was never accepted.
    """
    record = state.plan(plan_id)
    if record is None:
        raise UnknownPlanError(f"plan {plan_id!r} is unknown to cluster {state.cluster!r}")
    if record.status != APPLYING:
        return state
    target = apply_changes(state.layout, record.request.changes)
    try:
        check_capacity(target, gpu_capacity)
    except CapacityError as exc:
        done = replace(record, status=FAILED, message=str(exc))
        return replace(state, plans=_replace_plan(state.plans, done))
    done = replace(record, status=APPLIED, applied_at=now)
    return replace(
        state,
        applied_plan_id=plan_id,
        layout=target,
        plans=_replace_plan(state.plans, done),
    )


def _replace_plan(plans: Sequence[PlanRecord], record: PlanRecord) -> tuple[PlanRecord, ...]:
    return tuple(record if plan.plan_id == record.plan_id else plan for plan in plans)


def _trim_history(plans: tuple[PlanRecord, ...]) -> tuple[PlanRecord, ...]:
    excess = len(plans) - PLAN_HISTORY
    if excess <= 0:
        return plans
    kept: list[PlanRecord] = []
    for plan in plans:
        if excess > 0 and plan.status != APPLYING:
            excess -= 1
            continue
        kept.append(plan)
    return tuple(kept)


# ---------------------------------------------------------------------------------------------
# State file (JSON)


def state_to_dict(state: AgentState) -> dict[str, Any]:
    """Return the JSON form of ``state`` written to the state file."""
    return {
        "version": STATE_FILE_VERSION,
        "cluster": state.cluster,
        "applied_plan_id": state.applied_plan_id,
        "items": [item_to_dict(item) for item in state.layout.items],
        "plans": [
            {
                "plan_id": plan.plan_id,
                "base_plan_id": plan.request.base_plan_id,
                "changes": [item_to_dict(item) for item in plan.request.changes],
                "status": plan.status,
                "accepted_at": plan.accepted_at.isoformat(),
                "applied_at": plan.applied_at.isoformat() if plan.applied_at else None,
                "message": plan.message,
            }
            for plan in state.plans
        ],
    }


def state_from_dict(raw: Mapping[str, Any]) -> AgentState:
    """Rebuild the state from :func:`state_to_dict` output.

    Raises:
        StateFileError: the content is not a state written by this agent version.
    """
    try:
        if raw.get("version") != STATE_FILE_VERSION:
            raise StateFileError(f"version={raw.get('version')!r}, expected {STATE_FILE_VERSION}")
        items = tuple(parse_item(item, f"items[{i}]") for i, item in enumerate(raw["items"]))
        plans = []
        for i, plan in enumerate(raw["plans"]):
            if plan["status"] not in PLAN_STATUSES:
                raise StateFileError(f"plans[{i}].status={plan['status']!r} is not a status")
            request = parse_change_request(
                {"base_plan_id": plan["base_plan_id"], "changes": plan["changes"]}
            )
            applied_at = plan["applied_at"]
            plans.append(
                PlanRecord(
                    plan_id=plan["plan_id"],
                    request=request,
                    status=plan["status"],
                    accepted_at=datetime.fromisoformat(plan["accepted_at"]),
                    applied_at=datetime.fromisoformat(applied_at) if applied_at else None,
                    message=plan.get("message", ""),
                )
            )
        return AgentState(
            cluster=raw["cluster"],
            applied_plan_id=raw["applied_plan_id"],
            layout=Layout(items=tuple(sorted(items, key=item_sort_key))),
            plans=tuple(plans),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, StateFileError):
            raise
        raise StateFileError(f"malformed state: {exc!r}") from exc


def _utc_now() -> datetime:
    return datetime.now(UTC)


class StateStore:
    """Thread-safe holder of the :class:`AgentState`, saved to a JSON file after each change.

    Args:
        cluster: Name of the serving cluster.
        gpu_capacity: GPUs the cluster has.
        state_path: JSON file to load at start and rewrite (atomically) after every change;
            ``None`` keeps the state in memory only.
        clock: Source of acceptance and application times.

    Raises:
        StateFileError: the state file is unreadable or was written for another cluster.
    """

    def __init__(
        self,
        cluster: str,
        gpu_capacity: int,
        state_path: Path | str | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.cluster = cluster
        self.gpu_capacity = gpu_capacity
        self.state_path = Path(state_path) if state_path is not None else None
        self._clock = clock
        self._lock = threading.Lock()
        self._state = self._load()

    def _load(self) -> AgentState:
        if self.state_path is None or not self.state_path.exists():
            return AgentState(cluster=self.cluster)
        try:
            raw = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StateFileError(
                f"cannot read state file {self.state_path}: {exc}; fix or delete it"
            ) from exc
        try:
            state = state_from_dict(raw)
        except StateFileError as exc:
            raise StateFileError(f"state file {self.state_path}: {exc}; fix or delete it") from exc
        if state.cluster != self.cluster:
            raise StateFileError(
                f"state file {self.state_path} belongs to cluster {state.cluster!r}, not "
                f"{self.cluster!r}; pass --cluster {state.cluster} or another --state-path"
            )
        return state

    def _save(self, state: AgentState) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(state_to_dict(state), indent=1, sort_keys=True)
        # Write then rename, so a crash leaves either the old or the new file, never half.
        fd, tmp = tempfile.mkstemp(prefix=".agent-state-", dir=self.state_path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, self.state_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def snapshot(self) -> AgentState:
        """Return the current state (an immutable value)."""
        with self._lock:
            return self._state

    def plan(self, plan_id: str) -> PlanRecord:
        """Return the record of ``plan_id``.

        Raises:
            UnknownPlanError: the plan was never accepted (or is older than the history kept).
        """
        record = self.snapshot().plan(plan_id)
        if record is None:
            raise UnknownPlanError(f"plan {plan_id!r} is unknown to cluster {self.cluster!r}")
        return record

    def submit(self, plan_id: str, body: object) -> tuple[PlanRecord, bool]:
        """Validate and accept a change-set body; see :func:`submit_plan`.

        Returns:
            ``(record, created)``; ``created`` is False when the same request came before.
        """
        validate_plan_id(plan_id)
        request = parse_change_request(body)
        with self._lock:
            state, record, created = submit_plan(
                self._state,
                plan_id,
                request,
                gpu_capacity=self.gpu_capacity,
                now=self._clock(),
            )
            if created:
                self._save(state)
                self._state = state
            return record, created

    def complete(self, plan_id: str) -> PlanRecord:
        """Finish applying ``plan_id``; see :func:`complete_plan`."""
        with self._lock:
            state = complete_plan(
                self._state, plan_id, gpu_capacity=self.gpu_capacity, now=self._clock()
            )
            if state is not self._state:
                self._save(state)
                self._state = state
            record = state.plan(plan_id)
            assert record is not None
            return record

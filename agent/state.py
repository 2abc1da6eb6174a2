"""Cluster agent state: pure rules over frozen values, plus a small thread-safe store that
persists them.

Wire format of one item, in change sets and in ``GET /v1/layout``::

    {"service": "chat", "request_type": "SS", "model": "llama2-70b", "gpu_type": "H100-80GB",
     "tp": 4, "power_cap_w": 490, "clock_mhz": null, "instances": 2}

A *slot* is everything but ``instances``: (service, request type, serving config). In a change
set ``instances`` is the slot's *target* count (0 removes the slot), so applying the same change
set twice gives the same layout.

The agent keeps the *desired* layout (what the last accepted plan wants) and the *actual*
instances (what runs). Accepting a plan only sets the desired layout; the apply loop
(:mod:`agent.runner`) moves the actual instances towards it wave by wave
(:mod:`agent.rollout`) and saves the state after every wave, and announces each wave before
it runs it (``in_flight``), so an apply interrupted by a crash or restart resumes where it
stopped and no step is lost or recorded twice.

Plans carry a *version*; the agent accepts only versions above the highest it accepted
(409 otherwise), so an old plan that arrives late cannot undo a newer one.

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

from agent.rollout import (
    STEP_KINDS,
    Instance,
    Step,
    apply_wave,
    layout_of,
    next_wave,
)
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
    "spp",
    "kvp",
    "instances",
)
#: ``spp`` and ``kvp`` (a long-context gang: tp x spp x kvp GPUs) default to 1 and are
#: written only for a gang, so agents and payloads from before gangs still agree.
_OPTIONAL_ITEM_FIELDS = frozenset({"clock_mhz", "spp", "kvp"})
#: Fields of a change-set body.
REQUEST_FIELDS: tuple[str, ...] = ("version", "base_plan_id", "changes")
#: Optional fields of a change-set body: the plan's runtime policy (``clock_policy`` and
#: ``power_guard``, as :mod:`optimizer.result` writes them) for the control loops.
OPTIONAL_REQUEST_FIELDS: tuple[str, ...] = ("policy",)
#: Plans remembered for idempotency; older finished plans are forgotten first.
PLAN_HISTORY = 1000
#: Journal entries kept (steps the backend completed), oldest dropped first.
JOURNAL_HISTORY = 10_000
#: Version of the state file layout.
STATE_FILE_VERSION = 2
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
    """A plan's version is not above the last accepted one, or its base plan is not the one
    the cluster runs."""


class UnknownPlanError(AgentError, LookupError):
    """The agent has never accepted a plan with this id."""


class StateFileError(AgentError, ValueError):
    """The state file cannot be read or belongs to another cluster."""


@dataclass(frozen=True)
class ChangeRequest:
    """A validated change set: target counts for slots, against a base plan.

    Attributes:
        version: The plan's version; must exceed every version the agent accepted before.
        base_plan_id: The plan the sender believes the cluster runs (``None``: none yet).
        changes: One item per slot; ``instances`` is the slot's target count.
        policy: The plan's runtime policy (clock policy per pool, power guard per domain),
            or ``None`` when the sender sent none (the control loops then run without floors
            and without a power guard).
    """

    version: int
    base_plan_id: str | None
    changes: tuple[LayoutItem, ...] = ()
    policy: Mapping[str, Any] | None = None

    @property
    def fingerprint(self) -> str:
        """Digest of the request, independent of the order of its changes."""
        items = [item_to_dict(item) for item in sorted(self.changes, key=item_sort_key)]
        body: dict[str, Any] = {
            "version": self.version,
            "base_plan_id": self.base_plan_id,
            "changes": items,
        }
        if self.policy is not None:
            body["policy"] = self.policy
        return digest(body)


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
        waves: Waves completed for it so far.
    """

    plan_id: str
    request: ChangeRequest
    status: str
    accepted_at: datetime
    applied_at: datetime | None = None
    message: str = ""
    waves: int = 0


@dataclass(frozen=True)
class JournalEntry:
    """One step the backend completed, in order.

    Attributes:
        plan_id: The plan the step belonged to.
        wave: Number of the wave within the plan (1-based).
        step: The step.
        done_at: When the wave completed.
    """

    plan_id: str
    wave: int
    step: Step
    done_at: datetime


@dataclass(frozen=True)
class AgentState:
    """Everything the agent knows.

    Attributes:
        cluster: Name of the serving cluster.
        version: Highest plan version accepted (0: none).
        applied_plan_id: Last plan that finished applying, or ``None``.
        desired: What the last accepted plan wants to run.
        instances: What runs now (the actual layout), sorted by id.
        in_flight: The wave being run now (announced before it runs), or empty.
        plans: Accepted plans, oldest first.
        journal: Steps completed, oldest first.
        next_number: Number of the next instance id.
    """

    cluster: str
    version: int = 0
    applied_plan_id: str | None = None
    desired: Layout = Layout()
    instances: tuple[Instance, ...] = ()
    in_flight: tuple[Step, ...] = ()
    plans: tuple[PlanRecord, ...] = ()
    journal: tuple[JournalEntry, ...] = ()
    next_number: int = 1

    @property
    def layout(self) -> Layout:
        """The actual layout (counts per slot of the running instances)."""
        return layout_of(self.instances)

    def plan(self, plan_id: str) -> PlanRecord | None:
        """Return the record of ``plan_id``, or ``None`` when it was never accepted."""
        return next((plan for plan in self.plans if plan.plan_id == plan_id), None)

    def applying(self) -> PlanRecord | None:
        """Return the plan being applied now, if any (there is at most one)."""
        return next((plan for plan in self.plans if plan.status == APPLYING), None)

    @property
    def policy(self) -> Mapping[str, Any] | None:
        """The runtime policy of the plan the cluster runs (``None``: none, or it sent none)."""
        record = self.plan(self.applied_plan_id) if self.applied_plan_id else None
        return record.request.policy if record is not None else None


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
    name = key if where == "body" else f"{where}.{key}"
    # bool is an int subclass; ``true`` is never a valid count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field_error(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise _field_error(name, f"must be >= {minimum}, got {value}")
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
        spp=_require_int(raw, "spp", where, minimum=1) if "spp" in raw else 1,
        kvp=_require_int(raw, "kvp", where, minimum=1) if "kvp" in raw else 1,
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
        **_gang(item.config),
        "instances": item.instances,
    }


def _gang(config: ServingConfig) -> dict[str, int]:
    """``spp`` and ``kvp`` of a long-context gang; nothing for a plain TP instance."""
    return {"spp": config.spp, "kvp": config.kvp} if (config.spp, config.kvp) != (1, 1) else {}


def item_sort_key(item: LayoutItem) -> tuple[str, str, str, str, int, int, int, int, int]:
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
        config.spp,
        config.kvp,
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
        body: The decoded JSON body: ``{"version": int, "base_plan_id": str | null,
            "changes": [item, ...]}`` and optionally ``"policy": {...}`` (the plan's runtime
            policy; an object).

    Returns:
        The validated request.

    Raises:
        ChangeSetError: the body is malformed, or two changes name the same slot; the message
            names the offending field.
    """
    if not isinstance(body, Mapping):
        raise _field_error("body", f"must be an object with fields {', '.join(REQUEST_FIELDS)}")
    unknown = sorted(set(body) - set(REQUEST_FIELDS) - set(OPTIONAL_REQUEST_FIELDS))
    if unknown:
        raise _field_error(
            unknown[0], f"unknown field; allowed: {REQUEST_FIELDS + OPTIONAL_REQUEST_FIELDS}"
        )
    missing = [key for key in REQUEST_FIELDS if key not in body]
    if missing:
        raise _field_error(missing[0], "missing required field (use null for no base plan)")
    version = _require_int(body, "version", "body", minimum=1)
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
    policy = body.get("policy")
    if policy is not None and not isinstance(policy, Mapping):
        raise _field_error("policy", "must be an object (the plan's policy) or null")
    return ChangeRequest(
        version=version,
        base_plan_id=base_plan_id,
        changes=changes,
        policy=dict(policy) if policy is not None else None,
    )


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
    record unchanged. Accepting sets the desired layout; the apply loop does the rest. A
    change set that changes nothing is applied at once.

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
        StalePlanError: the version is not above the last accepted one, or
            ``request.base_plan_id`` is not the plan the cluster runs.
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
    if request.version <= state.version:
        raise StalePlanError(
            f"version {request.version} is stale: cluster {state.cluster!r} already accepted "
            f"version {state.version}; a plan must carry a higher version than every plan "
            "before it"
        )
    if request.base_plan_id != state.applied_plan_id:
        raise StalePlanError(
            f"base_plan_id {request.base_plan_id!r} is stale: cluster {state.cluster!r} runs "
            f"plan {state.applied_plan_id!r}; read GET /v1/layout and diff again"
        )
    desired = apply_changes(state.layout, request.changes)
    check_capacity(desired, gpu_capacity)
    record = PlanRecord(plan_id=plan_id, request=request, status=APPLYING, accepted_at=now)
    new_state = replace(
        state,
        version=request.version,
        desired=desired,
        plans=_trim_history((*state.plans, record)),
    )
    if desired == state.layout:
        new_state = complete_plan(new_state, plan_id, now=now)
    result = new_state.plan(plan_id)
    assert result is not None
    return new_state, result, True


def plan_next_wave(state: AgentState, *, gpu_capacity: int, max_unavailable: int) -> AgentState:
    """Announce the next wave of the plan being applied (``in_flight``).

    A wave already in flight is kept as it is (it is run again after a restart). Nothing
    changes when no plan is applying.

    Raises:
        ValueError: the desired layout cannot be reached (see :func:`agent.rollout.next_wave`).
    """
    if state.in_flight or state.applying() is None:
        return state
    wave = next_wave(
        state.instances,
        state.desired,
        gpu_capacity=gpu_capacity,
        max_unavailable=max_unavailable,
        next_number=state.next_number,
    )
    started = sum(1 for step in wave if step.kind == "start")
    return replace(state, in_flight=tuple(wave), next_number=state.next_number + started)


def commit_wave(state: AgentState, *, now: datetime) -> AgentState:
    """Record that the wave in flight completed: the instances change, the journal grows.

    Raises:
        ValueError: no wave is in flight, or it does not fit the instances.
    """
    record = state.applying()
    if not state.in_flight or record is None:
        raise ValueError("no wave in flight")
    number = record.waves + 1
    entries = tuple(JournalEntry(record.plan_id, number, step, now) for step in state.in_flight)
    return replace(
        state,
        instances=apply_wave(state.instances, state.in_flight),
        in_flight=(),
        plans=_replace_plan(state.plans, replace(record, waves=number)),
        journal=(*state.journal, *entries)[-JOURNAL_HISTORY:],
    )


def complete_plan(state: AgentState, plan_id: str, *, now: datetime) -> AgentState:
    """Mark ``plan_id`` applied once the instances match the desired layout.

    Completing a finished plan changes nothing.

    Raises:
        UnknownPlanError: the plan was never accepted.
        ValueError: the instances do not match the desired layout yet.
    """
    record = state.plan(plan_id)
    if record is None:
        raise UnknownPlanError(f"plan {plan_id!r} is unknown to cluster {state.cluster!r}")
    if record.status != APPLYING:
        return state
    if state.layout != state.desired or state.in_flight:
        raise ValueError(f"plan {plan_id} is not applied yet")
    done = replace(record, status=APPLIED, applied_at=now)
    return replace(state, applied_plan_id=plan_id, plans=_replace_plan(state.plans, done))


def fail_plan(state: AgentState, plan_id: str, message: str) -> AgentState:
    """Give up applying ``plan_id``: it is marked failed and the desired layout becomes what
    runs (the instances already moved stay as they are; the next plan starts from them).
    """
    record = state.plan(plan_id)
    if record is None or record.status != APPLYING:
        return state
    done = replace(record, status=FAILED, message=message)
    return replace(
        state, desired=state.layout, in_flight=(), plans=_replace_plan(state.plans, done)
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


def _config_to_dict(config: ServingConfig | None) -> dict[str, Any] | None:
    if config is None:
        return None
    return {
        "model": config.model,
        "gpu_type": config.gpu_type,
        "tp": config.tp,
        "power_cap_w": config.power_cap_w,
        "clock_mhz": config.clock_mhz,
        **_gang(config),
    }


def _config_from_dict(raw: Mapping[str, Any] | None) -> ServingConfig | None:
    if raw is None:
        return None
    return ServingConfig(
        raw["model"],
        raw["gpu_type"],
        int(raw["tp"]),
        int(raw["power_cap_w"]),
        raw["clock_mhz"],
        int(raw.get("spp", 1)),
        int(raw.get("kvp", 1)),
    )


def step_to_dict(step: Step) -> dict[str, Any]:
    """JSON form of a step (state file, ``GET /v1/status``, journal)."""
    return {
        "kind": step.kind,
        "instance_id": step.instance_id,
        "service": step.service,
        "request_type": step.request_type,
        "source": _config_to_dict(step.source),
        "target": _config_to_dict(step.target),
        "gpus": list(step.gpus),
    }


def _step_from_dict(raw: Mapping[str, Any]) -> Step:
    if raw["kind"] not in STEP_KINDS:
        raise StateFileError(f"step kind {raw['kind']!r} is unknown")
    return Step(
        raw["kind"],
        raw["instance_id"],
        raw["service"],
        raw["request_type"],
        _config_from_dict(raw["source"]),
        _config_from_dict(raw["target"]),
        tuple(int(g) for g in raw["gpus"]),
    )


def instance_to_dict(inst: Instance) -> dict[str, Any]:
    """JSON form of an instance (state file, ``GET /v1/status``)."""
    return {
        "instance_id": inst.instance_id,
        "service": inst.service,
        "request_type": inst.request_type,
        **(_config_to_dict(inst.config) or {}),
        "gpus": list(inst.gpus),
    }


def _instance_from_dict(raw: Mapping[str, Any]) -> Instance:
    config = _config_from_dict(raw)
    assert config is not None
    return Instance(
        raw["instance_id"],
        raw["service"],
        raw["request_type"],
        config,
        tuple(int(g) for g in raw["gpus"]),
    )


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def state_to_dict(state: AgentState) -> dict[str, Any]:
    """Return the JSON form of ``state`` written to the state file."""
    return {
        "version": STATE_FILE_VERSION,
        "cluster": state.cluster,
        "plan_version": state.version,
        "applied_plan_id": state.applied_plan_id,
        "desired": [item_to_dict(item) for item in state.desired.items],
        "instances": [instance_to_dict(inst) for inst in state.instances],
        "in_flight": [step_to_dict(step) for step in state.in_flight],
        "next_number": state.next_number,
        "plans": [
            {
                "plan_id": plan.plan_id,
                "plan_version": plan.request.version,
                "base_plan_id": plan.request.base_plan_id,
                "changes": [item_to_dict(item) for item in plan.request.changes],
                "policy": plan.request.policy,
                "status": plan.status,
                "accepted_at": plan.accepted_at.isoformat(),
                "applied_at": _time(plan.applied_at),
                "message": plan.message,
                "waves": plan.waves,
            }
            for plan in state.plans
        ],
        "journal": [
            {
                "plan_id": entry.plan_id,
                "wave": entry.wave,
                "done_at": entry.done_at.isoformat(),
                **step_to_dict(entry.step),
            }
            for entry in state.journal
        ],
    }


def state_from_dict(raw: Mapping[str, Any]) -> AgentState:
    """Rebuild the state from :func:`state_to_dict` output.

    Raises:
        StateFileError: the content is not a state written by this agent version.
    """
    try:
        if raw.get("version") != STATE_FILE_VERSION:
            raise StateFileError(
                f"version={raw.get('version')!r}, expected {STATE_FILE_VERSION} (a file of an "
                "older agent: stop its serving instances, then delete the file)"
            )
        desired = tuple(parse_item(item, f"desired[{i}]") for i, item in enumerate(raw["desired"]))
        plans = []
        for i, plan in enumerate(raw["plans"]):
            if plan["status"] not in PLAN_STATUSES:
                raise StateFileError(f"plans[{i}].status={plan['status']!r} is not a status")
            request = parse_change_request(
                {
                    "version": plan["plan_version"],
                    "base_plan_id": plan["base_plan_id"],
                    "changes": plan["changes"],
                    "policy": plan.get("policy"),
                }
            )
            plans.append(
                PlanRecord(
                    plan_id=plan["plan_id"],
                    request=request,
                    status=plan["status"],
                    accepted_at=datetime.fromisoformat(plan["accepted_at"]),
                    applied_at=(
                        datetime.fromisoformat(plan["applied_at"]) if plan["applied_at"] else None
                    ),
                    message=plan.get("message", ""),
                    waves=int(plan.get("waves", 0)),
                )
            )
        return AgentState(
            cluster=raw["cluster"],
            version=int(raw["plan_version"]),
            applied_plan_id=raw["applied_plan_id"],
            desired=Layout(items=tuple(sorted(desired, key=item_sort_key))),
            instances=tuple(_instance_from_dict(inst) for inst in raw["instances"]),
            in_flight=tuple(_step_from_dict(step) for step in raw["in_flight"]),
            plans=tuple(plans),
            journal=tuple(
                JournalEntry(
                    entry["plan_id"],
                    int(entry["wave"]),
                    _step_from_dict(entry),
                    datetime.fromisoformat(entry["done_at"]),
                )
                for entry in raw["journal"]
            ),
            next_number=int(raw["next_number"]),
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
        max_unavailable: Most instances of one pool disrupted at once while applying.

    Raises:
        StateFileError: the state file is unreadable or was written for another cluster.
    """

    def __init__(
        self,
        cluster: str,
        gpu_capacity: int,
        state_path: Path | str | None = None,
        clock: Callable[[], datetime] = _utc_now,
        max_unavailable: int = 1,
    ) -> None:
        if max_unavailable < 1:
            raise ValueError(f"max_unavailable must be >= 1, got {max_unavailable}")
        self.cluster = cluster
        self.gpu_capacity = gpu_capacity
        self.max_unavailable = max_unavailable
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
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.state_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _update(self, change: Callable[[AgentState], AgentState]) -> AgentState:
        with self._lock:
            state = change(self._state)
            if state is not self._state:
                self._save(state)
                self._state = state
            return state

    def now(self) -> datetime:
        """The store's clock."""
        return self._clock()

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

    def next_wave(self) -> tuple[PlanRecord, tuple[Step, ...]] | None:
        """Announce (and save) the next wave of the applying plan, or finish the plan.

        Returns:
            ``(plan, wave)`` to run, or ``None`` when no plan is applying (any plan whose
            instances reached the desired layout is marked applied; one that cannot reach it
            is marked failed).
        """

        def step(state: AgentState) -> AgentState:
            record = state.applying()
            if record is None:
                return state
            if not state.in_flight and state.layout == state.desired:
                return complete_plan(state, record.plan_id, now=self._clock())
            try:
                check_capacity(state.desired, self.gpu_capacity)
                return plan_next_wave(
                    state, gpu_capacity=self.gpu_capacity, max_unavailable=self.max_unavailable
                )
            except (CapacityError, ValueError) as exc:
                return fail_plan(state, record.plan_id, str(exc))

        state = self._update(step)
        record = state.applying()
        if record is None:
            return None
        return record, state.in_flight

    def commit_wave(self) -> AgentState:
        """Record that the wave in flight completed; see :func:`commit_wave`."""
        return self._update(lambda state: commit_wave(state, now=self._clock()))

    def fail(self, plan_id: str, message: str) -> PlanRecord:
        """Mark ``plan_id`` failed; see :func:`fail_plan`."""
        state = self._update(lambda state: fail_plan(state, plan_id, message))
        record = state.plan(plan_id)
        assert record is not None
        return record

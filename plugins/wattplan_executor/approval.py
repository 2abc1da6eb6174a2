"""The approval task: a person approves or rejects a plan in Airflow's Required Actions.

Built on the standard provider's human-in-the-loop operators (Airflow 3.3: the task waits in
the ``awaiting_input`` state without holding a worker slot; the scheduler enforces the
response timeout). The answer branches: *Approve* runs the ``on_approve`` task, *Reject*
runs ``on_reject`` and skips the rest, and no answer before ``response_timeout`` counts as
*Reject*. The answer itself (who, when, what, whether it timed out) is pushed to XCom under
:data:`RESPONSE_KEY`, so the branch it leads to can record it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import HITLBranchOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

APPROVE = "Approve"
REJECT = "Reject"
#: XCom key of the recorded answer.
RESPONSE_KEY = "response"


def response_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a human-in-the-loop answer worth recording, as JSON-able values.

    Args:
        event: What Airflow resumes the task with: ``chosen_options``, ``responded_by_user``
            (``{"id", "name"}``, ``None`` when the timeout answered), ``responded_at``,
            ``timedout``.

    Returns:
        ``{"chosen", "user", "user_id", "responded_at", "timed_out"}``.
    """
    user = event.get("responded_by_user") or {}
    responded_at = event.get("responded_at")
    chosen = list(event.get("chosen_options") or [])
    return {
        "chosen": chosen[0] if chosen else None,
        "user": user.get("name"),
        "user_id": user.get("id"),
        "responded_at": (
            responded_at.isoformat() if isinstance(responded_at, datetime) else responded_at
        ),
        "timed_out": bool(event.get("timedout", False)),
    }


class PlanApprovalOperator(HITLBranchOperator):
    """Ask a person to approve a plan; branch on the answer; no answer means *Reject*.

    Args:
        on_approve: Task id to run on *Approve*.
        on_reject: Task id to run on *Reject* or timeout.
        **kwargs: Passed to ``HITLBranchOperator`` (``subject``, ``body`` (Markdown, both
            templated), ``response_timeout``, ``assigned_users``, ``notifiers``, ...).
    """

    def __init__(self, *, on_approve: str, on_reject: str, **kwargs: Any) -> None:
        super().__init__(
            options=[APPROVE, REJECT],
            defaults=[REJECT],
            multiple=False,
            options_mapping={APPROVE: on_approve, REJECT: on_reject},
            **kwargs,
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Push the answer to XCom, then branch on it."""
        if "error" not in event:
            context["ti"].xcom_push(key=RESPONSE_KEY, value=response_record(event))
        return super().execute_complete(context, event)

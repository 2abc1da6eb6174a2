"""Operator and sensor that push an approved layout and wait until the cluster runs it."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException

from wattplan.domain import Layout
from wattplan.errors import PlanInputError
from wattplan_executor.codec import layout_from_dict, layout_to_dict
from wattplan_executor.diff import diff_layout
from wattplan_executor.exceptions import (
    ClusterNotFoundError,
    ClusterPermanentError,
    ClusterTransientError,
)
from wattplan_executor.hooks import ServingClusterHook

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)


def push_layout(
    hook: ServingClusterHook,
    plan_id: str,
    desired: Layout,
    version: int,
    policy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read what the cluster runs, diff it against ``desired`` and send only the difference.

    The plan id is the idempotency key, so a retried push cannot apply twice. An empty diff
    is a successful no-op that sends nothing.

    Args:
        hook: Hook of the target cluster.
        plan_id: Id of the approved plan.
        desired: The plan's layout.
        version: The plan's version (``wattplan.jobs.plan_version``: its window start).
        policy: The plan's runtime policy, sent with the changes for the cluster's control
            loops (with an empty diff nothing is sent and the cluster keeps its policy).

    Returns:
        ``{"plan_id", "changes": <changes sent>, "status": "applying" | "applied"}``.

    Raises:
        ClusterTransientError: the cluster did not answer; retry.
        ClusterPermanentError: the cluster refused the changes.
    """
    base_plan_id, actual = hook.get_layout()
    changes = diff_layout(actual, desired)
    if not changes:
        log.info("cluster already runs the layout of plan %s (as plan %s)", plan_id, base_plan_id)
        return {"plan_id": plan_id, "changes": 0, "status": "applied"}
    status = hook.push_changes(plan_id, base_plan_id, changes, version, policy)
    log.info(
        "plan %s: sent %d changes on top of plan %s: %s",
        plan_id,
        len(changes),
        base_plan_id,
        status,
    )
    return {"plan_id": plan_id, "changes": len(changes), "status": status}


def _layout_arg(desired: Layout | Mapping[str, Any]) -> dict[str, Any]:
    return layout_to_dict(desired) if isinstance(desired, Layout) else dict(desired)


class PushPlanOperator(BaseOperator):
    """Push an approved plan's layout to a serving cluster (see :func:`push_layout`).

    Transient cluster errors raise as they are, so the task's ``retries`` apply; refusals
    (bad token, stale base plan, invalid layout) fail the task at once through
    ``AirflowFailException``.

    Args:
        plan_id: Id of the plan (templated).
        desired: The layout, as :func:`~wattplan_executor.codec.layout_to_dict` gives it (a
            ``Layout`` is converted).
        version: The plan's version; the cluster refuses versions not above its last.
        serving_cluster_conn_id: Airflow Connection id of the cluster.
        **kwargs: Passed to ``BaseOperator``.

    ``execute`` returns (and so pushes to XCom) ``{"plan_id", "changes", "status"}``.
    """

    template_fields: Sequence[str] = ("plan_id",)

    def __init__(
        self,
        *,
        plan_id: str,
        desired: Layout | Mapping[str, Any],
        version: int,
        serving_cluster_conn_id: str = ServingClusterHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plan_id = plan_id
        self.desired = _layout_arg(desired)
        self.version = version
        self.serving_cluster_conn_id = serving_cluster_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        """Push the layout; see the class docstring."""
        hook = ServingClusterHook(self.serving_cluster_conn_id)
        try:
            return push_layout(hook, self.plan_id, layout_from_dict(self.desired), self.version)
        except (ClusterPermanentError, PlanInputError) as exc:
            raise AirflowFailException(f"plan {self.plan_id}: {exc}") from exc


class PlanAppliedSensor(BaseSensorOperator):
    """Wait until a serving cluster reports a plan ``applied``; fail at once on ``failed``.

    A cluster that does not answer is polled again at the next poke (the sensor's
    ``timeout`` bounds the wait). A cluster that does not know the plan fails the task,
    unless ``desired`` is given and the cluster already runs that layout: that is what
    :func:`push_layout` leaves behind when the diff was empty and nothing was sent.

    Args:
        plan_id: Id of the plan (templated).
        serving_cluster_conn_id: Airflow Connection id of the cluster.
        desired: Optional layout of the plan (templated), to accept a no-op push.
        mode: ``reschedule`` (default) frees the worker slot between pokes.
        poke_interval: Seconds between pokes.
        **kwargs: Passed to ``BaseSensorOperator`` (``timeout``, ``retries``, ...).
    """

    template_fields: Sequence[str] = ("plan_id", "desired")

    def __init__(
        self,
        *,
        plan_id: str,
        serving_cluster_conn_id: str = ServingClusterHook.default_conn_name,
        desired: Layout | Mapping[str, Any] | None = None,
        mode: str = "reschedule",
        poke_interval: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(mode=mode, poke_interval=poke_interval, **kwargs)
        self.plan_id = plan_id
        self.serving_cluster_conn_id = serving_cluster_conn_id
        # Templated: may arrive as an XComArg at parse time and as a dict at run time.
        self.desired = layout_to_dict(desired) if isinstance(desired, Layout) else desired

    def poke(self, context: Context) -> bool:
        """Return True once the plan is applied; see the class docstring."""
        # One try per poke: the sensor's own schedule is the retry.
        hook = ServingClusterHook(self.serving_cluster_conn_id, max_attempts=1)
        try:
            status = hook.get_plan_status(self.plan_id)
        except ClusterNotFoundError as exc:
            return self._check_noop_push(hook, exc)
        except ClusterTransientError as exc:
            log.warning(
                "plan %s: cluster did not answer, poking again later: %s", self.plan_id, exc
            )
            return False
        except ClusterPermanentError as exc:
            raise AirflowFailException(f"plan {self.plan_id}: {exc}") from exc
        if status == "failed":
            raise AirflowFailException(
                f"plan {self.plan_id}: the cluster reports it failed; it keeps its last "
                "applied layout (see the agent's log)"
            )
        return status == "applied"

    def _check_noop_push(self, hook: ServingClusterHook, exc: ClusterNotFoundError) -> bool:
        if self.desired is None:
            raise AirflowFailException(
                f"plan {self.plan_id}: the cluster does not know it ({exc}); push it first, or "
                "pass desired= to accept a push that had nothing to send"
            ) from exc
        try:
            _, actual = hook.get_layout()
        except ClusterTransientError:
            return False
        except ClusterPermanentError as err:
            raise AirflowFailException(f"plan {self.plan_id}: {err}") from err
        if diff_layout(actual, layout_from_dict(self.desired)):
            raise AirflowFailException(
                f"plan {self.plan_id}: the cluster neither knows the plan nor runs its layout; "
                "push it first"
            ) from exc
        return True

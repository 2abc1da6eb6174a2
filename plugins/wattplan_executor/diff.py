"""Pure diff between what a cluster runs and what an approved plan wants."""

from __future__ import annotations

from typing import Any

from wattplan.domain import Layout, ServingConfig
from wattplan_executor.codec import slot_dict


def _configs(*layouts: Layout) -> dict[tuple[str, str, str], tuple[str, str, ServingConfig]]:
    return {
        (item.service, item.request_type, item.config.key): (
            item.service,
            item.request_type,
            item.config,
        )
        for layout in layouts
        for item in layout.items
    }


def diff_layout(actual: Layout, desired: Layout) -> list[dict[str, Any]]:
    """Return the changes that turn ``actual`` into ``desired``.

    A slot is (service, request type, serving config), as in
    :meth:`~wattplan.domain.Layout.instances_by_slot`. Only slots whose instance count differs
    appear, each with the *target* count (0 for slots ``desired`` drops), in a stable order.
    ``load_rps`` is ignored: the cluster does not run it.

    Args:
        actual: What the cluster runs.
        desired: What the approved plan wants.

    Returns:
        Change dicts in the cluster API's item form; empty when the layouts match.
    """
    have = actual.instances_by_slot()
    want = desired.instances_by_slot()
    slots = _configs(actual, desired)
    changes: list[dict[str, Any]] = []
    for key in sorted(have.keys() | want.keys()):
        target = want.get(key, 0)
        if have.get(key, 0) != target:
            service, request_type, config = slots[key]
            changes.append({**slot_dict(service, request_type, config), "instances": target})
    return changes

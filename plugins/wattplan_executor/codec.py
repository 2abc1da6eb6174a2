"""JSON form of a :class:`~wattplan.domain.Layout`, so a layout travels through DAG arguments,
XCom and the cluster API.

``layout_to_dict`` gives ``{"items": [item, ...]}`` with items such as::

    {"service": "chat", "request_type": "SS", "model": "llama2-70b", "gpu_type": "H100-80GB",
     "tp": 4, "power_cap_w": 490, "clock_mhz": null, "instances": 2, "load_rps": 3.5}

``load_rps`` is optional on input (the cluster API does not carry it). A long-context gang
(``tp x spp x kvp`` GPUs) also has ``"spp"`` and ``"kvp"``; they default to 1 and are written
only for a gang. Other keys of the outer object (``cluster``, ``plan_id``, ``gpus`` in
``GET /v1/layout``) are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wattplan.domain import Layout, LayoutItem, ServingConfig
from wattplan.errors import PlanInputError

#: Fields that name a slot: (service, request type) and the serving config.
SLOT_FIELDS: tuple[str, ...] = (
    "service",
    "request_type",
    "model",
    "gpu_type",
    "tp",
    "power_cap_w",
    "clock_mhz",
)
_GANG_FIELDS = ("spp", "kvp")
_ITEM_FIELDS = frozenset((*SLOT_FIELDS, *_GANG_FIELDS, "instances", "load_rps"))
_OPTIONAL_FIELDS = frozenset({"clock_mhz", "load_rps", *_GANG_FIELDS})


def slot_dict(service: str, request_type: str, config: ServingConfig) -> dict[str, Any]:
    """Return the slot fields of one (service, request type, config) as a JSON-able dict."""
    return {
        "service": service,
        "request_type": request_type,
        "model": config.model,
        "gpu_type": config.gpu_type,
        "tp": config.tp,
        "power_cap_w": config.power_cap_w,
        "clock_mhz": config.clock_mhz,
        **({"spp": config.spp, "kvp": config.kvp} if (config.spp, config.kvp) != (1, 1) else {}),
    }


def item_to_dict(item: LayoutItem) -> dict[str, Any]:
    """Return the JSON form of one layout item, ``load_rps`` included."""
    return {
        **slot_dict(item.service, item.request_type, item.config),
        "instances": item.instances,
        "load_rps": item.load_rps,
    }


def _get(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = raw[key]
    # bool is an int subclass; ``true`` is never a valid count.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise PlanInputError(f"{where}.{key}={value!r} has the wrong type")
    return value


def item_from_dict(raw: object, where: str = "item") -> LayoutItem:
    """Parse one item from its JSON form.

    Args:
        raw: The decoded object.
        where: Path of the item, used in error messages.

    Raises:
        PlanInputError: a key is missing, unknown or of the wrong type; the message names it.
    """
    if not isinstance(raw, Mapping):
        raise PlanInputError(f"{where} must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _ITEM_FIELDS)
    if unknown:
        raise PlanInputError(f"{where}.{unknown[0]} is not a layout item field")
    missing = sorted(k for k in _ITEM_FIELDS - _OPTIONAL_FIELDS if k not in raw)
    if missing:
        raise PlanInputError(f"{where}.{missing[0]} is missing")
    clock_mhz = raw.get("clock_mhz")
    if clock_mhz is not None:
        clock_mhz = _get(raw, "clock_mhz", int, where)
    instances = _get(raw, "instances", int, where)
    if instances < 0:
        raise PlanInputError(f"{where}.instances={instances} must be >= 0")
    gang = {key: _get(raw, key, int, where) if key in raw else 1 for key in _GANG_FIELDS}
    for key, value in gang.items():
        if value < 1:
            raise PlanInputError(f"{where}.{key}={value} must be >= 1")
    config = ServingConfig(
        model=_get(raw, "model", str, where),
        gpu_type=_get(raw, "gpu_type", str, where),
        tp=_get(raw, "tp", int, where),
        power_cap_w=_get(raw, "power_cap_w", int, where),
        clock_mhz=clock_mhz,
        spp=gang["spp"],
        kvp=gang["kvp"],
    )
    load_rps = float(_get(raw, "load_rps", (int, float), where)) if "load_rps" in raw else 0.0
    return LayoutItem(
        service=_get(raw, "service", str, where),
        request_type=_get(raw, "request_type", str, where),
        config=config,
        instances=instances,
        load_rps=load_rps,
    )


def layout_to_dict(layout: Layout) -> dict[str, Any]:
    """Return the JSON form of ``layout``: ``{"items": [...]}`` in the layout's order."""
    return {"items": [item_to_dict(item) for item in layout.items]}


def layout_from_dict(raw: object) -> Layout:
    """Parse a layout from its JSON form (or from a ``GET /v1/layout`` answer).

    Raises:
        PlanInputError: ``raw`` has no ``items`` list or an item is malformed.
    """
    if not isinstance(raw, Mapping) or not isinstance(raw.get("items"), list):
        raise PlanInputError('a layout must be an object {"items": [...]}')
    return Layout(
        items=tuple(item_from_dict(item, f"items[{i}]") for i, item in enumerate(raw["items"]))
    )

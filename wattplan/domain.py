"""Domain types shared by telemetry, forecasting, the optimizer and the plan lifecycle.

Plain frozen dataclasses with units in their field names; no I/O here.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum

from wattplan.errors import PlanInputError

#: DynamoLLM's nine request types: input class then output class, S/M/L each.
REQUEST_TYPES: tuple[str, ...] = ("SS", "SM", "SL", "MS", "MM", "ML", "LS", "LM", "LL")


@dataclass(frozen=True)
class RequestTypeBins:
    """Token-length bin edges that map a request to one of the nine types.

    A request with ``input_tokens < input_edges[0]`` has input class S, below
    ``input_edges[1]`` class M, otherwise L; likewise for output. Defaults follow the
    public DynamoLLM re-implementation (DOMAIN.md section 2).
    """

    input_edges: tuple[int, int] = (256, 1024)
    output_edges: tuple[int, int] = (100, 350)

    def __post_init__(self) -> None:
        for name, edges in (("input_edges", self.input_edges), ("output_edges", self.output_edges)):
            if len(edges) != 2 or not 0 < edges[0] < edges[1]:
                raise PlanInputError(f"{name}={edges} must be two increasing positive edges")

    def classify(self, input_tokens: int, output_tokens: int) -> str:
        """Return the request type (e.g. ``"MS"``) of one request."""
        classes = "SML"
        return (
            classes[bisect.bisect_right(self.input_edges, input_tokens)]
            + classes[bisect.bisect_right(self.output_edges, output_tokens)]
        )


class PlanStatus(StrEnum):
    """Where a plan is in its lifecycle."""

    PROPOSED = "proposed"
    APPROVED = "approved"
    REJECTED = "rejected"
    APPLIED = "applied"
    FAILED = "failed"
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class TypeWindow:
    """Observed load of one request type of one service in one window.

    The latency percentiles are None where no request of the window carried the measurement
    (the Azure trace has none; JSONL request logs do).
    """

    service: str
    request_type: str
    window_start: datetime
    window_s: int
    request_count: int
    input_tokens: int
    output_tokens: int
    peak_rate_rps: float
    mean_rate_rps: float
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    tbt_p50_s: float | None = None
    tbt_p99_s: float | None = None


@dataclass(frozen=True)
class LoadForecast:
    """Forecast load of one pool for one future window."""

    service: str
    request_type: str
    window_start: datetime
    window_s: int
    mean_rate_rps: float
    peak_rate_rps: float
    planned_rate_rps: float
    quantile: float
    method: str


@dataclass(frozen=True)
class ServingConfig:
    """One way to run an instance: model on a GPU type, TP degree, clock and power cap.

    ``clock_mhz`` is ``None`` when the clock is not locked (the driver picks it under the cap).
    """

    model: str
    gpu_type: str
    tp: int
    power_cap_w: int
    clock_mhz: int | None = None

    @property
    def key(self) -> str:
        """Short stable name, e.g. ``llama2-70b/H100-80GB/tp4/cap490``."""
        clock = f"/{self.clock_mhz}mhz" if self.clock_mhz else ""
        return f"{self.model}/{self.gpu_type}/tp{self.tp}/cap{self.power_cap_w}{clock}"


@dataclass(frozen=True)
class Profile:
    """Energy-performance profile of one serving config for one request type.

    Power is piecewise linear in load between ``(0, idle_power_w)`` and
    ``(capacity_rps, power_at_capacity_w)``; both are per instance (all its GPUs).
    """

    config: ServingConfig
    request_type: str
    capacity_rps: float
    idle_power_w: float
    power_at_capacity_w: float
    ttft_p99_s: float
    tbt_p99_s: float
    ttft_slo_s: float
    tbt_slo_s: float
    version: str
    source: str

    def power_w(self, rate_rps: float) -> float:
        """Instance power at a request rate within ``[0, capacity_rps]``."""
        share = min(max(rate_rps / self.capacity_rps, 0.0), 1.0)
        return self.idle_power_w + share * (self.power_at_capacity_w - self.idle_power_w)

    @property
    def energy_per_request_j(self) -> float:
        """Energy per request at capacity (J)."""
        return self.power_at_capacity_w / self.capacity_rps


@dataclass(frozen=True)
class LayoutItem:
    """Instances of one serving config in one pool (service, request type)."""

    service: str
    request_type: str
    config: ServingConfig
    instances: int
    load_rps: float = 0.0

    @property
    def gpus(self) -> int:
        """GPUs this item holds."""
        return self.instances * self.config.tp


@dataclass(frozen=True)
class Layout:
    """A whole cluster layout: what runs, per pool."""

    items: tuple[LayoutItem, ...] = ()

    @property
    def gpus(self) -> int:
        """GPUs in use."""
        return sum(item.gpus for item in self.items)

    def instances_by_slot(self) -> dict[tuple[str, str, str], int]:
        """Instances keyed by (service, request type, config key)."""
        slots: dict[tuple[str, str, str], int] = {}
        for item in self.items:
            key = (item.service, item.request_type, item.config.key)
            slots[key] = slots.get(key, 0) + item.instances
        return slots


@dataclass(frozen=True)
class PlanPrediction:
    """What the optimizer expects a layout to cost over its window."""

    energy_kwh: float
    carbon_g: float
    cost_usd: float
    gpus: int
    peak_power_w: float
    min_slo_headroom: float
    instances_started: int = 0
    instances_stopped: int = 0


@dataclass(frozen=True)
class Plan:
    """A proposed layout for one window of one cluster."""

    plan_id: str
    cluster: str
    window_start: datetime
    window_s: int
    layout: Layout
    prediction: PlanPrediction
    solver: dict[str, object] = field(default_factory=dict)


def digest(payload: object) -> str:
    """Stable short SHA-256 of a JSON-serialisable payload (dataclasses allowed)."""

    def default(obj: object) -> object:
        if isinstance(obj, datetime):
            return obj.isoformat()
        if hasattr(obj, "__dataclass_fields__"):
            return asdict(obj)  # type: ignore[call-overload]
        raise TypeError(f"cannot digest {type(obj).__name__}")

    text = json.dumps(payload, sort_keys=True, default=default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]

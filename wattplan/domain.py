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

#: Optional long-context class (Mnemosyne): served by TP x SPP x KVP gangs; kept out of
#: ``REQUEST_TYPES`` so code over the nine DynamoLLM types is unaffected.
LONG_CONTEXT_TYPE = "LC"


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

    ``clock_mhz`` is the locked SM clock, ``None`` when the clock is not locked (the driver
    picks it under the cap). ``spp`` and ``kvp`` are the sequence-pipeline and KV-cache
    parallel degrees of a long-context gang (Mnemosyne); 1 for ordinary instances.
    """

    model: str
    gpu_type: str
    tp: int
    power_cap_w: int
    clock_mhz: int | None = None
    spp: int = 1  # sequence-pipeline-parallel degree (long-context gangs, Mnemosyne)
    kvp: int = 1  # KV-parallel degree (long-context gangs)

    @property
    def gpus(self) -> int:
        """GPUs one instance holds: tp x spp x kvp."""
        return self.tp * self.spp * self.kvp

    @property
    def key(self) -> str:
        """Short stable name, e.g. ``llama2-70b/H100-80GB/tp4/cap490``."""
        clock = f"/{self.clock_mhz}mhz" if self.clock_mhz else ""
        gang = f"/spp{self.spp}kvp{self.kvp}" if self.spp > 1 or self.kvp > 1 else ""
        return f"{self.model}/{self.gpu_type}/tp{self.tp}{gang}/cap{self.power_cap_w}{clock}"


@dataclass(frozen=True)
class Profile:
    """Energy-performance profile of one serving config for one request type.

    ``power_curve`` is instance power (all its GPUs) against request rate, piecewise linear
    between its points: ``(rate_rps, watts)`` with rates strictly increasing, the first at
    rate 0.0 (loaded idle) and the last at ``capacity_rps``. Latencies are at capacity.

    Raises:
        ValueError: the power curve breaks these rules (the message names the profile).
    """

    config: ServingConfig
    request_type: str
    capacity_rps: float  # highest rate whose P99 TTFT and TBT stay within the SLOs
    power_curve: tuple[tuple[float, float], ...]  # (rate_rps, instance watts, all its GPUs)
    ttft_p99_s: float  # at capacity
    tbt_p99_s: float  # at capacity
    ttft_slo_s: float
    tbt_slo_s: float
    version: str
    source: str
    ttft_p50_s: float | None = None
    tbt_p50_s: float | None = None

    def __post_init__(self) -> None:
        name = f"profile {self.config.key} {self.request_type} ({self.version})"
        curve = self.power_curve
        if len(curve) < 2:
            raise ValueError(f"{name}: power_curve needs at least 2 points, got {len(curve)}")
        if curve[0][0] != 0.0:
            raise ValueError(f"{name}: power_curve must start at rate 0.0, got {curve[0][0]}")
        if any(b[0] <= a[0] for a, b in zip(curve, curve[1:], strict=False)):
            raise ValueError(f"{name}: power_curve rates must be strictly increasing")
        if curve[-1][0] != self.capacity_rps:
            raise ValueError(
                f"{name}: power_curve must end at capacity_rps={self.capacity_rps}, "
                f"got {curve[-1][0]}"
            )
        if any(not watts >= 0 for _, watts in curve):
            raise ValueError(f"{name}: power_curve watts must be >= 0")

    @property
    def idle_power_w(self) -> float:
        """Loaded-idle instance power (W): the curve at rate 0."""
        return self.power_curve[0][1]

    @property
    def power_at_capacity_w(self) -> float:
        """Instance power (W) at ``capacity_rps``."""
        return self.power_curve[-1][1]

    def power_w(self, rate_rps: float) -> float:
        """Instance power at a request rate, interpolated on the curve within
        ``[0, capacity_rps]`` (clamped outside it)."""
        rate = min(max(rate_rps, 0.0), self.capacity_rps)
        rates = [r for r, _ in self.power_curve]
        i = min(max(bisect.bisect_right(rates, rate), 1), len(rates) - 1)
        (r0, w0), (r1, w1) = self.power_curve[i - 1], self.power_curve[i]
        return w0 + (rate - r0) / (r1 - r0) * (w1 - w0)

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
        return self.instances * self.config.gpus


@dataclass(frozen=True)
class DispatchShare:
    """Share of one request type's requests that the router sends to one pool.

    The optimizer may carry part of a type's load in the pool of a componentwise-larger
    type of the same service (spill); the plan says so with these shares.
    """

    service: str
    request_type: str  # the type whose requests are split
    pool: str  # the pool (a request type of the same service) that takes this share
    share: float  # in (0, 1]; a type's shares sum to 1


@dataclass(frozen=True)
class Layout:
    """A whole cluster layout: what runs, per pool.

    ``dispatch`` says how the router splits a type's requests over pools of its service
    when the plan spills part of its load (empty, or a type not named: all of a type's
    requests go to its own pool). The executor and the agent's wire format carry only the
    items; the dispatch is the router's.
    """

    items: tuple[LayoutItem, ...] = ()
    dispatch: tuple[DispatchShare, ...] = ()

    def dispatch_of(self, service: str, request_type: str) -> tuple[tuple[str, float], ...]:
        """``((pool, share), ...)`` of one type, or ``()`` when the layout names none."""
        return tuple(
            (d.pool, d.share)
            for d in self.dispatch
            if d.service == service and d.request_type == request_type
        )

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
    instances_resharded: int = 0
    clock_changes: int = 0


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
    degraded: bool = False  # demand exceeded capacity: carries the most it can; never auto-approved
    policy: dict[str, object] = field(default_factory=dict)  # clock policy, power guard, placement
    diff: dict[str, object] = field(default_factory=dict)  # changes against the applied layout


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

"""Live state of a serving engine, read from its Prometheus metrics endpoint.

The instance-level clock loop needs, every few seconds, how many requests an engine is
running and how many wait, how full its KV cache is and how many tokens it has generated.
vLLM exposes them at ``/metrics`` in the Prometheus text format; the simulated backend
serves the same names. A missing endpoint, missing metrics or garbage raise
:class:`MetricsError`; the caller keeps its current clock and retries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from wattplan.errors import WattplanError

#: Metric names per quantity, newest first (vLLM renamed the KV-cache gauge in v0.10).
METRIC_NAMES: Mapping[str, tuple[str, ...]] = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "generation_tokens": ("vllm:generation_tokens_total",),
    "prompt_tokens": ("vllm:prompt_tokens_total",),
}
_REQUIRED = ("running", "waiting")
# name{labels} value [timestamp]; label values may hold escaped quotes
_SAMPLE = re.compile(
    r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?[ \t]+(\S+)(?:[ \t]+-?\d+)?'
)
_MAX_BODY_BYTES = 4 * 1024 * 1024


class MetricsError(WattplanError):
    """The engine's metrics could not be read or make no sense (the loop keeps its clock)."""


@dataclass(frozen=True)
class EngineSnapshot:
    """One reading of a serving engine.

    Attributes:
        running: Requests in the running batch.
        waiting: Requests queued for admission (their prefill has not started).
        kv_cache_usage: Fraction of KV-cache blocks in use, 0..1 (None: not exported).
        generation_tokens_total: Tokens generated since the engine started (None: not
            exported); the loop differences it for a token rate.
        prompt_tokens_total: Prompt tokens prefilled since the engine started (None: not
            exported); the loop differences it for the prefill load.
    """

    running: int
    waiting: int
    kv_cache_usage: float | None = None
    generation_tokens_total: float | None = None
    prompt_tokens_total: float | None = None


def parse_prometheus_text(text: str) -> dict[str, float]:
    """Sum of each metric's samples over their label sets (``# HELP``/``# TYPE`` skipped).

    Raises:
        MetricsError: a sample line is malformed or its value is not a number.
    """
    sums: dict[str, float] = {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line)
        if match is None:
            raise MetricsError(f"metrics line {line_no} is not a Prometheus sample: {line[:80]!r}")
        try:
            value = float(match.group(3))
        except ValueError:
            raise MetricsError(
                f"metrics line {line_no}: value {match.group(3)[:40]!r} is not a number"
            ) from None
        sums[match.group(1)] = sums.get(match.group(1), 0.0) + value
    return sums


def snapshot_from_metrics(metrics: Mapping[str, float]) -> EngineSnapshot:
    """The quantities the loop uses, checked for sense.

    Raises:
        MetricsError: a required metric is missing, or a value is negative or not finite.
    """
    found: dict[str, float | None] = {}
    for quantity, names in METRIC_NAMES.items():
        value = next((metrics[n] for n in names if n in metrics), None)
        if value is None and quantity in _REQUIRED:
            raise MetricsError(
                f"the engine exports no {quantity} metric ({' or '.join(names)}); is this a "
                "vLLM /metrics endpoint?"
            )
        if value is not None and (not math.isfinite(value) or value < 0):
            raise MetricsError(f"{quantity} metric is {value}, not a finite value >= 0")
        found[quantity] = value
    usage = found["kv_cache_usage"]
    if usage is not None and usage > 1.0 + 1e-9:
        raise MetricsError(f"kv_cache_usage {usage} is above 1")
    return EngineSnapshot(
        running=round(found["running"] or 0.0),
        waiting=round(found["waiting"] or 0.0),
        kv_cache_usage=usage,
        generation_tokens_total=found["generation_tokens"],
        prompt_tokens_total=found["prompt_tokens"],
    )


def fetch_snapshot(
    url: str, *, client: httpx.Client | None = None, timeout_s: float = 1.0
) -> EngineSnapshot:
    """GET ``url`` (an engine's ``/metrics``) and read a snapshot.

    Raises:
        MetricsError: the request failed, the status was not 200, the body is too large,
            or the metrics are missing or garbage.
    """
    try:
        if client is None:
            with httpx.Client(timeout=timeout_s) as own:
                response = own.get(url)
        else:
            response = client.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise MetricsError(f"cannot read metrics from {url}: {exc}") from exc
    if response.status_code != 200:
        raise MetricsError(f"metrics endpoint {url} answered HTTP {response.status_code}")
    if len(response.content) > _MAX_BODY_BYTES:
        raise MetricsError(f"metrics from {url} exceed {_MAX_BODY_BYTES} bytes")
    try:
        text = response.content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MetricsError(f"metrics from {url} are not UTF-8 text") from exc
    return snapshot_from_metrics(parse_prometheus_text(text))


def format_metrics(snapshot: EngineSnapshot, labels: str = "") -> str:
    """``snapshot`` in the Prometheus text format with vLLM's names (the simulated
    backend serves this; ``labels`` e.g. ``model_name="llama"``)."""
    tag = f"{{{labels}}}" if labels else ""
    lines = [
        f"vllm:num_requests_running{tag} {snapshot.running}",
        f"vllm:num_requests_waiting{tag} {snapshot.waiting}",
    ]
    if snapshot.kv_cache_usage is not None:
        lines.append(f"vllm:kv_cache_usage_perc{tag} {snapshot.kv_cache_usage!r}")
    if snapshot.generation_tokens_total is not None:
        lines.append(f"vllm:generation_tokens_total{tag} {snapshot.generation_tokens_total!r}")
    if snapshot.prompt_tokens_total is not None:
        lines.append(f"vllm:prompt_tokens_total{tag} {snapshot.prompt_tokens_total!r}")
    return "\n".join(lines) + "\n"

"""Memory and queueing model of one instance: KV capacity, representative lengths, and the
SLO capacity of a continuous-batching engine given its prefill and decode times.

Every formula here is written out, with its assumptions, in ``docs/profiles.md``.
No file reads, no clock, no randomness: same inputs in, same numbers out.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from wattplan.domain import REQUEST_TYPES, RequestTypeBins
from wattplan.errors import InputDataError

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class TransformerShape:
    """What the KV-cache memory model needs to know about a dense decoder-only model."""

    layers: int
    hidden_size: int
    intermediate_size: int
    attention_heads: int
    kv_heads: int
    vocab_size: int
    bytes_per_value: int = 2

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.attention_heads

    @property
    def params(self) -> int:
        """Parameter count: embeddings, untied LM head, attention, gated MLP and norms."""
        h, kv = self.hidden_size, self.kv_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        return self.layers * per_layer + 2 * self.vocab_size * h + h

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights at ``bytes_per_value`` each."""
        return self.params * self.bytes_per_value

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token: 2 (K and V) x layers x kv_heads x head_dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value


def kv_capacity_tokens(
    shape: TransformerShape,
    tp: int,
    gpu_memory_bytes: float,
    memory_utilization: float,
    reserve_bytes_per_gpu: float,
) -> int:
    """Tokens of KV cache an instance of ``tp`` GPUs holds after weights and a reserve.

    Args:
        shape: Model architecture.
        tp: Tensor-parallel degree; weights and KV heads are split evenly over the GPUs.
        gpu_memory_bytes: Memory of one GPU.
        memory_utilization: Share of GPU memory the engine may use (vLLM's
            ``gpu_memory_utilization``).
        reserve_bytes_per_gpu: Activations, CUDA graphs and communication buffers.

    Returns:
        ``floor(tp x (utilization x memory - weights / tp - reserve) / kv_bytes_per_token)``,
        or 0 when the weights do not leave room.
    """
    free_per_gpu = (
        memory_utilization * gpu_memory_bytes - shape.weight_bytes / tp - reserve_bytes_per_gpu
    )
    return max(0, math.floor(tp * free_per_gpu / shape.kv_bytes_per_token))


def representative_lengths(
    requests: Iterable[tuple[int, int]], bins: RequestTypeBins
) -> dict[str, tuple[float, float]]:
    """Median input and output tokens of each request type.

    Args:
        requests: ``(input tokens, output tokens)`` per request.
        bins: Bin edges that classify requests into the nine types.

    Returns:
        ``{request type: (median input tokens, median output tokens)}`` for all nine types.

    Raises:
        InputDataError: A type has no request, so it has no representative length.
    """
    by_type: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for input_tokens, output_tokens in requests:
        by_type[bins.classify(input_tokens, output_tokens)].append((input_tokens, output_tokens))
    empty = [t for t in REQUEST_TYPES if not by_type[t]]
    if empty:
        raise InputDataError(f"no request of type(s) {', '.join(empty)} in the traces")
    return {
        t: (
            float(statistics.median(i for i, _ in by_type[t])),
            float(statistics.median(o for _, o in by_type[t])),
        )
        for t in REQUEST_TYPES
    }


class Latency(Protocol):
    """Prefill and decode times of one serving config for one request type."""

    @property
    def max_prefill_tokens(self) -> float:
        """Most prompt tokens one prefill step may hold."""
        ...

    @property
    def max_batch(self) -> int:
        """Most requests that may decode together (slots), before the KV-cache limit."""
        ...

    def prefill_s(self, tokens: float) -> float:
        """Prefill time (s) of a step holding ``tokens`` prompt tokens in all."""
        ...

    def decode_s(self, batch: float) -> float:
        """Time (s) of one decode step at ``batch`` running requests."""
        ...


#: Decode batch sizes (slots) tried when searching for the SLO capacity.
BATCH_CANDIDATES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
TIE_REL = 1e-9  # relative difference below which two capacities are equal


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (Erlang C).

    Args:
        servers: Number of servers ``c`` (here: batch slots).
        offered_load: Arrival rate x mean holding time, in servers.

    Returns:
        The waiting probability; 1.0 when ``offered_load >= servers``.
    """
    if offered_load >= servers:
        return 1.0
    blocking = 1.0  # Erlang B by its stable recursion, then Erlang C from it.
    for k in range(1, servers + 1):
        blocking = offered_load * blocking / (k + offered_load * blocking)
    return servers * blocking / (servers - offered_load * (1.0 - blocking))


def poisson_quantile(mean: float, probability: float) -> int:
    """Smallest ``k`` with ``P[Poisson(mean) <= k] >= probability``."""
    term = math.exp(-mean)
    cdf, k = term, 0
    while cdf < probability:
        k += 1
        term *= mean / k
        cdf += term
    return k


@dataclass(frozen=True)
class OperatingPoint:
    """Where one instance runs one request type at its SLO capacity.

    ``batch`` is the slot limit (most requests decoding at once); ``prefill_group`` the
    tail (e.g. P99) number of prompts prefilled together; ``mean_concurrency`` the mean
    number of requests in the instance (Little's law); ``prefill_share`` the share of
    time spent prefilling; ``ttft_s`` and ``tbt_s`` the modelled latencies at the quantile
    asked for; ``decoding_batch`` the mean number of requests decoding (Little's law on
    the decode phase, at most ``batch``).
    """

    batch: int
    capacity_rps: float
    prefill_group: int
    mean_concurrency: float
    ttft_s: float
    tbt_s: float
    prefill_share: float
    decoding_batch: float = 0.0


def _mean_prefill_group(curves: Latency, prompt_tokens: float, rate_rps: float) -> float | None:
    """Mean prompts per prefill step: one plus those arriving while a step runs.

    Solves ``m = 1 + rate x prefill(m x p)`` by fixed-point iteration from ``m = 1`` (never
    decreasing, so it ends); ``None`` when the group outgrows the largest measured prefill
    or does not settle (the prefill queue is unstable).
    """
    group = 1.0
    for _ in range(200):
        tokens = group * prompt_tokens
        if tokens > curves.max_prefill_tokens:
            return None
        new = max(group, 1.0 + rate_rps * curves.prefill_s(tokens))
        if new - group <= 1e-9 * group:
            return group
        group = new
    return None


def point_at(
    curves: Latency,
    batch: int,
    prompt_tokens: float,
    output_tokens: float,
    rate_rps: float,
    quantile: float,
) -> OperatingPoint | None:
    """Latency at ``quantile``, concurrency and prefill share of ``batch`` slots at ``rate_rps``.

    ``None`` when the prefill queue is unstable at this rate or a prefill group would
    exceed ``max_prefill_tokens``. See :func:`choose_operating_point` for the formulas.
    """
    group_mean = _mean_prefill_group(curves, prompt_tokens, rate_rps)
    if group_mean is None:
        return None
    decode_s = curves.decode_s(batch)
    step_prefill_s = curves.prefill_s(group_mean * prompt_tokens)
    prefill_share = rate_rps * step_prefill_s / group_mean
    if prefill_share >= 1.0:
        return None
    # An arrival finds a prefill step in progress with probability u and then waits for
    # a uniform share of it, so the quantile of that wait is step x (1 - (1 - q) / u).
    tail = 1.0 - quantile
    prefill_wait_s = step_prefill_s * (1.0 - tail / prefill_share) if prefill_share > tail else 0.0
    wait_s = max(decode_s, prefill_wait_s)
    group = 1 + poisson_quantile(rate_rps * max(decode_s, step_prefill_s), quantile)
    if group * prompt_tokens > curves.max_prefill_tokens:
        return None
    ttft_s = wait_s + curves.prefill_s(group * prompt_tokens)
    decode_phase_s = output_tokens * decode_s / (1.0 - prefill_share)
    residence_s = ttft_s + decode_phase_s
    return OperatingPoint(
        batch=batch,
        capacity_rps=rate_rps,
        prefill_group=group,
        mean_concurrency=rate_rps * residence_s,
        ttft_s=ttft_s,
        tbt_s=decode_s,
        prefill_share=prefill_share,
        decoding_batch=min(float(batch), rate_rps * decode_phase_s),
    )


def choose_operating_point(
    curves: Latency,
    prompt_tokens: float,
    output_tokens: float,
    ttft_slo_s: float,
    tbt_slo_s: float,
    kv_tokens: int,
    quantile: float,
) -> OperatingPoint | None:
    """Find the highest request rate whose modelled P99 latencies meet the SLOs.

    The instance is modelled as a continuous-batching engine with ``B`` decode slots that
    prefills, before the next decode step, every prompt that is waiting (prefill first):

    - TBT: one decode step at the full batch, ``decode(B)``;
    - mean prefill group ``g = 1 + rate x prefill(g x p)`` and prefill share of time
      ``u = rate x prefill(g x p) / g``; decode runs in the rest of the time;
    - TTFT (P99), approximated by a sum of per-part quantiles (usually conservative for
      independent light-tailed parts, not a strict bound): the wait for the step in
      progress, ``w = max(decode(B), prefill(g x p) x (1 - (1 - quantile) / u))``
      (uniform residual of a prefill step found with probability ``u``), plus the own
      prefill group of one plus the ``quantile`` of Poisson arrivals during a full step:
      ``w + prefill(m_q x p)``;
    - residence ``R = TTFT + n x decode(B) / (1 - u)``;
    - slots: at most ``1 - quantile`` of arrivals may find all ``B`` slots busy (Erlang C
      with offered load ``rate x R``).

    ``B`` is tried at each of ``BATCH_CANDIDATES`` up to ``max_batch`` and the KV-cache
    limit, and at that limit; for each, the largest feasible rate is found by bisection
    (all constraints grow with the rate).

    Args:
        curves: Latency curves of the serving config.
        prompt_tokens: Representative input length ``p`` of the request type.
        output_tokens: Representative output length ``n``.
        ttft_slo_s: P99 time-to-first-token SLO.
        tbt_slo_s: P99 time-between-tokens SLO.
        kv_tokens: KV-cache capacity of the instance in tokens.
        quantile: Latency percentile the SLOs apply to, e.g. 0.99.

    Returns:
        The operating point with the highest capacity (smallest ``B`` on ties), or
        ``None`` when no rate meets the SLOs.
    """
    limit = min(curves.max_batch, math.floor(kv_tokens / (prompt_tokens + output_tokens)))
    candidates = sorted({b for b in BATCH_CANDIDATES if b <= limit} | {limit})
    best: OperatingPoint | None = None
    for batch in (b for b in candidates if b >= 1):

        def feasible(rate_rps: float, batch: int = batch) -> OperatingPoint | None:
            point = point_at(curves, batch, prompt_tokens, output_tokens, rate_rps, quantile)
            if point is None or point.ttft_s > ttft_slo_s or point.tbt_s > tbt_slo_s:
                return None
            if erlang_c(batch, point.mean_concurrency) > 1.0 - quantile:
                return None
            return point

        if feasible(0.0) is None:
            continue
        low, high = 0.0, batch / (max(output_tokens, 1.0) * curves.decode_s(batch))
        for _ in range(60):
            mid = (low + high) / 2
            if feasible(mid) is None:
                high = mid
            else:
                low = mid
        point = feasible(low)
        # Capacities within TIE_REL of each other are a tie (smallest B kept): bisection
        # end points of different B that meet the same binding constraint differ only in
        # rounding, and that noise must not pick B (the table must regenerate identically
        # on any machine).
        if (
            point is not None
            and low > 0
            and (best is None or low > best.capacity_rps * (1.0 + TIE_REL))
        ):
            best = point
    return best

"""The v0 latency, capacity and power model: pure functions over measured points.

Every formula here is written out, with its assumptions, in ``docs/profiles.md``.
No file reads, no clock, no randomness: same points in, same numbers out.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from profiles.sources import PerfRow, PowerPoint
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


def _interp_loglog(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear interpolation in (log x, log y); flat below the first point."""
    xs = [p[0] for p in points]
    if x > xs[-1]:
        raise ValueError(f"{x} is beyond the largest measured point {xs[-1]}")
    if x <= xs[0]:
        return points[0][1]
    i = bisect.bisect_left(xs, x)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    share = math.log(x / x0) / math.log(x1 / x0)
    return math.exp(math.log(y0) + share * (math.log(y1) - math.log(y0)))


@dataclass(frozen=True)
class LatencyCurves:
    """Measured prefill and decode time of one (hardware, TP) as interpolable points.

    ``prefill_points`` are ``(prompt tokens in the batch, prefill ms)``; ``decode_points``
    are ``(batch size, ms per decode iteration)``; both ascending.
    """

    hardware: str
    tp: int
    prefill_points: tuple[tuple[float, float], ...]
    decode_points: tuple[tuple[float, float], ...]

    @property
    def max_prefill_tokens(self) -> float:
        """Largest measured prompt-token count of one prefill."""
        return self.prefill_points[-1][0]

    @property
    def max_batch(self) -> int:
        """Largest measured decode batch."""
        return int(self.decode_points[-1][0])

    def prefill_s(self, tokens: float) -> float:
        """Prefill time (s) of a batch holding ``tokens`` prompt tokens in all."""
        return _interp_loglog(self.prefill_points, tokens) / 1000.0

    def decode_s(self, batch: float) -> float:
        """Time (s) of one decode iteration at ``batch`` running requests."""
        return _interp_loglog(self.decode_points, batch) / 1000.0


def build_latency_curves(
    rows: Iterable[PerfRow], hardware: str, tp: int, kv_tokens: int
) -> LatencyCurves:
    """Average the repeated SplitwiseSim runs of one (hardware, TP) into curves.

    Prefill time is keyed by the batch's total prompt tokens (``prompt_size x
    batch_size``): the prompt sweep at batch 1 and the batch sweep at 512 tokens agree
    within ~10% where they meet. Decode time is keyed by batch size alone (the measured
    context dependence at batch 1 is under 10% from 128 to 8,192 tokens). Runs whose KV
    cache (``batch x (prompt + output tokens)``) exceeds ``kv_tokens`` cannot have run as
    recorded and are dropped.

    Args:
        rows: Measured runs (any hardware and TP; filtered here).
        hardware: SplitwiseSim hardware name, e.g. ``"h100-80gb"``.
        tp: Tensor-parallel degree.
        kv_tokens: KV-cache capacity of the instance in tokens.

    Returns:
        The curves, means over the kept runs of each key.

    Raises:
        InputDataError: No usable run for this (hardware, TP).
    """
    prefill: dict[float, list[float]] = defaultdict(list)
    decode: dict[float, list[float]] = defaultdict(list)
    for row in rows:
        if row.hardware != hardware or row.tp != tp:
            continue
        if row.batch_size * (row.prompt_tokens + row.output_tokens) > kv_tokens:
            continue
        prefill[float(row.prompt_tokens * row.batch_size)].append(row.prompt_time_ms)
        decode[float(row.batch_size)].append(row.token_time_ms)
    if not prefill:
        raise InputDataError(f"no usable perf_model.csv run for hardware={hardware} tp={tp}")
    return LatencyCurves(
        hardware=hardware,
        tp=tp,
        prefill_points=tuple((k, statistics.fmean(v)) for k, v in sorted(prefill.items())),
        decode_points=tuple((k, statistics.fmean(v)) for k, v in sorted(decode.items())),
    )


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
    time spent prefilling; ``ttft_s`` and ``tbt_s`` the modelled tail latencies.
    """

    batch: int
    capacity_rps: float
    prefill_group: int
    mean_concurrency: float
    ttft_s: float
    tbt_s: float
    prefill_share: float


def _mean_prefill_group(
    curves: LatencyCurves, prompt_tokens: float, rate_rps: float
) -> float | None:
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


def _point_at(
    curves: LatencyCurves,
    batch: int,
    prompt_tokens: float,
    output_tokens: float,
    rate_rps: float,
    quantile: float,
) -> OperatingPoint | None:
    """Latency, concurrency and prefill share of ``batch`` slots at ``rate_rps``."""
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
    residence_s = ttft_s + output_tokens * decode_s / (1.0 - prefill_share)
    return OperatingPoint(
        batch=batch,
        capacity_rps=rate_rps,
        prefill_group=group,
        mean_concurrency=rate_rps * residence_s,
        ttft_s=ttft_s,
        tbt_s=decode_s,
        prefill_share=prefill_share,
    )


def choose_operating_point(
    curves: LatencyCurves,
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

    ``B`` is tried at each measured batch size and at the KV-cache limit; for each, the
    largest feasible rate is found by bisection (all constraints grow with the rate).

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
    candidates = sorted({int(b) for b, _ in curves.decode_points if b <= limit} | {limit})
    best: OperatingPoint | None = None
    for batch in (b for b in candidates if b >= 1):

        def feasible(rate_rps: float, batch: int = batch) -> OperatingPoint | None:
            point = _point_at(curves, batch, prompt_tokens, output_tokens, rate_rps, quantile)
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
        if point is not None and low > 0 and (best is None or low > best.capacity_rps):
            best = point
    return best


def tp_power_ratio(points: Iterable[PowerPoint], gpu_model: str) -> float:
    """Measured per-GPU power ratio of TP2 over TP1 at equal configured batch.

    Pairs every (model, ``max_num_seqs``) measured on ``gpu_model`` at both TP1 and TP2
    and averages ``power_per_gpu_w(TP2) / power_per_gpu_w(TP1)``.

    Raises:
        InputDataError: No such pair exists.
    """
    by_key: dict[tuple[str, int, int], float] = {}
    for point in points:
        if point.gpu_model == gpu_model and point.num_gpus == point.tp:
            by_key[(point.model_id, point.max_num_seqs, point.tp)] = point.power_per_gpu_w
    ratios = [
        by_key[(model, seqs, 2)] / power
        for (model, seqs, tp), power in sorted(by_key.items())
        if tp == 1 and (model, seqs, 2) in by_key
    ]
    if not ratios:
        raise InputDataError(f"no {gpu_model} model measured at both TP1 and TP2")
    return statistics.fmean(ratios)


@dataclass(frozen=True)
class DecodePowerCurve:
    """Average GPU power while serving, vs running batch, from one measured TP degree.

    ``points`` are ``(average batch, W per GPU)`` measured at ``reference_tp``. Other TP
    degrees scale the power by ``tp_doubling_ratio`` per doubling of TP.
    """

    points: tuple[tuple[float, float], ...]
    reference_tp: int
    tp_doubling_ratio: float
    idle_power_per_gpu_w: float

    def power_per_gpu_w(self, tp: int, mean_batch: float) -> float:
        """Power per GPU (W) at a mean running batch on a ``tp``-GPU instance.

        Linear in batch between measured points and flat beyond the largest; flat at the
        smallest measured batch down to one running request (decode streams all weights
        every iteration, whatever the batch); linear from loaded idle at 0 to that at 1
        (the share of time with a request running).
        """
        scale = self.tp_doubling_ratio ** math.log2(tp / self.reference_tp)
        xs = [p[0] for p in self.points]
        if mean_batch >= xs[-1]:
            measured = self.points[-1][1]
        elif mean_batch <= xs[0]:
            measured = self.points[0][1]
        else:
            i = bisect.bisect_left(xs, mean_batch)
            (x0, y0), (x1, y1) = self.points[i - 1], self.points[i]
            measured = y0 + (mean_batch - x0) / (x1 - x0) * (y1 - y0)
        busy_w = max(self.idle_power_per_gpu_w, scale * measured)
        if mean_batch >= 1.0:
            return busy_w
        return self.idle_power_per_gpu_w + mean_batch * (busy_w - self.idle_power_per_gpu_w)


def power_at_capacity_per_gpu_w(
    point: OperatingPoint,
    decode_power: DecodePowerCurve,
    tp: int,
    power_cap_w: float,
) -> float:
    """Average power per GPU (W) at the operating point, never above the power cap.

    Prefill is compute-bound and modelled at the power limit (``power_cap_w``); the rest of
    the time the GPU decodes at the mean running batch, at the measured decode power
    clipped to the cap.
    """
    decode_w = min(decode_power.power_per_gpu_w(tp, point.mean_concurrency), power_cap_w)
    share = min(point.prefill_share, 1.0)
    return share * power_cap_w + (1.0 - share) * decode_w

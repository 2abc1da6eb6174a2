"""The v1 latency and power model: roofline-shaped formulas with calibrated coefficients.

Pure functions of a GPU's public specification, a model's shape, the serving config (TP,
SPP, KVP, locked SM clock) and a handful of calibrated parameters per GPU type
(``profiles.fit`` fits them to the bundled measurements). ``docs/profiles.md`` writes every
formula out with its assumptions; names here match the document.

Clock enters in two places only, both calibrated on Perseus' locked-clock sweep:

- time of compute-bound work scales as ``s(x) = beta / x + (1 - beta)`` with
  ``x = clock / max clock`` (prefill compute, decode's per-token compute); memory traffic,
  communication and engine overheads do not scale with the SM clock, so decode (memory
  bound) is nearly clock-insensitive;
- power above loaded idle scales as ``rho(x) = sigma + (1 - sigma) x^alpha`` (superlinear:
  voltage falls with clock).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from profiles.hardware import GpuSpec
from profiles.model import TransformerShape

#: Inter-stage hop of a sequence-pipeline gang per decode step (ms); assumption, see docs.
SPP_HOP_MS = 0.2


@dataclass(frozen=True)
class ClockParams:
    """How time and power of one GPU type scale with the locked SM clock.

    Attributes:
        time_share: ``beta``, share of compute-bound time that scales as ``1 / clock``.
        static_power_share: ``sigma``, share of above-idle power that does not fall with clock.
        power_exponent: ``alpha``, exponent of the clock-dependent share.
    """

    time_share: float
    static_power_share: float
    power_exponent: float

    def time_factor(self, clock_ratio: float) -> float:
        """``s(x)``: compute time at clock ratio ``x`` relative to the maximum clock."""
        return self.time_share / clock_ratio + (1.0 - self.time_share)

    def power_factor(self, clock_ratio: float) -> float:
        """``rho(x)``: above-idle power at clock ratio ``x`` relative to the maximum clock."""
        share = self.static_power_share
        return share + (1.0 - share) * clock_ratio**self.power_exponent


@dataclass(frozen=True)
class PrefillParams:
    """Prefill time coefficients of one GPU type (see :func:`prefill_ms`).

    Attributes:
        overhead_ms: ``o_p``, fixed cost of a prefill step.
        compute_factor: ``k_c``, measured time over the roofline compute time (1 / efficiency).
        comm_factor: ``k_n``, measured over ideal ring all-reduce time of the activations.
        knee_tokens: ``T_k``, batch tokens around which the per-token cost rises.
        knee_ratio: ``r``, per-token cost far above the knee relative to far below it.
    """

    overhead_ms: float
    compute_factor: float
    comm_factor: float
    knee_tokens: float
    knee_ratio: float

    def knee(self, tokens: float) -> float:
        """``m(T) = (1 + T / T_k) / (1 + T / (r T_k))``: 1 for small batches, ``r`` for large."""
        return (1.0 + tokens / self.knee_tokens) / (
            1.0 + tokens / (self.knee_ratio * self.knee_tokens)
        )


@dataclass(frozen=True)
class DecodeParams:
    """Decode-step time coefficients of one GPU type (see :func:`decode_ms`).

    Attributes:
        layer_overhead_ms: ``c0``, engine overhead per layer and step.
        layer_comm_ms: ``c1``, per layer and step for each doubling of the TP (or KVP) degree.
        memory_factor: ``k_m``, measured over ideal time to stream weights and KV cache.
        request_overhead_ms: ``q``, per running request, layer and step.
        compute_factor: ``k_d``, measured over roofline time of the step's FLOPs.
    """

    layer_overhead_ms: float
    layer_comm_ms: float
    memory_factor: float
    request_overhead_ms: float
    compute_factor: float


@dataclass(frozen=True)
class PowerParams:
    """Power of one GPU above loaded idle while it serves (see :func:`decode_power_w`).

    Attributes:
        saturated_w: ``A``, above-idle W per GPU at a large running batch (TP1, max clock).
        batch_drop_w: ``B``, how far below ``A`` a batch near zero sits.
        batch_scale: ``b_s``, running batch over which power approaches ``A``.
        tp_factor: ``kappa``, above-idle power per GPU per doubling of the TP degree.
    """

    saturated_w: float
    batch_drop_w: float
    batch_scale: float
    tp_factor: float


@dataclass(frozen=True)
class GpuCalibration:
    """Everything the model needs about one GPU type: its spec and fitted parameters."""

    gpu: GpuSpec
    prefill: PrefillParams
    decode: DecodeParams
    power: PowerParams
    clock: ClockParams

    def clock_ratio(self, clock_mhz: int | None) -> float:
        """Locked clock over the maximum; 1.0 for an unlocked clock."""
        if clock_mhz is None:
            return 1.0
        return min(clock_mhz, self.gpu.max_clock_mhz) / self.gpu.max_clock_mhz


def prefill_flops_per_token(shape: TransformerShape, prompt_tokens: float) -> float:
    """FLOPs per prompt token: ``2 N`` for the weights plus causal attention ``2 L h p``."""
    return 2.0 * shape.params + 2.0 * shape.layers * shape.hidden_size * prompt_tokens


def allreduce_bytes_per_token(shape: TransformerShape) -> float:
    """Activation bytes all-reduced per token under TP: two all-reduces of ``h`` values per
    layer (after attention and after the MLP)."""
    return 2.0 * shape.layers * shape.hidden_size * shape.bytes_per_value


def prefill_ms(
    cal: GpuCalibration,
    shape: TransformerShape,
    batch_tokens: float,
    prompt_tokens: float,
    tp: int,
    clock_mhz: int | None = None,
    spp: int = 1,
) -> float:
    """Time of one prefill step over ``batch_tokens`` prompt tokens (ms).

    ``o_p + T m(T) [k_c flops(p) / (tp F) s(x) + k_n bytes_ar 2 (tp - 1) / tp / NVLink] / spp``;
    a sequence-pipeline gang of ``spp`` stages is assumed to pipeline the prompt perfectly.
    """
    params, gpu = cal.prefill, cal.gpu
    x = cal.clock_ratio(clock_mhz)
    compute_s = (
        params.compute_factor
        * prefill_flops_per_token(shape, prompt_tokens)
        / (tp * gpu.peak_flops)
        * cal.clock.time_factor(x)
    )
    comm_s = (
        params.comm_factor * allreduce_bytes_per_token(shape) * 2 * (tp - 1) / tp / gpu.nvlink_bps
    )
    per_token_ms = 1000.0 * (compute_s + comm_s) * params.knee(batch_tokens)
    return params.overhead_ms + batch_tokens * per_token_ms / spp


def decode_ms(
    cal: GpuCalibration,
    shape: TransformerShape,
    batch: float,
    context_tokens: float,
    tp: int,
    clock_mhz: int | None = None,
    spp: int = 1,
    kvp: int = 1,
) -> float:
    """Time of one decode step of ``batch`` requests with ``context_tokens`` each (ms).

    ``L (c0 + c1 log2(tp kvp)) + k_m (W / tp + B c kv / (tp kvp)) / BW
    + B [L q + k_d flops_d(c) / (tp F) s(x)] + (spp - 1) hop``. Only the compute term
    depends on the clock.
    """
    params, gpu = cal.decode, cal.gpu
    x = cal.clock_ratio(clock_mhz)
    overhead_ms = shape.layers * (
        params.layer_overhead_ms + params.layer_comm_ms * math.log2(tp * kvp)
    )
    memory_bytes = shape.weight_bytes / tp + batch * context_tokens * shape.kv_bytes_per_token / (
        tp * kvp
    )
    memory_ms = 1000.0 * params.memory_factor * memory_bytes / gpu.memory_bandwidth_bps
    flops = 2.0 * shape.params + 4.0 * shape.layers * shape.hidden_size * context_tokens
    compute_ms = (
        1000.0 * params.compute_factor * flops / (tp * gpu.peak_flops) * cal.clock.time_factor(x)
    )
    per_request_ms = shape.layers * params.request_overhead_ms + compute_ms
    return overhead_ms + memory_ms + batch * per_request_ms + (spp - 1) * SPP_HOP_MS


def _tp_scale(params: PowerParams, tp: int) -> float:
    return params.tp_factor ** math.log2(tp)


def decode_power_w(
    cal: GpuCalibration, mean_batch: float, tp: int, clock_mhz: int | None = None
) -> float:
    """Average power of one GPU (W) while decoding a mean running batch.

    ``idle + rho(x) kappa^log2(tp) (A - B exp(-b / b_s))`` for ``b >= 1``, never below idle
    nor above the board limit; linear from loaded idle at ``b = 0`` to the value at
    ``b = 1`` (the share of time with a request running).
    """
    params, gpu = cal.power, cal.gpu
    rho = cal.clock.power_factor(cal.clock_ratio(clock_mhz))
    batch = max(mean_batch, 1.0)
    above = params.saturated_w - params.batch_drop_w * math.exp(-batch / params.batch_scale)
    busy_w = min(gpu.loaded_idle_w + rho * _tp_scale(params, tp) * max(above, 0.0), gpu.tdp_w)
    if mean_batch >= 1.0:
        return busy_w
    return gpu.loaded_idle_w + max(mean_batch, 0.0) * (busy_w - gpu.loaded_idle_w)


def prefill_power_w(cal: GpuCalibration, tp: int, clock_mhz: int | None = None) -> float:
    """Power of one GPU (W) while prefilling: compute-bound work runs at the board limit at
    the maximum clock; ``idle + rho(x) kappa^log2(tp) (TDP - idle)``."""
    gpu = cal.gpu
    rho = cal.clock.power_factor(cal.clock_ratio(clock_mhz))
    return gpu.loaded_idle_w + rho * _tp_scale(cal.power, tp) * (gpu.tdp_w - gpu.loaded_idle_w)

"""Each instance's performance model and SLOs, from the profiles' v1 model.

The clock loop (``agent/clock_control.py``) projects TBT and TTFT with a
:class:`~agent.clock_control.PerformanceModel`: decode step ``(base + per_seq x b)`` slowed
by ``1 + s (f_max / f - 1)``, prefill ``(base + per_token x n) x f_max / f``. This module
fits those numbers, per (model, GPU type, TP, gang) and request type, to the same
calibrated model that generated the default profile table (``profiles/calibrate.py``,
``docs/profiles.md``), and takes the type's SLOs and representative prompt and output
lengths from it too, so the loop, the simulated instances and the plan agree:

* decode: ``decode_s`` is affine in the batch, so base and per-sequence time are its value
  at batch 0 and its slope, at the top clock; the clock sensitivity ``s`` is read off the
  ratio of the step at the lowest and the top clock at the largest batch (exact there at
  every clock, since both slow down linearly in ``f_max / f``; too slow below it);
* prefill: base and per-token time from the prefill of one and of four representative
  prompts at the top clock. The model's prefill slows by less than ``f_max / f`` (part of
  it is not compute), so the projection errs towards a higher clock;
* SLOs: 5x the type's latency alone on the largest configuration (the table's rule),
  unless overridden.

Models or GPU types the calibration does not know get ``None``; the caller falls back to
its configured model and says so.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from agent.clock_control import PerformanceModel
from profiles.calibrate import MAX_BATCH, ConfigLatency, SloPolicy, type_lengths, type_slos
from profiles.fit import Calibration, calibrate
from profiles.hardware import MODELS
from wattplan.domain import ServingConfig
from wattplan.settings import PROJECT_ROOT

log = logging.getLogger(__name__)

DATA_DIR = PROJECT_ROOT / "data"
#: Batch at which the decode clock sensitivity is read: the largest (``MAX_BATCH``). Only
#: the per-sequence compute slows with the clock, so the slowdown grows with the batch and
#: is over-estimated for every smaller batch (the loop errs towards a higher clock).
SENSITIVITY_BATCH = MAX_BATCH


@dataclass(frozen=True)
class InstancePerformance:
    """What the clock loop needs to know about one instance and its request type."""

    model: PerformanceModel
    ttft_slo_s: float
    tbt_slo_s: float
    prompt_tokens: float
    output_tokens: float


@functools.cache
def _calibrated(data_dir: Path) -> tuple[Calibration, dict[str, tuple[float, float]]]:
    return calibrate(data_dir), type_lengths(data_dir)


@functools.cache
def _slos(data_dir: Path, model: str) -> dict[str, tuple[float, float]]:
    cal, lengths = _calibrated(data_dir)
    return type_slos(cal, model, MODELS[model], lengths, SloPolicy())


def instance_performance(
    config: ServingConfig, request_type: str, data_dir: Path = DATA_DIR
) -> InstancePerformance | None:
    """The fitted performance model, SLOs and lengths of ``config`` serving ``request_type``.

    Args:
        config: The instance's serving configuration (its clock is ignored: the model
            covers every clock).
        request_type: The pool's request type (DynamoLLM's classes or the long-context
            one).
        data_dir: The bundled datasets the calibration reads.

    Returns:
        The performance, or ``None`` when the calibration knows neither the model nor the
        GPU type, or has no SLO for the type.
    """
    shape = MODELS.get(config.model)
    if shape is None:
        return None
    cal, lengths = _calibrated(data_dir)
    gpu_cal = cal.gpus.get(config.gpu_type)
    slos = _slos(data_dir, config.model)
    if gpu_cal is None or request_type not in lengths or request_type not in slos:
        return None
    prompt, output = lengths[request_type]
    clocks = gpu_cal.gpu.clocks_mhz
    top, low = max(clocks), min(clocks)

    def latency(clock: int) -> ConfigLatency:
        return ConfigLatency(gpu_cal, shape, replace(config, clock_mhz=clock), prompt, output)

    fast, slow = latency(top), latency(low)
    tbt_base = fast.decode_s(0)
    tbt_per_seq = fast.decode_s(1) - tbt_base
    ratio = slow.decode_s(SENSITIVITY_BATCH) / fast.decode_s(SENSITIVITY_BATCH)
    sensitivity = min(1.0, max(0.0, (ratio - 1.0) / (top / low - 1.0)))
    one, four = fast.prefill_s(prompt), fast.prefill_s(4 * prompt)
    per_token = max(0.0, (four - one) / (3 * prompt))
    model = PerformanceModel(
        max_clock_mhz=top,
        tbt_base_s=tbt_base,
        tbt_per_seq_s=tbt_per_seq,
        prefill_base_s=max(0.0, one - per_token * prompt),
        prefill_per_token_s=per_token,
        decode_clock_sensitivity=sensitivity,
    )
    ttft_slo, tbt_slo = slos[request_type]
    return InstancePerformance(model, ttft_slo, tbt_slo, prompt, output)

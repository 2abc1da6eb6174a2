"""Calibrate the v1 model (``profiles.physics``) to the bundled measurements, and score it.

Each parameter group is fitted to one dataset by weighted least squares on relative error
(rows divided by the measured value), with lower bounds where a value below them would be
unphysical (efficiency above 100%, negative overhead). Nonlinear parameters (exponents,
knees, scales) are chosen on fixed grids, so a fit is a finite, deterministic computation:
same files in, same parameters out.

Measured points are split into *fitted* points and *held-out* points (never used to fit);
:func:`score` reports the mean absolute percentage error (MAPE) on both, per source.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from profiles.hardware import A100, GPUS, H100, LLAMA2_70B, LLAMA31_8B, SPLITWISE_HARDWARE
from profiles.model import TransformerShape
from profiles.physics import (
    ClockParams,
    DecodeParams,
    GpuCalibration,
    PowerParams,
    PrefillParams,
    decode_ms,
    decode_power_w,
    prefill_ms,
    prefill_power_w,
)
from profiles.sources import (
    BenchPowerPoint,
    FrequencyPoint,
    LeaderboardV2Point,
    PerfRow,
    PowerPoint,
    read_argonne_power,
    read_mlenergy_v2,
    read_mlenergy_v3_power,
    read_perseus,
    read_splitwise_perf,
)
from wattplan.errors import InputDataError

#: Perseus file the clock model is fitted on (forward passes), and the one held out.
PERSEUS_FIT_FILE = "gpt3-175b+a100_sxm_bf16.csv"
PERSEUS_HELD_OUT_FILE = "bloom+a100_sxm_bf16.csv"
#: SplitwiseSim rows held out of the latency fit: one prompt size, one batch size and one
#: output length of each sweep (the fit never sees them; they test interpolation).
SPLITWISE_HELD_OUT = {"prompt_tokens": 2048, "batch_size": 8, "output_tokens": 1024}
#: ML.ENERGY v3 files whose H100 power-vs-batch curves fit the power model, and those held out.
MLENERGY_POWER_FIT = (
    "meta-llama__Llama-3.1-8B-Instruct__lm-arena-chat",
    "meta-llama__Llama-3.1-70B-Instruct__lm-arena-chat",
)
MLENERGY_POWER_HELD_OUT = (
    "Qwen__Qwen3-32B__lm-arena-chat",
    "google__gemma-3-27b-it__lm-arena-chat",
)
#: LLM-Inference-Bench rows that fit the A100 power curve (vLLM); the rest are held out.
ARGONNE_FIT_FRAMEWORK = "vLLM"
#: Mean prompt length assumed for ML.ENERGY's lm-arena-chat requests (not published in
#: the bundled files); decode context = prompt + half the mean output.
CHAT_PROMPT_TOKENS = 1000.0
#: Power cap of SplitwiseSim's ``h100-80gb-pcap`` rows (70% of 700 W).
SPLITWISE_PCAP_W = 490.0

PREFILL_KNEE_TOKENS = (250.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0, 3000.0, 4000.0, 6000.0)
PREFILL_KNEE_RATIOS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
POWER_BATCH_SCALES = tuple(float(b) for b in range(5, 401, 5))
POWER_TP_FACTORS = tuple(round(0.60 + 0.01 * i, 2) for i in range(41))
CLOCK_EXPONENTS = tuple(round(1.0 + 0.01 * i, 2) for i in range(401))


@dataclass(frozen=True)
class Comparison:
    """Model against measurement for one source and quantity."""

    source: str
    quantity: str
    split: str  # "fitted" or "held-out"
    points: int
    mape: float
    max_ape: float

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form (errors in percent, 0.1 precision)."""
        return {
            "source": self.source,
            "quantity": self.quantity,
            "split": self.split,
            "points": self.points,
            "mape_pct": round(100 * self.mape, 1),
            "max_ape_pct": round(100 * self.max_ape, 1),
        }


@dataclass(frozen=True)
class Calibration:
    """The fitted model of every GPU type, and how well it matches the data."""

    gpus: dict[str, GpuCalibration]
    comparisons: tuple[Comparison, ...]


def _compare(
    source: str, quantity: str, split: str, pairs: Iterable[tuple[float, float]]
) -> Comparison:
    """MAPE of ``(predicted, measured)`` pairs."""
    errors = [abs(pred - meas) / meas for pred, meas in pairs]
    if not errors:
        raise InputDataError(f"{source}: no {split} points for {quantity}")
    return Comparison(source, quantity, split, len(errors), statistics.fmean(errors), max(errors))


def bounded_lstsq(features: np.ndarray, target: np.ndarray, lower: Sequence[float]) -> np.ndarray:
    """Least squares with lower bounds on the coefficients, solved exactly.

    The problem is convex, so its optimum satisfies the KKT conditions for some set of
    coefficients held at their bound; every such set is tried (2**n, n small) and the best
    feasible solution is returned.

    Args:
        features: ``(rows, n)`` design matrix (already weighted).
        target: ``(rows,)`` values (already weighted).
        lower: One lower bound per coefficient (``-inf`` for none).

    Returns:
        The coefficients.
    """
    n = features.shape[1]
    bounds = np.array(lower, dtype=float)
    best: tuple[float, np.ndarray] | None = None
    for mask in itertools.product((False, True), repeat=n):
        fixed = np.array(mask)
        if np.any(fixed & ~np.isfinite(bounds)):
            continue
        coef = np.where(fixed, bounds, 0.0)
        free = ~fixed
        rest = target - features[:, fixed] @ coef[fixed]
        if free.any():
            solution, *_ = np.linalg.lstsq(features[:, free], rest, rcond=None)
            coef[free] = solution
        if np.any(coef < bounds - 1e-12):
            continue
        sse = float(np.sum((features @ coef - target) ** 2))
        if best is None or sse < best[0] - 1e-12 * max(best[0], 1.0):
            best = (sse, coef)
    if best is None:  # pragma: no cover - the all-free or all-fixed set is always feasible
        raise InputDataError("bounded least squares found no feasible solution")
    return best[1]


# --- clock (Perseus) ------------------------------------------------------------------------


def _forward_ratios(points: Sequence[FrequencyPoint]) -> list[tuple[float, float, float, float]]:
    """``(clock ratio, time ratio, power W, power W at max clock)`` of forward passes."""
    by_stage: dict[int, list[FrequencyPoint]] = defaultdict(list)
    for point in points:
        if point.instruction == "forward":
            by_stage[point.stage].append(point)
    out = []
    for stage in sorted(by_stage):
        rows = sorted(by_stage[stage], key=lambda p: p.frequency_mhz)
        top = rows[-1]
        for row in rows:
            out.append(
                (
                    row.frequency_mhz / top.frequency_mhz,
                    row.time_s / top.time_s,
                    row.power_w,
                    top.power_w,
                )
            )
    if not out:
        raise InputDataError("Perseus profile has no forward rows")
    return out


def fit_clock(points: Sequence[FrequencyPoint], idle_w: float) -> ClockParams:
    """Fit ``beta`` (time) and ``sigma``, ``alpha`` (power) to Perseus forward passes.

    Time: ``t(x) / t(1) - 1 = beta (1 / x - 1)``, least squares on relative error.
    Power: ``P(x) = idle + rho(x) (P(1) - idle)`` with ``rho(x) = sigma + (1 - sigma)
    x^alpha``; ``alpha`` on a grid, ``sigma`` by least squares on relative error for each.
    """
    ratios = _forward_ratios(points)
    x = np.array([r[0] for r in ratios])
    time_ratio = np.array([r[1] for r in ratios])
    power = np.array([r[2] for r in ratios])
    span = np.array([r[3] for r in ratios]) - idle_w
    beta = bounded_lstsq(((1 / x - 1) / time_ratio)[:, None], (time_ratio - 1) / time_ratio, [0.0])
    best: tuple[float, float, float] | None = None
    for alpha in CLOCK_EXPONENTS:
        xa = x**alpha
        # power - idle - span x^a = sigma span (1 - x^a), weighted by 1 / power
        sigma = bounded_lstsq(
            (span * (1 - xa) / power)[:, None], (power - idle_w - span * xa) / power, [0.0]
        )[0]
        pred = idle_w + (sigma + (1 - sigma) * xa) * span
        sse = float(np.sum(((pred - power) / power) ** 2))
        if best is None or sse < best[0]:
            best = (sse, float(sigma), alpha)
    assert best is not None
    return ClockParams(float(beta[0]), best[1], best[2])


def _clock_comparisons(
    clock: ClockParams, points: Sequence[FrequencyPoint], idle_w: float, source: str, split: str
) -> list[Comparison]:
    ratios = _forward_ratios(points)
    return [
        _compare(
            source,
            "forward time vs clock",
            split,
            ((clock.time_factor(x), t) for x, t, _, _ in ratios),
        ),
        _compare(
            source,
            "forward power vs clock",
            split,
            ((idle_w + clock.power_factor(x) * (top - idle_w), p) for x, _, p, top in ratios),
        ),
    ]


# --- latency (SplitwiseSim) -----------------------------------------------------------------


@dataclass(frozen=True)
class _PerfPoint:
    tp: int
    prompt_tokens: int
    batch_size: int
    output_tokens: int
    prompt_time_ms: float
    token_time_ms: float

    @property
    def held_out(self) -> bool:
        return (
            self.prompt_tokens == SPLITWISE_HELD_OUT["prompt_tokens"]
            or self.batch_size == SPLITWISE_HELD_OUT["batch_size"]
            or self.output_tokens == SPLITWISE_HELD_OUT["output_tokens"]
        )


def perf_points(
    rows: Iterable[PerfRow], hardware: str, kv_tokens: Callable[[int], int]
) -> list[_PerfPoint]:
    """Mean of the repeated runs per (TP, prompt, batch, output) of one SplitwiseSim hardware.

    Runs whose KV cache (``batch x (prompt + output)``) cannot fit the instance are dropped
    (one TP2 batch-64 run, whose prompt time is 6.6x *below* batch 32: a failed run).
    """
    groups: dict[tuple[int, int, int, int], list[PerfRow]] = defaultdict(list)
    for row in rows:
        if row.hardware != hardware:
            continue
        if row.batch_size * (row.prompt_tokens + row.output_tokens) > kv_tokens(row.tp):
            continue
        groups[(row.tp, row.prompt_tokens, row.batch_size, row.output_tokens)].append(row)
    if not groups:
        raise InputDataError(f"perf_model.csv: no usable {hardware} run")
    return [
        _PerfPoint(
            *key,
            statistics.fmean(r.prompt_time_ms for r in runs),
            statistics.fmean(r.token_time_ms for r in runs),
        )
        for key, runs in sorted(groups.items())
    ]


def _prefill_features(
    cal: GpuCalibration, shape: TransformerShape, point: _PerfPoint, knee: PrefillParams
) -> tuple[float, float, float]:
    """Columns of ``(o_p, k_c, k_n)`` in :func:`profiles.physics.prefill_ms` at max clock."""
    unit = replace(knee, overhead_ms=0.0, compute_factor=1.0, comm_factor=0.0)
    comm = replace(knee, overhead_ms=0.0, compute_factor=0.0, comm_factor=1.0)
    tokens = point.prompt_tokens * point.batch_size
    return (
        1.0,
        prefill_ms(replace(cal, prefill=unit), shape, tokens, point.prompt_tokens, point.tp),
        prefill_ms(replace(cal, prefill=comm), shape, tokens, point.prompt_tokens, point.tp),
    )


def fit_prefill(
    cal: GpuCalibration, shape: TransformerShape, points: Sequence[_PerfPoint]
) -> PrefillParams:
    """Fit ``o_p >= 0``, ``k_c >= 1``, ``k_n >= 0`` for every knee on the grid; keep the best."""
    fitted = [p for p in points if not p.held_out]
    y = np.array([p.prompt_time_ms for p in fitted])
    best: tuple[float, PrefillParams] | None = None
    for knee_tokens, ratio in itertools.product(PREFILL_KNEE_TOKENS, PREFILL_KNEE_RATIOS):
        knee = PrefillParams(0.0, 1.0, 0.0, knee_tokens, ratio)
        x = np.array([_prefill_features(cal, shape, p, knee) for p in fitted])
        coef = bounded_lstsq(x / y[:, None], np.ones_like(y), [0.0, 1.0, 0.0])
        sse = float(np.sum((x @ coef / y - 1) ** 2))
        if best is None or sse < best[0]:
            overhead, compute, comm = (float(c) for c in coef)
            best = (sse, PrefillParams(overhead, compute, comm, knee_tokens, ratio))
    assert best is not None
    return best[1]


def _decode_features(
    cal: GpuCalibration, shape: TransformerShape, point: _PerfPoint
) -> tuple[float, ...]:
    """Columns of ``(c0, c1, k_m, q, k_d)`` in :func:`profiles.physics.decode_ms`."""
    context = point.prompt_tokens + point.output_tokens / 2
    columns = []
    for i in range(5):
        unit = [0.0] * 5
        unit[i] = 1.0
        one = replace(cal, decode=DecodeParams(*unit))
        columns.append(decode_ms(one, shape, point.batch_size, context, point.tp))
    return tuple(columns)


def fit_decode(
    cal: GpuCalibration, shape: TransformerShape, points: Sequence[_PerfPoint]
) -> DecodeParams:
    """Fit ``c0, c1, q >= 0`` and ``k_m, k_d >= 1`` to the fitted points' ``token_time``."""
    fitted = [p for p in points if not p.held_out]
    y = np.array([p.token_time_ms for p in fitted])
    x = np.array([_decode_features(cal, shape, p) for p in fitted])
    coef = bounded_lstsq(x / y[:, None], np.ones_like(y), [0.0, 0.0, 1.0, 0.0, 1.0])
    return DecodeParams(*(float(c) for c in coef))


# --- power (ML.ENERGY v3 on H100, LLM-Inference-Bench on A100) ------------------------------


def _power_pred(params: PowerParams, idle_w: float, tdp_w: float, batch: float, tp: int) -> float:
    above = params.saturated_w - params.batch_drop_w * math.exp(
        -max(batch, 1.0) / params.batch_scale
    )
    return min(idle_w + params.tp_factor ** math.log2(tp) * max(above, 0.0), tdp_w)


def fit_power(
    points: Sequence[tuple[float, int, float]],
    idle_w: float,
    tp_factors: Sequence[float],
) -> PowerParams:
    """Fit ``A``, ``B`` (least squares) and ``b_s``, ``kappa`` (grids) to
    ``(running batch, TP, W per GPU)`` points at the maximum clock."""
    batch = np.array([p[0] for p in points])
    tp = np.array([p[1] for p in points], dtype=float)
    y = np.array([p[2] for p in points]) - idle_w
    best: tuple[float, PowerParams] | None = None
    for scale, kappa in itertools.product(POWER_BATCH_SCALES, tp_factors):
        k = kappa ** np.log2(tp)
        x = np.stack([k, -k * np.exp(-batch / scale)], axis=1)
        weights = 1.0 / (y + idle_w)
        coef = bounded_lstsq(x * weights[:, None], y * weights, [0.0, 0.0])
        sse = float(np.sum(((x @ coef - y) * weights) ** 2))
        if best is None or sse < best[0]:
            best = (sse, PowerParams(float(coef[0]), float(coef[1]), scale, kappa))
    assert best is not None
    return best[1]


def _v3_power_points(data_dir: Path, stems: Iterable[str]) -> list[PowerPoint]:
    return [
        p
        for stem in stems
        for p in read_mlenergy_v3_power(data_dir, stem)
        if p.gpu_model == "H100" and p.num_gpus == p.tp
    ]


def _argonne_gpu(point: BenchPowerPoint) -> str | None:
    if "A100" in point.hardware:
        return A100.name
    if "H100" in point.hardware:
        return H100.name
    return None


# --- the whole calibration ------------------------------------------------------------------


def _initial(gpu_name: str, clock: ClockParams) -> GpuCalibration:
    gpu = GPUS[gpu_name]
    return GpuCalibration(
        gpu=gpu,
        prefill=PrefillParams(0.0, 1.0, 0.0, 1000.0, 1.0),
        decode=DecodeParams(0.0, 0.0, 1.0, 0.0, 1.0),
        power=PowerParams(0.0, 0.0, 1.0, 1.0),
        clock=clock,
    )


def calibrate(data_dir: Path) -> Calibration:
    """Fit every parameter of both GPU types and score the model on fitted and held-out data.

    Args:
        data_dir: The repository's ``data/`` folder (bundled datasets).

    Returns:
        The per-GPU calibrations and the comparisons (see ``docs/profiles.md``).

    Raises:
        InputDataError: A bundled file is missing or malformed.
    """
    comparisons: list[Comparison] = []
    perseus_fit = read_perseus(data_dir, PERSEUS_FIT_FILE)
    perseus_held = read_perseus(data_dir, PERSEUS_HELD_OUT_FILE)
    clock = fit_clock(perseus_fit, A100.loaded_idle_w)
    comparisons += _clock_comparisons(clock, perseus_fit, A100.loaded_idle_w, "perseus", "fitted")
    comparisons += _clock_comparisons(
        clock, perseus_held, A100.loaded_idle_w, "perseus", "held-out"
    )

    splitwise = read_splitwise_perf(data_dir, "llama2-70b")
    from profiles.model import kv_capacity_tokens  # local: avoids an import cycle at load

    cals: dict[str, GpuCalibration] = {}
    perf: dict[str, list[_PerfPoint]] = {}
    for hardware, gpu_name in SPLITWISE_HARDWARE.items():
        cal = _initial(gpu_name, clock)
        gpu = cal.gpu

        def kv_tokens(tp: int, gpu_memory: float = gpu.memory_bytes) -> int:
            return kv_capacity_tokens(LLAMA2_70B, tp, gpu_memory, 0.9, 2 * 1024**3)

        points = perf_points(splitwise, hardware, kv_tokens)
        perf[gpu_name] = points
        cal = replace(cal, prefill=fit_prefill(cal, LLAMA2_70B, points))
        cal = replace(cal, decode=fit_decode(cal, LLAMA2_70B, points))
        cals[gpu_name] = cal

    # Power: H100 from ML.ENERGY v3 (TP1 and TP4); A100 from LLM-Inference-Bench (TP1).
    v3_fit = _v3_power_points(data_dir, MLENERGY_POWER_FIT)
    h100_power = fit_power(
        [(p.avg_batch_size, p.tp, p.power_per_gpu_w) for p in v3_fit],
        H100.loaded_idle_w,
        POWER_TP_FACTORS,
    )
    cals[H100.name] = replace(cals[H100.name], power=h100_power)
    argonne = read_argonne_power(data_dir)
    a100_fit = [
        p for p in argonne if _argonne_gpu(p) == A100.name and p.framework == ARGONNE_FIT_FRAMEWORK
    ]
    a100_power = fit_power(
        [(float(p.batch_size), p.gpus, p.power_w) for p in a100_fit],
        A100.loaded_idle_w,
        (h100_power.tp_factor,),
    )
    cals[A100.name] = replace(cals[A100.name], power=a100_power)

    comparisons += _latency_comparisons(cals, perf)
    comparisons += _power_comparisons(cals, data_dir, v3_fit, argonne)
    comparisons += _cross_engine_comparisons(cals, data_dir, argonne)
    return Calibration(cals, tuple(comparisons))


def _latency_comparisons(
    cals: dict[str, GpuCalibration], perf: dict[str, list[_PerfPoint]]
) -> list[Comparison]:
    out = []
    for gpu_name, points in perf.items():
        cal = cals[gpu_name]
        source = f"splitwise {gpu_name} llama2-70b"
        for split in ("fitted", "held-out"):
            chosen = [p for p in points if p.held_out == (split == "held-out")]
            out.append(
                _compare(
                    source,
                    "prefill time",
                    split,
                    (
                        (
                            prefill_ms(
                                cal,
                                LLAMA2_70B,
                                p.prompt_tokens * p.batch_size,
                                p.prompt_tokens,
                                p.tp,
                            ),
                            p.prompt_time_ms,
                        )
                        for p in chosen
                    ),
                )
            )
            out.append(
                _compare(
                    source,
                    "decode step time",
                    split,
                    (
                        (
                            decode_ms(
                                cal,
                                LLAMA2_70B,
                                p.batch_size,
                                p.prompt_tokens + p.output_tokens / 2,
                                p.tp,
                            ),
                            p.token_time_ms,
                        )
                        for p in chosen
                    ),
                )
            )
    return out


def _power_comparisons(
    cals: dict[str, GpuCalibration],
    data_dir: Path,
    v3_fit: Sequence[PowerPoint],
    argonne: Sequence[BenchPowerPoint],
) -> list[Comparison]:
    h100, a100 = cals[H100.name], cals[A100.name]
    out = [
        _compare(
            "mlenergy-v3 H100 (Llama-3.1 8B TP1, 70B TP4)",
            "power per GPU",
            "fitted",
            ((decode_power_w(h100, p.avg_batch_size, p.tp), p.power_per_gpu_w) for p in v3_fit),
        ),
        _compare(
            "mlenergy-v3 H100 (Qwen3-32B, gemma-3-27b TP1/TP2)",
            "power per GPU",
            "held-out",
            (
                (decode_power_w(h100, p.avg_batch_size, p.tp), p.power_per_gpu_w)
                for p in _v3_power_points(data_dir, MLENERGY_POWER_HELD_OUT)
            ),
        ),
    ]
    for gpu_name, cal in ((A100.name, a100), (H100.name, h100)):
        for split in ("fitted", "held-out"):
            chosen = [
                p
                for p in argonne
                if _argonne_gpu(p) == gpu_name
                and (split == "fitted")
                == (gpu_name == A100.name and p.framework == ARGONNE_FIT_FRAMEWORK)
            ]
            if chosen:
                out.append(
                    _compare(
                        f"argonne {gpu_name.split('-')[0]} 7-8B TP1",
                        "power per GPU",
                        split,
                        ((decode_power_w(cal, p.batch_size, p.gpus), p.power_w) for p in chosen),
                    )
                )
    return out


def _pcap_comparison(h100: GpuCalibration) -> list[Comparison]:
    """Splitwise's 70%-capped H100 rows: prefill 1.30x slower, decode 1.00x (every row).

    The model has no power cap; the capped GPU is taken to run at the clock where the
    modelled prefill power (TP1) meets the cap, and the slowdowns there are compared.
    """
    low, high = 0.05, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        clock = round(mid * h100.gpu.max_clock_mhz)
        if prefill_power_w(h100, 1, clock) > SPLITWISE_PCAP_W:
            high = mid
        else:
            low = mid
    x = low
    prefill_slowdown = h100.clock.time_factor(x)
    return [
        _compare(
            "splitwise H100 70% power cap",
            "prefill slowdown at the cap",
            "held-out",
            [(prefill_slowdown, 1.30)],
        )
    ]


def _cross_engine_comparisons(
    cals: dict[str, GpuCalibration], data_dir: Path, argonne: Sequence[BenchPowerPoint]
) -> list[Comparison]:
    """Latency of other engines (vLLM, TensorRT-LLM, 2024-2025) against the Splitwise-fitted
    model: held out, and expected to be worse (see docs)."""
    h100 = cals[H100.name]
    out = _pcap_comparison(h100)
    shapes = {
        "meta-llama/Llama-3.1-8B-Instruct": LLAMA31_8B,
        "meta-llama/Llama-3.1-70B-Instruct": LLAMA2_70B,
    }
    v3 = _v3_power_points(data_dir, MLENERGY_POWER_FIT)
    for label, inside in (("batch <= 64", True), ("batch > 64", False)):
        out.append(
            _compare(
                f"mlenergy-v3 H100 (Llama-3.1 8B TP1, 70B TP4), {label}",
                "median ITL vs decode step",
                "held-out",
                (
                    (
                        decode_ms(
                            h100,
                            shapes[p.model_id],
                            p.avg_batch_size,
                            CHAT_PROMPT_TOKENS + p.avg_output_len / 2,
                            p.tp,
                        ),
                        p.median_itl_ms,
                    )
                    for p in v3
                    if (p.avg_batch_size <= 64) == inside
                ),
            )
        )
    v2: Sequence[LeaderboardV2Point] = read_mlenergy_v2(data_dir)
    v2_shapes = {
        "meta-llama/Meta-Llama-3.1-8B-Instruct": LLAMA31_8B,
        "meta-llama/Meta-Llama-3.1-70B-Instruct": LLAMA2_70B,
    }
    a100_40gb = replace(
        cals[A100.name], gpu=replace(A100, name="A100-40GB", memory_bandwidth_bps=1.555e12)
    )
    for gpu_key, cal in (("H100", h100), ("A100", a100_40gb)):
        v2_chosen = [p for p in v2 if gpu_key in p.gpu and p.model in v2_shapes]
        out.append(
            _compare(
                f"mlenergy-v2 {cal.gpu.name} (Llama-3.1 8B, 70B)",
                "TPOT vs decode step",
                "held-out",
                (
                    (
                        decode_ms(
                            cal,
                            v2_shapes[p.model],
                            p.avg_batch_size,
                            CHAT_PROMPT_TOKENS + p.avg_output_tokens / 2,
                            p.tp,
                        ),
                        1000 * p.avg_tpot_s,
                    )
                    for p in v2_chosen
                ),
            )
        )
    for gpu_name in (A100.name, H100.name):
        cal = cals[gpu_name]
        chosen = [
            p
            for p in argonne
            if _argonne_gpu(p) == gpu_name and p.model == "meta-llama/Meta-Llama-3-8B"
        ]
        out.append(
            _compare(
                f"argonne {gpu_name.split('-')[0]} Llama-3-8B TP1",
                "batch latency (prefill + decode)",
                "held-out",
                (
                    (
                        (
                            prefill_ms(
                                cal,
                                LLAMA31_8B,
                                p.batch_size * p.length_tokens,
                                p.length_tokens,
                                p.gpus,
                            )
                            + p.length_tokens
                            * decode_ms(
                                cal, LLAMA31_8B, p.batch_size, 1.5 * p.length_tokens, p.gpus
                            )
                        )
                        / 1000.0,
                        p.latency_s,
                    )
                    for p in chosen
                ),
            )
        )
    return out

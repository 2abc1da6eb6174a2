"""Build the default profile table (v1) from the bundled public datasets.

``wattplan profiles calibrate`` (or ``python -m profiles.calibrate``) fits the model of
``profiles.physics`` to the bundled measurements (``profiles.fit``), evaluates it for every
(model, GPU type, TP, clock, request type) and writes ``data/profiles/v1.csv``; the output
is byte-identical on every run. Assumptions, parameters and their sources are listed in
``docs/profiles.md``; the constants below carry the same names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from profiles.fit import Calibration, calibrate
from profiles.hardware import GPUS, H100, MODELS, GpuSpec
from profiles.model import (
    GIB,
    OperatingPoint,
    TransformerShape,
    choose_operating_point,
    kv_capacity_tokens,
    point_at,
    representative_lengths,
)
from profiles.physics import (
    GpuCalibration,
    decode_ms,
    decode_power_w,
    prefill_ms,
    prefill_power_w,
)
from profiles.sources import read_azure_requests
from profiles.table import LoadPoint, ProfileRecord, make_record, write_profiles_csv
from wattplan.domain import LONG_CONTEXT_TYPE, REQUEST_TYPES, RequestTypeBins, ServingConfig
from wattplan.errors import InputDataError

__all__ = ["SloPolicy", "build_default_profiles", "main"]

log = logging.getLogger(__name__)

VERSION = "v1"
#: DynamoLLM: SLO = 5x the latency of the type running alone on the largest config.
SLO_MULTIPLIER = 5.0
#: Percentile the SLOs apply to.
LATENCY_QUANTILE = 0.99
#: Load points of each curve, as shares of the SLO capacity (0 = loaded idle).
LOAD_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Tensor-parallel degrees tried (kept where the weights fit and KV heads divide evenly).
TP_DEGREES = (1, 2, 4, 8)
#: vLLM's default ``gpu_memory_utilization`` and a per-GPU reserve for activations,
#: CUDA graphs and communication buffers (default assumption).
GPU_MEMORY_UTILIZATION = 0.9
RESERVE_BYTES_PER_GPU = 2 * GIB
#: Most prompt tokens in one prefill step (SplitwiseSim's largest measured batch, 64 x 512
#: tokens; beyond it the model would extrapolate, so larger groups run as several steps).
MAX_PREFILL_TOKENS = 32768
#: Most requests decoding together (twice SplitwiseSim's largest measured batch of 64).
MAX_BATCH = 128
#: The long-context class (Mnemosyne): representative request, TBT SLO, gang shapes tried.
LC_PROMPT_TOKENS = 1_048_576
LC_OUTPUT_TOKENS = 256
LC_TBT_SLO_S = 0.030
LC_SPP = (1, 2, 4)
LC_KVP = (1, 2, 4, 8, 16)
LC_MAX_GPUS = 64
#: The GPU type whose largest configuration sets the SLOs of every model.
REFERENCE_GPU = H100.name

SOURCE = (
    "v1 model (docs/profiles.md): latency fitted to splitwise {hardware} llama2-70b; "
    "decode power to {power}; clock to perseus A100; lengths azure-2023 medians"
)
POWER_SOURCE = {
    "H100-80GB": "mlenergy-v3 H100 Llama-3.1",
    "A100-80GB": "argonne A100 vLLM 7-8B",
}
SPLITWISE_NAME = {"H100-80GB": "h100-80gb", "A100-80GB": "a100-80gb"}


@dataclass(frozen=True)
class SloPolicy:
    """How SLOs are set: a multiple of the unloaded latency on the largest configuration,
    with absolute overrides per request type.

    Attributes:
        multiplier: DynamoLLM's multiple of the type's latency alone (default 5).
        overrides: ``{request type: (ttft_slo_s or None, tbt_slo_s or None)}``; a value
            replaces the derived one (default: the long-context class's 30 ms TBT).
    """

    multiplier: float = SLO_MULTIPLIER
    overrides: Mapping[str, tuple[float | None, float | None]] = field(
        default_factory=lambda: {LONG_CONTEXT_TYPE: (None, LC_TBT_SLO_S)}
    )

    def apply(
        self, request_type: str, ttft_alone_s: float, tbt_alone_s: float
    ) -> tuple[float, float]:
        """The ``(ttft_slo_s, tbt_slo_s)`` of one type from its unloaded latencies."""
        ttft, tbt = self.overrides.get(request_type, (None, None))
        return (
            ttft if ttft is not None else self.multiplier * ttft_alone_s,
            tbt if tbt is not None else self.multiplier * tbt_alone_s,
        )


@dataclass(frozen=True)
class ConfigLatency:
    """Modelled prefill and decode time of one serving config for one request type
    (implements :class:`profiles.model.Latency`)."""

    cal: GpuCalibration
    shape: TransformerShape
    config: ServingConfig
    prompt_tokens: float
    output_tokens: float

    @property
    def max_prefill_tokens(self) -> float:
        """No limit: larger groups are split into steps (see :meth:`prefill_s`)."""
        return math.inf

    @property
    def max_batch(self) -> int:
        """At most ``MAX_BATCH`` decoding requests."""
        return MAX_BATCH

    def prefill_s(self, tokens: float) -> float:
        """Prefill time (s) of ``tokens`` prompt tokens of this type.

        A step holds at most ``MAX_PREFILL_TOKENS`` (or one whole prompt, if longer); more
        tokens run as consecutive full steps, so time grows linearly beyond that.
        """
        c = self.config
        chunk = max(float(MAX_PREFILL_TOKENS), self.prompt_tokens)
        step = min(tokens, chunk)
        step_ms = prefill_ms(
            self.cal, self.shape, step, self.prompt_tokens, c.tp, c.clock_mhz, c.spp
        )
        return step_ms * max(tokens / chunk, 1.0) / 1000.0

    def decode_s(self, batch: float) -> float:
        """Decode-step time (s) at ``batch`` requests, each at the type's mean context."""
        c = self.config
        context = self.prompt_tokens + self.output_tokens / 2
        return (
            decode_ms(self.cal, self.shape, batch, context, c.tp, c.clock_mhz, c.spp, c.kvp)
            / 1000.0
        )


def kv_tokens(shape: TransformerShape, gpu: GpuSpec, config: ServingConfig) -> int:
    """KV-cache tokens of one instance: each of its ``tp x spp x kvp`` GPUs holds
    ``1 / (tp x spp)`` of the weights and an even share of the KV cache."""
    per_gpu = kv_capacity_tokens(
        shape,
        config.tp * config.spp,
        gpu.memory_bytes,
        GPU_MEMORY_UTILIZATION,
        RESERVE_BYTES_PER_GPU,
    ) / (config.tp * config.spp)
    return math.floor(per_gpu * config.gpus)


def tp_degrees(shape: TransformerShape, gpu: GpuSpec) -> tuple[int, ...]:
    """TP degrees whose weights fit with room for KV cache and that divide the KV heads."""
    return tuple(
        tp
        for tp in TP_DEGREES
        if shape.kv_heads % tp == 0
        and kv_capacity_tokens(
            shape, tp, gpu.memory_bytes, GPU_MEMORY_UTILIZATION, RESERVE_BYTES_PER_GPU
        )
        > 0
    )


def _sig(value: float, digits: int = 6) -> float:
    """``value`` rounded to ``digits`` significant digits (exact CSV round trip)."""
    return float(f"{value:.{digits}g}")


def _sig_floor(value: float, digits: int = 6) -> float:
    """``value`` rounded *down* to ``digits`` significant digits: a capacity never rounds up
    past the largest rate found feasible (tail latencies jump with the rate)."""
    if value <= 0:
        return 0.0
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    floored = float(f"{math.floor(value * scale) / scale:.{digits}g}")
    return floored if floored <= value else _sig(floored * (1 - 10.0**-digits), digits)


def _load_point(lat: ConfigLatency, gpu_cal: GpuCalibration, batch: int, rate: float) -> LoadPoint:
    """Power and P50/P99 latency of one instance at ``rate`` (``batch`` decode slots)."""
    c = lat.config
    if rate == 0.0:
        alone_ttft = lat.prefill_s(lat.prompt_tokens)
        alone_tbt = lat.decode_s(1)
        return LoadPoint(
            0.0,
            round(c.gpus * gpu_cal.gpu.loaded_idle_w, 1),
            round(alone_ttft, 4),
            round(alone_ttft, 4),
            round(alone_tbt, 4),
            round(alone_tbt, 4),
        )
    p99 = point_at(lat, batch, lat.prompt_tokens, lat.output_tokens, rate, LATENCY_QUANTILE)
    p50 = point_at(lat, batch, lat.prompt_tokens, lat.output_tokens, rate, 0.5)
    if p99 is None or p50 is None:  # pragma: no cover - below capacity both exist
        raise InputDataError(f"{c.key}: no operating point at {rate} req/s")
    power_per_gpu = p99.prefill_share * prefill_power_w(gpu_cal, c.tp, c.clock_mhz) + (
        1.0 - p99.prefill_share
    ) * decode_power_w(gpu_cal, p99.decoding_batch, c.tp, c.clock_mhz)
    tbt_p50 = lat.decode_s(min(float(batch), max(1.0, p50.decoding_batch)))
    return LoadPoint(
        rate,
        round(c.gpus * power_per_gpu, 1),
        round(p50.ttft_s, 4),
        round(p99.ttft_s, 4),
        round(tbt_p50, 4),
        round(p99.tbt_s, 4),
    )


def profile_record(
    lat: ConfigLatency,
    gpu_cal: GpuCalibration,
    request_type: str,
    slo: tuple[float, float],
    source: str,
) -> ProfileRecord | None:
    """The record of one config and request type, or ``None`` if no rate meets the SLOs."""
    gpu = gpu_cal.gpu
    point: OperatingPoint | None = choose_operating_point(
        lat,
        lat.prompt_tokens,
        lat.output_tokens,
        slo[0],
        slo[1],
        kv_tokens(lat.shape, gpu, lat.config),
        LATENCY_QUANTILE,
    )
    if point is None:
        return None
    capacity = _sig_floor(point.capacity_rps)
    rates = sorted({_sig(share * capacity) for share in LOAD_SHARES if share > 0} | {0.0})
    points = tuple(_load_point(lat, gpu_cal, point.batch, rate) for rate in rates)
    if len({p.rate_rps for p in points}) != len(points):  # pragma: no cover - 6 digits apart
        raise InputDataError(f"{lat.config.key} {request_type}: load points collapse")
    return make_record(
        lat.config,
        request_type,
        points,
        ttft_slo_s=round(slo[0], 4),
        tbt_slo_s=round(slo[1], 4),
        version=VERSION,
        source=source,
    )


def type_lengths(data_dir: Path) -> dict[str, tuple[float, float]]:
    lengths = representative_lengths(read_azure_requests(data_dir), RequestTypeBins())
    lengths[LONG_CONTEXT_TYPE] = (float(LC_PROMPT_TOKENS), float(LC_OUTPUT_TOKENS))
    return lengths


def _gangs(shape: TransformerShape, gpu: GpuSpec, tp: int) -> Iterator[tuple[int, int]]:
    """``(spp, smallest kvp)`` of long-context gangs at ``tp``: for each SPP, the smallest KVP
    whose KV cache holds one representative request, within ``LC_MAX_GPUS``."""
    need = LC_PROMPT_TOKENS + LC_OUTPUT_TOKENS
    for spp in LC_SPP:
        for kvp in LC_KVP:
            config = ServingConfig("", gpu.name, tp, gpu.tdp_w, None, spp, kvp)
            if config.gpus > LC_MAX_GPUS or tp * spp > shape.layers:
                break
            if kv_tokens(shape, gpu, config) >= need:
                yield spp, kvp
                break


def _sized_gangs(
    model: str, shape: TransformerShape, cal: GpuCalibration, tbt_slo_s: float
) -> Iterator[ServingConfig]:
    """Long-context gangs (max clock) sized by KV memory and the TBT SLO: for each TP and
    SPP, the smallest KVP that holds one representative request and whose decode step alone
    meets ``tbt_slo_s`` (more KV shards read the cache faster), within ``LC_MAX_GPUS``."""
    gpu = cal.gpu
    for tp in TP_DEGREES:
        if shape.kv_heads % tp:
            continue
        for spp, smallest in _gangs(shape, gpu, tp):
            for kvp in (k for k in LC_KVP if k >= smallest):
                config = ServingConfig(model, gpu.name, tp, gpu.tdp_w, None, spp, kvp)
                if config.gpus > LC_MAX_GPUS:
                    break
                lat = ConfigLatency(cal, shape, config, LC_PROMPT_TOKENS, LC_OUTPUT_TOKENS)
                if lat.decode_s(1) <= tbt_slo_s:
                    yield config
                    break


def _configs(
    model: str,
    shape: TransformerShape,
    cal: GpuCalibration,
    lc_tbt_slo_s: float | None,
) -> Iterator[tuple[ServingConfig, tuple[str, ...]]]:
    """Serving configs of one model on one GPU type with the request types each serves
    (long-context gangs only when ``lc_tbt_slo_s`` is given)."""
    gpu = cal.gpu
    for tp in tp_degrees(shape, gpu):
        for clock in gpu.clocks_mhz:
            yield ServingConfig(model, gpu.name, tp, gpu.tdp_w, clock), REQUEST_TYPES
    if lc_tbt_slo_s is None:
        return
    for gang in _sized_gangs(model, shape, cal, lc_tbt_slo_s):
        for clock in gpu.clocks_mhz:
            yield replace(gang, clock_mhz=clock), (LONG_CONTEXT_TYPE,)


def type_slos(
    calibration: Calibration,
    model: str,
    shape: TransformerShape,
    lengths: Mapping[str, tuple[float, float]],
    policy: SloPolicy,
) -> dict[str, tuple[float, float]]:
    """SLOs per type from the largest configuration on the reference GPU at its max clock
    (the largest long-context gang for the long-context class)."""
    cal = calibration.gpus[REFERENCE_GPU]
    gpu = cal.gpu
    largest = ServingConfig(model, gpu.name, max(tp_degrees(shape, gpu)), gpu.tdp_w)
    gangs = [
        ServingConfig(model, gpu.name, tp, gpu.tdp_w, None, spp, kvp)
        for tp in TP_DEGREES
        if shape.kv_heads % tp == 0
        for spp, kvp in _gangs(shape, gpu, tp)
    ]
    out = {}
    for request_type, (prompt, output) in lengths.items():
        config = largest
        if request_type == LONG_CONTEXT_TYPE:
            if not gangs:
                continue
            config = max(gangs, key=lambda g: (g.gpus, g.spp, g.tp))
        lat = ConfigLatency(cal, shape, config, prompt, output)
        out[request_type] = policy.apply(request_type, lat.prefill_s(prompt), lat.decode_s(1))
    return out


def build_default_records(
    data_dir: Path,
    calibration: Calibration | None = None,
    slo_policy: SloPolicy | None = None,
    long_context: bool = True,
) -> list[ProfileRecord]:
    """Derive the v1 profile table from the bundled data.

    Rows are ordered by model, GPU type, TP (then gang), clock and request type; a config
    that cannot meet a type's SLO at any rate has no row for it (logged).

    Args:
        data_dir: The repository's ``data/`` folder (bundled datasets).
        calibration: Fitted model (default: :func:`profiles.fit.calibrate` on ``data_dir``).
        slo_policy: SLO multiplier and overrides (default :class:`SloPolicy`).
        long_context: Also build the long-context class's gang profiles.

    Returns:
        The records, every float rounded (rates to 6 significant digits, power to 0.1 W,
        latencies to 0.1 ms) so that a CSV round trip is exact.

    Raises:
        InputDataError: A bundled file is missing or malformed.
    """
    calibration = calibration or calibrate(data_dir)
    policy = slo_policy or SloPolicy()
    lengths = type_lengths(data_dir)
    records: list[ProfileRecord] = []
    for model, shape in MODELS.items():
        slos = type_slos(calibration, model, shape, lengths, policy)
        for gpu_name in GPUS:
            cal = calibration.gpus[gpu_name]
            source = SOURCE.format(hardware=SPLITWISE_NAME[gpu_name], power=POWER_SOURCE[gpu_name])
            lc_slo = slos.get(LONG_CONTEXT_TYPE) if long_context else None
            for config, types in _configs(model, shape, cal, lc_slo[1] if lc_slo else None):
                for request_type in types:
                    if request_type not in slos:
                        continue
                    prompt, output = lengths[request_type]
                    lat = ConfigLatency(cal, shape, config, prompt, output)
                    record = profile_record(lat, cal, request_type, slos[request_type], source)
                    if record is None:
                        log.info("%s cannot meet the %s SLO: no row", config.key, request_type)
                        continue
                    records.append(record)
    return records


def build_default_profiles(data_dir: Path) -> list:  # type: ignore[type-arg]
    """The :class:`~wattplan.domain.Profile` of every default record."""
    return [record.profile for record in build_default_records(data_dir)]


def _parse_override(text: str) -> tuple[str, tuple[float | None, float | None]]:
    """``TYPE:ttft=S,tbt=S`` (either part optional) -> ``(TYPE, (ttft, tbt))``."""
    name, sep, rest = text.partition(":")
    values: dict[str, float] = {}
    try:
        for part in rest.split(","):
            key, _, value = part.partition("=")
            if key.strip() not in ("ttft", "tbt"):
                raise ValueError(part)
            values[key.strip()] = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected TYPE:ttft=SECONDS,tbt=SECONDS (e.g. LC:tbt=0.06)"
        ) from exc
    if not sep or not name or not values or any(v <= 0 for v in values.values()):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected TYPE:ttft=SECONDS,tbt=SECONDS with positive seconds"
        )
    return name, (values.get("ttft"), values.get("tbt"))


def build_parser(prog: str = "wattplan profiles calibrate") -> argparse.ArgumentParser:
    """Argument parser of the calibration command."""
    repo_data = Path(__file__).resolve().parents[1] / "data"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Fit the v1 profile model to the bundled public datasets and write the default "
            "profile table (deterministic; prints a JSON summary with the fit errors)."
        ),
    )
    parser.add_argument(
        "--data-dir", type=Path, default=repo_data, help="bundled datasets (default: data/)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=repo_data / "profiles" / f"{VERSION}.csv",
        help=f"CSV to write (default: data/profiles/{VERSION}.csv)",
    )
    parser.add_argument(
        "--slo-multiplier",
        type=float,
        default=SLO_MULTIPLIER,
        help="SLO = this x the type's latency alone on the largest config (default 5)",
    )
    parser.add_argument(
        "--slo",
        type=_parse_override,
        action="append",
        default=[],
        metavar="TYPE:ttft=S,tbt=S",
        help="absolute SLO override per request type (repeatable; default LC:tbt=0.03)",
    )
    parser.add_argument(
        "--no-long-context", action="store_true", help="leave out the long-context class LC"
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "wattplan profiles calibrate") -> int:
    """Regenerate the default profile table and print a JSON summary with the fit errors.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).
        prog: Program name shown in ``--help``.

    Returns:
        Process exit status (0 on success, 2 on bad input data).
    """
    args = build_parser(prog).parse_args(argv)
    overrides: dict[str, tuple[float | None, float | None]] = {
        LONG_CONTEXT_TYPE: (None, LC_TBT_SLO_S)
    }
    overrides.update(dict(args.slo))
    policy = SloPolicy(args.slo_multiplier, overrides)
    try:
        print("calibrating the v1 model to the bundled data ...", file=sys.stderr)
        calibration = calibrate(args.data_dir)
        print("evaluating profiles ...", file=sys.stderr)
        records = build_default_records(
            args.data_dir, calibration, policy, long_context=not args.no_long_context
        )
    except InputDataError as exc:
        print(f"wattplan: error: {exc}", file=sys.stderr)
        return 2
    write_profiles_csv(records, args.out)
    profiles = [r.profile for r in records]
    summary = {
        "out": str(args.out),
        "version": VERSION,
        "rows": len(records),
        "configs": len({p.config for p in profiles}),
        "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
        "rows_by_model_gpu": _count_by(profiles),
        "fit": [c.as_dict() for c in calibration.comparisons],
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


def _count_by(profiles: Sequence) -> dict[str, int]:  # type: ignore[type-arg]
    counts: dict[str, int] = {}
    for p in profiles:
        key = f"{p.config.model}/{p.config.gpu_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


if __name__ == "__main__":
    raise SystemExit(main())

"""Build the default profile table (v0) from the bundled public datasets.

Run ``python -m profiles.calibrate`` to regenerate ``data/profiles/v0.csv``; the output is
byte-identical on every run. Assumptions, parameters and their sources are listed in
``docs/profiles.md``; the constants below carry the same names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from profiles.model import (
    GIB,
    MIB,
    DecodePowerCurve,
    LatencyCurves,
    TransformerShape,
    build_latency_curves,
    choose_operating_point,
    kv_capacity_tokens,
    power_at_capacity_per_gpu_w,
    representative_lengths,
    tp_power_ratio,
)
from profiles.sources import read_azure_requests, read_mlenergy_v3_power, read_splitwise_perf
from profiles.table import write_profiles_csv
from wattplan.domain import REQUEST_TYPES, Profile, RequestTypeBins, ServingConfig
from wattplan.errors import InputDataError

__all__ = ["build_default_profiles", "main", "write_profiles_csv"]

VERSION = "v0"
MODEL = "llama2-70b"
GPU_TYPE = "H100-80GB"
TP_DEGREES = (2, 4, 8)

#: SplitwiseSim hardware name -> per-GPU power cap (W). ``h100-80gb`` is the uncapped
#: H100 SXM (700 W TDP); ``h100-80gb-pcap`` is the DGX H100 capped at 70% (7,140 of
#: 10,200 W), i.e. 490 W per GPU.
HARDWARE_POWER_CAP_W = {"h100-80gb": 700, "h100-80gb-pcap": 490}
REFERENCE_HARDWARE = "h100-80gb"

#: DynamoLLM: SLO = 5x the latency of the type running alone on the largest config.
SLO_MULTIPLIER = 5.0

#: Percentile the latency SLOs apply to (P99): prefill-group sizes are taken at this
#: Poisson quantile and at most 1% of arrivals may find every batch slot busy (Erlang C).
LATENCY_QUANTILE = 0.99

#: Llama-2-70B architecture (Hugging Face ``meta-llama/Llama-2-70b-hf`` config.json),
#: fp16 weights and KV cache.
LLAMA2_70B = TransformerShape(
    layers=80,
    hidden_size=8192,
    intermediate_size=28672,
    attention_heads=64,
    kv_heads=8,
    vocab_size=32000,
    bytes_per_value=2,
)
#: H100 80GB HBM3 memory as nvidia-smi reports it (81,559 MiB).
H100_MEMORY_BYTES = 81559 * MIB
#: vLLM's default ``gpu_memory_utilization``.
GPU_MEMORY_UTILIZATION = 0.9
#: Activations, CUDA graphs and NCCL buffers per GPU (default assumption).
RESERVE_BYTES_PER_GPU = 2 * GIB

#: ML.ENERGY v3 file whose H100 TP4 power-vs-batch curve stands in for Llama-2-70B.
POWER_CURVE_FILE = "meta-llama__Llama-3.1-70B-Instruct__lm-arena-chat"
POWER_CURVE_TP = 4
#: ML.ENERGY v3 files with the same model measured on H100 at TP1 and TP2.
TP_RATIO_FILES = ("Qwen__Qwen3-32B__lm-arena-chat", "google__gemma-3-27b-it__lm-arena-chat")
MLENERGY_GPU = "H100"
#: Loaded-idle power per H100 (model in memory, engine waiting, P0); default, see docs.
IDLE_POWER_PER_GPU_W = 120.0

SOURCE = (
    "splitwise-sim perf_model.csv ({hardware} tp{tp}); azure-llm-inference-2023 code+conv "
    "medians; ml.energy v3 Llama-3.1-70B H100 power; v0 model (docs/profiles.md)"
)


def _kv_tokens(tp: int) -> int:
    return kv_capacity_tokens(
        LLAMA2_70B, tp, H100_MEMORY_BYTES, GPU_MEMORY_UTILIZATION, RESERVE_BYTES_PER_GPU
    )


def _decode_power_curve(data_dir: Path) -> DecodePowerCurve:
    points = sorted(
        (p.avg_batch_size, p.power_per_gpu_w)
        for p in read_mlenergy_v3_power(data_dir, POWER_CURVE_FILE)
        if p.gpu_model == MLENERGY_GPU and p.tp == POWER_CURVE_TP and p.num_gpus == p.tp
    )
    if not points:
        raise InputDataError(f"{POWER_CURVE_FILE}: no {MLENERGY_GPU} TP{POWER_CURVE_TP} point")
    pairs = [p for name in TP_RATIO_FILES for p in read_mlenergy_v3_power(data_dir, name)]
    return DecodePowerCurve(
        points=tuple(points),
        reference_tp=POWER_CURVE_TP,
        tp_doubling_ratio=tp_power_ratio(pairs, MLENERGY_GPU),
        idle_power_per_gpu_w=IDLE_POWER_PER_GPU_W,
    )


def build_default_profiles(data_dir: Path) -> list[Profile]:
    """Derive the v0 profile table for Llama-2-70B on H100-80GB from bundled data.

    One profile per (TP in 2/4/8, power cap 700/490 W, request type), ordered by power
    cap (uncapped first), TP, then ``REQUEST_TYPES`` order. Pure apart from reading the
    bundled files under ``data_dir``.

    Args:
        data_dir: The repository's ``data/`` folder (bundled datasets).

    Returns:
        54 profiles, every float rounded (capacity to 1e-6 req/s, power to 0.1 W,
        latencies to 0.1 ms) so that a CSV round trip is exact.

    Raises:
        InputDataError: A bundled file is missing or malformed, or a config cannot meet
            a type's SLO at any batch size.
    """
    rows = read_splitwise_perf(data_dir, MODEL)
    lengths = representative_lengths(read_azure_requests(data_dir), RequestTypeBins())
    decode_power = _decode_power_curve(data_dir)
    curves: dict[tuple[str, int], LatencyCurves] = {
        (hardware, tp): build_latency_curves(rows, hardware, tp, _kv_tokens(tp))
        for hardware in HARDWARE_POWER_CAP_W
        for tp in TP_DEGREES
    }
    largest = curves[(REFERENCE_HARDWARE, max(TP_DEGREES))]
    tbt_slo_s = SLO_MULTIPLIER * largest.decode_s(1)

    profiles: list[Profile] = []
    for hardware, cap_w in HARDWARE_POWER_CAP_W.items():
        for tp in TP_DEGREES:
            config = ServingConfig(MODEL, GPU_TYPE, tp, cap_w)
            for request_type in REQUEST_TYPES:
                prompt_tokens, output_tokens = lengths[request_type]
                ttft_slo_s = SLO_MULTIPLIER * largest.prefill_s(prompt_tokens)
                point = choose_operating_point(
                    curves[(hardware, tp)],
                    prompt_tokens,
                    output_tokens,
                    ttft_slo_s,
                    tbt_slo_s,
                    _kv_tokens(tp),
                    LATENCY_QUANTILE,
                )
                if point is None:
                    raise InputDataError(f"{config.key} cannot meet the {request_type} SLO")
                power_w = tp * power_at_capacity_per_gpu_w(point, decode_power, tp, cap_w)
                profiles.append(
                    Profile(
                        config=config,
                        request_type=request_type,
                        capacity_rps=round(point.capacity_rps, 6),
                        idle_power_w=round(tp * IDLE_POWER_PER_GPU_W, 1),
                        power_at_capacity_w=round(power_w, 1),
                        ttft_p99_s=round(point.ttft_s, 4),
                        tbt_p99_s=round(point.tbt_s, 4),
                        ttft_slo_s=round(ttft_slo_s, 4),
                        tbt_slo_s=round(tbt_slo_s, 4),
                        version=VERSION,
                        source=SOURCE.format(hardware=hardware, tp=tp),
                    )
                )
    return profiles


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the default profile table and print a short JSON summary.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        Process exit status (0 on success).
    """
    repo_data = Path(__file__).resolve().parents[1] / "data"
    parser = argparse.ArgumentParser(
        prog="python -m profiles.calibrate",
        description="Build the v0 default profile table from the bundled public datasets.",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=repo_data, help="bundled datasets (default: data/)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=repo_data / "profiles" / f"{VERSION}.csv",
        help="CSV to write (default: data/profiles/v0.csv)",
    )
    args = parser.parse_args(argv)
    profiles = build_default_profiles(args.data_dir)
    write_profiles_csv(profiles, args.out)
    summary = {
        "out": str(args.out),
        "version": VERSION,
        "rows": len(profiles),
        "configs": len({p.config for p in profiles}),
        "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
        "capacity_rps_range": [
            min(p.capacity_rps for p in profiles),
            max(p.capacity_rps for p in profiles),
        ],
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

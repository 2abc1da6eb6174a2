"""Public specifications the profile model starts from: GPUs and model architectures.

Every number here is a datasheet or ``config.json`` value (sources in ``docs/profiles.md``),
except ``loaded_idle_w``, which no bundled dataset measures (see the docs for its basis).
"""

from __future__ import annotations

from dataclasses import dataclass

from profiles.model import MIB, TransformerShape


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type as the latency and power model sees it.

    Attributes:
        name: wattplan's GPU type name (``ServingConfig.gpu_type``).
        peak_flops: Dense BF16 tensor-core FLOP/s at the maximum SM clock.
        memory_bandwidth_bps: HBM bandwidth, bytes per second.
        nvlink_bps: NVLink bandwidth per GPU and direction, bytes per second.
        memory_bytes: Memory as ``nvidia-smi`` reports it.
        tdp_w: Board power limit by default (W); written as ``power_cap_w``.
        max_clock_mhz: Highest SM clock (the unlocked boost clock).
        clocks_mhz: Locked SM clocks the default profile set covers, ascending, ending at
            ``max_clock_mhz``.
        loaded_idle_w: Power of one GPU with a model loaded and no request (P0 state).
    """

    name: str
    peak_flops: float
    memory_bandwidth_bps: float
    nvlink_bps: float
    memory_bytes: float
    tdp_w: int
    max_clock_mhz: int
    clocks_mhz: tuple[int, ...]
    loaded_idle_w: float


#: H100 SXM5 80 GB: 989.4 dense BF16 TFLOP/s, 3.35 TB/s HBM3, NVLink 4 (900 GB/s both
#: directions), 700 W, 1,980 MHz boost; clocks 800-1,800 MHz in 200 MHz steps plus max.
H100 = GpuSpec(
    name="H100-80GB",
    peak_flops=989.4e12,
    memory_bandwidth_bps=3.35e12,
    nvlink_bps=450e9,
    memory_bytes=81559 * MIB,
    tdp_w=700,
    max_clock_mhz=1980,
    clocks_mhz=(800, 1000, 1200, 1400, 1600, 1800, 1980),
    loaded_idle_w=120.0,
)

#: A100 SXM4 80 GB: 312 dense BF16 TFLOP/s, 2,039 GB/s HBM2e, NVLink 3 (600 GB/s both
#: directions), 400 W, 1,410 MHz boost; clocks over the range Perseus measured (855-1,410).
A100 = GpuSpec(
    name="A100-80GB",
    peak_flops=312e12,
    memory_bandwidth_bps=2.039e12,
    nvlink_bps=300e9,
    memory_bytes=81920 * MIB,
    tdp_w=400,
    max_clock_mhz=1410,
    clocks_mhz=(855, 1005, 1155, 1305, 1410),
    loaded_idle_w=400 * 120.0 / 700,
)

GPUS: dict[str, GpuSpec] = {gpu.name: gpu for gpu in (H100, A100)}

#: Llama-2-70B (Hugging Face ``meta-llama/Llama-2-70b-hf`` config.json), fp16. Named as in
#: SplitwiseSim, whose measurements calibrate the latency model.
LLAMA2_70B = TransformerShape(
    layers=80,
    hidden_size=8192,
    intermediate_size=28672,
    attention_heads=64,
    kv_heads=8,
    vocab_size=32000,
    bytes_per_value=2,
)

#: Llama-3.1-8B (``meta-llama/Llama-3.1-8B`` config.json), bf16: 128 KiB of KV per token.
LLAMA31_8B = TransformerShape(
    layers=32,
    hidden_size=4096,
    intermediate_size=14336,
    attention_heads=32,
    kv_heads=8,
    vocab_size=128256,
    bytes_per_value=2,
)

MODELS: dict[str, TransformerShape] = {"llama2-70b": LLAMA2_70B, "llama3.1-8b": LLAMA31_8B}

#: SplitwiseSim hardware name -> wattplan GPU type (the uncapped rows).
SPLITWISE_HARDWARE = {"h100-80gb": "H100-80GB", "a100-80gb": "A100-80GB"}

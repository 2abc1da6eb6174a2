"""Synthetic but physically shaped profiles and planning instances for benchmarks and tests.

The calibrated profile set comes from the profiles work; until then (and for instances far
larger than any calibrated set) this parametric model produces :class:`Profile` values with
the shapes the planner must handle. The model (docs/optimizer.md, "Synthetic profiles"):

* prefill is compute-bound: ``T_pre = 2 P n_in / (G F mfu s)`` with ``G`` the instance's
  GPUs, ``F`` the GPU's dense BF16 FLOP/s, ``s = clock / max clock``;
* a decode iteration reads the weights and the batch's KV cache:
  ``t_iter(B) = (W / tp + B c k / (tp kvp)) / (BW (0.8 + 0.2 s) eff) + B 2P / (G F mfu_d s)``;
  the batch ``B`` is the largest with ``t_iter <= TBT SLO`` whose KV cache fits in memory;
* capacity (rps) is ``1 / (T_pre + n_out t_iter / B)``, reduced until an M/D/1 estimate of
  TTFT meets the TTFT SLO; SLOs are 5x the isolated latency on the largest configuration at
  the top clock (DynamoLLM's rule), at least 250 ms TTFT and 40 ms TBT (30 ms long-context);
* power per GPU at load fraction ``u`` is ``idle + (TDP - idle) (0.55 + 0.45 phi) d(s) u^0.7``
  with ``phi`` the prefill share of busy time and ``d(s) = 0.3 + 0.7 s^2.5`` (dynamic power
  grows superlinearly with clock): concave in load, as measured curves are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from optimizer.inputs import (
    PLANNED_TYPES,
    ObjectiveWeights,
    PlanInputs,
    PowerDomain,
    Reconfiguration,
    SolverOptions,
)
from wattplan.domain import LONG_CONTEXT_TYPE, Layout, LayoutItem, Profile, ServingConfig

VERSION = "synthetic-v1"
SOURCE = "optimizer.synthetic parametric model (docs/optimizer.md)"


@dataclass(frozen=True)
class GpuSpec:
    """What the parametric model needs to know about a GPU type."""

    name: str
    flops: float  # dense BF16 FLOP/s
    bandwidth_bps: float  # HBM bytes/s
    memory_bytes: float
    tdp_w: float
    idle_w: float  # loaded idle (weights in memory, no requests)
    clocks_mhz: tuple[int, ...]  # lowest first; the last is the maximum


@dataclass(frozen=True)
class ModelSpec:
    """Size of an LLM: parameters and KV-cache bytes per token."""

    name: str
    params: float
    kv_bytes_per_token: float


GPUS = {
    "H100-80GB": GpuSpec(
        "H100-80GB", 989e12, 3.35e12, 80e9, 700.0, 100.0, (1080, 1230, 1380, 1530, 1680, 1830, 1980)
    ),
    "A100-80GB": GpuSpec(
        "A100-80GB", 312e12, 2.0e12, 80e9, 400.0, 60.0, (780, 885, 990, 1095, 1200, 1305, 1410)
    ),
}
MODELS = {
    # Llama-2-70B: 80 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes
    "llama2-70b": ModelSpec("llama2-70b", 70e9, 2 * 80 * 8 * 128 * 2),
    # Llama-3-8B: 32 layers x 8 KV heads x 128 dims x 2 x 2 bytes = 128 KiB (DOMAIN.md)
    "llama3-8b": ModelSpec("llama3-8b", 8e9, 2 * 32 * 8 * 128 * 2),
}
#: Representative (input, output) tokens per class: DynamoLLM's bins' typical members.
_INPUT = {"S": 128, "M": 512, "L": 2048}
_OUTPUT = {"S": 50, "M": 200, "L": 600}
_LONG_CONTEXT_TOKENS = (32768, 256)
_LOAD_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def tokens(request_type: str) -> tuple[int, int]:
    """Representative (input, output) tokens of a request type."""
    if request_type == LONG_CONTEXT_TYPE:
        return _LONG_CONTEXT_TOKENS
    return _INPUT[request_type[0]], _OUTPUT[request_type[1]]


def _prefill_s(m: ModelSpec, g: GpuSpec, gpus: int, tp: int, s: float, n_in: int) -> float:
    mfu = 0.55 / (1 + 0.08 * math.log2(tp))
    return 2 * m.params * n_in / (gpus * g.flops * mfu * s)


def _iteration_s(
    m: ModelSpec, g: GpuSpec, cfg: ServingConfig, s: float, batch: float, context: float
) -> float:
    eff = 0.75 / (1 + 0.05 * math.log2(cfg.tp))
    bandwidth = g.bandwidth_bps * (0.8 + 0.2 * s) * eff
    read = 2 * m.params / cfg.tp + batch * context * m.kv_bytes_per_token / (cfg.tp * cfg.kvp)
    compute = batch * 2 * m.params / (cfg.gpus * g.flops * 0.35 * s)
    return read / bandwidth + compute


def slos(
    m: ModelSpec, g: GpuSpec, request_type: str, largest: ServingConfig
) -> tuple[float, float]:
    """(TTFT, TBT) SLOs: 5x the isolated latency on the largest config at the top clock."""
    n_in, n_out = tokens(request_type)
    ttft = _prefill_s(m, g, largest.gpus, largest.tp, 1.0, n_in)
    tbt = _iteration_s(m, g, largest, 1.0, 1, n_in + n_out / 2)
    floor = 0.030 if request_type == LONG_CONTEXT_TYPE else 0.040
    return max(5 * ttft, 0.25), max(5 * tbt, floor)


def synthetic_profile(
    model: str, config: ServingConfig, request_type: str, slo: tuple[float, float]
) -> Profile | None:
    """One profile from the parametric model; ``None`` where the config cannot meet the SLO.

    Args:
        model: A key of :data:`MODELS`.
        config: The serving config (its GPU type a key of :data:`GPUS`).
        request_type: One of the planned request types.
        slo: (TTFT, TBT) SLOs in seconds.
    """
    m, g = MODELS[model], GPUS[config.gpu_type]
    clock = config.clock_mhz or g.clocks_mhz[-1]
    s = clock / g.clocks_mhz[-1]
    n_in, n_out = tokens(request_type)
    ttft_slo, tbt_slo = slo
    free = config.gpus * 0.9 * g.memory_bytes - 2 * m.params * config.kvp
    if free <= 0:
        return None
    context = n_in + n_out / 2
    batch_mem = math.floor(free / ((n_in + n_out) * m.kv_bytes_per_token))
    lo, hi = 0, min(batch_mem, 512)
    while lo < hi:  # largest batch whose iteration meets the TBT SLO
        mid = (lo + hi + 1) // 2
        if _iteration_s(m, g, config, s, mid, context) <= tbt_slo:
            lo = mid
        else:
            hi = mid - 1
    batch = lo
    if batch < 1:
        return None
    t_pre = _prefill_s(m, g, config.gpus, config.tp, s, n_in)
    t_iter = _iteration_s(m, g, config, s, batch, context)
    capacity = 1 / (t_pre + n_out * t_iter / batch)

    def ttft(rate: float) -> float:
        rho = min(rate * t_pre, 0.999)
        return t_pre + rho * t_pre / (2 * (1 - rho)) + t_iter

    if ttft(0.0) > ttft_slo:
        return None
    while ttft(capacity) > ttft_slo:
        capacity *= 0.97
    capacity = round(capacity, 6)
    phi = min(capacity * t_pre, 1.0)
    dynamic = (g.tdp_w - g.idle_w) * (0.55 + 0.45 * phi) * (0.3 + 0.7 * s**2.5)
    curve = tuple(
        (round(u * capacity, 6), round(config.gpus * (g.idle_w + dynamic * u**0.7), 3))
        for u in _LOAD_POINTS
    )
    return Profile(
        config=config,
        request_type=request_type,
        capacity_rps=curve[-1][0],
        power_curve=curve,
        ttft_p99_s=round(ttft(capacity), 4),
        tbt_p99_s=round(t_iter, 4),
        ttft_slo_s=round(ttft_slo, 4),
        tbt_slo_s=round(tbt_slo, 4),
        version=VERSION,
        source=SOURCE,
    )


def synthetic_profiles(
    models: tuple[str, ...],
    gpu_types: tuple[str, ...],
    tps: tuple[int, ...] = (1, 2, 4, 8),
    request_types: tuple[str, ...] = PLANNED_TYPES,
    clocks: int = 7,
    gangs: tuple[tuple[int, int], ...] = ((1, 1), (2, 2)),
) -> tuple[Profile, ...]:
    """Profiles for every feasible (model, GPU type, TP, clock, request type).

    Args:
        models: Keys of :data:`MODELS`.
        gpu_types: Keys of :data:`GPUS`.
        tps: Tensor-parallel degrees.
        request_types: Types to profile; the long-context type gets gang shapes.
        clocks: How many of the GPU's locked clocks, highest first.
        gangs: (SPP, KVP) shapes for the long-context type.
    """
    out: list[Profile] = []
    for model in models:
        for gpu_type in gpu_types:
            g = GPUS[gpu_type]
            for rtype in request_types:
                shapes = gangs if rtype == LONG_CONTEXT_TYPE else ((1, 1),)
                largest = ServingConfig(model, gpu_type, max(tps), int(g.tdp_w), None, *max(shapes))
                slo = slos(MODELS[model], g, rtype, largest)
                for tp in tps:
                    for spp, kvp in shapes:
                        for clock in g.clocks_mhz[-clocks:]:
                            cfg = ServingConfig(model, gpu_type, tp, int(g.tdp_w), clock, spp, kvp)
                            p = synthetic_profile(model, cfg, rtype, slo)
                            if p is not None:
                                out.append(p)
    return tuple(out)


def _best_gpus_per_rps(profiles: tuple[Profile, ...]) -> dict[tuple[str, str], float]:
    best: dict[tuple[str, str], float] = {}
    for p in profiles:
        key = (p.config.model, p.request_type)
        best[key] = min(best.get(key, math.inf), p.config.gpus / p.capacity_rps)
    return best


#: Relative popularity of each type (conversation-like services favour short inputs).
_TYPE_WEIGHT = {
    "SS": 3.0, "SM": 4.0, "SL": 1.0, "MS": 3.0, "MM": 3.0, "ML": 0.8,
    "LS": 1.5, "LM": 1.0, "LL": 0.4, LONG_CONTEXT_TYPE: 0.15,
}  # fmt: skip


def _demand(
    rng: np.random.Generator,
    services: dict[str, str],
    types: tuple[str, ...],
    profiles: tuple[Profile, ...],
    gpus_target: float,
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """Peak and mean demand per pool, scaled so the peak needs about ``gpus_target`` GPUs."""
    best = _best_gpus_per_rps(profiles)
    raw: dict[tuple[str, str], float] = {}
    for service, model in services.items():
        weights = rng.dirichlet([_TYPE_WEIGHT[t] * 2 for t in types])
        size = rng.lognormal(0.0, 0.5)
        for t, w in zip(types, weights, strict=True):
            if (model, t) in best:
                raw[(service, t)] = float(size * w)
    need = sum(rate * best[(services[s], t)] for (s, t), rate in raw.items())
    scale = gpus_target / need
    peak = {k: round(v * scale, 4) for k, v in raw.items()}
    mean = {k: round(v * float(rng.uniform(0.55, 0.8)), 4) for k, v in peak.items()}
    return peak, mean


def _previous_layout(
    rng: np.random.Generator,
    services: dict[str, str],
    peak: dict[tuple[str, str], float],
    profiles: tuple[Profile, ...],
) -> Layout:
    """A plausible applied layout: last window's load (+-25%) on one fixed shape per pool."""
    by_pool: dict[tuple[str, str], list[Profile]] = {}
    for p in profiles:
        by_pool.setdefault((p.config.model, p.request_type), []).append(p)
    items = []
    for (service, rtype), rate in sorted(peak.items()):
        options = [p for p in by_pool[(services[service], rtype)] if p.config.clock_mhz is not None]
        top = max(p.config.clock_mhz or 0 for p in options)
        options = sorted(
            (p for p in options if p.config.clock_mhz == top), key=lambda p: p.config.key
        )
        choice = options[int(rng.integers(len(options)))]
        last = rate * float(rng.uniform(0.75, 1.25))
        n = math.ceil(last / choice.capacity_rps)
        if n:
            items.append(LayoutItem(service, rtype, choice.config, n, last))
    return Layout(tuple(items))


def dynamollm_instance(seed: int = 0, clock_mode: str = "envelope") -> PlanInputs:
    """DynamoLLM's size: 1 model, 9 pools, TP {2,4,8}, 7 clocks, 1 GPU type, 320 GPUs.

    The peak needs about 230 of the 320 GPUs; the applied layout is last window's (load
    within +-25%) on one shape per pool, so reconfiguration terms are active.
    """
    rng = np.random.default_rng(seed)
    from wattplan.domain import REQUEST_TYPES

    profiles = synthetic_profiles(("llama2-70b",), ("H100-80GB",), (2, 4, 8), REQUEST_TYPES)
    services = {"chat": "llama2-70b"}
    peak, mean = _demand(rng, services, REQUEST_TYPES, profiles, 200.0)
    return PlanInputs(
        window_s=1800,
        demand_rps=peak,
        mean_rps=mean,
        service_models=services,
        profiles=profiles,
        gpu_inventory={"H100-80GB": 320},
        current=_previous_layout(rng, services, peak, profiles),
        carbon_g_per_kwh=250.0,
        electricity_usd_per_mwh=80.0,
        gpu_usd_per_hour={"H100-80GB": 2.5},
        weights=ObjectiveWeights(energy_kwh=1.0),
        solver=SolverOptions(time_limit_s=10.0, mip_gap=1e-4, clock_mode=clock_mode),
    )


def fleet_instance(
    seed: int = 0,
    clock_mode: str = "envelope",
    time_limit_s: float = 10.0,
    hull_tolerance: float = 0.01,
) -> PlanInputs:
    """The fleet: 20 models, 10 pools, TP {1,2,4,8}, 7 clocks, 2 GPU types, 10,000 GPUs.

    Ten 70B-class and ten 8B-class services; 5,000 H100s in rows A and B, 5,000 A100s in
    rows C and D, each row's budget 72% of its GPUs' TDP (the peak plan must fit it);
    demand sized to need about 5,000 GPUs at the best GPUs-per-rps; the applied layout is
    last window's on one shape per pool (reconfiguration terms active).
    """
    rng = np.random.default_rng(seed)
    models = ("llama2-70b", "llama3-8b")
    gpu_types = ("H100-80GB", "A100-80GB")
    profiles = synthetic_profiles(models, gpu_types)
    services = {f"svc{i:02d}": models[i % 2] for i in range(20)}
    peak, mean = _demand(rng, services, PLANNED_TYPES, profiles, 5000.0)
    domains = tuple(
        PowerDomain(
            f"row-{name}",
            round(0.72 * 2500 * GPUS[gpu].tdp_w),
            {gpu: 2500, other: 0},
        )
        for name, gpu, other in (
            ("a", "H100-80GB", "A100-80GB"),
            ("b", "H100-80GB", "A100-80GB"),
            ("c", "A100-80GB", "H100-80GB"),
            ("d", "A100-80GB", "H100-80GB"),
        )
    )
    return PlanInputs(
        window_s=1800,
        demand_rps=peak,
        mean_rps=mean,
        service_models=services,
        profiles=profiles,
        gpu_inventory={"H100-80GB": 5000, "A100-80GB": 5000},
        current=_previous_layout(rng, services, peak, profiles),
        carbon_g_per_kwh=250.0,
        electricity_usd_per_mwh=80.0,
        gpu_usd_per_hour={"H100-80GB": 2.5, "A100-80GB": 1.3},
        reconfiguration=Reconfiguration(),
        power_domains=domains,
        weights=ObjectiveWeights(energy_kwh=1.0),
        solver=SolverOptions(
            time_limit_s=time_limit_s,
            mip_gap=0.01,
            clock_mode=clock_mode,
            hull_tolerance=hull_tolerance,
        ),
    )

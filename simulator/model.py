"""The instance model the simulator shares between its two modes: profiles as arrays.

An instance of serving config ``c`` running request type ``t`` is described only by its
:class:`~wattplan.domain.Profile` (through the fields of the profile contract): the SLO
capacity, the P99 (and, when the profile has them, P50) TTFT and TBT at that capacity, the
SLOs, and the power curve. How latency moves with load is the model's choice, written out
here and in ``docs/simulator.md``:

- An instance's *utilisation* ``u`` is the sum over the types it serves of rate / SLO
  capacity (1.0 = at capacity); a pool routes requests to its instances in proportion to
  their capacity, so all instances of a pool share one utilisation.
- Below capacity, latency percentiles grow linearly with ``u`` from ``zero_load_share`` of
  their value at capacity (``u = 0``) to the profile's value (``u = 1``).
- Past capacity the P99 rises linearly from the profile's value at ``u = 1`` through
  ``(1 + overload_margin) x SLO`` at ``u = 1 + overload_margin``, so the SLO is crossed
  just past the capacity, as the profile's definition of capacity says.
- An instance's throughput saturates at ``saturation`` x its SLO capacity (bigger
  batches, latency far past the SLO); work beyond that waits in a FIFO backlog (fluid,
  per pool) and the wait adds to TTFT.
- Latency of one request is log-normal through the P50 and P99 at its utilisation
  (``p50_share x P99`` when the profile has no P50).
- Power is the profile's power curve at the instance's rate, clamped to the capacity.

No I/O, no clock; NumPy arrays in and out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import ndtr, ndtri

from wattplan.domain import REQUEST_TYPES, Profile, ServingConfig
from wattplan.errors import InputDataError

#: Pool name of a pool that serves every request type of its service (SinglePool).
POOL_ALL = "*"
#: z-score of the 99th percentile of a standard normal.
Z99 = float(ndtri(0.99))


@dataclass(frozen=True)
class LatencyModel:
    """Constants of the load -> latency model (module docstring; ``docs/simulator.md``).

    Attributes:
        load_window_s: Length of the buckets over which an instance's load is measured in
            per-request mode (latency follows the load of the last ``load_window_s``).
        load_window_requests: A pool's load is averaged over at least this many of its
            requests (longer windows for quiet pools): the profile's latency at a rate
            already includes the Poisson burstiness of that rate, so the noise of counts
            over a few requests must not count a second time.
        overload_margin: Past capacity, the P99 reaches ``(1 + margin) x SLO`` at
            ``u = 1 + margin`` (and keeps rising at that slope).
        saturation: Utilisation at which an instance's throughput saturates; work beyond
            it queues.
        ttft_zero_load_share: TTFT at zero load as a share of TTFT at capacity.
        tbt_zero_load_share: TBT at zero load as a share of TBT at capacity.
        ttft_p50_share: P50 / P99 of TTFT, used when a profile has no ``ttft_p50_s``.
        tbt_p50_share: P50 / P99 of TBT, used when a profile has no ``tbt_p50_s``.
    """

    load_window_s: float = 60.0
    load_window_requests: float = 200.0
    overload_margin: float = 0.1
    saturation: float = 1.5
    ttft_zero_load_share: float = 0.4
    tbt_zero_load_share: float = 0.8
    ttft_p50_share: float = 0.5
    tbt_p50_share: float = 0.8

    def __post_init__(self) -> None:
        if min(self.load_window_s, self.overload_margin, self.load_window_requests) <= 0:
            raise ValueError("load_window_s, load_window_requests, overload_margin must be > 0")
        if self.saturation < 1.0:
            raise ValueError("saturation must be >= 1 (throughput saturates past capacity)")
        for name in ("ttft_zero_load_share", "tbt_zero_load_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        for name in ("ttft_p50_share", "tbt_p50_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")


@dataclass(frozen=True)
class ReconfigCosts:
    """What a layout change costs (DOMAIN.md section 6 defaults).

    A new instance is made the cheapest way available: a clock or power-cap change of an
    instance of the same shape in the same pool (``clock_change_s``), moving an instance of
    the same config from another pool of the service (free), re-sharding GPUs freed by the
    service on the same GPU type (``reshard_s`` of downtime), or a cold start
    (``startup_s``, started ahead so it is ready when its window begins). For all of these
    the instance's GPUs draw loaded-idle power and serve nothing.
    """

    startup_s: float = 420.0
    reshard_s: float = 90.0
    clock_change_s: float = 0.08

    def __post_init__(self) -> None:
        if min(self.startup_s, self.reshard_s, self.clock_change_s) < 0:
            raise ValueError("reconfiguration times must be >= 0")


FREE_RECONFIGURATION = ReconfigCosts(0.0, 0.0, 0.0)


def shape_of(config: ServingConfig) -> tuple[str, str, int, int, int]:
    """What an instance's GPUs hold regardless of clock and cap: model, GPU, TP, SPP, KVP."""
    return (
        config.model,
        config.gpu_type,
        config.tp,
        getattr(config, "spp", 1),
        getattr(config, "kvp", 1),
    )


def gpus_of(config: ServingConfig) -> int:
    """GPUs one instance of ``config`` holds (tp x spp x kvp)."""
    return config.tp * getattr(config, "spp", 1) * getattr(config, "kvp", 1)


def speed_key(config: ServingConfig) -> tuple[float, float]:
    """Order of clock variants: locked clocks ascending, unlocked (None) fastest; then cap."""
    clock = float("inf") if config.clock_mhz is None else float(config.clock_mhz)
    return (clock, float(config.power_cap_w))


def power_points(profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """The profile's power curve as (rates, watts) arrays.

    Works with the contract's ``power_curve`` and with the older two-point profiles
    (``idle_power_w`` at 0, ``power_at_capacity_w`` at capacity).
    """
    curve: Any = getattr(profile, "power_curve", None)
    if curve:
        rates = np.array([float(r) for r, _ in curve])
        watts = np.array([float(w) for _, w in curve])
    else:
        rates = np.array([0.0, profile.capacity_rps])
        watts = np.array([profile.idle_power_w, profile.power_at_capacity_w])
    return rates, watts


class ProfileTable:
    """Profiles as arrays indexed by (config, request type).

    Attributes:
        configs: Serving configs, in first-seen order.
        types: Request types: the nine DynamoLLM types, then any other type the profiles
            name (e.g. the long-context class), in first-seen order.
        capacity_rps, ttft_p50_s, ttft_p99_s, tbt_p50_s, tbt_p99_s, ttft_slo_s,
        tbt_slo_s: Arrays of shape (configs, types); NaN where no profile exists.
    """

    def __init__(self, profiles: Iterable[Profile], model: LatencyModel | None = None) -> None:
        self.model = model or LatencyModel()
        profiles = list(profiles)
        if not profiles:
            raise InputDataError("no profiles: the simulator needs at least one Profile")
        self.configs: list[ServingConfig] = []
        self.config_index: dict[str, int] = {}
        types = list(REQUEST_TYPES)
        for p in profiles:
            if p.config.key not in self.config_index:
                self.config_index[p.config.key] = len(self.configs)
                self.configs.append(p.config)
            if p.request_type not in types:
                types.append(p.request_type)
        self.types: tuple[str, ...] = tuple(types)
        self.type_index = {t: i for i, t in enumerate(self.types)}
        shape = (len(self.configs), len(self.types))
        nan = np.full(shape, np.nan)
        self.capacity_rps = nan.copy()
        self.ttft_p50_s, self.ttft_p99_s = nan.copy(), nan.copy()
        self.tbt_p50_s, self.tbt_p99_s = nan.copy(), nan.copy()
        self.ttft_slo_s, self.tbt_slo_s = nan.copy(), nan.copy()
        self.idle_power_w = nan.copy()
        self.curves: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.profiles: dict[tuple[int, int], Profile] = {}
        m = self.model
        for p in profiles:
            c, t = self.config_index[p.config.key], self.type_index[p.request_type]
            if (c, t) in self.profiles:
                raise InputDataError(
                    f"two profiles for {p.config.key} {p.request_type}: keep one version"
                )
            if not p.capacity_rps > 0:
                raise InputDataError(f"profile {p.config.key} {p.request_type}: capacity <= 0")
            self.profiles[(c, t)] = p
            self.capacity_rps[c, t] = p.capacity_rps
            ttft50: Any = getattr(p, "ttft_p50_s", None)
            tbt50: Any = getattr(p, "tbt_p50_s", None)
            self.ttft_p99_s[c, t] = p.ttft_p99_s
            self.tbt_p99_s[c, t] = p.tbt_p99_s
            self.ttft_p50_s[c, t] = min(
                p.ttft_p99_s, ttft50 if ttft50 else m.ttft_p50_share * p.ttft_p99_s
            )
            self.tbt_p50_s[c, t] = min(
                p.tbt_p99_s, tbt50 if tbt50 else m.tbt_p50_share * p.tbt_p99_s
            )
            self.ttft_slo_s[c, t] = p.ttft_slo_s
            self.tbt_slo_s[c, t] = p.tbt_slo_s
            rates, watts = power_points(p)
            self.curves[(c, t)] = (rates, watts)
            self.idle_power_w[c, t] = watts[0]
        self.gpus = np.array([gpus_of(c) for c in self.configs])
        # Loaded-idle power of an instance: the same for every type it may serve (the
        # profiles agree up to calibration noise); the mean over its profiles.
        self.config_idle_w = np.nanmean(self.idle_power_w, axis=1)
        by_shape: dict[tuple[str, str, int, int, int], list[int]] = {}
        for i, config in enumerate(self.configs):
            by_shape.setdefault(shape_of(config), []).append(i)
        self._variants = {
            i: sorted(members, key=lambda j: speed_key(self.configs[j]))
            for members in by_shape.values()
            for i in members
        }

    # --- lookups ----------------------------------------------------------------------------

    def config(self, key: str) -> int:
        """Index of a config key.

        Raises:
            InputDataError: no profile names this config.
        """
        try:
            return self.config_index[key]
        except KeyError:
            raise InputDataError(
                f"layout uses config {key!r}, which no profile describes; use a config of "
                "the profile set"
            ) from None

    def type(self, request_type: str) -> int:
        """Index of a request type.

        Raises:
            InputDataError: no profile names this type.
        """
        try:
            return self.type_index[request_type]
        except KeyError:
            raise InputDataError(f"request type {request_type!r} is not profiled") from None

    def require(self, config: int, request_type: int) -> None:
        """Raise :class:`InputDataError` when (config, type) has no profile."""
        if np.isnan(self.capacity_rps[config, request_type]):
            raise InputDataError(
                f"config {self.configs[config].key} has no profile for request type "
                f"{self.types[request_type]}: a layout may only route a type to a config "
                "profiled for it"
            )

    def configs_for(self, model: str, gpu_types: Sequence[str] | None = None) -> list[int]:
        """Indices of the configs of a model (optionally on given GPU types)."""
        return [
            i
            for i, c in enumerate(self.configs)
            if c.model == model and (gpu_types is None or c.gpu_type in gpu_types)
        ]

    def variants(self, config: int) -> list[int]:
        """Configs of the same shape (clock/cap variants), slowest first."""
        return self._variants[config]

    def govern(
        self, config: np.ndarray, request_type: np.ndarray, utilisation: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The instance-level clock governor (DynamoLLM's 5-second loop).

        For instances planned at ``config`` running at ``utilisation`` (of ``config``'s
        capacity for ``request_type``), pick, among the clock/cap variants of the same
        shape whose capacity carries that load, the one drawing the least power at it (the
        slowest clock where power grows with the clock, as DynamoLLM's rule assumes; the
        profiles decide), else the variant with the most capacity. ``request_type`` -1
        (mixed pools) keeps the planned config.

        Returns:
            (variant config index, utilisation of the variant) broadcast to the inputs.
        """
        config, request_type, utilisation = np.broadcast_arrays(
            np.asarray(config), np.asarray(request_type), np.asarray(utilisation, dtype=float)
        )
        variant = config.astype(np.int64).copy()
        ratio = np.ones(utilisation.shape)
        pairs = np.unique(np.stack([config.ravel(), request_type.ravel()], axis=1), axis=0)
        for c, t in pairs:
            if t < 0 or np.isnan(self.capacity_rps[c, t]):
                continue
            sel = (config == c) & (request_type == t)
            need = utilisation[sel] * self.capacity_rps[c, t]
            options = [v for v in self.variants(int(c)) if not np.isnan(self.capacity_rps[v, t])]
            best = max(options, key=lambda v: self.capacity_rps[v, t])
            chosen = np.full(need.shape, best, dtype=np.int64)
            watts = np.full(need.shape, np.inf)
            for v in options:  # slowest first: ties keep the slower variant
                ok = self.capacity_rps[v, t] >= need
                power = self.power_w(v, int(t), need)
                better = ok & (power < watts)
                chosen = np.where(better, v, chosen)
                watts = np.where(better, power, watts)
            variant[sel] = chosen
            ratio[sel] = self.capacity_rps[c, t] / self.capacity_rps[chosen, t]
        return variant, utilisation * ratio

    def boost(self, config: int, request_type: int) -> float:
        """Most capacity a governed instance reaches, relative to its planned config."""
        if request_type < 0 or np.isnan(self.capacity_rps[config, request_type]):
            return 1.0
        caps = [self.capacity_rps[v, request_type] for v in self.variants(config)]
        best = max(c for c in caps if not np.isnan(c))
        return float(best / self.capacity_rps[config, request_type])

    # --- the model --------------------------------------------------------------------------

    def power_w(self, config: int, request_type: int, rate_rps: np.ndarray) -> np.ndarray:
        """Instance power at per-instance rates, on the profile's curve (clamped)."""
        rates, watts = self.curves[(config, request_type)]
        return np.interp(np.clip(rate_rps, 0.0, rates[-1]), rates, watts)

    def latency(
        self,
        config: np.ndarray | int,
        request_type: np.ndarray | int,
        utilisation: np.ndarray,
        metric: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Median and log-normal sigma of TTFT or TBT at a utilisation.

        Args:
            config: Config index (or array of them).
            request_type: Type index (or array of them).
            utilisation: Instance utilisation (1.0 = SLO capacity); values past
                ``saturation`` are treated as that.
            metric: ``"ttft"`` or ``"tbt"``.

        Returns:
            (median seconds, sigma) broadcast to the inputs' shape.
        """
        m = self.model
        if metric == "ttft":
            p50c, p99c = (
                self.ttft_p50_s[config, request_type],
                self.ttft_p99_s[config, request_type],
            )
            slo, zero = self.ttft_slo_s[config, request_type], m.ttft_zero_load_share
        else:
            p50c, p99c = self.tbt_p50_s[config, request_type], self.tbt_p99_s[config, request_type]
            slo, zero = self.tbt_slo_s[config, request_type], m.tbt_zero_load_share
        u = np.clip(utilisation, 0.0, m.saturation)
        below = p99c * (zero + (1.0 - zero) * np.minimum(u, 1.0))
        # Past capacity: linear from the profile's P99 to (1 + margin) x SLO at 1 + margin.
        top = np.maximum((1.0 + m.overload_margin) * slo, p99c)
        above = p99c + (u - 1.0) / m.overload_margin * (top - p99c)
        p99 = np.where(u <= 1.0, below, above)
        ratio = p50c / p99c
        sigma = np.log(1.0 / ratio) / Z99
        return p99 * ratio, sigma


def lognormal_sample(median: np.ndarray, sigma: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``median x exp(sigma x z)`` (z: standard-normal scores)."""
    return median * np.exp(sigma * z)


def lognormal_cdf(x: np.ndarray, median: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """P[L <= x] for a log-normal with the given median and sigma (sigma 0: a step)."""
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log(np.maximum(x, 1e-300) / median) / np.where(sigma > 0, sigma, 1.0)
    step = (x >= median).astype(float)
    return np.where(sigma > 0, ndtr(z), step) * (x > 0)


#: Constants of the 3-D R-sequence (Roberts 2018): a low-discrepancy sequence in the cube.
_PLASTIC = 1.2207440846057596
R3 = (1.0 / _PLASTIC, 1.0 / _PLASTIC**2, 1.0 / _PLASTIC**3)


def quasi_uniform(n: int, dim: int, offset: int = 0) -> np.ndarray:
    """``n`` points of coordinate ``dim`` (0-2) of the R3 sequence, in (0, 1).

    Deterministic and evenly spread: the simulator uses them instead of random draws so
    that the same inputs always give the same outputs and small slices are not noisy.
    """
    index = np.arange(offset, offset + n, dtype=np.float64) + 1.0
    values = np.modf(0.5 + index * R3[dim])[0]
    return np.clip(values, 1e-9, 1 - 1e-9)


def quasi_normal(n: int, dim: int, offset: int = 0) -> np.ndarray:
    """Standard-normal scores of :func:`quasi_uniform` points."""
    return np.asarray(ndtri(quasi_uniform(n, dim, offset)))

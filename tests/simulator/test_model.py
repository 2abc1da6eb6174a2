"""The instance model: latency against load, power curves, the clock governor."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.model import LatencyModel, ProfileTable, quasi_normal, quasi_uniform
from tests.simulator.conftest import config, profile
from wattplan.errors import InputDataError


def test_latency_at_capacity_is_the_profiles_p99(table: ProfileTable) -> None:
    c, t = table.config(config(2).key), table.type("SS")
    med, sigma = table.latency(c, t, np.array([1.0]), "ttft")
    p99 = med * np.exp(sigma * 2.3263478740408408)
    assert p99[0] == pytest.approx(0.2, rel=1e-6)
    med, sigma = table.latency(c, t, np.array([1.0]), "tbt")
    assert (med * np.exp(sigma * 2.3263478740408408))[0] == pytest.approx(0.05, rel=1e-6)


def test_p99_grows_with_load_and_crosses_the_slo_just_past_capacity(table: ProfileTable) -> None:
    c, t = table.config(config(2).key), table.type("SS")
    u = np.linspace(0.0, 1.5, 151)
    med, sigma = table.latency(c, t, u, "ttft")
    p99 = med * np.exp(sigma * 2.3263478740408408)
    assert np.all(np.diff(p99) > 0)
    assert p99[0] == pytest.approx(0.4 * 0.2)  # zero-load share
    crossing = u[np.argmax(p99 > 0.5)]
    assert 1.0 < crossing <= 1.0 + table.model.overload_margin + 1e-9


def test_missing_p50_uses_the_models_share(table: ProfileTable) -> None:
    c, t = table.config(config(4).key), table.type("MM")
    assert table.ttft_p50_s[c, t] == pytest.approx(0.5 * 0.2)
    assert table.tbt_p50_s[c, t] == pytest.approx(0.8 * 0.05)


def test_power_interpolates_the_curve_and_clamps_at_capacity(table: ProfileTable) -> None:
    c, t = table.config(config(2).key), table.type("SS")
    watts = table.power_w(c, t, np.array([0.0, 5.0, 10.0, 25.0]))
    assert watts.tolist() == pytest.approx([200.0, 600.0, 1000.0, 1000.0])


def test_governor_picks_the_cheapest_variant_that_carries_the_load(table: ProfileTable) -> None:
    fast, slow = table.config(config(2, 700).key), table.config(config(2, 500).key)
    t = table.type("SS")
    # 6 rps: both carry it; 500 W cap draws 200 + 6/7 x 450 = 585.7 W < 200 + 0.6 x 800 = 680 W.
    # 9 rps: only the 700 W variant carries it. 12 rps: none does, the biggest wins.
    variant, util = table.govern(np.array([fast] * 3), np.array([t] * 3), np.array([0.6, 0.9, 1.2]))
    assert variant.tolist() == [slow, fast, fast]
    assert util.tolist() == pytest.approx([6 / 7, 0.9, 1.2])
    same, _ = table.govern(np.array([fast]), np.array([-1]), np.array([0.6]))
    assert same.tolist() == [fast]  # mixed pools are not governed


def test_unknown_config_and_duplicate_profiles_are_refused(profiles) -> None:
    table = ProfileTable(profiles)
    with pytest.raises(InputDataError, match="no profile describes"):
        table.config("nope")
    with pytest.raises(InputDataError, match="two profiles"):
        ProfileTable([*profiles, profile(config(2), "SS", 1.0, 1.0, 2.0)])


def test_model_constants_are_validated() -> None:
    with pytest.raises(ValueError):
        LatencyModel(saturation=0.9)
    with pytest.raises(ValueError):
        LatencyModel(ttft_zero_load_share=0.0)


def test_quasi_random_points_are_deterministic_and_even() -> None:
    a, b = quasi_uniform(10_000, 0), quasi_uniform(10_000, 0)
    assert np.array_equal(a, b)
    counts = np.histogram(a, bins=10, range=(0, 1))[0]
    assert counts.min() >= 990 and counts.max() <= 1010
    z = quasi_normal(100_000, 1)
    assert abs(z.mean()) < 0.01 and abs(np.percentile(z, 99) - 2.326) < 0.02

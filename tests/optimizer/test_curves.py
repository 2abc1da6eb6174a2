"""Power-curve math: hulls, clock envelopes, safe upper lines, dispatch (against grids)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer.curves import (
    balanced_power_w,
    build_envelope,
    lower_hull,
    packed_dispatch,
    simplify_hull,
)
from wattplan.domain import Profile, ServingConfig


def _profile(clock: int | None, curve: tuple[tuple[float, float], ...]) -> Profile:
    config = ServingConfig("m", "H100-80GB", 4, 700, clock)
    return Profile(config, "MM", curve[-1][0], curve, 0.1, 0.02, 1.0, 0.1, "test", "hand")


# concave curves, as measured: power rises fast at low load and flattens
LOW = _profile(1080, ((0.0, 300.0), (2.0, 700.0), (4.0, 900.0), (6.0, 1000.0)))
MID = _profile(1530, ((0.0, 350.0), (3.0, 900.0), (6.0, 1250.0), (9.0, 1450.0)))
TOP = _profile(1980, ((0.0, 400.0), (4.0, 1200.0), (8.0, 1700.0), (12.0, 2000.0)))
GRID = np.linspace(0.0, 12.0, 2401)


def _q(rate: float, profiles: tuple[Profile, ...] = (LOW, MID, TOP)) -> float:
    """Oracle: least power among clocks whose capacity covers the rate."""
    return min(p.power_w(rate) for p in profiles if p.capacity_rps >= rate - 1e-12)


def test_lower_hull_keeps_only_the_convex_lower_boundary() -> None:
    points = [(0.0, 0.0), (1.0, 2.0), (2.0, 1.0), (3.0, 3.0), (2.0, 5.0)]
    assert lower_hull(points) == ((0.0, 0.0), (2.0, 1.0), (3.0, 3.0))


def test_envelope_is_the_least_power_clock_that_keeps_the_slo() -> None:
    env = build_envelope([TOP, LOW, MID])
    assert env.capacity_rps == 12.0
    assert [p.config.clock_mhz for p in env.profiles] == [1080, 1530, 1980]
    for r in GRID:
        assert env.power_w(r) == pytest.approx(_q(r))
        clock = env.clock_for(r)
        chosen = next(p for p in env.profiles if p.config.clock_mhz == clock)
        assert chosen.capacity_rps >= r - 1e-9
        assert chosen.power_w(r) == pytest.approx(_q(r))


def test_clock_bands_match_the_policy_at_every_load() -> None:
    env = build_envelope([LOW, MID, TOP])
    edges = [0.0] + [b.upto_rps for b in env.bands]
    for lo, hi, band in zip(edges[:-1], edges[1:], env.bands, strict=True):
        for r in np.linspace(lo, hi, 7)[1:-1]:
            assert env.clock_for(r) == band.clock_mhz
    assert env.bands[-1].upto_rps == pytest.approx(12.0)


def test_hull_is_below_the_envelope_and_upper_line_above_it() -> None:
    env = build_envelope([LOW, MID, TOP])
    for r in GRID:
        q = env.power_w(r)
        assert env.hull_w(r) <= q + 1e-9
        assert env.upper_a_w + env.upper_b_w_per_rps * r >= q - 1e-9
    # tight at capacity, where instances sized for the peak run
    assert env.upper_a_w + env.upper_b_w_per_rps * 12.0 == pytest.approx(env.power_w(12.0))
    slopes = [s for _, s in env.segments]
    assert slopes == sorted(slopes)


def test_upper_line_covers_the_jump_where_a_clock_drops_out() -> None:
    # just past 6 rps only MID and TOP remain: their power there is far above LOW's
    env = build_envelope([LOW, MID, TOP])
    for r in (6.0 + 1e-6, 9.0 + 1e-6):
        assert env.upper_a_w + env.upper_b_w_per_rps * r >= env.power_w(r) - 1e-6


def test_simplified_hull_stays_above_within_tolerance() -> None:
    hull = lower_hull([(x, x**2 + 100.0) for x in np.linspace(0, 10, 21)])
    simple = simplify_hull(hull, 0.02)
    assert len(simple) < len(hull)
    assert simple[0] == hull[0] and simple[-1] == hull[-1]
    for x, y in hull:
        chord = np.interp(x, [p[0] for p in simple], [p[1] for p in simple])
        assert y - 1e-9 <= chord <= y * 1.02 + 1e-9


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5),
    share=st.floats(0.0, 1.0),
)
def test_packed_dispatch_is_exact_and_between_hull_and_balanced(n: int, share: float) -> None:
    env = build_envelope([LOW, MID, TOP])
    load = share * n * env.capacity_rps
    dispatch = packed_dispatch(env, n, load)
    assert sum(k for k, _, _ in dispatch.loads) == n
    assert sum(k * r for k, r, _ in dispatch.loads) == pytest.approx(load, abs=1e-6)
    assert dispatch.power_w == pytest.approx(sum(k * _q(r) for k, r, _ in dispatch.loads))
    hull_total = n * env.hull_w(load / n)
    assert dispatch.power_w >= hull_total - 1e-6
    # at most one instance sits off the hull
    worst_gap = max(_q(r) - env.hull_w(r) for r in GRID)
    assert dispatch.power_w <= hull_total + worst_gap + 1e-6
    # packing onto hull vertices is never worse than the even split plus that one instance
    assert dispatch.power_w <= balanced_power_w(env, n, load) + worst_gap + 1e-6


def test_packing_beats_every_split_of_a_concave_curve_on_a_grid() -> None:
    # brute force over splits of the load between two instances (0.25 rps steps)
    env = build_envelope([TOP])
    for load in np.arange(0.0, 24.01, 1.5):
        best = min(
            TOP.power_w(a) + TOP.power_w(load - a)
            for a in np.arange(0.0, 12.01, 0.25)
            if 0 <= load - a <= 12.0
        )
        assert packed_dispatch(env, 2, load).power_w <= best + 1e-6


def test_linear_curve_hull_is_exact() -> None:
    line = _profile(None, ((0.0, 400.0), (10.0, 2000.0)))
    env = build_envelope([line])
    for n, share in itertools.product((1, 3), (0.0, 0.3, 1.0)):
        load = share * n * 10.0
        assert packed_dispatch(env, n, load).power_w == pytest.approx(n * env.hull_w(load / n))

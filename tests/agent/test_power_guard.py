"""The POLCA guard on a replayed power trace: caps in order, released with hysteresis,
never below the SLO-feasible clock before T2, and the budget held within the grace period."""

from __future__ import annotations

import math

import pytest

from agent.power_guard import GuardDecision, PoolClocks, PowerDomain, PowerGuard

# a row of 36 H100 (700 W) oversubscribed: a budget of 19 kW for 25.2 kW of TDP
DOMAIN = PowerDomain("row-7", budget_w=19_000, t1_frac=0.90, t2_frac=0.97, grace_s=10, hold_s=5)
POOLS = [
    PoolClocks("batch-LL", low_priority=True, floor_mhz=1400, min_mhz=800, max_mhz=1980),
    PoolClocks("chat-SS", low_priority=False, floor_mhz=1600, min_mhz=800, max_mhz=1980),
]
GPUS = {"batch-LL": 16, "chat-SS": 20}
IDLE_W, DYN_W = 90.0, 610.0


def pool_power(util: float, clock: float) -> float:
    """Per-GPU power: idle plus dynamic power, superlinear in clock (DOMAIN.md section 4)."""
    return IDLE_W + DYN_W * util * (clock / 1980) ** 2.4


def demand(t: int) -> float:
    """Utilisation: calm, a ramp to full load over 60-83 s, full until 150 s, calm again."""
    if t < 60:
        return 0.55
    if t < 150:
        return min(1.0, 0.55 + 0.02 * (t - 60))
    return 0.5 + 0.05 * math.sin(t / 7)


def replay(seconds: int = 240, lag_s: int = 2) -> tuple[list[GuardDecision], list[float]]:
    """Run the guard once a second on power readings that lag the truth by ``lag_s``."""
    guard = PowerGuard(DOMAIN, POOLS)
    caps: dict[str, int | None] = {p.pool: None for p in POOLS}
    truth: list[float] = []
    decisions = []
    for t in range(seconds):
        clocks = {p.pool: caps[p.pool] or p.max_mhz for p in POOLS}
        truth.append(sum(GPUS[p] * pool_power(demand(t), clocks[p]) for p in GPUS))
        reading = truth[max(0, t - lag_s)]
        decision = guard.step(float(t), reading)
        caps = dict(decision.caps)
        decisions.append(decision)
    return decisions, truth


def test_caps_come_in_order_and_release_with_hysteresis() -> None:
    decisions, _ = replay()
    levels = [d.level for d in decisions]
    changes = [(d.at_s, d.level) for d in decisions if d.changed]
    assert [lvl for _, lvl in changes][:2] == [1, 2]  # T1 first (low priority), then T2
    assert max(levels) >= 2 and levels[-1] == 0
    first_one = next(d for d in decisions if d.level == 1)
    assert first_one.caps == {"batch-LL": 1400, "chat-SS": None}
    at_two = next(d for d in decisions if d.level == 2)
    assert at_two.caps == {"batch-LL": 800, "chat-SS": 1600}
    # releases go down one level at a time, and only after the surge is over
    down = [(t, lvl) for t, lvl in changes if lvl < 2 and t > at_two.at_s]
    assert down and all(t >= 150 for t, _ in down)
    assert [lvl for _, lvl in down][-2:] == [1, 0]


def test_nothing_is_capped_below_the_slo_clock_unless_t2_was_exceeded() -> None:
    decisions, _ = replay()
    floors = {p.pool: p.floor_mhz for p in POOLS}
    for d in decisions:
        if d.level < 2:
            assert all(cap is None or cap >= floors[pool] for pool, cap in d.caps.items())
        if d.level == 2:
            assert d.power_w > DOMAIN.t2_frac * DOMAIN.budget_w or any(
                e.level >= 2 and e.at_s < d.at_s for e in decisions
            )


def test_the_budget_is_never_exceeded_for_longer_than_the_grace_period() -> None:
    _, truth = replay()
    longest = run = 0
    for watts in truth:
        run = run + 1 if watts > DOMAIN.budget_w else 0
        longest = max(longest, run)
    assert max(truth) > DOMAIN.budget_w  # the trace does test the guard
    assert longest <= DOMAIN.grace_s


def test_a_sustained_overload_brakes_every_pool_after_half_the_grace_period() -> None:
    guard = PowerGuard(DOMAIN, POOLS)
    for t in range(6):
        d = guard.step(float(t), 19_500.0)
    assert d.level == 3 and set(d.caps.values()) == {800}


def test_bad_domains_and_pools_are_refused() -> None:
    with pytest.raises(ValueError, match="t1_frac"):
        PowerDomain("x", 1000, t1_frac=0.99, t2_frac=0.9)
    with pytest.raises(ValueError, match="budget_w"):
        PowerDomain("x", 0)
    with pytest.raises(ValueError, match="min_mhz"):
        PoolClocks("p", True, floor_mhz=700, min_mhz=800, max_mhz=1980)
    with pytest.raises(ValueError, match="twice"):
        PowerGuard(DOMAIN, [POOLS[0], POOLS[0]])

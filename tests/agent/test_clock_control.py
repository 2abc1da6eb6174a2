"""The instance clock loop: lowest SLO-keeping clock, deadline jumps, rate limits, floors."""

from __future__ import annotations

import pytest

from agent.clock_control import (
    DEADLINE,
    KEEP,
    LOWER,
    NO_METRICS,
    RAISE,
    RATE_LIMITED,
    ClockController,
    ClockPolicy,
    PerformanceModel,
)
from agent.metrics import EngineSnapshot

# H100, Llama-70B-class on TP4: ~25 ms decode steps at small batch, prefill ~0.15 ms/token
MODEL = PerformanceModel(
    max_clock_mhz=1980,
    tbt_base_s=0.020,
    tbt_per_seq_s=0.0005,
    prefill_base_s=0.010,
    prefill_per_token_s=0.00015,
    decode_clock_sensitivity=0.3,
)
CLOCKS = [800, 1000, 1200, 1400, 1600, 1800, 1980]


def controller(**kw: object) -> ClockController:
    args: dict[str, object] = {
        "model": MODEL,
        "clocks_mhz": CLOCKS,
        "tbt_slo_s": 0.050,
        "ttft_slo_s": 1.0,
        "prompt_tokens": 1000,
        "margin": 0.85,
    }
    args.update(kw)
    return ClockController(**args)  # type: ignore[arg-type]


def lowest_ok(batch: int, waiting: int, margin: float = 0.85) -> int:
    """Brute force over the clocks, independent of the controller's loop."""
    for f in CLOCKS:
        tbt = (0.020 + 0.0005 * max(batch, 1)) * (1 + 0.3 * (1980 / f - 1))
        ttft = waiting * (0.010 + 0.00015 * 1000) * 1980 / f
        if tbt <= margin * 0.050 and ttft <= margin * 1.0:
            return f
    return 1980


def test_light_load_settles_on_the_lowest_clock_that_keeps_the_slo() -> None:
    c = controller()
    light = EngineSnapshot(running=8, waiting=0)
    first = c.decide(0.0, light)
    assert (first.clock_mhz, first.reason) == (1980, RATE_LIMITED)  # one reading is not enough
    second = c.decide(5.0, light)
    assert second.changed and second.reason == LOWER
    assert second.clock_mhz == lowest_ok(8, 0) < 1980
    assert second.projected_tbt_s is not None and second.projected_tbt_s <= 0.85 * 0.050
    assert c.decide(10.0, light).reason == KEEP


def test_a_queue_that_would_miss_its_ttft_jumps_to_max_at_once() -> None:
    c = controller(clock_mhz=800)
    burst = EngineSnapshot(running=20, waiting=6)  # 6 x 0.16 s x 2.5 > 1 s at 800 MHz
    d = c.decide(0.1, burst)
    assert (d.clock_mhz, d.reason, d.changed) == (1980, DEADLINE, True)


def test_rising_load_raises_without_waiting_and_lowering_is_rate_limited() -> None:
    c = controller(clock_mhz=1400, min_change_interval_s=5.0, settle_decisions=1)
    heavy = EngineSnapshot(running=40, waiting=2)  # inside the SLO at 1400, not the margin
    up = c.decide(0.0, heavy)
    assert (up.reason, up.clock_mhz) == (RAISE, lowest_ok(42, 2)) and up.clock_mhz > 1400
    light = EngineSnapshot(running=2, waiting=0)
    assert c.decide(1.0, light).reason == RATE_LIMITED  # 1 s after a change
    down = c.decide(5.0, light)
    assert down.reason == LOWER and down.clock_mhz == lowest_ok(2, 0)


def test_the_plan_floor_and_the_supported_list_bound_every_choice() -> None:
    policy = ClockPolicy(floors=((0.0, 1000), (5.0, 1400), (10.0, 1800)))
    c = controller(policy=policy, settle_decisions=1, min_change_interval_s=0.0)
    idle = EngineSnapshot(running=0, waiting=0)
    assert c.decide(0.0, idle, load_rps=7.5).clock_mhz == 1400
    assert c.decide(1.0, idle, load_rps=12.0).clock_mhz == 1800
    assert c.decide(2.0, idle, load_rps=1.0).clock_mhz == 1000
    for t, snap in enumerate(
        [EngineSnapshot(running=r, waiting=w) for r in (0, 30, 90) for w in (0, 3)]
    ):
        assert c.decide(3.0 + t, snap, load_rps=1.0).clock_mhz in CLOCKS


def test_no_reading_keeps_the_current_clock() -> None:
    c = controller(clock_mhz=1200)
    d = c.decide(0.0, None)
    assert (d.clock_mhz, d.changed, d.reason) == (1200, False, NO_METRICS)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="supported"):
        controller(clock_mhz=1234)
    with pytest.raises(ValueError, match="positive"):
        controller(clocks_mhz=[])
    with pytest.raises(ValueError, match="sensitivity"):
        PerformanceModel(1980, 0.02, 0.0005, 0.01, 0.0001, decode_clock_sensitivity=1.5)


def test_max_lower_steps_walks_down_one_supported_clock_per_change() -> None:
    c = controller(max_lower_steps=1)
    light = EngineSnapshot(running=8, waiting=0)
    target = lowest_ok(8, 0)
    assert target <= CLOCKS[-3]  # several steps below the maximum
    seen = []
    for k in range(40):
        d = c.decide(5.0 * k, light)
        if d.changed:
            assert d.reason == LOWER
            seen.append(d.clock_mhz)
    assert seen == [f for f in reversed(CLOCKS[:-1]) if f >= target]
    # a raise is not limited: a queue jumps straight to the maximum
    jam = c.decide(1000.0, EngineSnapshot(running=60, waiting=40))
    assert (jam.clock_mhz, jam.reason) == (1980, DEADLINE)
    with pytest.raises(ValueError, match="max_lower_steps"):
        controller(max_lower_steps=0)

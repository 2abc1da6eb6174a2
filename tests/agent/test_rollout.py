"""Staggered rollout: waves never disrupt more than max_unavailable instances of a pool, never
over-commit GPUs, and always reach the desired layout."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.rollout import (
    RETUNE,
    START,
    STOP,
    Instance,
    apply_wave,
    gpus_per_instance,
    instance_id,
    layout_of,
    next_wave,
)
from wattplan.domain import Layout, LayoutItem, ServingConfig

TP4 = ServingConfig("llama2-70b", "H100-80GB", 4, 490)
TP4_SLOW = ServingConfig("llama2-70b", "H100-80GB", 4, 400, 1410)
TP8 = ServingConfig("llama2-70b", "H100-80GB", 8, 490)
TP2 = ServingConfig("llama2-70b", "H100-80GB", 2, 300)
CONFIGS = (TP2, TP4, TP4_SLOW, TP8, ServingConfig("llama2-70b", "H100-80GB", 1, 300, 1200))
POOLS = (("chat", "SS"), ("chat", "LL"), ("code", "SS"))


def start_instances(layout: Layout) -> tuple[Instance, ...]:
    """Instances running ``layout`` on GPUs 0, 1, 2, ..."""
    instances, gpu, number = [], 0, 1
    for item in layout.items:
        for _ in range(item.instances):
            need = gpus_per_instance(item.config)
            gpus = tuple(range(gpu, gpu + need))
            instances.append(
                Instance(instance_id(number), item.service, item.request_type, item.config, gpus)
            )
            gpu, number = gpu + need, number + 1
    return tuple(instances)


def roll_out(
    instances: tuple[Instance, ...], desired: Layout, capacity: int, k: int
) -> tuple[tuple[Instance, ...], list[list]]:
    """Run waves until done, checking the invariants after each wave."""
    waves = []
    number = 1000
    for _ in range(200):
        wave = next_wave(
            instances, desired, gpu_capacity=capacity, max_unavailable=k, next_number=number
        )
        if not wave:
            return instances, waves
        number += sum(1 for s in wave if s.kind == START)
        disrupted = Counter(s.pool for s in wave if s.disrupts)
        assert max(disrupted.values(), default=0) <= k, disrupted
        # While the wave runs, the old instances still hold their GPUs and the new ones
        # already hold theirs: all of them must be distinct and within the cluster.
        held = [g for inst in instances for g in inst.gpus]
        held += [g for s in wave if s.kind == START for g in s.gpus]
        assert len(held) == len(set(held)), "a GPU is handed out twice"
        assert all(0 <= g < capacity for g in held)
        instances = apply_wave(instances, wave)
        waves.append(wave)
    raise AssertionError("the rollout did not finish in 200 waves")


layouts = st.lists(
    st.tuples(st.sampled_from(POOLS), st.sampled_from(CONFIGS), st.integers(1, 3)),
    max_size=6,
).map(
    lambda entries: Layout(
        tuple(
            LayoutItem(pool[0], pool[1], config, n)
            for (pool, config), n in {(p, c): n for p, c, n in entries}.items()
        )
    )
)


@settings(max_examples=150, deadline=None)
@given(before=layouts, after=layouts, slack=st.integers(0, 6), k=st.integers(1, 3))
def test_rollout_reaches_the_desired_layout_within_the_disruption_budget(
    before: Layout, after: Layout, slack: int, k: int
) -> None:
    capacity = max(before.gpus, after.gpus) + slack
    instances, _ = roll_out(start_instances(before), after, capacity, k)
    assert layout_of(instances).instances_by_slot() == after.instances_by_slot()


def test_new_instances_start_before_old_ones_stop_when_gpus_allow() -> None:
    before = Layout((LayoutItem("chat", "SS", TP4, 2),))
    after = Layout((LayoutItem("chat", "SS", TP8, 1),))
    _, waves = roll_out(start_instances(before), after, capacity=16, k=1)
    assert [[s.kind for s in wave] for wave in waves] == [[START], [STOP], [STOP]]


def test_stops_come_first_when_a_start_waits_for_gpus() -> None:
    before = Layout((LayoutItem("chat", "SS", TP4, 2),))
    after = Layout((LayoutItem("chat", "SS", TP8, 1),))
    _, waves = roll_out(start_instances(before), after, capacity=8, k=1)
    assert [[s.kind for s in wave] for wave in waves] == [[STOP], [STOP], [START]]


def test_clock_change_retunes_running_instances_in_place_one_at_a_time() -> None:
    before = Layout((LayoutItem("chat", "SS", TP4, 3),))
    after = Layout((LayoutItem("chat", "SS", TP4_SLOW, 3),))
    instances = start_instances(before)
    final, waves = roll_out(instances, after, capacity=12, k=1)
    assert [[s.kind for s in wave] for wave in waves] == [[RETUNE]] * 3
    assert {(i.instance_id, i.gpus) for i in final} == {(i.instance_id, i.gpus) for i in instances}


def test_max_unavailable_counts_per_pool() -> None:
    before = Layout((LayoutItem("chat", "SS", TP2, 4), LayoutItem("code", "SS", TP2, 4)))
    after = Layout()
    _, waves = roll_out(start_instances(before), after, capacity=16, k=2)
    assert [Counter(s.pool for s in wave) for wave in waves] == [
        Counter({("chat", "SS"): 2, ("code", "SS"): 2})
    ] * 2


def test_a_layout_that_cannot_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="gpu_capacity=4"):
        next_wave(
            (),
            Layout((LayoutItem("chat", "SS", TP8, 1),)),
            gpu_capacity=4,
            max_unavailable=1,
            next_number=1,
        )

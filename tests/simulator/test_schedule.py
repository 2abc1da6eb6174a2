"""Layout transitions: how new instances come about, cheapest first."""

from __future__ import annotations

from simulator.model import POOL_ALL, ReconfigCosts
from simulator.schedule import transition
from tests.simulator.conftest import config, layout
from wattplan.domain import Layout, LayoutItem

COSTS = ReconfigCosts(startup_s=420.0, reshard_s=90.0, clock_change_s=0.08)


def _groups(groups):
    return sorted(
        (pool[1], g.config.key.split("/", 2)[2], g.instances, g.downtime_s, g.startup_s)
        for pool, gs in groups.items()
        for g in gs
    )


def test_same_layout_keeps_everything() -> None:
    a = layout(SS=(config(2), 3), MM=(config(4), 1))
    groups, changes = transition(a, a, COSTS)
    assert changes.total == 0 and changes.stops == 0
    assert _groups(groups) == [("MM", "tp4/cap700", 1, 0.0, 0.0), ("SS", "tp2/cap700", 3, 0.0, 0.0)]


def test_cap_change_of_the_same_shape_is_a_clock_change() -> None:
    groups, changes = transition(
        layout(SS=(config(2, 700), 3)), layout(SS=(config(2, 500), 2)), COSTS
    )
    assert (changes.clock_changes, changes.cold_starts, changes.stops) == (2, 0, 1)
    assert _groups(groups) == [("SS", "tp2/cap500", 2, 0.08, 0.0)]


def test_same_config_moves_between_pools_for_free() -> None:
    before = layout(SS=(config(2), 2), MM=(config(2), 1))
    after = layout(SS=(config(2), 1), MM=(config(2), 2))
    groups, changes = transition(before, after, COSTS)
    assert (changes.moves, changes.cold_starts, changes.stops) == (1, 0, 0)
    assert ("MM", "tp2/cap700", 1, 0.0, 0.0) in _groups(groups)


def test_freed_gpus_are_resharded_and_the_rest_cold_start() -> None:
    before = layout(SS=(config(2), 2))  # 4 GPUs
    after = layout(SS=(config(4), 2))  # 8 GPUs: one re-shard on the freed 4, one cold start
    groups, changes = transition(before, after, COSTS)
    assert (changes.reshards, changes.cold_starts, changes.stops) == (1, 1, 2)
    assert _groups(groups) == [
        ("SS", "tp4/cap700", 1, 0.0, 420.0),
        ("SS", "tp4/cap700", 1, 90.0, 0.0),
    ]


def test_all_types_pool_is_its_own_pool() -> None:
    single = Layout((LayoutItem("svc", POOL_ALL, config(4), 2),))
    groups, changes = transition(Layout(), single, COSTS)
    assert changes.cold_starts == 2
    assert list(groups) == [("svc", POOL_ALL)]


def test_spare_gpus_start_new_instances_ahead_instead_of_resharding() -> None:
    before = layout(SS=(config(2), 2))  # 4 GPUs
    after = layout(SS=(config(4), 2))  # 8 GPUs
    groups, changes = transition(before, after, COSTS, spare_gpus=4)
    assert (changes.reshards, changes.cold_starts) == (1, 1)  # 4 spare: one ahead, one re-shard
    groups, changes = transition(before, after, COSTS, spare_gpus=12)
    assert (changes.reshards, changes.cold_starts, changes.stops) == (0, 2, 2)
    assert _groups(groups) == [("SS", "tp4/cap700", 2, 0.0, 420.0)]

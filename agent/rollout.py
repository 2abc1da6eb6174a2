"""Staggered application of a layout: the instances a cluster runs, and the waves of steps
that turn them into a desired layout.

A plan is applied in *waves*. A wave is a set of steps the backend runs together; the next
wave starts when the whole wave is done. In every wave, each pool (service, request type)
has at most ``max_unavailable`` of its running instances *disrupted* (stopped, or retuned to
a new clock or power cap), so a pool never loses more than that many instances at once.
Starting an instance disrupts nothing, so new instances start first, as far as free GPUs
allow ("surge"); a pool's old instances stop once its new ones are up, or earlier when a
start elsewhere waits for their GPUs.

Pure functions over frozen values; :mod:`agent.state` persists them, :mod:`agent.backends`
runs the steps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from wattplan.changes import Pool, plan_moves
from wattplan.domain import Layout, LayoutItem, ServingConfig

START = "start"
STOP = "stop"
RETUNE = "retune"
STEP_KINDS: tuple[str, ...] = (START, STOP, RETUNE)


@dataclass(frozen=True)
class Instance:
    """One serving instance the cluster runs.

    Attributes:
        instance_id: Stable id (``i00001``), also written to telemetry.
        service: Service of its pool.
        request_type: Request type of its pool.
        config: What it runs.
        gpus: Indices of the GPUs it holds.
    """

    instance_id: str
    service: str
    request_type: str
    config: ServingConfig
    gpus: tuple[int, ...]

    @property
    def pool(self) -> Pool:
        """(service, request type)."""
        return (self.service, self.request_type)


@dataclass(frozen=True)
class Step:
    """One action on one instance.

    Attributes:
        kind: ``start``, ``stop`` or ``retune``.
        instance_id: The instance (for a start, the id it will have).
        service: Service of its pool.
        request_type: Request type of its pool.
        source: Config before (``None`` for a start).
        target: Config after (``None`` for a stop).
        gpus: GPUs the instance holds (for a start, the GPUs allocated to it).
    """

    kind: str
    instance_id: str
    service: str
    request_type: str
    source: ServingConfig | None
    target: ServingConfig | None
    gpus: tuple[int, ...]

    @property
    def pool(self) -> Pool:
        """(service, request type)."""
        return (self.service, self.request_type)

    @property
    def disrupts(self) -> bool:
        """Whether a running instance is unavailable during the step (stop, retune)."""
        return self.kind != START


def gpus_per_instance(config: ServingConfig) -> int:
    """GPUs one instance of ``config`` holds."""
    return LayoutItem("", "", config, 1).gpus


def instance_id(number: int) -> str:
    """The id of the ``number``-th instance the agent ever started."""
    return f"i{number:05d}"


def layout_of(instances: Iterable[Instance]) -> Layout:
    """The layout (counts per slot) of running instances, in a stable order."""
    counts: Counter[tuple[str, str, ServingConfig]] = Counter()
    for inst in instances:
        counts[(inst.service, inst.request_type, inst.config)] += 1
    items = [LayoutItem(s, r, c, n) for (s, r, c), n in counts.items()]
    return Layout(tuple(sorted(items, key=_item_order)))


def _item_order(item: LayoutItem) -> tuple[str, str, str, int, int]:
    return (
        item.service,
        item.request_type,
        item.config.key,
        item.config.power_cap_w,
        item.config.clock_mhz or 0,
    )


def next_wave(
    instances: Sequence[Instance],
    desired: Layout,
    *,
    gpu_capacity: int,
    max_unavailable: int,
    next_number: int,
) -> list[Step]:
    """The next wave of steps from ``instances`` towards ``desired`` (empty when there).

    Args:
        instances: What runs now.
        desired: What should run.
        gpu_capacity: GPUs of the cluster, indices ``0 .. gpu_capacity - 1``.
        max_unavailable: Most instances of one pool disrupted in one wave (>= 1).
        next_number: Number of the next instance id to hand out.

    Returns:
        Steps: starts (lowest free GPUs first), then retunes, then stops.

    Raises:
        ValueError: ``max_unavailable`` < 1, or nothing can move although the layouts
            differ (``desired`` does not fit in ``gpu_capacity``).
    """
    if max_unavailable < 1:
        raise ValueError(f"max_unavailable must be >= 1, got {max_unavailable}")
    moves = plan_moves(layout_of(instances), desired)
    if not moves:
        return []
    used = {gpu for inst in instances for gpu in inst.gpus}
    free = [gpu for gpu in range(gpu_capacity) if gpu not in used]
    # Instances are taken for stops and retunes newest first, so older ones keep serving.
    by_slot: dict[tuple[str, str, ServingConfig], list[Instance]] = {}
    for inst in sorted(instances, key=lambda i: i.instance_id, reverse=True):
        by_slot.setdefault((inst.service, inst.request_type, inst.config), []).append(inst)

    starts: list[Step] = []
    blocked = False
    pending_start_pools: set[Pool] = set()
    number = next_number
    for move in (m for m in moves if m.kind == START):
        assert move.target is not None
        need = gpus_per_instance(move.target)
        pending_start_pools.add((move.service, move.request_type))
        for _ in range(move.instances):
            if need > len(free):
                blocked = True
                break
            gpus, free = tuple(free[:need]), free[need:]
            starts.append(
                Step(
                    START,
                    instance_id(number),
                    move.service,
                    move.request_type,
                    None,
                    move.target,
                    gpus,
                )
            )
            number += 1

    budget: Counter[Pool] = Counter()
    disrupting: list[Step] = []
    for kind in (RETUNE, STOP):
        for move in (m for m in moves if m.kind == kind):
            pool = (move.service, move.request_type)
            if kind == STOP and pool in pending_start_pools and not blocked:
                continue  # its new instances come up first
            assert move.source is not None
            candidates = by_slot.get((move.service, move.request_type, move.source), [])
            for _ in range(move.instances):
                if budget[pool] >= max_unavailable or not candidates:
                    break
                inst = candidates.pop(0)
                budget[pool] += 1
                disrupting.append(
                    Step(
                        kind,
                        inst.instance_id,
                        inst.service,
                        inst.request_type,
                        inst.config,
                        move.target,
                        inst.gpus,
                    )
                )
    wave = starts + disrupting
    if not wave:
        raise ValueError(
            f"cannot move towards the desired layout: it needs {desired.gpus} GPUs and the "
            f"cluster has gpu_capacity={gpu_capacity}"
        )
    return wave


def apply_wave(instances: Sequence[Instance], wave: Sequence[Step]) -> tuple[Instance, ...]:
    """The instances after a wave completed, sorted by id.

    Raises:
        ValueError: a step names an instance that does not run (stop, retune) or already
            runs (start).
    """
    by_id = {inst.instance_id: inst for inst in instances}
    for step in wave:
        if step.kind == START:
            if step.instance_id in by_id:
                raise ValueError(f"instance {step.instance_id} already runs")
            assert step.target is not None
            by_id[step.instance_id] = Instance(
                step.instance_id, step.service, step.request_type, step.target, step.gpus
            )
        elif step.instance_id not in by_id:
            raise ValueError(f"instance {step.instance_id} does not run")
        elif step.kind == STOP:
            del by_id[step.instance_id]
        else:
            assert step.target is not None
            by_id[step.instance_id] = replace(by_id[step.instance_id], config=step.target)
    return tuple(sorted(by_id.values(), key=lambda i: i.instance_id))

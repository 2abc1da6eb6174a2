"""The approval policy, and what a person sees when the policy asks for one.

Pure functions: :func:`decide` says whether a plan may be approved by policy or needs a
person; :func:`evaluate_layout` estimates a layout's energy, carbon, cost and SLO headroom at
the forecast load, the same way for the current layout and the plan so the two compare;
:func:`approval_body` renders the Markdown the Airflow approval task shows.

**Degraded plans.** A plan is *degraded* when the optimizer could not carry the whole
forecast and returned the best it could (issue 7 adds this). :func:`plan_is_degraded` reads
it defensively, so this module works before and after that change: a ``degraded``
attribute of the plan or of its prediction, or a ``degraded`` key (or ``status`` of
``"degraded"``) in the plan's solver record; any of these being true makes it degraded;
none present means not degraded. A degraded plan is never approved by policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from wattplan.changes import LayoutChange, Pool, PoolChange
from wattplan.domain import Layout, LayoutItem, Plan, Profile
from wattplan.settings import Settings

#: Route of a plan that the policy approved.
AUTO = "auto"
#: Route of a plan that needs a person.
HUMAN = "human"


@dataclass(frozen=True)
class ApprovalPolicy:
    """When a plan may be approved without a person (from :class:`Settings`).

    Attributes:
        approve_all: Approve every plan that is neither degraded nor a large change
            (``WATTPLAN_AUTO_APPROVE``; demo and tests).
        clock_only: Approve plans that only retune clocks or power caps
            (``WATTPLAN_AUTO_APPROVE_CLOCK_ONLY``).
        max_instance_changes: Approve plans that start plus stop at most this many
            instances (``WATTPLAN_AUTO_APPROVE_MAX_INSTANCE_CHANGES``).
        large_change_instances: More instance changes than this always need a person
            (``WATTPLAN_APPROVAL_LARGE_CHANGE_INSTANCES``).
    """

    approve_all: bool = False
    clock_only: bool = True
    max_instance_changes: int = 0
    large_change_instances: int = 64

    @classmethod
    def from_settings(cls, settings: Settings) -> ApprovalPolicy:
        """The policy the settings configure."""
        return cls(
            approve_all=settings.auto_approve,
            clock_only=settings.auto_approve_clock_only,
            max_instance_changes=settings.auto_approve_max_instance_changes,
            large_change_instances=settings.approval_large_change_instances,
        )


@dataclass(frozen=True)
class Verdict:
    """What the policy decided about one plan.

    Attributes:
        route: :data:`AUTO` (approved by policy) or :data:`HUMAN` (a person decides).
        rule: Short name of the rule that decided (``degraded``, ``large_change``,
            ``auto_approve``, ``no_change``, ``clock_only``, ``small_change``, ``needs_person``).
        reason: One sentence for the person and the record.
    """

    route: str
    rule: str
    reason: str

    @property
    def auto(self) -> bool:
        """Whether the policy approved the plan."""
        return self.route == AUTO


def plan_is_degraded(plan: Plan) -> bool:
    """Whether the optimizer marked the plan degraded (see the module docstring)."""
    for holder in (plan, plan.prediction):
        if bool(getattr(holder, "degraded", False)):
            return True
    solver = plan.solver if isinstance(plan.solver, Mapping) else {}
    return bool(solver.get("degraded", False)) or solver.get("status") == "degraded"


def decide(policy: ApprovalPolicy, change: LayoutChange, *, degraded: bool) -> Verdict:
    """Apply the policy to a plan's change against the current layout.

    Rules, first match wins: a degraded plan needs a person; so does one with more than
    ``large_change_instances`` instance changes; ``approve_all`` approves the rest; a plan
    that changes nothing is approved; clock/power-only changes are approved when
    ``clock_only`` (else a person decides); at most ``max_instance_changes`` instance
    changes are approved; anything else needs a person.

    Args:
        policy: The policy.
        change: The plan against the current layout (:func:`wattplan.changes.describe_change`).
        degraded: Whether the plan is degraded (:func:`plan_is_degraded`).

    Returns:
        The verdict, with the rule that decided.
    """
    n = change.instance_changes
    moves = f"{change.started} started, {change.stopped} stopped, {change.retuned} retuned"
    if degraded:
        return Verdict(
            HUMAN,
            "degraded",
            "the plan is degraded (it cannot carry the whole forecast): a person must decide",
        )
    if n > policy.large_change_instances:
        return Verdict(
            HUMAN,
            "large_change",
            f"{n} instance changes ({moves}) exceed the large-change limit of "
            f"{policy.large_change_instances}: a person must decide",
        )
    if policy.approve_all:
        return Verdict(AUTO, "auto_approve", f"approved by policy (WATTPLAN_AUTO_APPROVE): {moves}")
    if change.is_noop:
        return Verdict(AUTO, "no_change", "the plan changes nothing on the cluster")
    if change.is_clock_only:
        if policy.clock_only:
            return Verdict(
                AUTO, "clock_only", f"only clocks or power caps change ({change.retuned} retuned)"
            )
        return Verdict(
            HUMAN,
            "needs_person",
            f"clocks or power caps of {change.retuned} instances change and "
            "WATTPLAN_AUTO_APPROVE_CLOCK_ONLY is off: a person must decide",
        )
    if n <= policy.max_instance_changes:
        return Verdict(
            AUTO,
            "small_change",
            f"{n} instance changes ({moves}) are within the auto-approval limit of "
            f"{policy.max_instance_changes}",
        )
    return Verdict(
        HUMAN,
        "needs_person",
        f"{n} instance changes ({moves}) exceed the auto-approval limit of "
        f"{policy.max_instance_changes}: a person must decide",
    )


# --- evaluation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prices:
    """Grid and price figures a plan was made with (from its solver record)."""

    carbon_g_per_kwh: float = 0.0
    electricity_usd_per_mwh: float = 0.0
    gpu_usd_per_hour: float = 0.0

    @classmethod
    def from_solver_record(cls, solver: Mapping[str, object]) -> Prices:
        """Read the figures ``jobs.propose_plan`` stores with each plan (0 when absent)."""

        def number(key: str) -> float:
            value = solver.get(key)
            return float(value) if isinstance(value, int | float) else 0.0

        return cls(
            number("carbon_g_per_kwh"),
            number("electricity_usd_per_mwh"),
            number("gpu_usd_per_hour"),
        )


@dataclass(frozen=True)
class Figures:
    """A layout's estimated figures over one window at the forecast load.

    Attributes:
        gpus: GPUs the layout holds.
        energy_kwh: GPU energy over the window; ``None`` when a running config has no profile.
        carbon_kg: Operational carbon of that energy.
        cost_usd: GPU-hours at the GPU price plus energy at the electricity price.
        min_slo_headroom: Lowest ``1 - forecast peak / SLO capacity`` over pools with load
            (negative: the pool is over capacity); ``None`` when no pool has load.
        tightest_pool: The pool with that headroom.
        unprofiled: Slots without a profile (their energy and capacity are unknown).
    """

    gpus: int
    energy_kwh: float | None
    carbon_kg: float | None
    cost_usd: float | None
    min_slo_headroom: float | None
    tightest_pool: Pool | None
    unprofiled: tuple[str, ...] = ()


def _route(
    peak_rps: Mapping[Pool, float], capacity: Mapping[Pool, float]
) -> tuple[dict[Pool, float], dict[Pool, dict[Pool, float]], set[Pool]]:
    """Where each type's peak goes, as the optimizer plans it (``optimizer/inputs.py``).

    A pool first carries its own type up to its SLO capacity; what it cannot carry spills
    to pools of a componentwise-larger type of the same service with spare capacity
    (smallest such type first, smaller types spilling first), counted at that pool's own
    capacity, which the profiles make the conservative one. What finds no room stays with
    its own pool, or, without one, stays unserved.

    Returns:
        The peak each pool carries; per source pool the share of its load sent to each
        pool (itself included), which its mean load follows; the pools with load left
        that no pool carries (no own pool, no room above).
    """
    from optimizer.inputs import larger_or_equal

    def size(pool: Pool) -> tuple[int, str]:
        return (sum("SML".find(c) for c in pool[1] if c in "SML"), pool[1])

    carried = {pool: min(rate, capacity.get(pool, 0.0)) for pool, rate in peak_rps.items()}
    unserved: set[Pool] = set()
    shares: dict[Pool, dict[Pool, float]] = {
        pool: {pool: carried[pool]} for pool in peak_rps if carried[pool] > 0
    }
    for pool in sorted(peak_rps, key=lambda p: (p[0], size(p))):
        left = peak_rps[pool] - carried[pool]
        targets = sorted(
            (
                q
                for q in capacity
                if q[0] == pool[0] and q != pool and larger_or_equal(pool[1], q[1])
            ),
            key=size,
        )
        for target in targets:
            if left <= 1e-12:
                break
            moved = min(left, capacity[target] - carried.get(target, 0.0))
            if moved > 0:
                carried[target] = carried.get(target, 0.0) + moved
                shares.setdefault(pool, {})[target] = moved
                left -= moved
        if left > 1e-12 and capacity.get(pool, 0.0) > 0:  # over capacity where it is
            carried[pool] += left
            shares.setdefault(pool, {})[pool] = shares.get(pool, {}).get(pool, 0.0) + left
        elif left > 1e-12:
            unserved.add(pool)
    return (
        carried,
        {
            pool: {q: v / peak_rps[pool] for q, v in sent.items()}
            for pool, sent in shares.items()
            if peak_rps[pool] > 0
        },
        unserved,
    )


def evaluate_layout(
    layout: Layout,
    *,
    peak_rps: Mapping[Pool, float],
    mean_rps: Mapping[Pool, float],
    profiles: Mapping[tuple[str, str], Profile],
    window_s: int,
    prices: Prices,
) -> Figures:
    """Estimate a layout's figures at the forecast load.

    Load that a pool cannot carry within its SLO capacity spills, as the optimizer plans
    it, to pools of componentwise-larger types of the same service (:func:`_route`). Each
    pool's load is split over its instances in proportion to their SLO capacity. Energy
    uses the forecast mean rate and each profile's power curve; headroom uses the forecast
    peak (planned) rate. A type with load left that no pool carries has headroom -1.

    Args:
        layout: The layout to evaluate.
        peak_rps: Forecast planned (peak) rate per pool.
        mean_rps: Forecast mean rate per pool.
        profiles: Profiles keyed by (config key, request type).
        window_s: Window length.
        prices: Carbon intensity and prices.

    Returns:
        The figures.
    """
    by_pool: dict[Pool, list[tuple[LayoutItem, Profile | None]]] = {}
    for item in layout.items:
        if item.instances > 0:
            profile = profiles.get((item.config.key, item.request_type))
            by_pool.setdefault((item.service, item.request_type), []).append((item, profile))
    unprofiled = sorted(
        f"{item.service}/{item.request_type}/{item.config.key}"
        for items in by_pool.values()
        for item, profile in items
        if profile is None
    )
    capacity = {
        pool: sum(i.instances * p.capacity_rps for i, p in items if p is not None)
        for pool, items in by_pool.items()
    }
    peak_carried, shares, unserved = _route({p: r for p, r in peak_rps.items() if r > 0}, capacity)
    mean_carried: dict[Pool, float] = {}
    for pool, mean in mean_rps.items():
        for target, share in shares.get(pool, {pool: 1.0}).items():
            mean_carried[target] = mean_carried.get(target, 0.0) + mean * share
    watts = 0.0
    headrooms: list[tuple[float, Pool]] = []
    for pool in sorted(by_pool):
        items = [(i, p) for i, p in by_pool[pool] if p is not None]
        mean = mean_carried.get(pool, 0.0)
        for item, profile in items:
            share = (
                item.instances * profile.capacity_rps / capacity[pool] if capacity[pool] else 0.0
            )
            watts += item.instances * profile.power_w(mean * share / item.instances)
        peak = peak_carried.get(pool, 0.0)
        if peak > 0:
            headrooms.append((1.0 - peak / capacity[pool] if capacity[pool] else -1.0, pool))
    headrooms.extend((-1.0, pool) for pool in unserved)  # load with nowhere to go
    hours = window_s / 3600.0
    energy = None if unprofiled else watts * hours / 1000.0
    carbon = None if energy is None else energy * prices.carbon_g_per_kwh / 1000.0
    cost = (
        None
        if energy is None
        else layout.gpus * hours * prices.gpu_usd_per_hour
        + energy * prices.electricity_usd_per_mwh / 1000.0
    )
    tightest = min(headrooms) if headrooms else None
    return Figures(
        gpus=layout.gpus,
        energy_kwh=energy,
        carbon_kg=carbon,
        cost_usd=cost,
        min_slo_headroom=tightest[0] if tightest else None,
        tightest_pool=tightest[1] if tightest else None,
        unprofiled=tuple(unprofiled),
    )


# --- what the person sees -------------------------------------------------------------------


def _item_text(item: LayoutItem) -> str:
    c = item.config
    clock = f" {c.clock_mhz} MHz" if c.clock_mhz else ""
    return f"{item.instances} × {c.model} tp{c.tp} {c.power_cap_w} W{clock}"


def _pool_cell(items: tuple[LayoutItem, ...]) -> str:
    return "<br>".join(_item_text(i) for i in items) if items else "–"


def _change_cell(pool: PoolChange) -> str:
    if not pool.changed:
        return "no change"
    parts = []
    if pool.started:
        parts.append(f"+{pool.started} started")
    if pool.stopped:
        parts.append(f"−{pool.stopped} stopped")
    if pool.retuned:
        parts.append(f"{pool.retuned} retuned")
    gpus = pool.gpus_after - pool.gpus_before
    if gpus:
        parts.append(f"{gpus:+d} GPUs")
    return ", ".join(parts)


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _delta(before: float | None, after: float | None, digits: int) -> str:
    if before is None or after is None:
        return "n/a"
    return f"{after - before:+,.{digits}f}"


def _headroom(figures: Figures) -> str:
    if figures.min_slo_headroom is None:
        return "no load"
    pool = figures.tightest_pool
    where = f" ({pool[0]}/{pool[1]})" if pool else ""
    return f"{figures.min_slo_headroom:.0%}{where}"


def _duration(seconds: int) -> str:
    minutes, rest = divmod(seconds, 60)
    parts = ([f"{minutes} min"] if minutes else []) + ([f"{rest} s"] if rest or not minutes else [])
    return " ".join(parts)


def approval_subject(plan: Plan) -> str:
    """One line naming the plan, its cluster and window."""
    end = plan.window_start + timedelta(seconds=plan.window_s)
    return (
        f"Approve plan {plan.plan_id} for cluster {plan.cluster} "
        f"({plan.window_start:%Y-%m-%d %H:%M}–{end:%H:%M} UTC)?"
    )


def approval_body(
    plan: Plan,
    change: LayoutChange,
    verdict: Verdict,
    *,
    current: Figures,
    planned: Figures,
    prices: Prices,
    timeout_s: int,
    current_plan_id: str | None,
) -> str:
    """The Markdown a person reads before approving: each pool before -> after, and the
    estimated energy, carbon, cost and SLO headroom of the current layout against the plan.

    Args:
        plan: The plan.
        change: The plan against the current layout.
        verdict: Why the policy asks a person.
        current: Figures of the current layout (:func:`evaluate_layout`).
        planned: Figures of the plan, evaluated the same way.
        prices: The figures the estimates used.
        timeout_s: How long the approval waits.
        current_plan_id: The plan the cluster runs now, if any.

    Returns:
        Markdown text.
    """
    end = plan.window_start + timedelta(seconds=plan.window_s)
    lines = [
        f"**Plan** `{plan.plan_id}` for cluster **{plan.cluster}**, window "
        f"**{plan.window_start:%Y-%m-%d %H:%M}–{end:%H:%M} UTC**.",
        "",
        f"**Why you are asked:** {verdict.reason}.",
        "",
        f"**Change:** {change.started} instances started, {change.stopped} stopped, "
        f"{change.retuned} retuned in place; GPUs {current.gpus} → {planned.gpus}. "
        f"The cluster now runs plan `{current_plan_id or 'none'}`.",
        "",
        "| pool | now | plan | change |",
        "|---|---|---|---|",
    ]
    for pool in change.pools:
        lines.append(
            f"| {pool.service} / {pool.request_type} | {_pool_cell(pool.before)} | "
            f"{_pool_cell(pool.after)} | {_change_cell(pool)} |"
        )
    rows = [
        ("GPUs", float(current.gpus), float(planned.gpus), 0),
        ("energy in the window (kWh)", current.energy_kwh, planned.energy_kwh, 2),
        ("carbon (kg CO2eq)", current.carbon_kg, planned.carbon_kg, 2),
        ("cost ($)", current.cost_usd, planned.cost_usd, 2),
    ]
    lines += [
        "",
        "| estimate at the forecast load | current layout | plan | difference |",
        "|---|---:|---:|---:|",
    ]
    for name, before, after, digits in rows:
        lines.append(
            f"| {name} | {_number(before, digits)} | {_number(after, digits)} | "
            f"{_delta(before, after, digits)} |"
        )
    lines.append(f"| lowest SLO headroom | {_headroom(current)} | {_headroom(planned)} | |")
    p = plan.prediction
    lines += [
        "",
        "Both columns are estimated the same way from the stored profiles: energy at the "
        "forecast mean rate, headroom at the forecast peak (`1 − peak / SLO capacity`; "
        "negative = over capacity; load beyond a pool's capacity spills to pools of larger "
        "types of the same service, as the optimizer plans it), "
        f"{prices.carbon_g_per_kwh:.0f} gCO2eq/kWh, "
        f"${prices.electricity_usd_per_mwh:.2f}/MWh, ${prices.gpu_usd_per_hour:.2f}/GPU-hour. "
        f"The optimizer's own prediction for the plan: {p.energy_kwh:.2f} kWh, "
        f"{p.carbon_g / 1000:.2f} kg CO2eq, ${p.cost_usd:.2f}, lowest SLO headroom "
        f"{p.min_slo_headroom:.0%}.",
    ]
    unprofiled = sorted(set(current.unprofiled) | set(planned.unprofiled))
    if unprofiled:
        lines.append(f"No profile for {', '.join(unprofiled)}: their figures are unknown (n/a).")
    lines += [
        "",
        f"**Approve** pushes the plan to cluster {plan.cluster}. **Reject** keeps the current "
        f"layout; so does no answer within {_duration(timeout_s)}. A newer "
        "plan supersedes this one if it is still unanswered.",
    ]
    return "\n".join(lines)

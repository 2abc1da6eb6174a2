"""Piecewise-linear power curves: clock envelopes, convex hulls, safe upper lines, dispatch.

Pure functions over :class:`~wattplan.domain.Profile` values; the model in
:mod:`optimizer.model` only sees the numbers computed here. The reasoning behind each
representation (and where it is exact) is in ``docs/optimizer.md``, section "Power".

Terms used here:

* the *envelope* ``Q(r)`` of a set of profiles that differ only in their locked clock is the
  power of an instance whose clock the instance-level loop sets for the load it carries:
  ``Q(r) = min { P_f(r) : capacity_f >= r }`` (the least power among the clocks that keep the
  SLO at rate ``r``; ties go to the lowest clock);
* its *lower convex hull* ``H`` is what the MILP charges for energy: for ``n`` instances
  carrying ``y`` the model charges ``n * H(y / n)``, an LP-exact perspective;
* its *upper line* ``a + b r >= Q(r)`` on ``[0, capacity]``, tight at capacity, is what the
  power-domain rows charge at the planned peak, so those rows never under-estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from wattplan.domain import Profile

Point = tuple[float, float]

#: Rates closer than this (rps) are the same event point.
_EPS = 1e-9


def lower_hull(points: Sequence[Point]) -> tuple[Point, ...]:
    """Lower convex hull of points, left to right (Andrew's monotone chain).

    Args:
        points: ``(x, y)`` pairs in any order; equal ``x`` keep the lowest ``y``.

    Returns:
        The hull's vertices with strictly increasing ``x``.
    """
    best: dict[float, float] = {}
    for x, y in points:
        best[x] = min(y, best.get(x, math.inf))
    hull: list[Point] = []
    for x, y in sorted(best.items()):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord from x1 to (x, y)
            if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append((x, y))
    return tuple(hull)


def simplify_hull(hull: Sequence[Point], rel_tol: float) -> tuple[Point, ...]:
    """Drop hull vertices while the chord stays within ``rel_tol`` above every dropped one.

    The result is still convex and lies on or above ``hull`` (never below), by at most
    ``rel_tol`` of the power at any dropped vertex; the ends are kept.

    Args:
        hull: Vertices of a lower convex hull, left to right.
        rel_tol: Allowed relative over-estimate (0 keeps every vertex).
    """
    if rel_tol <= 0 or len(hull) <= 2:
        return tuple(hull)
    kept = [hull[0]]
    i = 0
    while i < len(hull) - 1:
        j = i + 1
        # extend the chord from hull[i] as far as every skipped vertex stays within tolerance
        while j + 1 < len(hull) and all(
            _chord(hull[i], hull[j + 1], hull[k][0]) <= hull[k][1] * (1 + rel_tol)
            for k in range(i + 1, j + 1)
        ):
            j += 1
        kept.append(hull[j])
        i = j
    return tuple(kept)


def _chord(a: Point, b: Point, x: float) -> float:
    return a[1] + (x - a[0]) * (b[1] - a[1]) / (b[0] - a[0])


@dataclass(frozen=True)
class ClockBand:
    """Loads up to ``upto_rps`` (from the previous band's end) run at ``clock_mhz``."""

    upto_rps: float
    clock_mhz: int | None


@dataclass(frozen=True)
class Envelope:
    """Power of one instance whose clock follows its load, over a set of clock profiles.

    Attributes:
        profiles: The profiles (same serving config except the clock), lowest clock first;
            an unlocked clock (``None``) sorts last.
        capacity_rps: The largest SLO capacity among them.
        hull: Vertices of the lower convex hull of ``Q`` from rate 0 to ``capacity_rps``.
        upper_a_w: Intercept of the upper line (W).
        upper_b_w_per_rps: Slope of the upper line (W per rps).
        bands: The clock policy: for rising load, the clock the instance loop should set.
    """

    profiles: tuple[Profile, ...]
    capacity_rps: float
    hull: tuple[Point, ...]
    upper_a_w: float
    upper_b_w_per_rps: float
    bands: tuple[ClockBand, ...]

    @property
    def idle_w(self) -> float:
        """Hull value at rate 0: the lowest loaded-idle power over the clocks."""
        return self.hull[0][1]

    @property
    def segments(self) -> tuple[tuple[float, float], ...]:
        """``(width_rps, slope_w_per_rps)`` of each hull segment, convex: slopes rise."""
        return tuple(
            (x2 - x1, (y2 - y1) / (x2 - x1))
            for (x1, y1), (x2, y2) in zip(self.hull, self.hull[1:], strict=False)
        )

    def power_w(self, rate_rps: float) -> float:
        """``Q(rate)``: least power over the clocks whose capacity covers ``rate``."""
        return min(p.power_w(rate_rps) for p in self._feasible(rate_rps))

    def clock_for(self, rate_rps: float) -> int | None:
        """The clock the policy sets at ``rate`` (least power; lowest clock on ties)."""
        best = min(self._feasible(rate_rps), key=lambda p: (p.power_w(rate_rps), _rank(p)))
        return best.config.clock_mhz

    def lowest_slo_clock(self, rate_rps: float) -> int | None:
        """The lowest clock whose SLO capacity covers ``rate`` (the power guard's cap)."""
        return self._feasible(rate_rps)[0].config.clock_mhz

    def hull_w(self, rate_rps: float) -> float:
        """``H(rate)``: the lower convex hull of ``Q`` at ``rate`` (clamped to the range)."""
        rate = min(max(rate_rps, 0.0), self.capacity_rps)
        for (x1, y1), (x2, y2) in zip(self.hull, self.hull[1:], strict=False):
            if rate <= x2 + _EPS:
                return y1 + (rate - x1) * (y2 - y1) / (x2 - x1)
        return self.hull[-1][1]

    def _feasible(self, rate_rps: float) -> list[Profile]:
        rate = min(max(rate_rps, 0.0), self.capacity_rps)
        return [p for p in self.profiles if p.capacity_rps >= rate - _EPS]


def _rank(profile: Profile) -> int:
    """Order of clocks: locked clocks by MHz, then unlocked (the driver's maximum)."""
    clock = profile.config.clock_mhz
    return 1_000_000 if clock is None else clock


def _segment_lines(profile: Profile) -> list[tuple[float, float, float, float]]:
    """``(x1, x2, slope, intercept)`` of each curve segment."""
    lines = []
    for (x1, y1), (x2, y2) in zip(profile.power_curve, profile.power_curve[1:], strict=False):
        slope = (y2 - y1) / (x2 - x1)
        lines.append((x1, x2, slope, y1 - slope * x1))
    return lines


def _event_rates(profiles: Sequence[Profile], capacity: float) -> list[float]:
    """Rates where ``Q`` may bend or jump: curve points, capacities and curve crossings."""
    rates = {0.0, capacity}
    for p in profiles:
        rates.update(r for r, _ in p.power_curve)
    lines = [(p, seg) for p in profiles for seg in _segment_lines(p)]
    for i, (p, (a1, a2, s1, c1)) in enumerate(lines):
        for q, (b1, b2, s2, c2) in lines[i + 1 :]:
            if p is q or s1 == s2:
                continue
            x = (c2 - c1) / (s1 - s2)
            if max(a1, b1) < x < min(a2, b2):
                rates.add(x)
    ordered = sorted(r for r in rates if 0.0 <= r <= capacity)
    merged = [ordered[0]]
    for r in ordered[1:]:
        if r - merged[-1] > _EPS:
            merged.append(r)
    return merged


def build_envelope(profiles: Sequence[Profile], hull_tolerance: float = 0.0) -> Envelope:
    """The envelope, its hull, upper line and clock policy for profiles of one config.

    Args:
        profiles: Profiles for one request type whose serving configs differ only in
            ``clock_mhz`` (one profile gives a trivial envelope).
        hull_tolerance: Relative over-estimate allowed when simplifying the hull
            (:func:`simplify_hull`); 0 keeps it exact.

    Returns:
        The :class:`Envelope`.

    Raises:
        ValueError: ``profiles`` is empty.
    """
    if not profiles:
        raise ValueError("an envelope needs at least one profile")
    ordered = tuple(sorted(profiles, key=_rank))
    capacity = max(p.capacity_rps for p in ordered)
    draft = Envelope(ordered, capacity, ((0.0, 0.0), (capacity, 0.0)), 0.0, 0.0, ())
    hull = simplify_hull(lower_hull([pt for p in ordered for pt in p.power_curve]), hull_tolerance)
    events = _event_rates(ordered, capacity)
    # Q between events is the lower envelope of lines without a crossing: linear. Its
    # supremum over an interval is at an end or at a right limit where a clock drops out.
    top = draft.power_w(capacity)
    slope = math.inf
    for r in events:
        if r >= capacity - _EPS:
            continue
        values = [draft.power_w(r)]
        right = [p for p in ordered if p.capacity_rps > r + _EPS]
        values.append(min(p.power_w(r) for p in right))
        slope = min(slope, (top - max(values)) / (capacity - r))
    if not math.isfinite(slope):
        slope = 0.0
    bands: list[ClockBand] = []
    for lo, hi in zip(events, events[1:], strict=False):
        clock = draft.clock_for((lo + hi) / 2)
        if bands and bands[-1].clock_mhz == clock:
            bands[-1] = ClockBand(hi, clock)
        else:
            bands.append(ClockBand(hi, clock))
    if not bands:
        bands.append(ClockBand(capacity, draft.clock_for(capacity)))
    return Envelope(ordered, capacity, hull, top - slope * capacity, slope, tuple(bands))


@dataclass(frozen=True)
class Dispatch:
    """How ``instances`` share ``load_rps`` when packed onto hull vertices.

    ``loads`` lists ``(instances, rate_rps, clock_mhz)`` groups; ``power_w`` is their
    exact total power on the envelope ``Q``.
    """

    loads: tuple[tuple[int, float, int | None], ...]
    power_w: float


def packed_dispatch(envelope: Envelope, instances: int, load_rps: float) -> Dispatch:
    """Exact power of ``instances`` carrying ``load_rps`` packed onto hull vertices.

    With the per-instance rate ``r = load / n`` inside hull segment ``[a, b]``, ``m``
    instances run at ``b``, ``n - m - 1`` at ``a`` and one at the remainder ``r*``; the
    total differs from the model's ``n H(r)`` only by ``Q(r*) - H(r*)`` of that one
    instance (zero when ``Q`` is convex, e.g. linear curves).

    Args:
        envelope: The instance's envelope.
        instances: Instance count (>= 0).
        load_rps: Total load (clamped to ``[0, instances * capacity]``).

    Returns:
        The :class:`Dispatch`.
    """
    if instances <= 0:
        return Dispatch((), 0.0)
    load = min(max(load_rps, 0.0), instances * envelope.capacity_rps)
    rate = load / instances
    hull = envelope.hull
    a, b = hull[0][0], hull[-1][0]
    for (x1, _), (x2, _) in zip(hull, hull[1:], strict=False):
        if rate <= x2 + _EPS:
            a, b = x1, x2
            break
    m = 0 if b - a <= _EPS else math.floor((load - instances * a) / (b - a) + 1e-9)
    m = min(max(m, 0), instances - 1)
    rest = load - m * b - (instances - m - 1) * a
    rest = min(max(rest, 0.0), envelope.capacity_rps)
    groups = [(m, b), (instances - m - 1, a), (1, rest)]
    loads = tuple((k, r, envelope.clock_for(r)) for k, r in groups if k > 0)
    return Dispatch(loads, sum(k * envelope.power_w(r) for k, r, _ in loads))


def balanced_power_w(envelope: Envelope, instances: int, load_rps: float) -> float:
    """Power when a router spreads ``load_rps`` evenly: ``n Q(load / n)``."""
    if instances <= 0:
        return 0.0
    return instances * envelope.power_w(load_rps / instances)

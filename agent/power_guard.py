"""The POLCA power guard: keep a power domain under its budget by capping clocks in steps.

POLCA (DOMAIN.md section 7) lets a power domain (a row, a PDU) hold more servers than its
budget covers at peak, because inference rarely peaks everywhere at once; a runtime guard
caps clocks when measured power nears the budget. :class:`PowerGuard` is that guard for
one domain, one decision per power reading (every second):

=====  ===========================  ===============================================
level  entered when power exceeds   clock caps
=====  ===========================  ===============================================
0      (normal)                     none
1      T1 = ``t1_frac`` x budget    low-priority pools at their SLO-feasible clock
2      T2 = ``t2_frac`` x budget    low-priority pools at their minimum clock, the
                                    others at their SLO-feasible clock
3      the budget, for half the     every pool at its minimum clock (the brake)
       grace period
=====  ===========================  ===============================================

Release has hysteresis, and judges the power the domain would draw *without* the caps it
is releasing: when the guard raises a level it notes the reading, and ``hold_s`` later it
notes how much the caps saved; it steps down from level L only when the reading plus that
saving is ``release_frac`` x budget below the threshold of L (T2 for 2 and 3, T1 for 1),
and never sooner than ``hold_s`` after the last change. Judging the capped reading alone
would release, overshoot and cap again in a loop. Below level 2 no pool is capped under the plan's
SLO-feasible clock (``floor_mhz``); the plan gives each pool its priority and floor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PowerDomain:
    """A set of GPUs sharing a power budget."""

    name: str
    budget_w: float
    t1_frac: float = 0.90
    t2_frac: float = 0.97
    release_frac: float = 0.04
    grace_s: float = 10.0
    hold_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.budget_w > 0:
            raise ValueError(f"power domain {self.name}: budget_w must be > 0")
        if not 0 < self.t1_frac < self.t2_frac <= 1:
            raise ValueError(f"power domain {self.name}: need 0 < t1_frac < t2_frac <= 1")
        if not 0 <= self.release_frac < self.t1_frac or self.grace_s <= 0 or self.hold_s < 0:
            raise ValueError(f"power domain {self.name}: bad release_frac, grace_s or hold_s")


@dataclass(frozen=True)
class PoolClocks:
    """One pool's clocks as the guard sees them (from the plan and the GPU type)."""

    pool: str
    low_priority: bool
    floor_mhz: int
    min_mhz: int
    max_mhz: int

    def __post_init__(self) -> None:
        if not 0 < self.min_mhz <= self.floor_mhz <= self.max_mhz:
            raise ValueError(f"pool {self.pool}: need 0 < min_mhz <= floor_mhz <= max_mhz")


@dataclass(frozen=True)
class GuardDecision:
    """Caps after one power reading: ``caps[pool]`` is the highest clock it may run at (None:
    uncapped)."""

    at_s: float
    power_w: float
    level: int
    caps: Mapping[str, int | None]
    changed: bool


@dataclass
class PowerGuard:
    """The guard of one domain (see the module docstring)."""

    domain: PowerDomain
    pools: Sequence[PoolClocks]
    level: int = 0
    _raised_at_s: float = field(default=float("-inf"), init=False)
    _over_since_s: float | None = field(default=None, init=False)
    _raise_power_w: float = field(default=0.0, init=False)
    _saving_w: dict[int, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        names = [p.pool for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"power domain {self.domain.name}: a pool is listed twice")

    @property
    def t1_w(self) -> float:
        return self.domain.t1_frac * self.domain.budget_w

    @property
    def t2_w(self) -> float:
        return self.domain.t2_frac * self.domain.budget_w

    def step(self, now_s: float, power_w: float) -> GuardDecision:
        """Take one power reading (W, the domain's sum) and return the caps."""
        d = self.domain
        before = self.level
        if power_w > d.budget_w:
            self._over_since_s = now_s if self._over_since_s is None else self._over_since_s
        else:
            self._over_since_s = None
        target = self.level
        if power_w > self.t2_w:
            target = max(target, 2)
        elif power_w > self.t1_w:
            target = max(target, 1)
        if self._over_since_s is not None and now_s - self._over_since_s >= d.grace_s / 2:
            target = 3
        if target > self.level:
            self.level = target
            self._raised_at_s = now_s
            self._raise_power_w = power_w
            self._saving_w.pop(target, None)
        elif now_s - self._raised_at_s >= d.hold_s:
            if self.level and self.level not in self._saving_w:  # what the caps saved
                self._saving_w[self.level] = max(0.0, self._raise_power_w - power_w)
            margin = d.release_frac * d.budget_w
            uncapped_w = power_w + self._saving_w.get(self.level, 0.0)
            if self.level >= 2 and uncapped_w < self.t2_w - margin:
                self.level = 1
                self._raised_at_s = now_s  # the next step down waits hold_s again
            elif self.level == 1 and uncapped_w < self.t1_w - margin:
                self.level = 0
                self._raised_at_s = now_s
        return GuardDecision(now_s, power_w, self.level, self.caps(), self.level != before)

    def caps(self) -> dict[str, int | None]:
        """Each pool's cap at the current level."""
        out: dict[str, int | None] = {}
        for p in self.pools:
            if self.level == 0:
                out[p.pool] = None
            elif self.level == 1:
                out[p.pool] = p.floor_mhz if p.low_priority else None
            elif self.level == 2:
                out[p.pool] = p.min_mhz if p.low_priority else p.floor_mhz
            else:
                out[p.pool] = p.min_mhz
        return out

"""Instance-level clock selection (throttLL'eM-style): the lowest GPU clock that keeps the
running batch's time between tokens and the queue's time to first token within the SLO.

The window plan fixes instances, TP and a per-instance clock *policy*; between plans load
moves in seconds. Every few seconds (DynamoLLM: ~5 s) the loop reads the engine's state
(:mod:`agent.metrics`) and asks :class:`ClockController` for a clock. The controller
projects, for each supported clock, the time between tokens of the batch it would run --
the decode step of :class:`PerformanceModel`, stretched by the share of engine time the
current prefill load (prompt tokens per second, from the engine's counter) takes at that
clock -- and the prefill wait of the queued requests, and picks the lowest clock whose
projections stay under the SLOs times a safety margin (DOMAIN.md section 5).

Rules (each decision says which applied, as its ``reason``):

* ``deadline``: the queue's projected TTFT or the batch's TBT at the *current* clock
  already breaks the SLO: go to the maximum clock at once (no rate limit).
* ``raise``: a higher clock is needed to keep the SLO with the margin: raise at once.
* ``lower``: a lower clock keeps the SLO: lower only when it has been enough for
  ``settle_decisions`` decisions in a row and the last change is at least
  ``min_change_interval_s`` old (a clock change costs 50-200 ms, DOMAIN.md section 6).

The loop should poll more often than it may lower (default: every 0.5 s against 5 s), so
that raises and deadline jumps come within a poll while lowering keeps DynamoLLM's ~5 s
pace; on the replayed trace a 5 s poll missed 1-5% of requests' SLOs, a 0.5 s poll none.
* ``keep`` / ``rate-limited`` / ``metrics-unavailable`` (no reading: keep the clock).
* The plan's policy gives a floor per load (:class:`ClockPolicy`); no clock outside the
  GPU's supported list is ever chosen.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.metrics import EngineSnapshot

DEADLINE, RAISE, LOWER, KEEP = "deadline", "raise", "lower", "keep"
RATE_LIMITED, NO_METRICS = "rate-limited", "metrics-unavailable"


@dataclass(frozen=True)
class PerformanceModel:
    """Step times of one instance (model, GPU type, TP) against batch and clock.

    ``tbt(b, f) = (tbt_base_s + tbt_per_seq_s * b) * (1 + decode_clock_sensitivity *
    (max_clock / f - 1))``: decode is memory-bound, so only part of it slows with the
    clock (sensitivity 0: not at all, 1: like prefill). ``prefill(n, f) = (prefill_base_s
    + prefill_per_token_s * n) * max_clock / f``: prefill is compute-bound.
    """

    max_clock_mhz: int
    tbt_base_s: float
    tbt_per_seq_s: float
    prefill_base_s: float
    prefill_per_token_s: float
    decode_clock_sensitivity: float = 0.25

    def __post_init__(self) -> None:
        if self.max_clock_mhz <= 0:
            raise ValueError(f"max_clock_mhz must be > 0, not {self.max_clock_mhz}")
        for name in ("tbt_base_s", "tbt_per_seq_s", "prefill_base_s", "prefill_per_token_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not 0 <= self.decode_clock_sensitivity <= 1:
            raise ValueError("decode_clock_sensitivity must be in [0, 1]")

    def tbt_s(self, batch: int, clock_mhz: float) -> float:
        """Decode step time (time between tokens) of a batch of ``batch`` sequences."""
        slow = 1.0 + self.decode_clock_sensitivity * (self.max_clock_mhz / clock_mhz - 1.0)
        return (self.tbt_base_s + self.tbt_per_seq_s * max(batch, 1)) * slow

    def prefill_s(self, prompt_tokens: float, clock_mhz: float) -> float:
        """Prefill time of one prompt."""
        return (self.prefill_base_s + self.prefill_per_token_s * prompt_tokens) * (
            self.max_clock_mhz / clock_mhz
        )

    def prefill_share(self, prompt_tokens_per_s: float, clock_mhz: float) -> float:
        """Share of engine time that prefilling ``prompt_tokens_per_s`` takes at a clock."""
        return prompt_tokens_per_s * self.prefill_per_token_s * self.max_clock_mhz / clock_mhz

    def effective_tbt_s(self, batch: int, clock_mhz: float, prompt_tokens_per_s: float) -> float:
        """Time between tokens with prefills interleaved (inf when prefill alone saturates)."""
        share = self.prefill_share(prompt_tokens_per_s, clock_mhz)
        return self.tbt_s(batch, clock_mhz) / (1.0 - share) if share < 1.0 else float("inf")

    def queue_ttft_s(
        self,
        waiting: int,
        prompt_tokens: float,
        clock_mhz: float,
        prompt_tokens_per_s: float = 0.0,
    ) -> float:
        """Projected TTFT of a request arriving now: the prefills queued ahead of it and its
        own, stretched by the engine time the prefill load and the running decode take
        (inf when prefill alone saturates the engine)."""
        share = self.prefill_share(prompt_tokens_per_s, clock_mhz)
        if share >= 1.0:
            return float("inf")
        return (waiting + 1) * self.prefill_s(prompt_tokens, clock_mhz) / (1.0 - share)


@dataclass(frozen=True)
class ClockPolicy:
    """The plan's per-instance policy: the lowest clock allowed at a given load.

    ``floors`` are ``(load_rps, clock_mhz)`` steps: at a load of at least ``load_rps`` the
    clock may not go below ``clock_mhz`` (the optimizer's load -> lowest SLO clock table).
    """

    floors: tuple[tuple[float, int], ...] = ()

    def floor_mhz(self, load_rps: float | None) -> int | None:
        """The floor at ``load_rps`` (None: no floor, or no load reading)."""
        if load_rps is None or not self.floors:
            return None
        loads = [f[0] for f in self.floors]
        i = bisect.bisect_right(loads, load_rps) - 1
        return self.floors[i][1] if i >= 0 else None


@dataclass(frozen=True)
class ClockDecision:
    """What the controller chose and why."""

    clock_mhz: int
    changed: bool
    reason: str
    projected_tbt_s: float | None = None
    projected_ttft_s: float | None = None


@dataclass
class ClockController:
    """Chooses one instance's clock from its engine's state (see the module docstring).

    Args:
        model: The instance's performance model.
        clocks_mhz: Clocks the GPU supports (any order; the controller never leaves them).
        tbt_slo_s: SLO on the time between tokens.
        ttft_slo_s: SLO on the time to first token.
        prompt_tokens: Typical prompt length of the instance's request type.
        policy: The plan's floors by load.
        margin: Projections must stay under ``margin`` x SLO to choose a clock (0.65: the
            largest that kept every request of the replayed Azure conversation trace inside
            its SLO, see ``wattplan bench clock-loop``).
        min_change_interval_s: Least time between two lowering changes.
        settle_decisions: Decisions in a row a lower clock must be enough for.
        max_lower_steps: Lower by at most this many supported clocks per change (None: to
            the lowest feasible clock at once). 1 trades about half of the saving for SLO
            attainment within one request of the maximum clock over the replayed hour.
        clock_mhz: Current clock (default: the highest supported).
    """

    model: PerformanceModel
    clocks_mhz: Sequence[int]
    tbt_slo_s: float
    ttft_slo_s: float
    prompt_tokens: float
    policy: ClockPolicy = field(default_factory=ClockPolicy)
    margin: float = 0.65
    min_change_interval_s: float = 5.0
    settle_decisions: int = 2
    max_lower_steps: int | None = None
    clock_mhz: int | None = None
    _last_change_s: float = field(default=float("-inf"), init=False)
    _lower_streak: int = field(default=0, init=False)
    _last_prompt: tuple[float, float] | None = field(default=None, init=False)
    _prompt_rate: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        clocks = sorted({int(c) for c in self.clocks_mhz})
        if not clocks or clocks[0] <= 0:
            raise ValueError("clocks_mhz must list at least one positive clock")
        if self.tbt_slo_s <= 0 or self.ttft_slo_s <= 0 or not 0 < self.margin <= 1:
            raise ValueError("SLOs must be > 0 and margin in (0, 1]")
        self.clocks_mhz = clocks
        if self.max_lower_steps is not None and self.max_lower_steps < 1:
            raise ValueError("max_lower_steps must be >= 1 or None")
        if self.clock_mhz is None:
            self.clock_mhz = clocks[-1]
        elif self.clock_mhz not in clocks:
            raise ValueError(f"current clock {self.clock_mhz} MHz is not a supported clock")

    @property
    def max_mhz(self) -> int:
        return self.clocks_mhz[-1]

    def decide(
        self, now_s: float, snapshot: EngineSnapshot | None, load_rps: float | None = None
    ) -> ClockDecision:
        """The clock for the next interval (and whether it changed)."""
        current = int(self.clock_mhz or self.max_mhz)
        if snapshot is None:
            self._lower_streak = 0
            return ClockDecision(current, False, NO_METRICS)
        self._update_prompt_rate(now_s, snapshot)
        batch = snapshot.running + snapshot.waiting
        tbt_now = self.model.effective_tbt_s(batch, current, self._prompt_rate)
        ttft_now = self.model.queue_ttft_s(
            snapshot.waiting, self.prompt_tokens, current, self._prompt_rate
        )
        if tbt_now > self.tbt_slo_s or ttft_now > self.ttft_slo_s:
            return self._change(now_s, self.max_mhz, DEADLINE, snapshot)
        target = self._lowest_feasible(snapshot, load_rps)
        if target > current:
            return self._change(now_s, target, RAISE, snapshot)
        if target < current:
            self._lower_streak += 1
            if (
                self._lower_streak >= self.settle_decisions
                and now_s - self._last_change_s >= self.min_change_interval_s
            ):
                if self.max_lower_steps is not None:
                    step_down = self.clocks_mhz.index(current) - self.max_lower_steps
                    target = max(target, self.clocks_mhz[max(0, step_down)])
                return self._change(now_s, target, LOWER, snapshot)
            return ClockDecision(current, False, RATE_LIMITED, tbt_now, ttft_now)
        self._lower_streak = 0
        return ClockDecision(current, False, KEEP, tbt_now, ttft_now)

    def _update_prompt_rate(self, now_s: float, snapshot: EngineSnapshot) -> None:
        total = snapshot.prompt_tokens_total
        if total is None:
            return
        if self._last_prompt is not None and now_s > self._last_prompt[0]:
            delta = total - self._last_prompt[1]
            if delta >= 0:  # a restarted engine resets its counter: skip that interval
                self._prompt_rate = delta / (now_s - self._last_prompt[0])
        self._last_prompt = (now_s, total)

    def _lowest_feasible(self, snapshot: EngineSnapshot, load_rps: float | None) -> int:
        floor = self.policy.floor_mhz(load_rps) or 0
        batch = snapshot.running + snapshot.waiting
        for clock in self.clocks_mhz:
            if clock < floor:
                continue
            tbt = self.model.effective_tbt_s(batch, clock, self._prompt_rate)
            ttft = self.model.queue_ttft_s(
                snapshot.waiting, self.prompt_tokens, clock, self._prompt_rate
            )
            if tbt <= self.margin * self.tbt_slo_s and ttft <= self.margin * self.ttft_slo_s:
                return clock
        return self.max_mhz

    def _change(self, now_s: float, clock: int, reason: str, s: EngineSnapshot) -> ClockDecision:
        changed = clock != self.clock_mhz
        if changed:
            self.clock_mhz = clock
            self._last_change_s = now_s
        self._lower_streak = 0
        return ClockDecision(
            clock,
            changed,
            reason,
            self.model.effective_tbt_s(s.running + s.waiting, clock, self._prompt_rate),
            self.model.queue_ttft_s(s.waiting, self.prompt_tokens, clock, self._prompt_rate),
        )

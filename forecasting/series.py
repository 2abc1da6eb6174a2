"""Load series: one (service, request type)'s mean and peak rate per planning window.

The forecaster works on dense arrays indexed by *epoch steps*: step ``k`` is the window
``[k * window_s, (k + 1) * window_s)`` seconds since 1970-01-01 UTC, so the time of day and
the day of the week of every window follow from its step alone. A window that was never
observed is ``NaN`` (missing); a window observed quiet is ``0.0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from wattplan.domain import TypeWindow
from wattplan.errors import PlanInputError

#: The two forecast targets of every pool.
TARGETS: tuple[str, ...] = ("mean", "peak")


@dataclass(frozen=True, eq=False)
class LoadSeries:
    """Mean and peak request rate of one pool per window, oldest first.

    Attributes:
        service: Service (model deployment) the pool belongs to.
        request_type: Request type of the pool (e.g. ``"MS"``).
        first_step: Epoch step of index 0 (see the module docstring).
        window_s: Window length in seconds.
        mean_rps: Mean arrival rate per window; NaN where the window is missing.
        peak_rps: Highest 1-minute arrival rate inside each window; NaN where missing.
        members: What the pool was made from (e.g. ServeGen clients), for reports.
    """

    service: str
    request_type: str
    first_step: int
    window_s: int
    mean_rps: np.ndarray
    peak_rps: np.ndarray
    members: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.mean_rps.shape != self.peak_rps.shape or self.mean_rps.ndim != 1:
            raise PlanInputError(
                f"pool {self.service}/{self.request_type}: mean and peak arrays differ in shape "
                f"({self.mean_rps.shape} vs {self.peak_rps.shape})"
            )

    def __len__(self) -> int:
        return int(self.mean_rps.shape[0])

    @property
    def key(self) -> tuple[str, str]:
        """``(service, request_type)``."""
        return (self.service, self.request_type)

    @property
    def end_step(self) -> int:
        """Epoch step just after the last window."""
        return self.first_step + len(self)

    def values(self, target: str) -> np.ndarray:
        """The array of one target (``"mean"`` or ``"peak"``)."""
        if target == "mean":
            return self.mean_rps
        if target == "peak":
            return self.peak_rps
        raise PlanInputError(f"unknown forecast target {target!r}; use one of {TARGETS}")

    def start_of(self, step: int) -> datetime:
        """Start time of the window at an epoch step."""
        return step_start(step, self.window_s)

    def until(self, end_step: int) -> LoadSeries:
        """The series cut just before ``end_step`` (nothing at or after it survives)."""
        n = max(0, min(len(self), end_step - self.first_step))
        return LoadSeries(
            self.service,
            self.request_type,
            self.first_step,
            self.window_s,
            self.mean_rps[:n].copy(),
            self.peak_rps[:n].copy(),
            self.members,
        )


def step_of(at: datetime, window_s: int) -> int:
    """Epoch step of the window starting at ``at``.

    Raises:
        PlanInputError: ``at`` is naive or not aligned to ``window_s``.
    """
    if at.tzinfo is None:
        raise PlanInputError(f"{at.isoformat()} has no time zone; pass an aware (UTC) time")
    seconds = at.timestamp()
    if seconds % window_s:
        raise PlanInputError(f"{at.isoformat()} is not aligned to {window_s}-second windows")
    return int(seconds // window_s)


def step_start(step: int, window_s: int) -> datetime:
    """Start time (UTC) of the window at an epoch step."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=step * window_s)


def weekend_mask(steps: np.ndarray, window_s: int) -> np.ndarray:
    """True where the window at each epoch step starts on a Saturday or Sunday (UTC).

    1970-01-01 was a Thursday, so day ``d`` since the epoch is a weekend day when
    ``(d + 3) % 7`` is 5 or 6.
    """
    days = (np.asarray(steps, dtype=np.int64) * window_s) // 86400
    return (days + 3) % 7 >= 5


def series_from_type_windows(
    windows: Iterable[TypeWindow],
    start: datetime,
    end: datetime,
    window_s: int,
    pools: Sequence[tuple[str, str]] = (),
) -> list[LoadSeries]:
    """Aggregate observed windows (any length dividing ``window_s``) into planning windows.

    A planning window's mean is the requests of its observed sub-windows over their total
    length; its peak is the highest sub-window peak (each already the highest 1-minute rate).
    A planning window with no observed sub-window is missing (NaN).

    Args:
        windows: Observed windows of any pools, each of one length that divides ``window_s``.
        start: First planning window's start (aligned to ``window_s``).
        end: End of the last planning window (aligned to ``window_s``).
        window_s: Planning window length in seconds.
        pools: Pools to return even when no window of theirs was observed (all NaN).

    Returns:
        One series per pool, sorted by (service, request type).

    Raises:
        PlanInputError: a window's length does not divide ``window_s``, or the range is
            misaligned or empty.
    """
    first, last = step_of(start, window_s), step_of(end, window_s)
    if last <= first:
        raise PlanInputError(f"empty range {start.isoformat()}..{end.isoformat()}")
    n = last - first
    counts: dict[tuple[str, str], np.ndarray] = {}
    covered: dict[tuple[str, str], np.ndarray] = {}
    peaks: dict[tuple[str, str], np.ndarray] = {}

    def arrays(key: tuple[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if key not in counts:
            counts[key] = np.zeros(n)
            covered[key] = np.zeros(n)
            peaks[key] = np.full(n, -math.inf)
        return counts[key], covered[key], peaks[key]

    for key in pools:
        arrays(key)
    for w in windows:
        if w.window_s <= 0 or window_s % w.window_s:
            raise PlanInputError(
                f"observed window of {w.window_s} s ({w.service}/{w.request_type} at "
                f"{w.window_start.isoformat()}) does not divide the {window_s}-second window"
            )
        i = int(w.window_start.timestamp() // window_s) - first
        if not 0 <= i < n:
            continue
        c, cov, pk = arrays((w.service, w.request_type))
        c[i] += w.request_count
        cov[i] += w.window_s
        pk[i] = max(pk[i], w.peak_rate_rps)
    series = []
    for key in sorted(counts):
        cov = covered[key]
        seen = cov > 0
        mean = np.full(n, np.nan)
        mean[seen] = counts[key][seen] / cov[seen]
        peak = np.where(seen, peaks[key], np.nan)
        series.append(LoadSeries(key[0], key[1], first, window_s, mean, peak))
    return series


def minute_counts_to_series(
    counts_per_minute: np.ndarray,
    first_minute: int,
    window_s: int,
    *,
    service: str,
    request_type: str,
    members: tuple[str, ...] = (),
) -> LoadSeries:
    """Build a series from requests per minute (epoch minutes, NaN = not observed).

    Windows are cut at multiples of ``window_s``; a window is missing when none of its
    minutes was observed, its mean counts the observed minutes only.

    Raises:
        PlanInputError: ``window_s`` is not a whole number of minutes.
    """
    if window_s % 60 or window_s <= 0:
        raise PlanInputError(f"window_s={window_s} must be a positive multiple of 60")
    per = window_s // 60
    lead = (first_minute % per + per) % per
    padded = np.concatenate([np.full(lead, np.nan), np.asarray(counts_per_minute, float)])
    tail = (-len(padded)) % per
    padded = np.concatenate([padded, np.full(tail, np.nan)]).reshape(-1, per)
    seen = ~np.isnan(padded)
    observed = seen.sum(axis=1)
    with np.errstate(invalid="ignore"):
        mean = np.where(observed > 0, np.nansum(padded, axis=1) / (observed * 60), np.nan)
    peak = np.full(len(padded), np.nan)
    rows = observed > 0
    peak[rows] = np.nanmax(padded[rows], axis=1) / 60
    first_step = (first_minute - lead) // per
    return LoadSeries(service, request_type, first_step, window_s, mean, peak, members)

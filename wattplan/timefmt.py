"""Small time helpers (aware UTC datetimes only)."""

from __future__ import annotations

from datetime import UTC, datetime


def floor_to(moment: datetime, step_s: int) -> datetime:
    """Floor an aware datetime to a multiple of ``step_s`` seconds since the epoch."""
    if moment.tzinfo is None:
        raise ValueError("floor_to needs an aware datetime")
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % step_s, tz=UTC)

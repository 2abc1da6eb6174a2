"""Small time helpers (aware UTC datetimes only)."""

from __future__ import annotations

from datetime import UTC, datetime


def floor_to(moment: datetime, step_s: int) -> datetime:
    """Floor an aware datetime to a multiple of ``step_s`` seconds since the epoch."""
    if moment.tzinfo is None:
        raise ValueError("floor_to needs an aware datetime")
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % step_s, tz=UTC)


def cron_for_interval(seconds: int) -> str:
    """Cron expression whose runs split the day into intervals of ``seconds``.

    Raises:
        ValueError: the interval is not a whole number of minutes dividing an hour, or of
            hours dividing a day.
    """
    if seconds % 60 == 0 and 60 % (minutes := seconds // 60) == 0 and minutes < 60:
        return f"*/{minutes} * * * *"
    if seconds % 3600 == 0 and 24 % (hours := seconds // 3600) == 0:
        return f"0 */{hours} * * *"
    raise ValueError(
        f"an interval of {seconds} s does not divide the day evenly: use a number of minutes "
        "dividing 60 or of hours dividing 24"
    )

"""The JSONL request-log format: one JSON object per line, as serving engines log requests.

Fields (docs/formats.md has an example line): ``arrived_at`` (ISO 8601 with a zone, or
epoch seconds), ``input_tokens``, ``output_tokens`` (required); ``ttft_s``, ``tbt_s`` (mean
time between output tokens), ``token_times_s`` (seconds after arrival at which each output
token was emitted), ``e2e_s``, ``model``, ``pool``, ``instance_id``, ``outcome``
(ok|error|timeout|cancelled) and ``request_id`` (optional). Unknown fields are ignored.

Pure: reads one file, returns records and rejected lines; never raises on a line's content.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from telemetry.lines import (
    INT32_MAX,
    RejectCollector,
    decode_line,
    is_blank,
    line_key,
    open_lines,
)
from telemetry.requests import ParsedRequests, RequestRecord
from wattplan.domain import RequestTypeBins

OUTCOMES = frozenset({"ok", "error", "timeout", "cancelled"})
#: Longest text accepted for a name field (model, pool, instance_id, request_id).
MAX_NAME_CHARS = 512

#: Exceptions a malformed line can raise while it is read; each becomes a rejected row.
_CONTENT_ERRORS = (ValueError, TypeError, ArithmeticError, RecursionError, OSError)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


_decode: Callable[[str], Any]
try:  # msgspec (an Airflow dependency) decodes JSON about four times faster than json
    import msgspec

    _decode = msgspec.json.Decoder().decode
except ImportError:  # pragma: no cover - the stdlib fallback behaves the same on bad lines
    _decode = json.JSONDecoder(parse_constant=_refuse_constant).decode


def _arrival(value: Any) -> datetime:
    if value is None:
        raise ValueError("missing arrived_at")
    if isinstance(value, str):
        moment = datetime.fromisoformat(value.strip())
        if moment.tzinfo is None:
            raise ValueError(
                f"arrived_at {value[:64]!r} has no time zone: add Z or an offset such as +00:00"
            )
        return moment.astimezone(UTC)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"arrived_at must be ISO 8601 text or epoch seconds, not {value!r:.64}")
    if not math.isfinite(value):
        raise ValueError("arrived_at is not a finite number")
    return datetime.fromtimestamp(value, tz=UTC)


def _count(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if type(value) is int and 0 <= value <= INT32_MAX:  # fast path
        return value
    if value is None:
        raise ValueError(f"missing {key}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be a whole number of tokens, not {value!r:.64}")
    if not 0 <= value <= INT32_MAX:
        raise ValueError(f"{key} {value} must be in [0, {INT32_MAX}]")
    return value


def _seconds(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is float and 0.0 <= value < math.inf:  # fast path (NaN fails the test)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number of seconds, not {value!r:.64}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{key} {value!r} must be a finite number >= 0")
    return seconds


def _name(obj: dict[str, Any], key: str, escaped: bool, *, allow_int: bool = False) -> str | None:
    """A text field; ``escaped`` says the line holds ``\\u`` escapes (lone surrogates?)."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str:
        if allow_int and type(value) is int:
            return str(value)
        raise ValueError(f"{key} must be text, not {value!r:.64}")
    if len(value) > MAX_NAME_CHARS or "\x00" in value:
        raise ValueError(f"{key} holds NUL or is longer than {MAX_NAME_CHARS} characters")
    if escaped:
        value.encode("utf-8")  # a lone surrogate cannot be stored: UnicodeEncodeError
    return value


def _token_times(obj: dict[str, Any]) -> list[float] | None:
    value = obj.get("token_times_s")
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError("token_times_s must be a list of seconds after arrival")
    times: list[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise ValueError(f"token_times_s holds a non-number {item!r:.64}")
        t = float(item)
        if not math.isfinite(t) or t < 0 or (times and t < times[-1]):
            raise ValueError("token_times_s must be finite, >= 0 and non-decreasing")
        times.append(t)
    return times


def record_from_object(
    obj: dict[str, Any],
    arrived_at: datetime,
    source: str,
    line_no: int,
    service: str,
    bins: RequestTypeBins,
    *,
    escaped: bool = True,
) -> RequestRecord:
    """Validate one decoded JSON object (its ``arrived_at`` already read) and build its record.

    ``ttft_s``, ``tbt_s`` and ``e2e_s`` given explicitly win; missing ones are derived from
    ``token_times_s``: TTFT is the first time, end-to-end latency the last, mean TBT the
    span between first and last divided by the number of gaps (needs two tokens).

    Args:
        obj: The line's JSON object.
        arrived_at: Its arrival time, read with the object's ``arrived_at``.
        source: Source name stored with the record.
        line_no: Line number stored with the record.
        service: Service of the record.
        bins: Request-type bin edges.
        escaped: Whether the line may hold ``\\u`` escapes (text fields are then checked
            for lone surrogates, which PostgreSQL cannot store).

    Raises:
        ValueError: a field is missing, of the wrong type, negative, not finite or out of
            range, or TTFT exceeds the end-to-end latency.
    """
    input_tokens = _count(obj, "input_tokens")
    output_tokens = _count(obj, "output_tokens")
    ttft_s, tbt_s, e2e_s = _seconds(obj, "ttft_s"), _seconds(obj, "tbt_s"), _seconds(obj, "e2e_s")
    times = _token_times(obj)
    if times:
        ttft_s = times[0] if ttft_s is None else ttft_s
        e2e_s = times[-1] if e2e_s is None else e2e_s
        if tbt_s is None and len(times) >= 2:
            tbt_s = (times[-1] - times[0]) / (len(times) - 1)
    if ttft_s is not None and e2e_s is not None and ttft_s > e2e_s:
        raise ValueError(f"ttft_s {ttft_s} is larger than e2e_s {e2e_s}")
    outcome = _name(obj, "outcome", escaped)
    if outcome is not None and outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome[:64]!r} is not one of {sorted(OUTCOMES)}")
    return RequestRecord(
        source,
        line_no,
        service,
        arrived_at,
        input_tokens,
        output_tokens,
        bins.classify(input_tokens, output_tokens),
        _name(obj, "model", escaped),
        _name(obj, "pool", escaped),
        _name(obj, "instance_id", escaped),
        ttft_s,
        tbt_s,
        e2e_s,
        outcome,
        _name(obj, "request_id", escaped, allow_int=True),
    )


def parse_request_log(
    path: Path,
    service: str,
    bins: RequestTypeBins,
    *,
    source: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> ParsedRequests:
    """Read a JSONL request log (one JSON object per line).

    Never raises on a line's content: a truncated or non-JSON line, invalid UTF-8, NUL bytes,
    a missing or malformed field, negative tokens, NaN or infinite numbers, a line identical
    to an earlier one, or a ``request_id`` that appeared on an earlier line (valid or not)
    become :class:`~telemetry.lines.RejectedRow` with the reason. Line numbers are physical
    line numbers (the format has no header); blank lines are skipped and not counted.

    With ``start`` and ``end``, only the interval ``[start, end)`` is read: lines arriving
    outside it are skipped after their time is read (not validated, not counted), and only
    rejected lines attributed to the interval are returned (see
    :class:`~telemetry.lines.RejectedRow`); the result is the interval's part of a full
    parse.

    Args:
        path: The ``.jsonl`` file.
        service: Service (model endpoint) the requests belong to.
        bins: Request-type bin edges.
        source: Name stored with each row; defaults to the file name.
        start: Start of the interval to read (aware), or None for the whole file.
        end: End of the interval to read (aware), or None for the whole file.

    Raises:
        InputDataError: the file cannot be opened.
    """
    source = source or path.name
    records: list[RequestRecord] = []
    rejects = RejectCollector(source)
    seen_lines: dict[bytes, int] = {}
    seen_ids: dict[str, int] = {}
    for line_no, data in open_lines(path, "request log"):
        if is_blank(data):
            continue
        at: datetime | None = None
        try:
            obj = _decode(decode_line(data))
            if type(obj) is not dict:
                raise ValueError(f"not a JSON object but {type(obj).__name__}")
            request_id = obj.get("request_id")
            id_key = str(request_id) if type(request_id) in (str, int) else None
            first_id = line_no if id_key is None else seen_ids.setdefault(id_key, line_no)
            at = _arrival(obj.get("arrived_at"))
            rejects.seen(at)
            if (start is not None and at < start) or (end is not None and at >= end):
                continue
            record = record_from_object(
                obj, at, source, line_no, service, bins, escaped=b"\\u" in data
            )
            first = seen_lines.setdefault(line_key(data), line_no)
            if first != line_no:
                raise ValueError(f"duplicate of line {first}")
            if first_id != line_no:
                raise ValueError(f"request_id {str(id_key)[:64]!r} already on line {first_id}")
        except _CONTENT_ERRORS as exc:
            rejects.reject(line_no, data, str(exc) or type(exc).__name__, at)
            continue
        records.append(record)
    rejected = rejects.within(start, end)
    return ParsedRequests(tuple(records), rejected, len(records) + len(rejected))

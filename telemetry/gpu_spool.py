"""The collector's spool format for GPU telemetry: PostgreSQL ``COPY`` text with a header.

A spool file (``gpu-<node>-<first sample>.tsv``) starts with one header line, the
:data:`~telemetry.gpu.SAMPLE_KEYS` joined by tabs, followed by one sample per line: the
same fields in the same order, tab-separated, written as PostgreSQL's ``COPY`` text format
writes them (``\\N`` for null, backslash escapes for tab, newline, carriage return and
backslash in names, ``unsupported_fields`` as an array literal such as
``{applied_sm_clock_mhz}``). docs/telemetry.md documents it.

Why this format: a line is already a ``gpu_telemetry`` row, so a clean file goes to the
server as it is. :func:`scan_spool_bytes` first tries the *vectorised path*: one regular
expression checks that every line is canonical (the form :func:`format_spool_line`
writes), pandas' C reader and NumPy extract the columns the loader needs (time, GPU,
node, instance, energy, power), and the ``COPY`` payload is cut from the file's bytes by
line offsets. Any file it cannot vouch for entirely (a bad or non-canonical line, a
repeated sample, a wrong header, invalid UTF-8, a missing final newline) is read line by
line instead, through :func:`telemetry.gpu.scan_lines` and the same validation rules as
the JSONL format, which gives each bad line its reason; both paths produce the same rows.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from telemetry.gpu import (
    _BLANK,
    _FIELD_KIND,
    _MAX_T_S,
    _MIN_T_S,
    _NULL,
    SAMPLE_KEYS,
    GpuScan,
    SeenSamples,
    _add_reject,
    _copy_escape,
    _Reject,
    _split_lines,
    _unsupported_array,
    format_timestamp,
    parse_sample_object,
    scan_lines,
)

#: First line of every spool file.
SPOOL_HEADER = "\t".join(SAMPLE_KEYS)
_HEADER_BYTES = (SPOOL_HEADER + "\n").encode()
_BLANK_BYTES = _BLANK.encode()
_NAME_KEYS = frozenset({"gpu_uuid", "sampled_at", "node", "instance_id"})
_UNESCAPE = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}
_ESCAPE = re.compile(r"\\.?")
_INT_TEXT = re.compile(r"-?[0-9]+")
_FLOAT_TEXT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_ARRAY_NAME = re.compile(r"[a-z_]{1,64}")

# --- the canonical line (what format_spool_line writes), for the vectorised path ------------
# Names use a conservative character set (no escapes needed); numbers are plain decimals
# within the column's range; the same limits as the JSONL canonical form.
_C_NAME = r"[A-Za-z0-9_.:/@+-]{1,128}"
_C_I32 = r"(?:0|[1-9][0-9]{0,8}|\\N)"
_C_I64 = r"(?:0|[1-9][0-9]{0,17}|\\N)"
_C_FLT = r"(?:(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,17})?|\\N)"
_C_PCT = r"(?:100(?:\.0{1,17})?|[1-9]?[0-9](?:\.[0-9]{1,17})?|\\N)"
_C_KIND = {"int32": _C_I32, "int64": _C_I64, "float": _C_FLT, "pct": _C_PCT}
_C_LINE = (
    _C_NAME
    + r"\t[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z\t"
    + _C_NAME
    + r"\t(?:0|[1-9][0-9]{0,8})\t(?:"
    + _C_NAME
    + r"|\\N)"
    + "".join(r"\t" + _C_KIND[_FIELD_KIND[name]] for name in SAMPLE_KEYS[5:-1])
    + r"\t\{(?:[a-z_]{1,32}(?:,[a-z_]{1,32}){0,8})?\}\n"
)
#: Every line of a body canonical (possessive: no backtracking over millions of lines).
_CANONICAL_BODY = re.compile(f"(?:{_C_LINE})*+".encode())
_US_PER_DAY = 86_400_000_000
# columns the vectorised path reads: (index in the line, name)
_READ_COLUMNS = {0: "gpu_uuid", 1: "sampled_at", 2: "node", 4: "instance_id"}
_READ_NUMBERS = {5: "energy_mj", 6: "power_w"}


def format_spool_line(record: Mapping[str, Any]) -> str:
    """One sample as its canonical spool line (no trailing newline).

    Args:
        record: The :data:`~telemetry.gpu.SAMPLE_KEYS` (``sampled_at`` an aware datetime;
            missing measurement keys are written as null, ``unsupported_fields`` defaults
            to []).

    Raises:
        ValueError: ``sampled_at`` is naive, or a number is not finite.
    """
    fields = []
    for key in SAMPLE_KEYS:
        value = record.get(key)
        if key == "sampled_at" and isinstance(value, datetime):
            fields.append(format_timestamp(value))
        elif key == "unsupported_fields":
            fields.append("{" + ",".join(value or ()) + "}")
        elif value is None:
            fields.append(_NULL)
        elif isinstance(value, bool):
            raise ValueError(f"{key} must be a number or text, not a bool")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{key} must be finite, not {value}")
            fields.append(repr(value))
        else:
            fields.append(_copy_escape(str(value)))
    return "\t".join(fields)


def scan_spool_bytes(
    data: bytes,
    source: str,
    *,
    start_s: float = -math.inf,
    end_s: float = math.inf,
    seen: SeenSamples | None = None,
    keep_samples: bool = False,
    into: GpuScan | None = None,
    vectorised: bool = True,
) -> GpuScan:
    """Validate one spool file and collect the interval's samples: what
    :func:`telemetry.gpu.scan_gpu_bytes` does for JSONL, for the spool format.

    A file whose first line is not :data:`SPOOL_HEADER` is rejected whole: every line,
    the header included, becomes a rejected row naming the expected header (the columns
    cannot be trusted).

    Args:
        data: The file's bytes.
        source: Name stored with each row (the file name).
        start_s: Interval start, seconds since the epoch.
        end_s: Interval end, seconds since the epoch.
        seen: Keys accepted so far in this load (shared across files).
        keep_samples: Build :class:`~telemetry.gpu.GpuSample` objects (line by line).
        into: Append to this scan instead of a new one.
        vectorised: Try the vectorised path first (False: line by line only; the result is
            the same, which the tests check).
    """
    out = into if into is not None else GpuScan()
    seen = SeenSamples() if seen is None else seen
    if vectorised and not keep_samples and _scan_vectorised(data, start_s, end_s, seen, out):
        return out
    lines, ends_in_newline = _split_lines(data)
    if lines and lines[-1] in ("", b""):
        lines.pop()
        ends_in_newline = True
    if not lines:
        return out
    header = lines[0]
    if not isinstance(header, str) or header.rstrip("\r") != SPOOL_HEADER:
        reason = (
            "file header is not the GPU spool header (expected the tab-separated columns "
            f"{', '.join(SAMPLE_KEYS)}): the file's columns are unknown, so every line is "
            "rejected"
        )
        for line_no, line in enumerate(lines, start=1):
            blank = not (line.strip(_BLANK) if isinstance(line, str) else line.strip(_BLANK_BYTES))
            if not blank:
                _add_reject(out, source, line_no, line, reason, None, start_s, end_s)
        return out
    return scan_lines(
        lines[1:],
        ends_in_newline,
        source,
        first_line_no=2,
        parse_line=parse_spool_line,
        start_s=start_s,
        end_s=end_s,
        seen=seen,
        keep_samples=keep_samples,
        into=out,
    )


def parse_spool_line(
    line: str,
) -> tuple[tuple[str | None, ...], float, tuple[str, tuple[str, ...]]]:
    """Validate one spool line (any valid spelling): see :data:`telemetry.gpu.LineParser`.

    Raises:
        _Reject: the line breaks a rule (the message is the reason).
    """
    fields = line.split("\t")
    if len(fields) != len(SAMPLE_KEYS):
        raise _Reject(
            f"expected {len(SAMPLE_KEYS)} tab-separated fields ({', '.join(SAMPLE_KEYS)}), "
            f"found {len(fields)}"
        )
    obj: dict[str, Any] = {}
    t_s = None
    try:
        for key, text in zip(SAMPLE_KEYS, fields, strict=True):
            obj[key] = _value(key, text)
            if key == "sampled_at" and isinstance(obj[key], str):
                t_s = _time_of(obj[key])
    except _Reject as exc:
        exc.t_s = t_s
        raise
    return parse_sample_object(obj)


def _time_of(text: str) -> float | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.utcoffset() is None:
        return None
    t_s = moment.timestamp()
    return t_s if _MIN_T_S <= t_s < _MAX_T_S else None


def _value(key: str, text: str) -> Any:
    """A field's text as the JSON-like value :func:`parse_sample_object` checks."""
    if text == _NULL:
        return None
    if key in _NAME_KEYS:
        return _unescape(key, text)
    if key == "unsupported_fields":
        if len(text) < 2 or text[0] != "{" or text[-1] != "}":
            raise _Reject(
                f"unsupported_fields {text[:60]!r} is not an array literal such as "
                "{applied_sm_clock_mhz}"
            )
        names = text[1:-1].split(",") if len(text) > 2 else []
        if not all(_ARRAY_NAME.fullmatch(n) for n in names):
            raise _Reject(f"unsupported_fields {text[:60]!r} must list field names")
        return names
    if _INT_TEXT.fullmatch(text):
        return int(text)
    if _FLOAT_TEXT.fullmatch(text):
        return float(text)  # may be inf for huge exponents: rejected as not finite
    raise _Reject(f"{key} {text[:40]!r} is not a number")


def _unescape(key: str, text: str) -> str:
    if "\\" not in text:
        return text

    def one(match: re.Match[str]) -> str:
        escape = match.group(0)
        if escape not in _UNESCAPE:
            raise _Reject(
                f"{key} holds an unknown escape {escape!r} (COPY text allows \\\\, \\t, \\n, \\r)"
            )
        return _UNESCAPE[escape]

    return _ESCAPE.sub(one, text)


# --- the vectorised path ---------------------------------------------------------------------


def _scan_vectorised(
    data: bytes, start_s: float, end_s: float, seen: SeenSamples, out: GpuScan
) -> bool:
    """Scan a wholly canonical file with pandas and NumPy; False (nothing changed) when the
    file needs the line-by-line path."""
    if not data.startswith(_HEADER_BYTES) or not data.endswith(b"\n"):
        return False
    if _CANONICAL_BODY.fullmatch(data, len(_HEADER_BYTES)) is None:
        return False
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    n = len(newlines) - 1  # the header's newline is the first
    if n == 0:
        return True
    table = pd.read_csv(
        io.BytesIO(data),
        sep="\t",
        header=None,
        skiprows=1,
        usecols=[*_READ_COLUMNS, *_READ_NUMBERS, len(SAMPLE_KEYS) - 1],
        names=list(SAMPLE_KEYS),
        dtype={
            **{name: "category" for name in _READ_COLUMNS.values()},
            "unsupported_fields": "category",
            **{name: "float64" for name in _READ_NUMBERS.values()},
        },
        na_values=[_NULL],
        keep_default_na=False,
        quoting=3,  # csv.QUOTE_NONE: the format has no quoting
        engine="c",
    )
    if len(table) != n:
        return False
    for text in table["unsupported_fields"].cat.categories:
        try:
            _unsupported_array(text[1:-1].split(",") if len(text) > 2 else [])
        except _Reject:
            return False  # an unknown or repeated name: the line-by-line path names it
    stamps = table["sampled_at"].cat
    try:  # canonical times: ...T..:..:..\.ffffffZ, all UTC
        unique_us = np.array(
            [text[:-1] for text in stamps.categories.tolist()], dtype="datetime64[us]"
        ).astype(np.int64)
    except ValueError:
        return False  # e.g. a 13th month: the line-by-line path names it
    t_us = unique_us[stamps.codes.to_numpy()]
    if len(unique_us) and (unique_us.min() / 1e6 < _MIN_T_S or unique_us.max() / 1e6 >= _MAX_T_S):
        return False  # the line-by-line path rejects them with the reason
    t_s = t_us / 1e6
    inside = (t_s >= start_s) & (t_s < end_s)
    gpu = table["gpu_uuid"].cat
    gpu_names = list(gpu.categories)
    gpu_codes = gpu.codes.to_numpy().astype(np.int64)
    accepted = _accept_keys(seen, gpu_names, gpu_codes[inside], t_us[inside])
    if accepted is None:
        return False  # a repeated sample: the line-by-line path rejects it with its reason
    energy = table["energy_mj"].to_numpy(dtype=np.float64)
    power = table["power_w"].to_numpy(dtype=np.float64)

    # commit: from here on nothing can fail over to the line-by-line path
    for uuid, times in accepted.items():
        seen.by_gpu[uuid] = times
    before = np.flatnonzero(t_s < start_s)
    if len(before):
        for code in np.unique(gpu_codes[before]).tolist():
            rows = before[gpu_codes[before] == code]
            last = int(rows[np.argmax(t_s[rows])])
            anchor = out.anchors.get(gpu_names[code])
            if anchor is None or anchor[0] < t_s[last]:
                out.anchors[gpu_names[code]] = (
                    float(t_s[last]),
                    float(energy[last]),
                    float(power[last]),
                )
    out.rows_outside += int(n - inside.sum())
    picked = np.flatnonzero(inside)
    if not len(picked):
        return True
    names = np.asarray(gpu_names, dtype=object)
    nodes = table["node"].cat
    instances = table["instance_id"].cat
    node_names = np.asarray(list(nodes.categories), dtype=object)
    inst_names = np.asarray([*instances.categories.tolist(), None], dtype=object)
    out.t_s.frombytes(np.ascontiguousarray(t_s[picked]).tobytes())
    out.gpu_uuid.extend(names[gpu_codes[picked]].tolist())
    out.node.extend(node_names[nodes.codes.to_numpy()[picked]].tolist())
    out.instance_id.extend(inst_names[instances.codes.to_numpy()[picked]].tolist())  # -1: None
    out.energy_mj.frombytes(np.ascontiguousarray(energy[picked]).tobytes())
    out.power_w.frombytes(np.ascontiguousarray(power[picked]).tobytes())
    _cut_copy_chunks(data, newlines, np.where(inside, t_us // _US_PER_DAY, -1), out)
    return True


def _accept_keys(
    seen: SeenSamples, gpu_names: list[str], codes: np.ndarray, t_us: np.ndarray
) -> dict[str, list[int]] | None:
    """Each GPU's accepted times after adding these samples, or None if one repeats (in
    the file or against ``seen``). ``seen`` itself is not changed."""
    result: dict[str, list[int]] = {}
    order = np.lexsort((t_us, codes))
    codes, t_us = codes[order], t_us[order]
    if len(t_us) > 1 and bool(np.any((codes[1:] == codes[:-1]) & (t_us[1:] == t_us[:-1]))):
        return None
    bounds = np.flatnonzero(np.diff(codes)) + 1
    for part_codes, part in zip(np.split(codes, bounds), np.split(t_us, bounds), strict=True):
        if not len(part):
            continue
        uuid = gpu_names[int(part_codes[0])]
        times = seen.by_gpu.get(uuid, [])
        new = part.tolist()
        if not times or new[0] > times[-1]:
            result[uuid] = times + new
            continue
        known = np.asarray(times, dtype=np.int64)
        if bool(np.isin(part, known).any()):
            return None
        result[uuid] = np.union1d(known, part).tolist()
    return result


def _cut_copy_chunks(
    data: bytes, newlines: np.ndarray, day_of_row: np.ndarray, out: GpuScan
) -> None:
    """Append the picked rows (``day_of_row >= 0``) to ``out.copy_by_day`` as slices of
    ``data``: a canonical spool line is a ``COPY`` row as it stands."""
    change = np.flatnonzero(day_of_row[1:] != day_of_row[:-1]) + 1
    starts = np.concatenate(([0], change)).tolist()
    ends = np.concatenate((change, [len(day_of_row)])).tolist()
    line_start = (newlines[:-1] + 1).tolist()  # body row i starts after newline i
    line_end = (newlines[1:] + 1).tolist()
    days = day_of_row.tolist()
    for first, stop in zip(starts, ends, strict=True):
        day = days[first]
        if day < 0:
            continue
        chunk = data[line_start[first] : line_end[stop - 1]]
        key = datetime.fromtimestamp(day * 86_400, tz=UTC).strftime("%Y%m%d")
        out.copy_by_day.setdefault(key, []).append(chunk)

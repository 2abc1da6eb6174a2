"""JSONL request-log parsing: fields, derived latencies, rejects, and latency percentiles."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from telemetry.request_log import parse_request_log
from telemetry.requests import aggregate_windows
from wattplan.domain import RequestTypeBins
from wattplan.errors import InputDataError

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
BINS = RequestTypeBins()


def line(**fields: object) -> str:
    base: dict[str, object] = {
        "arrived_at": "2025-03-01T12:00:05Z",
        "input_tokens": 300,
        "output_tokens": 120,
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


def write(tmp_path: Path, *lines: str | bytes) -> Path:
    path = tmp_path / "engine.jsonl"
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def test_full_line_becomes_a_record_with_every_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        line(
            request_id="r1",
            ttft_s=0.25,
            tbt_s=0.03,
            e2e_s=3.8,
            model="llama3-70b",
            pool="MM",
            instance_id="node1/gpu0-3",
            outcome="ok",
        ),
    )
    parsed = parse_request_log(path, "chat", BINS)
    (record,) = parsed.records
    assert parsed.rows_read == 1 and not parsed.rejected
    assert record.arrived_at == T0 + timedelta(seconds=5)
    assert (record.source, record.line_no, record.service) == ("engine.jsonl", 1, "chat")
    assert (record.input_tokens, record.output_tokens, record.request_type) == (300, 120, "MM")
    assert (record.ttft_s, record.tbt_s, record.e2e_s) == (0.25, 0.03, 3.8)
    assert (record.model, record.pool, record.instance_id, record.outcome) == (
        "llama3-70b",
        "MM",
        "node1/gpu0-3",
        "ok",
    )
    assert record.request_id == "r1"


def test_token_times_give_ttft_mean_tbt_and_e2e(tmp_path: Path) -> None:
    path = write(tmp_path, line(output_tokens=4, token_times_s=[0.5, 0.6, 0.8, 1.1]))
    (record,) = parse_request_log(path, "chat", BINS).records
    assert record.ttft_s == 0.5
    assert record.e2e_s == 1.1
    assert record.tbt_s == pytest.approx((1.1 - 0.5) / 3)


def test_explicit_latencies_win_over_token_times(tmp_path: Path) -> None:
    path = write(tmp_path, line(ttft_s=0.4, tbt_s=0.05, e2e_s=2.0, token_times_s=[0.5, 0.6]))
    (record,) = parse_request_log(path, "chat", BINS).records
    assert (record.ttft_s, record.tbt_s, record.e2e_s) == (0.4, 0.05, 2.0)


def test_epoch_seconds_and_iso_with_offset_name_the_same_instant(tmp_path: Path) -> None:
    epoch = (T0 + timedelta(seconds=5)).timestamp()
    path = write(
        tmp_path,
        line(arrived_at=epoch, request_id="a"),
        line(arrived_at="2025-03-01T13:00:05+01:00", request_id="b"),
    )
    first, second = parse_request_log(path, "chat", BINS).records
    assert first.arrived_at == second.arrived_at == T0 + timedelta(seconds=5)
    assert second.arrived_at.tzinfo == UTC


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"arrived_at": "2025-03-01T12:00:05Z", "input_tokens": 3', "truncated"),
        ("not json at all", "malformed"),
        ("[1, 2, 3]", "not a JSON object"),
        (line(arrived_at=...), "missing arrived_at"),
        (line(input_tokens=...), "missing input_tokens"),
        (line(output_tokens="12"), "whole number of tokens"),
        (line(input_tokens=-3), "must be in [0,"),
        (line(input_tokens=2**40), "must be in [0,"),
        (line(input_tokens=True), "whole number of tokens"),
        (line(arrived_at="2025-03-01T12:00:05"), "no time zone"),
        (line(arrived_at="yesterday"), "isoformat"),
        (line(arrived_at=1e300), "out of range"),
        (line(ttft_s=-0.1), "must be a finite number >= 0"),
        (line(ttft_s="fast"), "number of seconds"),
        (line(ttft_s=3.0, e2e_s=2.0), "larger than e2e_s"),
        (line(token_times_s=[0.5, 0.2]), "non-decreasing"),
        (line(outcome="maybe"), "outcome 'maybe' is not one of"),
        (line(model=7), "model must be text"),
        ('{"arrived_at": 1700000000, "input_tokens": NaN, "output_tokens": 1}', "malformed"),
        ('{"arrived_at": Infinity, "input_tokens": 1, "output_tokens": 1}', "malformed"),
        ('{"arrived_at": 1700000000, "input_tokens": 1, "output_tokens": 1e999}', "range"),
        (line(model="a\x00b"), "NUL"),
    ],
)
def test_bad_line_is_rejected_with_its_reason(tmp_path: Path, text: str, reason: str) -> None:
    path = write(tmp_path, line(request_id="good"), text)
    parsed = parse_request_log(path, "chat", BINS)
    assert [r.line_no for r in parsed.records] == [1]
    (rejected,) = parsed.rejected
    assert (rejected.source, rejected.line_no) == ("engine.jsonl", 2)
    assert reason in rejected.reason
    assert rejected.raw == text
    assert parsed.rows_read == 2


def test_lone_surrogate_in_a_name_is_rejected_not_stored(tmp_path: Path) -> None:
    text = '{"arrived_at": 1700000000, "input_tokens": 1, "output_tokens": 1, "pool": "\\ud800"}'
    parsed = parse_request_log(write(tmp_path, text), "chat", BINS)
    assert not parsed.records and len(parsed.rejected) == 1


def test_repeated_line_and_repeated_request_id_are_rejected_naming_the_first(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        line(request_id="r1"),
        line(request_id="r1"),
        line(request_id="r1", input_tokens=5),
        line(request_id="r2"),
    )
    parsed = parse_request_log(path, "chat", BINS)
    assert [r.line_no for r in parsed.records] == [1, 4]
    assert [(r.line_no, r.reason) for r in parsed.rejected] == [
        (2, "duplicate of line 1"),
        (3, "request_id 'r1' already on line 1"),
    ]


def test_binary_and_latin1_lines_are_rejected_with_printable_raw(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        line(request_id="ok"),
        b"\x00\x01\xff\xfe garbage \x00",
        '{"arrived_at": 1700000000, "input_tokens": 1, "output_tokens": 1, "model": "café"}'.encode(
            "latin-1"
        ),
    )
    parsed = parse_request_log(path, "chat", BINS)
    assert [r.line_no for r in parsed.records] == [1]
    binary, latin1 = parsed.rejected
    assert "NUL" in binary.reason and "\x00" not in binary.raw
    assert binary.raw == "\x01\\xff\\xfe garbage "
    assert "not valid UTF-8" in latin1.reason and "caf\\xe9" in latin1.raw


def test_very_long_garbage_line_keeps_a_capped_raw(tmp_path: Path) -> None:
    parsed = parse_request_log(write(tmp_path, "x" * 100_000), "chat", BINS)
    (rejected,) = parsed.rejected
    assert len(rejected.raw) < 9000 and rejected.raw.endswith("more characters]")


def test_blank_lines_are_not_rows_but_keep_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "", line(request_id="a"), "   ", "\r", line(request_id="b"))
    parsed = parse_request_log(path, "chat", BINS)
    assert parsed.rows_read == 2
    assert [r.line_no for r in parsed.records] == [2, 5]


def test_rejected_line_is_attributed_to_its_neighbours_time(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "garbage before any time",
        line(arrived_at="2025-03-01T12:07:00Z", request_id="a"),
        "garbage after",
        line(arrived_at="2025-03-01T12:09:00Z", input_tokens=-1),
    )
    rejected = parse_request_log(path, "chat", BINS).rejected
    assert [r.attributed_at for r in rejected] == [
        T0 + timedelta(minutes=7),
        T0 + timedelta(minutes=7),
        T0 + timedelta(minutes=9),
    ]


def test_missing_file_raises_an_input_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="cannot open request log .*nope.jsonl"):
        parse_request_log(tmp_path / "nope.jsonl", "chat", BINS)


def test_windows_carry_latency_percentiles_only_where_measured(tmp_path: Path) -> None:
    ttfts = [0.1 * (i + 1) for i in range(10)]
    lines = [
        line(arrived_at=f"2025-03-01T12:00:{i:02d}Z", ttft_s=t, tbt_s=0.02, request_id=str(i))
        for i, t in enumerate(ttfts)
    ]
    lines.append(line(arrived_at="2025-03-01T12:00:30Z", input_tokens=10, request_id="x"))
    records = parse_request_log(write(tmp_path, *lines), "chat", BINS).records
    windows = {
        w.request_type: w
        for w in aggregate_windows(records, T0, T0 + timedelta(minutes=5), 300, ["chat"])
    }
    mm, sm, ll = windows["MM"], windows["SM"], windows["LL"]
    assert mm.request_count == 10
    assert mm.ttft_p50_s == pytest.approx(0.55)  # linear between 0.5 and 0.6
    assert mm.ttft_p99_s == pytest.approx(0.1 * 9 + 0.91 * 0.1)
    assert mm.tbt_p50_s == mm.tbt_p99_s == pytest.approx(0.02)
    assert sm.request_count == 1 and sm.ttft_p50_s is None and sm.tbt_p99_s is None
    assert ll.request_count == 0 and ll.ttft_p50_s is None

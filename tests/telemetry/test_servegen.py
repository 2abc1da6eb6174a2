"""ServeGen rate traces and token distributions -> workload rates."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from telemetry.servegen import (
    SERVEGEN_DAY0,
    client_of,
    distribution_mean,
    parse_rate_trace,
    parse_token_windows,
    workload_rates,
)
from wattplan.errors import InputDataError
from wattplan.settings import PROJECT_ROOT

BUNDLED = PROJECT_ROOT / "data" / "servegen-alibaba" / "language" / "m-large"


def test_default_day0_is_a_monday_at_midnight_utc() -> None:
    assert datetime(2024, 1, 1, tzinfo=UTC) == SERVEGEN_DAY0
    assert SERVEGEN_DAY0.weekday() == 0


def test_client_name_comes_from_the_file_name() -> None:
    assert client_of(Path("chunk-61-trace.csv")) == "chunk-61"
    assert client_of(Path("chunk-61-dataset.json")) == "chunk-61"


def test_trace_rows_keep_fit_and_empty_windows_have_no_fit(tmp_path: Path) -> None:
    path = tmp_path / "chunk-7-trace.csv"
    path.write_text("0,5.25,0.92,Gamma,1.17,0.16\n600,0,0,,0,0\n1200,1.5,1.3,Weibull,0.8,0.5\n")
    parsed = parse_rate_trace(path)
    assert parsed.rows_read == 3 and not parsed.rejected
    first, empty, third = parsed.rows
    assert (first.client, first.timestamp_s, first.rate_rps, first.cv, first.pattern) == (
        "chunk-7",
        0,
        5.25,
        0.92,
        "Gamma",
    )
    assert (first.shape, first.scale) == (1.17, 0.16)
    assert (empty.rate_rps, empty.cv, empty.pattern, empty.shape) == (0.0, None, None, None)
    assert third.pattern == "Weibull"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("600,1.0,0.5,Gamma,1,1,9", "expected 6 fields"),
        ("600,fast,0.5,Gamma,1,1", "could not convert"),
        ("600,nan,0.5,Gamma,1,1", "not a finite number"),
        ("600,inf,0.5,Gamma,1,1", "not a finite number"),
        ("600,-2,0.5,Gamma,1,1", "must be >= 0"),
        ("-600,1,0.5,Gamma,1,1", "whole number of seconds"),
        ("600.5,1,0.5,Gamma,1,1", "whole number of seconds"),
        ("600,1,0.5,Gam ma();,1,1", "not a distribution name"),
        ("0,1,0.5,Gamma,1,1", "timestamp 0 already on line 1"),
        ("99999999999999,1,0.5,Gamma,1,1", "100 years"),
    ],
)
def test_bad_trace_row_is_rejected_with_reason(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "chunk-7-trace.csv"
    path.write_text(f"0,5.25,0.92,Gamma,1.17,0.16\n{text}\n")
    parsed = parse_rate_trace(path, source="servegen-x/chunk-7-trace.csv")
    assert len(parsed.rows) == 1
    (rejected,) = parsed.rejected
    assert (rejected.source, rejected.line_no, rejected.raw) == (
        "servegen-x/chunk-7-trace.csv",
        2,
        text,
    )
    assert reason in rejected.reason


def test_distribution_mean_is_the_probability_weighted_token_count() -> None:
    assert distribution_mean("{10: 0.25, 20: 0.75}", "x") == pytest.approx(17.5)
    assert distribution_mean({1: 2.0, 3: 2.0}, "x") == pytest.approx(2.0)  # normalised


def test_dataset_literals_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    path = tmp_path / "chunk-7-dataset.json"
    path.write_text(json.dumps({"0": {"input_tokens": payload, "output_tokens": "{1: 1.0}"}}))
    parsed = parse_token_windows(path)
    assert not parsed.windows and len(parsed.rejected) == 1
    assert not marker.exists()


def test_dataset_windows_with_bad_distributions_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "chunk-7-dataset.json"
    path.write_text(
        json.dumps(
            {
                "0": {"input_tokens": "{100: 1.0}", "output_tokens": "{10: 0.5, 30: 0.5}"},
                "21600": {"input_tokens": "{}", "output_tokens": "{10: 1.0}"},
                "43200": {"input_tokens": "{100: -1.0}", "output_tokens": "{10: 1.0}"},
                "x": {"input_tokens": "{100: 1.0}", "output_tokens": "{10: 1.0}"},
                "64800": {"input_tokens": "{100: 1.0"},
            }
        )
    )
    parsed = parse_token_windows(path)
    assert [(w.timestamp_s, w.mean_input_tokens, w.mean_output_tokens) for w in parsed.windows] == [
        (0, 100.0, 20.0)
    ]
    assert [r.line_no for r in parsed.rejected] == [2, 3, 4, 5]
    assert parsed.rows_read == 5
    assert "non-empty" in parsed.rejected[0].reason
    assert "negative probability" in parsed.rejected[1].reason


@pytest.mark.parametrize("content", [b"\xff\xfe not json", b"[1, 2]", b'{"0": '])
def test_unreadable_dataset_file_raises_an_input_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "chunk-7-dataset.json"
    path.write_bytes(content)
    with pytest.raises(InputDataError, match="chunk-7-dataset.json"):
        parse_token_windows(path)


def test_rate_windows_take_token_means_of_the_dataset_window_containing_them(
    tmp_path: Path,
) -> None:
    trace = tmp_path / "chunk-7-trace.csv"
    trace.write_text("0,1,1,Gamma,1,1\n21000,2,1,Gamma,1,1\n21600,3,1,Gamma,1,1\n")
    dataset = tmp_path / "chunk-7-dataset.json"
    dataset.write_text(
        json.dumps(
            {
                "0": {"input_tokens": "{100: 1.0}", "output_tokens": "{10: 1.0}"},
                "21600": {"input_tokens": "{200: 1.0}", "output_tokens": "{20: 1.0}"},
            }
        )
    )
    day0 = datetime(2025, 6, 2, tzinfo=UTC)
    rows = workload_rates(
        parse_rate_trace(trace).rows,
        {"chunk-7": parse_token_windows(dataset).windows},
        workload="servegen-test",
        day0_at=day0,
    )
    assert [(r.window_start_at, r.mean_input_tokens, r.mean_output_tokens) for r in rows] == [
        (day0, 100.0, 10.0),
        (day0 + timedelta(seconds=21000), 100.0, 10.0),
        (day0 + timedelta(hours=6), 200.0, 20.0),
    ]
    assert {(r.workload, r.client, r.window_s) for r in rows} == {("servegen-test", "chunk-7", 600)}


def test_bundled_dataset_means_match_the_published_figures() -> None:
    parsed = parse_token_windows(BUNDLED / "chunk-34-dataset.json")
    assert len(parsed.windows) == 56 and not parsed.rejected
    mean_in = sum(w.mean_input_tokens for w in parsed.windows) / 56
    mean_out = sum(w.mean_output_tokens for w in parsed.windows) / 56
    assert (round(mean_in), round(mean_out)) == (221, 18)  # SOURCE.md: chunk-34 221 / 18

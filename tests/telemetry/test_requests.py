"""Request-log parsing, classification and window aggregation."""

from __future__ import annotations

import csv
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from telemetry.requests import aggregate_windows, parse_azure_timestamp, parse_azure_trace
from wattplan import jobs
from wattplan.domain import RequestTypeBins
from wattplan.errors import InputDataError
from wattplan.settings import PROJECT_ROOT, Settings

CONV = PROJECT_ROOT / "data" / "azure-llm-inference-2023" / "AzureLLMInferenceTrace_conv.csv"


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ((255, 99), "SS"),
        ((256, 100), "MM"),
        ((1023, 349), "MM"),
        ((1024, 350), "LL"),
        ((10, 400), "SL"),
    ],
)
def test_classify_uses_half_open_bins(tokens: tuple[int, int], expected: str) -> None:
    assert RequestTypeBins().classify(*tokens) == expected


def test_azure_timestamp_keeps_microseconds_as_utc() -> None:
    moment = parse_azure_timestamp("2023-11-16 18:15:46.6805900")
    assert moment == datetime(2023, 11, 16, 18, 15, 46, 680590, tzinfo=UTC)


def test_bad_lines_are_rejected_with_reason_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.1,374,44\n"
        "not-a-time,1,2\n"
        "2023-11-16 18:15:47.1,-5,2\n"
        "2023-11-16 18:15:48.1,12\n"
    )
    parsed = parse_azure_trace(path, "chat", RequestTypeBins())
    assert [r.line_no for r in parsed.records] == [1]
    assert [(r.line_no, r.raw) for r in parsed.rejected] == [
        (2, "not-a-time,1,2"),
        (3, "2023-11-16 18:15:47.1,-5,2"),
        (4, "2023-11-16 18:15:48.1,12"),
    ]
    assert "expected 3 fields" in parsed.rejected[2].reason


def test_wrong_header_names_the_expected_format(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("time,in,out\n")
    with pytest.raises(InputDataError, match="TIMESTAMP,ContextTokens,GeneratedTokens"):
        parse_azure_trace(path, "chat", RequestTypeBins())


def test_windows_match_an_independent_count_of_the_real_trace() -> None:
    parsed = parse_azure_trace(CONV, "conversation", RequestTypeBins())
    start = datetime(2023, 11, 16, 18, 30, tzinfo=UTC)
    end = start + timedelta(minutes=30)
    windows = aggregate_windows(parsed.records, start, end, 300, ["conversation"])
    assert len(windows) == 6 * 9

    # Oracle: straight from the CSV with the csv module and the documented bin edges.
    counts: Counter[tuple[str, int]] = Counter()
    minute_counts: Counter[tuple[str, int, int]] = Counter()
    with CONV.open() as handle:
        for row in csv.DictReader(handle):
            t = datetime.strptime(row["TIMESTAMP"][:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
            if not start <= t < end:
                continue
            i, o = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            rtype = "SML"[(i >= 256) + (i >= 1024)] + "SML"[(o >= 100) + (o >= 350)]
            offset = int((t - start).total_seconds())
            counts[(rtype, offset // 300)] += 1
            minute_counts[(rtype, offset // 300, (offset % 300) // 60)] += 1
    for w in windows:
        k = int((w.window_start - start).total_seconds()) // 300
        assert w.request_count == counts[(w.request_type, k)]
        peak = max((minute_counts[(w.request_type, k, m)] for m in range(5)), default=0)
        assert w.peak_rate_rps == pytest.approx(peak / 60)
        assert w.mean_rate_rps == pytest.approx(w.request_count / 300)
    assert sum(w.request_count for w in windows) == sum(counts.values()) > 1000


def test_ingest_twice_leaves_identical_rows(engine: sa.Engine) -> None:
    settings = Settings.from_env({})
    start = datetime(2023, 11, 16, 18, 30, tzinfo=UTC)
    end = start + timedelta(minutes=10)

    def snapshot() -> tuple[list, list]:
        with engine.connect() as conn:
            logs = conn.execute(sa.text("SELECT * FROM request_logs ORDER BY 1, 2")).all()
            windows = conn.execute(
                sa.text("SELECT * FROM request_type_windows ORDER BY 1, 2, 3")
            ).all()
        return logs, windows

    n = jobs.ingest_requests(engine, settings, start, end)
    first = snapshot()
    assert n == len(first[0]) > 0
    assert len(first[1]) == 2 * 2 * 9  # two services, two windows, nine types
    assert jobs.ingest_requests(engine, settings, start, end) == n
    assert snapshot() == first

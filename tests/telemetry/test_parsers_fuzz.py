"""Every parser, fed random bytes and mutated valid lines, never crashes and never drops a
row silently: each non-blank data line comes back exactly once, as a record or as a rejected
row with a printable raw copy. Malformed whole files fail with a clear InputDataError.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry.lines import RejectedRow
from telemetry.reference import (
    parse_carbon_intensity_rows,
    parse_electricity_price_rows,
    parse_gpu_price_rows,
)
from telemetry.request_log import parse_request_log
from telemetry.requests import parse_azure_trace
from telemetry.servegen import parse_rate_trace, parse_token_windows
from wattplan.domain import RequestTypeBins
from wattplan.errors import InputDataError

BINS = RequestTypeBins()
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

AZURE_HEADER = b"TIMESTAMP,ContextTokens,GeneratedTokens"
CARBON_HEADER = (
    "Datetime (UTC),Country,Zone Name,Zone Id,Carbon Intensity gCO₂eq/kWh (direct),"
    "Carbon Intensity gCO₂eq/kWh (LCA),Low Carbon Percentage,Renewable Percentage,"
    "Data Source,Data Estimated,Data Estimation Method"
).encode()
PRICE_HEADER = b"Datetime (UTC),Datetime (Local),Price (USD/MWh)"
GPU_HEADER = b"Cloud,GPU Type,GPU Arch,GPUs,GPU RAM,vCPUs,RAM,On-demand,Per-GPU,Spot,Name"

VALID_LINES: dict[str, list[bytes]] = {
    "jsonl": [
        b'{"arrived_at": "2025-03-01T12:00:05Z", "input_tokens": 300, "output_tokens": 120}',
        b'{"request_id": "r9", "arrived_at": 1740830405.25, "input_tokens": 3000, '
        b'"output_tokens": 4, "token_times_s": [0.2, 0.25, 0.3, 0.41], "model": "m", '
        b'"pool": "LS", "instance_id": "i1", "outcome": "timeout"}',
        b'{"arrived_at": "2025-03-01T12:00:07+02:00", "input_tokens": 10, "output_tokens": 0, '
        b'"ttft_s": 0.1, "tbt_s": null, "e2e_s": 0.1, "outcome": "error"}',
    ],
    "azure": [
        b"2023-11-16 18:15:46.6805900,374,44",
        b"2023-11-16 18:15:50.9951690,1020,8",
        b"2023-11-16 18:16:02.1000000,4808,10",
    ],
    "servegen": [
        b"0,5.263333333333334,0.9246104716166008,Gamma,1.1697212644435706,0.1624147993270712",
        b"600,0,0,,0,0",
        b"1200,1.5,1.3,Weibull,0.8,0.5",
    ],
    "carbon": [
        b"2023-01-01 00:00:00,USA,CAISO,US-CAL-CISO,238.69,309.75,48.08,39.45,caiso.com,false,",
        b"2023-01-01 01:00:00,USA,CAISO,US-CAL-CISO,220.25,,53.92,40.63,caiso.com,false,",
    ],
    "price": [
        b"2024-01-01 00:00:00+00:00,2023-12-31 16:00:00-08:00,40.860355",
        b"2024-01-01 01:00:00+00:00,2023-12-31 17:00:00-08:00,-4.5",
    ],
    "gpu": [
        b"AWS,A100 (80 GB),Ampere,8,640,96,1152,40.97,5.12,,p4de.24xlarge",
        b'Lambda,"H100 (80 GB)",Hopper,1,80,26,200,2.49,2.49,,gpu_1x_h100',
        b"Azure,T4 (16 GB),Turing,1,16,4,28,0.53,,,NC4as",
    ],
}

Parser = Callable[[Path], tuple[Sequence[object], Sequence[RejectedRow], int]]


def _jsonl(path: Path) -> tuple[Sequence[object], Sequence[RejectedRow], int]:
    p = parse_request_log(path, "chat", BINS)
    return p.records, p.rejected, p.rows_read


def _azure(path: Path) -> tuple[Sequence[object], Sequence[RejectedRow], int]:
    p = parse_azure_trace(path, "chat", BINS)
    return p.records, p.rejected, p.rows_read


def _servegen(path: Path) -> tuple[Sequence[object], Sequence[RejectedRow], int]:
    p = parse_rate_trace(path)
    return p.rows, p.rejected, p.rows_read


def _carbon(path: Path) -> tuple[Sequence[object], Sequence[RejectedRow], int]:
    p = parse_carbon_intensity_rows(path)
    return p.rows, p.rejected, p.rows_read


def _price(path: Path) -> tuple[Sequence[object], Sequence[RejectedRow], int]:
    p = parse_electricity_price_rows(path, "US-CAL-CISO")
    return p.rows, p.rejected, p.rows_read


def _gpu(path: Path) -> tuple[Sequence[object], Sequence[RejectedRow], int]:
    p = parse_gpu_price_rows(path)
    return p.rows, p.rejected, p.rows_read


#: name -> (parser, header line or None, whether line numbers count data lines after it)
PARSERS: dict[str, tuple[Parser, bytes | None]] = {
    "jsonl": (_jsonl, None),
    "azure": (_azure, AZURE_HEADER),
    "servegen": (_servegen, None),
    "carbon": (_carbon, CARBON_HEADER),
    "price": (_price, PRICE_HEADER),
    "gpu": (_gpu, GPU_HEADER),
}


def expected_line_numbers(body: bytes, has_header: bool) -> list[int]:
    """Independent oracle: 1-based numbers of the non-blank lines (after any header)."""
    if not has_header and body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    numbers = [n for n, raw in enumerate(body.split(b"\n"), start=1) if raw.strip()]
    return numbers


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="wp-fuzz-") as folder:
        yield Path(folder)


def run_parser(name: str, body: bytes, folder: Path) -> None:
    """Parse ``body`` (behind the format's header) and check the accounting invariants."""
    parser, header = PARSERS[name]
    path = folder / f"{name}.input"
    path.write_bytes(header + b"\n" + body if header is not None else body)
    rows, rejected, rows_read = parser(path)
    expected = expected_line_numbers(body, header is not None)
    assert rows_read == len(rows) + len(rejected) == len(expected)
    rejected_nos = [r.line_no for r in rejected]
    assert len(set(rejected_nos)) == len(rejected_nos) and set(rejected_nos) <= set(expected)
    if rows and hasattr(rows[0], "line_no"):  # reference values carry no line number
        assert sorted([r.line_no for r in rows] + rejected_nos) == expected  # type: ignore[attr-defined]
    for r in rejected:
        assert r.reason
        assert "\x00" not in r.raw
        r.raw.encode("utf-8")  # storable: no lone surrogates


def mutate(line: bytes, data: st.DataObject) -> bytes:
    """One random edit of a valid line: cut, delete, insert or replace bytes."""
    op = data.draw(st.sampled_from(["truncate", "delete", "insert", "replace", "keep"]))
    i = data.draw(st.integers(0, len(line)))
    if op == "truncate":
        return line[:i]
    if op == "delete":
        return line[:i] + line[i + data.draw(st.integers(1, 8)) :]
    if op == "insert":
        return line[:i] + data.draw(st.binary(min_size=1, max_size=6)) + line[i:]
    if op == "replace" and line:
        j = min(i, len(line) - 1)
        return line[:j] + bytes([data.draw(st.integers(0, 255))]) + line[j + 1 :]
    return line


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(body=st.binary(max_size=600))
def test_random_bytes_never_crash_and_every_line_is_accounted(
    name: str, body: bytes, scratch: Path
) -> None:
    run_parser(name, body, scratch)


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.data())
def test_mutated_valid_lines_are_loaded_or_rejected_never_lost(
    name: str, data: st.DataObject, scratch: Path
) -> None:
    valid = VALID_LINES[name]
    lines = data.draw(st.lists(st.sampled_from(valid), min_size=1, max_size=12))
    lines = [mutate(line, data) for line in lines]
    ending = data.draw(st.sampled_from([b"\n", b"\r\n"]))
    run_parser(name, ending.join(lines) + data.draw(st.sampled_from([b"", ending])), scratch)


BOUNDS = {
    "jsonl": [
        datetime(2025, 3, 1, h, m, tzinfo=UTC) for h, m in ((9, 0), (12, 0), (12, 1), (23, 0))
    ],
    "azure": [
        datetime(2023, 11, 16, h, m, tzinfo=UTC) for h, m in ((0, 0), (18, 15), (18, 16), (23, 0))
    ],
}


@pytest.mark.parametrize("name", ["jsonl", "azure"])
@FUZZ
@given(data=st.data())
def test_reading_an_interval_gives_that_intervals_part_of_a_full_parse(
    name: str, data: st.DataObject, scratch: Path
) -> None:
    parse = parse_request_log if name == "jsonl" else parse_azure_trace
    lines = data.draw(st.lists(st.sampled_from(VALID_LINES[name]), min_size=1, max_size=10))
    body = b"\n".join(mutate(line, data) for line in lines)
    path = scratch / f"interval.{name}"
    path.write_bytes(body if name == "jsonl" else AZURE_HEADER + b"\n" + body)
    start, end = sorted(data.draw(st.lists(st.sampled_from(BOUNDS[name]), min_size=2, max_size=2)))
    full = parse(path, "chat", BINS)
    part = parse(path, "chat", BINS, start=start, end=end)
    assert part.records == tuple(r for r in full.records if start <= r.arrived_at < end)
    assert part.rejected == tuple(
        r for r in full.rejected if r.attributed_at is None or start <= r.attributed_at < end
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(
    entries=st.dictionaries(
        st.text(max_size=8),
        st.one_of(
            json_values,
            st.fixed_dictionaries(
                {
                    "input_tokens": st.one_of(
                        st.text(max_size=30),
                        st.dictionaries(st.integers(-5, 5000), st.floats(), max_size=5).map(str),
                    ),
                    "output_tokens": st.dictionaries(
                        st.integers(0, 50), st.floats(0, 1), max_size=4
                    ).map(str),
                }
            ),
        ),
        max_size=6,
    )
)
def test_servegen_dataset_entries_are_read_or_rejected_never_lost(
    entries: dict[str, object], scratch: Path
) -> None:
    path = scratch / "chunk-1-dataset.json"
    path.write_text(json.dumps(entries))
    parsed = parse_token_windows(path)
    assert parsed.rows_read == len(parsed.windows) + len(parsed.rejected) == len(entries)
    assert all("\x00" not in r.raw for r in parsed.rejected)


@FUZZ
@given(body=st.binary(max_size=300))
def test_servegen_dataset_garbage_is_an_input_error_or_rows(body: bytes, scratch: Path) -> None:
    path = scratch / "chunk-1-dataset.json"
    path.write_bytes(body)
    try:
        parsed = parse_token_windows(path)
    except InputDataError as exc:
        assert "chunk-1-dataset.json" in str(exc)
    else:
        assert parsed.rows_read == len(parsed.windows) + len(parsed.rejected)


# --- malformed whole files ------------------------------------------------------------------


def test_azure_trace_with_wrong_header_names_the_expected_one(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_bytes(b"time,in,out\n2023-11-16 18:15:46.1,1,2\n")
    with pytest.raises(InputDataError, match="TIMESTAMP,ContextTokens,GeneratedTokens"):
        parse_azure_trace(path, "chat", BINS)


def test_utf16_azure_trace_is_refused_by_its_header(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_bytes("TIMESTAMP,ContextTokens,GeneratedTokens\n".encode("utf-16"))
    with pytest.raises(InputDataError, match="is not the Azure trace format"):
        parse_azure_trace(path, "chat", BINS)


@pytest.mark.parametrize("parser", [_azure, _jsonl, _servegen, _carbon, _price, _gpu])
def test_missing_file_is_an_input_error_naming_the_path(tmp_path: Path, parser: Parser) -> None:
    with pytest.raises(InputDataError, match="missing.csv"):
        parser(tmp_path / "missing.csv")


@pytest.mark.parametrize("parser", [_azure, _carbon, _price, _gpu])
def test_empty_file_is_an_input_error(tmp_path: Path, parser: Parser) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(InputDataError, match="empty.csv"):
        parser(path)


def test_azure_trace_rejects_garbage_encoding_nan_and_repeats_with_line_numbers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "trace.csv"
    path.write_bytes(
        AZURE_HEADER
        + b"\n2023-11-16 18:15:46.1,374,44"
        + b"\n\x89PNG\x1a\x00\x00\xff"
        + b"\n2023-11-16 18:15:47.1,caf\xe9,2"
        + b"\n2023-11-16 18:15:48.1,nan,2"
        + b"\n2023-11-16 18:15:46.1,374,44"
        + b"\n2023-11-16 18:15:49.1,1e3,2"
        + b"\n2023-11-16 18:15:5"
    )
    parsed = parse_azure_trace(path, "chat", BINS)
    assert [r.line_no for r in parsed.records] == [1]
    reasons = {r.line_no: r.reason for r in parsed.rejected}
    assert parsed.rows_read == 7 == 1 + len(reasons)
    assert "NUL" in reasons[2]  # binary garbage
    assert "not valid UTF-8" in reasons[3]
    assert "not a whole number of tokens" in reasons[4]  # nan
    assert reasons[5] == "duplicate of line 1"
    assert "not a whole number of tokens" in reasons[6]  # 1e3
    assert "expected 3 fields" in reasons[7]  # truncated last line
    assert {r.raw for r in parsed.rejected if r.line_no == 3} == {
        "2023-11-16 18:15:47.1,caf\\xe9,2"
    }


def test_reference_csv_missing_a_column_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_bytes(b"Datetime (UTC),Price\n2024-01-01 00:00:00,4\n")
    with pytest.raises(InputDataError, match=r"missing columns \['Price \(USD/MWh\)'\]"):
        parse_electricity_price_rows(path, "X")


def test_every_example_in_the_format_guide_parses_without_rejects(tmp_path: Path) -> None:
    guide = (Path(__file__).parents[2] / "docs" / "formats.md").read_text()
    blocks = [b.split("\n", 1)[1] for b in guide.split("```")[1::2]]
    azure, jsonl, trace, dataset, carbon, price, gpu = blocks
    checks: list[tuple[str, Parser]] = [
        (azure, _azure),
        (jsonl, _jsonl),
        (trace, _servegen),
        (carbon, _carbon),
        (price, _price),
        (gpu, _gpu),
    ]
    for text, parser in checks:
        path = tmp_path / "example"
        path.write_text(text)
        rows, rejected, _ = parser(path)
        assert rows and not rejected, text
    path = tmp_path / "chunk-1-dataset.json"
    path.write_text(dataset)
    parsed = parse_token_windows(path)
    assert len(parsed.windows) == 1 and not parsed.rejected

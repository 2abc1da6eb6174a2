"""GPU telemetry files: the parser never fails on content and accounts for every line; the
energy windows follow the documented counter rules."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry.gpu import (
    MEASUREMENT_FIELDS,
    GpuSample,
    aggregate_instance_windows,
    format_sample_line,
    parse_gpu_file,
    parse_spool_file_name,
    scan_gpu_bytes,
    spool_file_name,
)
from wattplan.errors import InputDataError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def record(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "gpu_uuid": "GPU-6b1f3c2e-58d4-4e0b-9a7c-2f1d3e4a5b60",
        "sampled_at": T0,
        "node": "gpu-node-7",
        "gpu_index": 0,
        "instance_id": "inst-a",
        "energy_mj": 51_234_567_890,
        "power_w": 412.345,
        "sm_clock_mhz": 1980,
        "memory_clock_mhz": 2619,
        "applied_sm_clock_mhz": None,
        "power_limit_w": 700.0,
        "utilization_pct": 87.0,
        "memory_used_bytes": 76_235_669_504,
        "temperature_c": 54.0,
        "unsupported_fields": ["applied_sm_clock_mhz"],
    }
    values.update(overrides)
    return values


def parse_bytes(data: bytes) -> tuple[list[GpuSample], list[Any], int]:
    scan = scan_gpu_bytes(data, "f.jsonl", keep_samples=True)
    return scan.samples, scan.rejected, len(scan.samples) + len(scan.rejected)


def write(tmp_path: Path, lines: list[str | bytes], *, newline_at_end: bool = True) -> Path:
    data = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines)
    path = tmp_path / "gpu-n-20260301T120000.000000Z.jsonl"
    path.write_bytes(data + (b"\n" if newline_at_end else b""))
    return path


def test_canonical_line_round_trips_to_the_same_sample(tmp_path: Path) -> None:
    path = write(tmp_path, [format_sample_line(record())])
    parsed = parse_gpu_file(path)
    assert parsed.rejected == () and parsed.rows_read == 1
    (s,) = parsed.samples
    assert s == GpuSample(
        gpu_uuid="GPU-6b1f3c2e-58d4-4e0b-9a7c-2f1d3e4a5b60",
        sampled_at=T0,
        node="gpu-node-7",
        gpu_index=0,
        instance_id="inst-a",
        energy_mj=51_234_567_890,
        power_w=412.345,
        sm_clock_mhz=1980,
        memory_clock_mhz=2619,
        applied_sm_clock_mhz=None,
        power_limit_w=700.0,
        utilization_pct=87.0,
        memory_used_bytes=76_235_669_504,
        temperature_c=54.0,
        unsupported_fields=("applied_sm_clock_mhz",),
        source=path.name,
        line_no=1,
    )


def test_other_json_spellings_mean_the_same_sample() -> None:
    canonical = format_sample_line(record())
    as_json = json.loads(canonical)
    as_json["sampled_at"] = "2026-03-01T14:00:00+02:00"
    as_json["comment"] = "extra keys are ignored"
    spaced = json.dumps(dict(reversed(list(as_json.items()))), indent=None)
    samples, rejected, _ = parse_bytes(f"{canonical}\n".encode())
    other, rejected_other, _ = parse_bytes(f"{spaced}\r\n".encode())
    assert rejected == [] == rejected_other
    assert samples == other


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({**json.loads(format_sample_line(record())), "power_w": -3.0}), "power_w"),
        (format_sample_line(record()).replace('"power_w":412.345', '"power_w":NaN'), "NaN"),
        (format_sample_line(record()).replace("412.345", "Infinity"), "Infinity"),
        (format_sample_line(record()).replace("412.345", "1e999"), "power_w"),
        (format_sample_line(record(energy_mj=2**63)), "energy_mj"),
        (format_sample_line(record(sm_clock_mhz=2**31)), "sm_clock_mhz"),
        (format_sample_line(record(sm_clock_mhz=1980.5)), "must be an integer"),
        (format_sample_line(record(gpu_index=True)), "gpu_index"),
        (format_sample_line(record(utilization_pct=100.5)), "at most 100"),
        (format_sample_line(record(power_w="412")), "must be a number"),
        (format_sample_line(record(gpu_uuid=None)), "gpu_uuid is missing"),
        (format_sample_line(record(node="")), "node"),
        (format_sample_line(record(node="a\tb")), "unprintable"),
        (format_sample_line(record(sampled_at="2026-03-01T12:00:00")), "no time zone"),
        (format_sample_line(record(sampled_at="2026-02-30T12:00:00.000000Z")), "not"),
        (format_sample_line(record(sampled_at="1969-12-31T23:59:59.000000Z")), "outside"),
        (format_sample_line(record(unsupported_fields=["fan_speed"])), "unknown fields"),
        (format_sample_line(record(unsupported_fields=["power_w", "power_w"])), "repeats"),
    ],
)
def test_bad_line_is_rejected_with_a_reason(line: str, reason: str) -> None:
    samples, rejected, rows_read = parse_bytes(f"{line}\n".encode())
    assert samples == [] and rows_read == 1
    assert reason in rejected[0].reason and rejected[0].raw == line


def test_truncated_last_line_is_rejected_as_truncated(tmp_path: Path) -> None:
    line = format_sample_line(record())
    path = write(tmp_path, [line, line.replace("12:00:00", "12:00:01")[:80]], newline_at_end=False)
    parsed = parse_gpu_file(path)
    assert len(parsed.samples) == 1 and parsed.rows_read == 2
    assert "truncated" in parsed.rejected[0].reason and parsed.rejected[0].line_no == 2


def test_binary_and_wrong_encoding_keep_an_escaped_raw_copy_without_nul(tmp_path: Path) -> None:
    line = format_sample_line(record())
    path = write(tmp_path, [b"\x00\xff\xfe garbage \x00", "caf\xe9".encode("latin-1"), line])
    parsed = parse_gpu_file(path)
    assert len(parsed.samples) == 1 and parsed.rows_read == 3
    raws = [r.raw for r in parsed.rejected]
    assert raws == ["\\xff\\xfe garbage ", "caf\\xe9"]
    assert all("\x00" not in r for r in raws)
    assert all("UTF-8" in r.reason for r in parsed.rejected)


def test_repeated_gpu_and_time_keeps_the_first_line_only() -> None:
    line = format_sample_line(record())
    later = format_sample_line(record(sampled_at=T0 + timedelta(seconds=1)))
    samples, rejected, rows_read = parse_bytes(f"{line}\n{later}\n{line}\n".encode())
    assert [s.line_no for s in samples] == [1, 2] and rows_read == 3
    assert rejected[0].line_no == 3 and "duplicate" in rejected[0].reason


def test_blank_lines_are_not_rows() -> None:
    line = format_sample_line(record())
    samples, rejected, rows_read = parse_bytes(f"\n  \n{line}\n\n".encode())
    assert rows_read == 1 and samples[0].line_no == 3 and rejected == []


def test_rejected_line_is_attributed_to_its_own_or_the_nearest_readable_time() -> None:
    at = [T0 + timedelta(seconds=i) for i in range(3)]
    lines = [
        "garbage before any time",
        format_sample_line(record(sampled_at=at[0])),
        "garbage",
        format_sample_line(record(sampled_at=at[2], power_w=-1.0)),
    ]
    _, rejected, _ = parse_bytes("\n".join(lines).encode() + b"\n")
    assert [(r.line_no, r.attributed_at) for r in rejected] == [(1, at[0]), (3, at[0]), (4, at[2])]


def test_missing_or_unreadable_file_raises_input_data_error(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="cannot read GPU telemetry file"):
        parse_gpu_file(tmp_path / "missing.jsonl")
    with pytest.raises(InputDataError):
        parse_gpu_file(tmp_path)


def test_spool_file_names_carry_node_and_first_sample_time() -> None:
    name = spool_file_name("node a/7", T0 + timedelta(microseconds=5))
    assert name == "gpu-node_a_7-20260301T120000.000005Z.tsv"
    assert parse_spool_file_name(name) == ("node_a_7", T0 + timedelta(microseconds=5))
    assert parse_spool_file_name("gpu-n-20260301T120000.000000Z-3.tsv") == ("n", T0)
    assert parse_spool_file_name("gpu-n-20260301T120000.000000Z-3.jsonl") == ("n", T0)
    assert spool_file_name("n", T0, ".jsonl") == "gpu-n-20260301T120000.000000Z.jsonl"
    assert parse_spool_file_name("other.jsonl") is None
    assert parse_spool_file_name("gpu-n-20260301T120000.000000Z.tsv.part") is None


# --- properties -----------------------------------------------------------------------------

names = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_categories=("Cs",)),
    min_size=1,
    max_size=20,
).filter(str.isprintable)
records = st.fixed_dictionaries(
    {
        "gpu_uuid": st.one_of(st.just("GPU-6b1f3c2e-58d4"), names),
        "sampled_at": st.datetimes(
            min_value=datetime(1971, 1, 1), max_value=datetime(2199, 1, 1), timezones=st.just(UTC)
        ),
        "node": st.one_of(st.just("gpu-node-7"), names),
        "gpu_index": st.integers(0, 2**31 - 1),
        "instance_id": st.one_of(st.none(), names),
        "energy_mj": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        "power_w": st.one_of(st.none(), st.floats(0, 1e300)),
        "sm_clock_mhz": st.one_of(st.none(), st.integers(0, 2**31 - 1)),
        "memory_clock_mhz": st.one_of(st.none(), st.integers(0, 3000)),
        "applied_sm_clock_mhz": st.one_of(st.none(), st.integers(0, 2000)),
        "power_limit_w": st.one_of(st.none(), st.floats(0, 1000)),
        "utilization_pct": st.one_of(st.none(), st.floats(0, 100), st.integers(0, 100)),
        "memory_used_bytes": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        "temperature_c": st.one_of(st.none(), st.floats(0, 120)),
        "unsupported_fields": st.lists(st.sampled_from(MEASUREMENT_FIELDS), unique=True),
    }
)


@FUZZ
@given(records, st.randoms(use_true_random=False))
def test_canonical_and_free_json_paths_accept_the_same_samples(
    rec: dict[str, Any], rnd: random.Random
) -> None:
    canonical = format_sample_line(rec)
    as_json = json.loads(canonical)
    keys = list(as_json)
    rnd.shuffle(keys)
    free = json.dumps({k: as_json[k] for k in keys}, indent=rnd.choice([None, 1]))
    free = free.replace("\n", " ")
    fast, fast_rejected, _ = parse_bytes(f"{canonical}\n".encode())
    slow, slow_rejected, _ = parse_bytes(f"{free}\n".encode())
    assert fast_rejected == [] == slow_rejected
    assert fast == slow
    assert fast[0].sampled_at == rec["sampled_at"]


def _check_accounting(data: bytes) -> None:
    samples, rejected, rows_read = parse_bytes(data)
    non_blank = sum(1 for line in data.split(b"\n") if line.strip())
    assert rows_read == len(samples) + len(rejected) == non_blank - _bom_only(data)
    for r in rejected:
        assert "\x00" not in r.raw
        r.raw.encode("utf-8")  # storable text
    for s in samples:
        assert s.sampled_at.tzinfo is not None
        for name in MEASUREMENT_FIELDS:
            value = getattr(s, name)
            assert value is None or (math.isfinite(value) and value >= 0)


def _bom_only(data: bytes) -> int:
    first = data.split(b"\n", 1)[0]
    return 1 if first.startswith(b"\xef\xbb\xbf") and not first[3:].strip() else 0


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_never_raise_and_every_line_is_accounted_for(data: bytes) -> None:
    _check_accounting(data)


@FUZZ
@given(st.lists(records, min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_mutated_valid_lines_never_raise_and_every_line_is_accounted_for(
    recs: list[dict[str, Any]], rnd: random.Random
) -> None:
    lines = [bytearray(format_sample_line(r).encode()) for r in recs]
    for line in lines:
        for _ in range(rnd.randint(0, 3)):
            position = rnd.randrange(len(line))
            action = rnd.choice(["flip", "cut", "insert", "delete"])
            if action == "flip":
                line[position] = rnd.randrange(256)
            elif action == "cut":
                del line[position:]
                break
            elif action == "insert":
                line[position:position] = rnd.choice(
                    [b"-", b"NaN", b"\x00", b"\n", b'"', b"9" * 30]
                )
            else:
                del line[position]
            if not line:
                break
    _check_accounting(b"\n".join(bytes(x) for x in lines) + rnd.choice([b"", b"\n"]))


# --- energy windows -------------------------------------------------------------------------


def sample(
    gpu: str, t_s: float, energy_mj: int | None, power_w: float | None, **kw: Any
) -> GpuSample:
    values: dict[str, Any] = {
        "gpu_uuid": gpu,
        "sampled_at": T0 + timedelta(seconds=t_s),
        "node": "n1",
        "gpu_index": int(gpu[-1]),
        "instance_id": "inst-a",
        "energy_mj": energy_mj,
        "power_w": power_w,
        "sm_clock_mhz": None,
        "memory_clock_mhz": None,
        "applied_sm_clock_mhz": None,
        "power_limit_w": None,
        "utilization_pct": None,
        "memory_used_bytes": None,
        "temperature_c": None,
    }
    values.update(kw)
    return GpuSample(**values)


def test_energy_is_counter_deltas_summed_over_the_instance_gpus() -> None:
    samples = [
        sample("g0", 0, 1_000_000, 100.0),
        sample("g1", 0, 5_000_000, 300.0),
        sample("g0", 30, 4_000_000, 100.0),  # +3000 J
        sample("g1", 30, 14_000_000, 300.0),  # +9000 J
        sample("g0", 60, 7_000_000, 100.0),  # +3000 J, next window
        sample("g1", 60, 23_000_000, 500.0),  # +9000 J, next window
    ]
    windows = aggregate_instance_windows(samples, T0, T0 + timedelta(seconds=120), 60)
    assert [(w.window_start, w.energy_j, w.samples, w.gpus) for w in windows] == [
        (T0, 12_000.0, 4, 2),
        (T0 + timedelta(seconds=60), 12_000.0, 2, 2),
    ]
    assert (windows[0].mean_power_w, windows[0].peak_power_w) == (400.0, 400.0)
    assert (windows[1].mean_power_w, windows[1].peak_power_w) == (600.0, 600.0)
    assert windows[0].node == "n1" and windows[0].counter_resets == 0


def test_counter_reset_is_counted_and_its_step_integrates_power() -> None:
    samples = [
        sample("g0", 0, 9_000_000, 200.0),
        sample("g0", 10, 11_000_000, 200.0),  # +2000 J
        sample("g0", 20, 500, 400.0),  # reset: (200 + 400) / 2 * 10 s = 3000 J
        sample("g0", 30, 4_000_500, 400.0),  # +4000 J
    ]
    (window,) = aggregate_instance_windows(samples, T0, T0 + timedelta(seconds=60), 60)
    assert window.counter_resets == 1 and window.energy_j == pytest.approx(9_000.0)


def test_missing_counter_falls_back_to_power_and_long_gaps_count_nothing() -> None:
    samples = [
        sample("g0", 0, 1_000_000, 100.0),
        sample("g0", 10, None, 300.0, unsupported_fields=("energy_mj",)),  # 2000 J by power
        sample("g0", 200, 99_000_000, 300.0),  # 190 s gap > max_gap_s: nothing
    ]
    (window,) = aggregate_instance_windows(samples, T0, T0 + timedelta(seconds=300), 300)
    assert window.energy_j == pytest.approx(2_000.0) and window.counter_resets == 0


def test_samples_before_start_only_anchor_the_first_step_and_later_ones_are_ignored() -> None:
    samples = [
        sample("g0", -20, 0, 100.0),
        sample("g0", -5, 1_000_000, 100.0),  # latest reading before start
        sample("g0", 5, 3_000_000, 100.0),  # +2000 J, attributed to [0, 60)
        sample("g0", 60, 9_000_000, 100.0),  # at end: ignored
    ]
    (window,) = aggregate_instance_windows(samples, T0, T0 + timedelta(seconds=60), 60)
    assert window.energy_j == 2_000.0 and window.samples == 1


def test_a_step_belongs_to_the_window_of_its_later_sample() -> None:
    samples = [sample("g0", 59, 0, 100.0), sample("g0", 61, 200_000, 100.0)]
    windows = aggregate_instance_windows(samples, T0, T0 + timedelta(seconds=120), 60)
    assert [w.energy_j for w in windows] == [0.0, 200.0]


def test_samples_without_instance_are_not_counted_and_quiet_windows_are_not_emitted() -> None:
    samples = [
        sample("g0", 0, 0, 100.0, instance_id=None),
        sample("g0", 1, 100_000, 100.0, instance_id=None),
        sample("g1", 130, 0, 50.0),
    ]
    windows = aggregate_instance_windows(samples, T0, T0 + timedelta(seconds=180), 60)
    assert [(w.instance_id, w.window_start, w.energy_j) for w in windows] == [
        ("inst-a", T0 + timedelta(seconds=120), 0.0)
    ]


def test_interval_must_be_whole_windows() -> None:
    with pytest.raises(ValueError, match="whole number"):
        aggregate_instance_windows([], T0, T0 + timedelta(seconds=90), 60)

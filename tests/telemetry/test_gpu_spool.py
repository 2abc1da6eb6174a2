"""The collector's spool format: the vectorised path and the line-by-line path give the
same rows, rejects and accounting on any input; bad files are rejected line by line."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from telemetry.gpu import MEASUREMENT_FIELDS, SAMPLE_KEYS, GpuScan, SeenSamples, micros
from telemetry.gpu_spool import SPOOL_HEADER, _scan_vectorised, format_spool_line, scan_spool_bytes
from tests.telemetry.test_gpu_parse import FUZZ, T0, record  # one sample record for both formats


def spool(records: list[dict[str, Any]], extra: list[str] = ()) -> bytes:  # type: ignore[assignment]
    lines = [SPOOL_HEADER, *(format_spool_line(r) for r in records), *extra]
    return "".join(f"{line}\n" for line in lines).encode()


def sweeps(seconds: int, gpus: int = 2) -> list[dict[str, Any]]:
    return [
        record(
            gpu_uuid=f"GPU-{g}",
            gpu_index=g,
            sampled_at=T0 + timedelta(seconds=s),
            energy_mj=1_000_000 + 400_000 * s + g,
            power_w=400.0 + g + s / 10,
        )
        for s in range(seconds)
        for g in range(gpus)
    ]


def _typed(text: str) -> Any:
    if text == "\\N":
        return None
    if not text[:1].isdigit():  # names such as "nan" or "inf" stay text
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def outcome(data: bytes, *, vectorised: bool, **kw: Any) -> dict[str, Any]:
    """Everything a scan yields, with COPY rows as typed values (48 and 48.0 are equal)."""
    seen = kw.pop("seen", None)
    scan = scan_spool_bytes(data, "f.tsv", seen=seen, vectorised=vectorised, **kw)
    rows = [
        (day, [_typed(v) for v in line.split("\t")])
        for day in sorted(scan.copy_by_day)
        for chunk in scan.copy_by_day[day]
        for line in chunk.decode().split("\n")
        if line
    ]

    def nan_free(values: Any) -> list[Any]:
        return [None if math.isnan(v) else v for v in values]

    return {
        "rows": rows,
        "t_s": list(scan.t_s),
        "columns": (scan.gpu_uuid, scan.node, scan.instance_id),
        "energy": nan_free(scan.energy_mj),
        "power": nan_free(scan.power_w),
        "anchors": {k: tuple(nan_free(v)) for k, v in scan.anchors.items()},
        "rejected": [(r.line_no, r.reason, r.raw, r.attributed_at) for r in scan.rejected],
        "outside": scan.rows_outside,
        "seen": None if seen is None else seen.by_gpu,
    }


def test_collector_output_takes_the_vectorised_path_and_loads_every_sample() -> None:
    data = spool(sweeps(30))
    scan = GpuScan()
    assert _scan_vectorised(data, -math.inf, math.inf, SeenSamples(), scan)
    assert scan.rows_loaded == 60 and scan.rejected == []
    (chunk,) = scan.copy_by_day["20260301"]
    assert chunk == data[len(SPOOL_HEADER) + 1 :]  # the file's lines are the COPY rows
    assert outcome(data, vectorised=True) == outcome(data, vectorised=False)


def test_interval_day_split_anchors_and_outside_rows_match_the_line_by_line_path() -> None:
    midnight = datetime(2026, 3, 2, tzinfo=UTC)
    recs = [
        {**r, "sampled_at": r["sampled_at"] + (midnight - T0) - timedelta(seconds=20)}
        for r in sweeps(60)
    ]
    data = spool(recs)
    kw = {"start_s": (midnight - timedelta(seconds=10)).timestamp(), "end_s": 1e18}
    fast = outcome(data, vectorised=True, **kw)
    assert fast == outcome(data, vectorised=False, **kw)
    assert {day for day, _ in fast["rows"]} == {"20260301", "20260302"}
    assert fast["outside"] == 20 and len(fast["t_s"]) == 100
    assert fast["anchors"]["GPU-0"][0] == (midnight - timedelta(seconds=11)).timestamp()


def test_a_repeat_against_earlier_files_is_rejected_with_its_reason() -> None:
    recs = sweeps(5)
    seen = SeenSamples()
    scan_spool_bytes(spool(recs[:4]), "a.tsv", seen=seen)
    again = spool(recs[2:])
    fast = outcome(again, vectorised=True, seen=_copy(seen))
    slow = outcome(again, vectorised=False, seen=_copy(seen))
    assert fast == slow
    assert [r[0] for r in fast["rejected"]] == [2, 3]
    assert all("duplicate" in r[1] for r in fast["rejected"])
    assert seen.by_gpu["GPU-0"] == [micros(T0.timestamp()), micros(T0.timestamp() + 1)]


def _copy(seen: SeenSamples) -> SeenSamples:
    out = SeenSamples()
    out.by_gpu = {k: list(v) for k, v in seen.by_gpu.items()}
    return out


def test_a_wrong_header_rejects_every_line_of_the_file() -> None:
    data = spool(sweeps(2)).replace(b"gpu_uuid\tsampled_at", b"sampled_at\tgpu_uuid", 1)
    scan = scan_spool_bytes(data, "f.tsv")
    assert scan.rows_loaded == 0 and len(scan.rejected) == 5
    assert all("header" in r.reason for r in scan.rejected)


def test_bad_lines_are_rejected_with_reasons_and_good_ones_still_load() -> None:
    good = sweeps(3)
    extra = [
        format_spool_line(record(power_w=-1.0, sampled_at=T0 + timedelta(seconds=9))),
        "\t".join(["x"] * 3),
        format_spool_line(record(sampled_at=T0 + timedelta(seconds=8))).replace("2619", "2.6e3"),
        format_spool_line(record(sampled_at=T0 + timedelta(seconds=7))).replace("{app", "{bogus"),
    ]
    data = spool(good, extra)
    fast = outcome(data, vectorised=True)
    assert fast == outcome(data, vectorised=False)
    reasons = [r[1] for r in fast["rejected"]]
    assert len(fast["rows"]) == 6 and len(reasons) == 4
    assert "power_w" in reasons[0] and "15 tab-separated fields" in reasons[1]
    assert "memory_clock_mhz must be an integer" in reasons[2]
    assert "unknown fields" in reasons[3]


def test_backslashes_in_names_round_trip_and_escaped_control_characters_are_rejected() -> None:
    odd = record(node="rack 1\\slot\\2", instance_id="inst b")
    tab = record(node="rack\t1", sampled_at=T0 + timedelta(seconds=1))
    scan = scan_spool_bytes(spool([odd, tab]), "f.tsv", keep_samples=True)
    (sample,) = scan.samples
    assert (sample.node, sample.instance_id) == ("rack 1\\slot\\2", "inst b")
    assert sample.applied_sm_clock_mhz is None
    assert sample.unsupported_fields == ("applied_sm_clock_mhz",)
    assert sample.line_no == 2
    (rejected,) = scan.rejected
    assert rejected.line_no == 3 and "node holds control" in rejected.reason


# --- properties -----------------------------------------------------------------------------

names = st.text(
    alphabet=st.characters(min_codepoint=9, max_codepoint=0x2FFF, exclude_categories=("Cs",)),
    min_size=1,
    max_size=12,
)
records = st.fixed_dictionaries(
    {
        "gpu_uuid": st.one_of(st.sampled_from(["GPU-a", "GPU-b"]), names),
        "sampled_at": st.one_of(
            st.integers(0, 40).map(lambda s: T0 + timedelta(seconds=s)),
            st.datetimes(
                min_value=datetime(1971, 1, 1),
                max_value=datetime(2199, 1, 1),
                timezones=st.just(UTC),
            ),
        ),
        "node": st.one_of(st.just("gpu-node-7"), names),
        "gpu_index": st.integers(0, 2**31 - 1),
        "instance_id": st.one_of(st.none(), st.just("inst-a"), names),
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
intervals = st.tuples(st.integers(-5, 45), st.integers(1, 50)).map(
    lambda p: {
        "start_s": T0.timestamp() + p[0],
        "end_s": T0.timestamp() + p[0] + p[1],
    }
)


def _mutate(lines: list[bytearray], rnd: random.Random) -> None:
    for line in lines:
        for _ in range(rnd.randint(0, 2)):
            if not line:
                break
            position = rnd.randrange(len(line))
            action = rnd.choice(["flip", "cut", "insert", "delete"])
            if action == "flip":
                line[position] = rnd.randrange(256)
            elif action == "cut":
                del line[position:]
            elif action == "insert":
                line[position:position] = rnd.choice(
                    [b"-", b"NaN", b"\x00", b"\n", b"\t", b"\\", b"\\N", b"9" * 30, b"\r"]
                )
            else:
                del line[position]


@FUZZ
@given(
    st.lists(records, min_size=1, max_size=6),
    intervals,
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_vectorised_and_line_by_line_paths_agree_on_any_file(
    recs: list[dict[str, Any]], interval: dict[str, float], mutate: bool, rnd: random.Random
) -> None:
    lines = [bytearray(format_spool_line(r).encode()) for r in recs]
    if rnd.random() < 0.3:  # a repeated sample
        lines.append(bytearray(lines[rnd.randrange(len(lines))]))
    if mutate:
        _mutate(lines, rnd)
    data = SPOOL_HEADER.encode() + b"\n" + b"\n".join(bytes(x) for x in lines)
    data += rnd.choice([b"", b"\n"])
    prior = SeenSamples()
    if rnd.random() < 0.5:  # keys from an earlier file of the same load
        prior.add("GPU-a", micros(T0.timestamp() + rnd.randrange(40)))
    fast = outcome(data, vectorised=True, seen=_copy(prior), **interval)
    slow = outcome(data, vectorised=False, seen=_copy(prior), **interval)
    assert fast == slow


@FUZZ
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_after_a_header_never_raise_and_every_line_is_accounted_for(
    data: bytes, with_header: bool
) -> None:
    if with_header:
        data = SPOOL_HEADER.encode() + b"\n" + data
    scan = scan_spool_bytes(data, "f.tsv")
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    non_blank = sum(1 for line in lines if line.strip())
    header = 1 if lines[0].rstrip(b"\r") == SPOOL_HEADER.encode() else 0
    assert scan.rows_loaded + len(scan.rejected) + scan.rows_outside == non_blank - header
    for r in scan.rejected:
        assert "\x00" not in r.raw
        r.raw.encode("utf-8")


def test_the_header_names_the_gpu_telemetry_columns_in_order() -> None:
    assert SPOOL_HEADER.split("\t") == list(SAMPLE_KEYS)

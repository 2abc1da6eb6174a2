"""Loading GPU telemetry files into the real PostgreSQL: accounting, idempotency, partitions,
and energy windows checked against an independent pandas oracle."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from telemetry.gpu import (
    JSONL_SUFFIX,
    SPOOL_SUFFIX,
    format_sample_line,
    parse_gpu_file,
    spool_file_name,
)
from telemetry.gpu_spool import SPOOL_HEADER, format_spool_line
from wattplan.errors import InputDataError
from wattplan.ingest_gpu import list_complete_files, load_gpu_telemetry

RECORDING = Path(__file__).parents[1] / "data" / "nvml" / "h100_tp2_sequence.json"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
WINDOW_S = 15


def recorded_records(node: str, instance: str, uuid_prefix: str, t0: datetime = T0) -> list[dict]:
    """The replay recording as sample records (NVML units converted, errors as null)."""
    doc = json.loads(RECORDING.read_text())
    out = []
    for gpu in doc["gpus"]:
        for i, sweep in enumerate(gpu["sweeps"]):

            def v(key: str, sweep: dict = sweep) -> Any:
                value = sweep[key]
                return None if isinstance(value, str) else value

            app = sweep["applications_clock_mhz"]
            out.append(
                {
                    "gpu_uuid": uuid_prefix + gpu["uuid"][4:],
                    "sampled_at": t0 + timedelta(seconds=i),
                    "node": node,
                    "gpu_index": gpu["index"],
                    "instance_id": instance,
                    "energy_mj": v("energy_mj"),
                    "power_w": v("power_mw") / 1000,
                    "sm_clock_mhz": v("sm_clock_mhz"),
                    "memory_clock_mhz": v("memory_clock_mhz"),
                    "applied_sm_clock_mhz": None if isinstance(app, str) else app,
                    "power_limit_w": v("power_limit_mw") / 1000,
                    "utilization_pct": v("utilization_gpu_pct"),
                    "memory_used_bytes": v("memory_used_bytes"),
                    "temperature_c": v("temperature_c"),
                    "unsupported_fields": ["applied_sm_clock_mhz"] if isinstance(app, str) else [],
                }
            )
    return sorted(out, key=lambda r: (r["sampled_at"], r["gpu_index"]))


#: The collector's spool format and the JSONL format (for other producers).
FORMATS = ["tsv", "jsonl"]


def sample_line(record: dict, fmt: str = "tsv") -> str:
    return format_spool_line(record) if fmt == "tsv" else format_sample_line(record)


def write_file(
    folder: Path,
    records: list[dict],
    extra_lines: list[str] = (),  # type: ignore[assignment]
    fmt: str = "tsv",
) -> Path:
    """A telemetry file as the collector (tsv) or another producer (jsonl) writes it."""
    suffix = SPOOL_SUFFIX if fmt == "tsv" else JSONL_SUFFIX
    path = folder / spool_file_name(records[0]["node"], records[0]["sampled_at"], suffix)
    header = [SPOOL_HEADER] if fmt == "tsv" else []
    lines = header + [sample_line(r, fmt) for r in records] + list(extra_lines)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def two_nodes(folder: Path, fmt: str = "tsv") -> list[Path]:
    return [
        write_file(folder, recorded_records("node-a", "inst-a", "GPU-"), fmt=fmt),
        write_file(folder, recorded_records("node-b", "inst-b", "GPU-b"), fmt=fmt),
    ]


def load(engine: sa.Engine, files: list[Path], start: datetime, end: datetime, **kw: Any) -> Any:
    kw.setdefault("window_s", WINDOW_S)
    kw.setdefault("retention_days", 7)
    with engine.begin() as conn:
        return load_gpu_telemetry(conn, files, start, end, **kw)


def rows(engine: sa.Engine, query: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(query))]


def oracle(
    files: list[Path], start: datetime, end: datetime, max_gap_s: float = 60
) -> pd.DataFrame:
    """Energy, mean and peak power per (instance, window), written independently in pandas."""
    df = pd.DataFrame([asdict(s) for f in files for s in parse_gpu_file(f).samples])
    df["t"] = (df.sampled_at - start).dt.total_seconds()
    df = df.sort_values(["gpu_uuid", "t"])
    prev = df.groupby("gpu_uuid")[["energy_mj", "power_w", "t"]].shift()
    dt = df.t - prev.t
    counter = (df.energy_mj - prev.energy_mj) / 1000
    by_power = (df.power_w + prev.power_w) / 2 * dt
    df["step_j"] = np.where(counter >= 0, counter, by_power)
    df.loc[dt.isna() | (dt > max_gap_s), "step_j"] = 0.0
    df = df[(df.sampled_at >= start) & (df.sampled_at < end)]
    df["window"] = (df.t // WINDOW_S).astype(int)
    energy = df.groupby(["instance_id", "window"]).step_j.sum()
    summed = df.groupby(["instance_id", "window", "t"]).power_w.sum()
    power = summed.groupby(["instance_id", "window"]).agg(["mean", "max"])
    return pd.concat([energy.rename("energy_j"), power], axis=1).reset_index()


@pytest.mark.parametrize("fmt", FORMATS)
def test_instance_windows_match_an_independent_pandas_oracle(
    engine: sa.Engine, tmp_path: Path, fmt: str
) -> None:
    files = two_nodes(tmp_path, fmt)
    end = T0 + timedelta(seconds=60)
    load(engine, files, T0, end)
    stored = pd.DataFrame(
        rows(
            engine,
            "SELECT instance_id, window_start_at, energy_j, mean_power_w, peak_power_w,"
            " counter_resets, gpus, samples FROM instance_windows ORDER BY 1, 2",
        ),
        columns=["instance_id", "at", "energy_j", "mean", "max", "resets", "gpus", "samples"],
    )
    expected = oracle(files, T0, end)
    assert len(stored) == len(expected) == 8
    assert stored.energy_j.to_numpy() == pytest.approx(expected.energy_j.to_numpy())
    assert stored["mean"].to_numpy() == pytest.approx(expected["mean"].to_numpy())
    assert stored["max"].to_numpy() == pytest.approx(expected["max"].to_numpy())
    # GPU 1's driver reload at second 30 lands in the third window of each instance
    assert stored.resets.tolist() == [0, 0, 1, 0] * 2
    assert set(stored.gpus) == {2} and stored.samples.sum() == 2 * 2 * 48


@pytest.mark.parametrize("fmt", FORMATS)
def test_rerunning_an_interval_leaves_identical_rows(
    engine: sa.Engine, tmp_path: Path, fmt: str
) -> None:
    files = two_nodes(tmp_path, fmt)
    c = recorded_records("node-c", "inst-c", "GPU-c")[:1]
    files.append(write_file(tmp_path, c, ["not a sample"], fmt=fmt))
    end = T0 + timedelta(seconds=60)
    dumps = []
    for _ in range(2):  # the first run fills new partitions, the second an existing one
        result = load(engine, files, T0, end)
        dumps.append(
            [
                rows(engine, "SELECT * FROM gpu_telemetry ORDER BY gpu_uuid, sampled_at"),
                rows(engine, "SELECT * FROM instance_windows ORDER BY 1, 2"),
                rows(engine, "SELECT * FROM rejected_rows ORDER BY source, line_no"),
                rows(
                    engine,
                    "SELECT source_kind, rows_read, rows_loaded, rows_rejected FROM ingest_runs",
                ),
            ]
        )
    assert dumps[0] == dumps[1]
    assert len(dumps[0][0]) == 2 * 96 + 1 and result.rows_read == 2 * 96 + 1 + 1


@pytest.mark.parametrize(
    ("fmt", "first_bad_line", "garbage_reason"),
    [("tsv", 6, "expected 15 tab-separated fields"), ("jsonl", 5, "not valid JSON")],
)
def test_rejected_lines_land_with_file_line_reason_and_raw(
    engine: sa.Engine, tmp_path: Path, fmt: str, first_bad_line: int, garbage_reason: str
) -> None:
    good = recorded_records("node-a", "inst-a", "GPU-")
    bad_power = sample_line(
        {**good[1], "power_w": -5.0, "sampled_at": T0 + timedelta(seconds=50)}, fmt
    )
    path = write_file(tmp_path, good[:4], ["\x00not json at all\x00", bad_power], fmt=fmt)
    result = load(engine, [path], T0, T0 + timedelta(seconds=60))
    assert (result.rows_read, result.rows_loaded, result.rows_rejected) == (6, 4, 2)
    assert result.files == (str(path),)
    stored = rows(
        engine, "SELECT source, line_no, reason, raw, source_kind FROM rejected_rows ORDER BY 2"
    )
    assert [(s[0], s[1], s[4]) for s in stored] == [
        (path.name, first_bad_line, "gpu_telemetry"),
        (path.name, first_bad_line + 1, "gpu_telemetry"),
    ]
    assert garbage_reason in stored[0][2] and stored[0][3] == "not json at all"
    assert "power_w" in stored[1][2] and stored[1][3] == bad_power
    assert rows(engine, "SELECT rows_read, rows_loaded, rows_rejected FROM ingest_runs") == [
        (6, 4, 2)
    ]


def test_samples_outside_the_interval_are_neither_loaded_nor_counted(
    engine: sa.Engine, tmp_path: Path
) -> None:
    files = two_nodes(tmp_path)
    first = load(engine, files, T0, T0 + timedelta(seconds=30))
    second = load(engine, files, T0 + timedelta(seconds=30), T0 + timedelta(seconds=60))
    assert (first.rows_read, first.rows_loaded) == (120, 120)
    assert (second.rows_read, second.rows_loaded) == (72, 72)
    assert rows(engine, "SELECT count(*) FROM gpu_telemetry") == [(192,)]
    # the second run's first step starts from the reading at 29 s in the files
    whole = oracle(files, T0, T0 + timedelta(seconds=60))
    stored = rows(engine, "SELECT sum(energy_j) FROM instance_windows")
    assert stored[0][0] == pytest.approx(whole.energy_j.sum())


def test_first_step_of_an_interval_starts_from_the_stored_previous_reading(
    engine: sa.Engine, tmp_path: Path
) -> None:
    records = recorded_records("node-a", "inst-a", "GPU-")
    early = tmp_path / "early"
    late = tmp_path / "late"
    early.mkdir()
    late.mkdir()
    split = T0 + timedelta(seconds=15)
    before = write_file(early, [r for r in records if r["sampled_at"] < split])
    after = write_file(late, [r for r in records if r["sampled_at"] >= split])
    load(engine, [before], T0, split)
    load(engine, [after], split, T0 + timedelta(seconds=60))
    whole = oracle([before, after], T0, T0 + timedelta(seconds=60))
    by_window = rows(engine, "SELECT energy_j FROM instance_windows ORDER BY window_start_at")
    assert [r[0] for r in by_window] == pytest.approx(whole.energy_j.tolist())


def test_daily_partitions_are_created_and_old_ones_dropped_by_retention(
    engine: sa.Engine, tmp_path: Path
) -> None:
    day1 = datetime(2026, 3, 1, 23, 59, 30, tzinfo=UTC)
    early = write_file(tmp_path, recorded_records("node-a", "inst-a", "GPU-", t0=day1))
    load(engine, [early], day1 - timedelta(seconds=30), day1 + timedelta(seconds=60))
    partitions = (
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'gpu_telemetry'::regclass ORDER BY 1"
    )
    assert rows(engine, partitions) == [("gpu_telemetry_p20260301",), ("gpu_telemetry_p20260302",)]
    assert rows(engine, "SELECT count(*) FROM gpu_telemetry_p20260302") == [(2 * 18,)]
    later = datetime(2026, 3, 9, 0, 0, tzinfo=UTC)  # 7 days after day 1 ended
    late = write_file(tmp_path, recorded_records("node-a", "inst-a", "GPU-", t0=later))
    load(engine, [late], later, later + timedelta(seconds=60))
    assert rows(engine, partitions) == [("gpu_telemetry_p20260302",), ("gpu_telemetry_p20260309",)]
    assert rows(engine, "SELECT count(*) FROM gpu_telemetry") == [(2 * 18 + 96,)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_repeat_in_another_file_is_rejected_not_loaded(
    engine: sa.Engine, tmp_path: Path, fmt: str
) -> None:
    records = recorded_records("node-a", "inst-a", "GPU-")
    first = write_file(tmp_path, records, fmt=fmt)
    (tmp_path / "copy").mkdir()
    made = write_file(tmp_path / "copy", records[3:4], fmt=fmt)
    copy = made.rename(tmp_path / made.name.replace("Z.", "Z-1."))
    result = load(engine, [first, copy], T0, T0 + timedelta(seconds=60))
    assert (result.rows_loaded, result.rows_rejected) == (96, 1)
    assert "duplicate" in rows(engine, "SELECT reason FROM rejected_rows")[0][0]


def test_a_node_loaded_later_leaves_the_other_nodes_rows_alone(
    engine: sa.Engine, tmp_path: Path
) -> None:
    a, b = two_nodes(tmp_path)
    end = T0 + timedelta(seconds=60)
    load(engine, [a], T0, end)
    before = rows(engine, "SELECT * FROM gpu_telemetry ORDER BY gpu_uuid, sampled_at")
    windows_a = rows(engine, "SELECT * FROM instance_windows ORDER BY 1, 2")
    load(engine, [b], T0, end)
    after = rows(
        engine, "SELECT * FROM gpu_telemetry WHERE node = 'node-a' ORDER BY gpu_uuid, sampled_at"
    )
    assert after == before
    assert (
        rows(engine, "SELECT * FROM instance_windows WHERE instance_id = 'inst-a' ORDER BY 1, 2")
        == windows_a
    )
    assert rows(engine, "SELECT count(*) FROM gpu_telemetry WHERE node = 'node-b'") == [(96,)]


def test_list_complete_files_skips_part_files_and_picks_files_by_interval(tmp_path: Path) -> None:
    names = [
        "gpu-node-a-20260301T110000.000000Z.tsv",
        "gpu-node-a-20260301T120000.000000Z.tsv",
        "gpu-node-a-20260301T130000.000000Z.tsv",
        "gpu-node-a-20260301T140000.000000Z.tsv.part",
        "gpu-node-b-20260301T083000.000000Z.jsonl",
        "hand-made.jsonl",
        "notes.txt",
    ]
    for name in names:
        (tmp_path / name).write_text("")
    assert [p.name for p in list_complete_files(tmp_path)] == sorted(
        n for n in names if not n.endswith((".part", ".txt"))
    )
    chosen = list_complete_files(tmp_path, T0 + timedelta(minutes=5), T0 + timedelta(minutes=10))
    assert [p.name for p in chosen] == [names[1], names[4], names[5]]
    with pytest.raises(InputDataError, match="spool folder"):
        list_complete_files(tmp_path / "missing")


def test_arguments_are_checked_before_anything_is_written(
    engine: sa.Engine, tmp_path: Path
) -> None:
    (a, b) = two_nodes(tmp_path)
    (tmp_path / "x").mkdir()
    same_name = tmp_path / "x" / a.name
    same_name.write_text("")
    with pytest.raises(InputDataError, match="share a name"):
        load(engine, [a, same_name], T0, T0 + timedelta(seconds=60))
    with pytest.raises(ValueError, match="retention_days"):
        load(engine, [a], T0, T0 + timedelta(days=2), retention_days=1)
    with pytest.raises(ValueError, match="window"):
        load(engine, [a], T0 + timedelta(seconds=7), T0 + timedelta(seconds=60))
    assert rows(engine, "SELECT count(*) FROM gpu_telemetry") == [(0,)]


def test_a_missing_file_fails_the_load_and_nothing_is_kept(
    engine: sa.Engine, tmp_path: Path
) -> None:
    a, b = two_nodes(tmp_path)
    b.unlink()
    with pytest.raises(InputDataError, match="cannot read GPU telemetry file"):
        load(engine, [a, b], T0, T0 + timedelta(seconds=60))
    assert rows(engine, "SELECT count(*) FROM ingest_runs") == [(0,)]
    assert rows(engine, "SELECT to_regclass('gpu_telemetry_p20260301') IS NULL") == [(True,)]


def test_a_server_error_in_the_writer_thread_reaches_the_caller(engine: sa.Engine) -> None:
    import psycopg
    from psycopg import sql

    from wattplan.ingest_gpu import _CopyPipe

    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, psycopg.Connection)
        pipe = _CopyPipe(raw)
        pipe.execute(sql.SQL("SELECT 1 / 0"))
        with pytest.raises(psycopg.errors.DivisionByZero):
            pipe.close()
        conn.rollback()


def test_an_interval_without_files_records_an_empty_run(engine: sa.Engine) -> None:
    result = load(engine, [], T0, T0 + timedelta(seconds=60))
    assert (result.rows_read, result.rows_loaded, result.rows_rejected) == (0, 0, 0)
    assert rows(engine, "SELECT rows_read FROM ingest_runs") == [(0,)]


def test_an_interval_across_midnight_fills_an_existing_and_a_new_partition(
    engine: sa.Engine, tmp_path: Path
) -> None:
    t0 = datetime(2026, 3, 1, 23, 59, 15, tzinfo=UTC)
    files = [
        write_file(tmp_path, recorded_records("node-a", "inst-a", "GPU-", t0=t0)),
        write_file(tmp_path, recorded_records("node-b", "inst-b", "GPU-b", t0=t0)),
    ]
    load(engine, files, t0 - timedelta(seconds=15), t0 + timedelta(seconds=15))
    assert rows(engine, "SELECT to_regclass('gpu_telemetry_p20260302') IS NULL") == [(True,)]
    across = (t0 + timedelta(seconds=15), t0 + timedelta(seconds=60))
    dumps = []
    for _ in range(2):
        result = load(engine, files, *across)
        dumps.append(rows(engine, "SELECT * FROM gpu_telemetry ORDER BY gpu_uuid, sampled_at"))
    assert dumps[0] == dumps[1] and result.rows_loaded == 2 * 2 * 33
    assert rows(engine, "SELECT count(*) FROM gpu_telemetry_p20260302") == [(2 * 2 * 3,)]
    assert len(dumps[0]) == 2 * 96


def test_a_day_attached_early_still_takes_a_late_row_of_that_day(
    engine: sa.Engine, tmp_path: Path
) -> None:
    first = recorded_records(
        "node-a", "inst-a", "GPU-", t0=datetime(2026, 3, 1, 23, 59, 40, tzinfo=UTC)
    )
    later = recorded_records("node-a", "inst-a", "GPU-", t0=datetime(2026, 3, 2, 0, 3, tzinfo=UTC))
    stray = {**later[0], "sampled_at": datetime(2026, 3, 1, 23, 59, 59, 500000, tzinfo=UTC)}
    files = [write_file(tmp_path, first), write_file(tmp_path, later[:10])]
    with files[1].open("a") as handle:  # a clock step: a day-1 sample in a later file
        handle.write(sample_line(stray) + "\n")
    start, end = (
        datetime(2026, 3, 1, 23, 59, 30, tzinfo=UTC),
        datetime(2026, 3, 2, 0, 4, tzinfo=UTC),
    )
    result = load(engine, files, start, end)
    assert (result.rows_loaded, result.rows_rejected) == (96 + 10 + 1, 0)
    assert rows(engine, "SELECT count(*) FROM gpu_telemetry_p20260301") == [(2 * 20 + 1,)]
    assert rows(engine, "SELECT count(*) FROM gpu_telemetry_p20260302") == [(2 * 28 + 10,)]

"""The profiles table (migration 005) in a real PostgreSQL: load, read back, re-run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import sqlalchemy as sa

from profiles import load_profile_records, write_profiles_csv
from wattplan import store
from wattplan.domain import Profile, ServingConfig
from wattplan.errors import InputDataError
from wattplan.jobs import load_profile_table
from wattplan.settings import PROJECT_ROOT

V1 = PROJECT_ROOT / "data" / "profiles" / "v1.csv"


def _count(engine: sa.Engine, sql: str) -> object:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar_one()


def test_default_table_loads_and_reads_back_as_the_same_profiles(engine: sa.Engine) -> None:
    records = load_profile_records(V1)
    with engine.begin() as conn:
        assert load_profile_table(conn, V1) == len(records)
    with engine.connect() as conn:
        stored = store.read_profiles(conn, "v1")
    key = lambda p: (p.config.key, p.request_type)  # noqa: E731
    assert sorted(stored, key=key) == sorted((r.profile for r in records), key=key)
    assert _count(engine, "SELECT count(*) FROM profiles WHERE version = 'v1'") == len(records)
    assert _count(engine, "SELECT row_count FROM profile_versions WHERE version = 'v1'") == len(
        records
    )
    digest = hashlib.sha256(V1.read_bytes()).hexdigest()
    assert _count(engine, "SELECT source_sha256 FROM profile_versions") == digest


def test_every_stored_row_keeps_its_curve_latencies_energy_and_provenance(
    engine: sa.Engine,
) -> None:
    record = next(r for r in load_profile_records(V1) if r.profile.config.spp > 1)
    with engine.begin() as conn:
        store.write_profile_records(conn, [record])
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM profiles")).mappings().one()
    p = record.profile
    assert (row["spp"], row["kvp"], row["config_key"]) == (p.config.spp, p.config.kvp, p.config.key)
    assert row["power_curve"] == [list(point) for point in p.power_curve]
    assert [pt["ttft_p99_s"] for pt in row["load_points"]] == [
        pt.ttft_p99_s for pt in record.points
    ]
    assert row["idle_power_w"] == p.idle_power_w
    assert row["power_at_capacity_w"] == p.power_at_capacity_w
    assert row["energy_per_request_j"] == pytest.approx(p.energy_per_request_j)
    assert (row["method"], row["source"]) == ("calibrated", p.source)
    assert (row["ttft_p50_s"], row["tbt_p50_s"]) == (p.ttft_p50_s, p.tbt_p50_s)


def test_reloading_the_same_table_changes_nothing(engine: sa.Engine) -> None:
    def snapshot() -> list[tuple]:
        with engine.connect() as conn:
            return [
                tuple(r)
                for r in conn.execute(
                    sa.text(
                        "SELECT version, config_key, request_type, capacity_rps, power_curve::text,"
                        " load_points::text FROM profiles ORDER BY 1, 2, 3"
                    )
                )
            ]

    with engine.begin() as conn:
        load_profile_table(conn, V1)
    first = snapshot()
    with engine.begin() as conn:
        load_profile_table(conn, V1)
    assert snapshot() == first
    assert _count(engine, "SELECT count(*) FROM profile_versions") == 1


def test_a_measured_version_sits_beside_the_calibrated_one(
    engine: sa.Engine, tmp_path: Path
) -> None:
    record = load_profile_records(V1)[0]
    measured = type(record)(
        Profile(**{**record.profile.__dict__, "version": "lab-1", "source": "wattplan profile"}),
        record.points,
        "measured",
    )
    path = tmp_path / "lab.csv"
    write_profiles_csv([measured], path)
    with engine.begin() as conn:
        load_profile_table(conn, V1)
        load_profile_table(conn, path)
    with engine.connect() as conn:
        assert [p.source for p in store.read_profiles(conn, "lab-1")] == ["wattplan profile"]
        assert len(store.read_profiles(conn, "v1")) == len(load_profile_records(V1))
    assert _count(engine, "SELECT method FROM profiles WHERE version = 'lab-1'") == "measured"


def test_a_bare_profile_reads_back_with_its_two_point_curve(engine: sa.Engine) -> None:
    config = ServingConfig("m", "H100-80GB", 2, 700)
    profile = Profile(
        config, "SS", 2.0, ((0.0, 240.0), (2.0, 900.0)), 0.1, 0.03, 0.5, 0.1, "x", "y"
    )
    with engine.begin() as conn:
        store.write_profiles(conn, [profile])
    with engine.connect() as conn:
        assert store.read_profiles(conn, "x") == [profile]


def test_a_malformed_table_writes_nothing(engine: sa.Engine, tmp_path: Path) -> None:
    lines = V1.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([*lines[:5], lines[5].replace(",calibrated,", ",guessed,")]) + "\n")
    with pytest.raises(InputDataError, match="line 6: column method"), engine.begin() as conn:
        load_profile_table(conn, bad)
    assert _count(engine, "SELECT count(*) FROM profiles") == 0

"""Carbon intensity, electricity and GPU prices, and ServeGen rates, loaded from a path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from wattplan.errors import InputDataError
from wattplan.ingest_reference import (
    load_carbon_intensity,
    load_electricity_prices,
    load_gpu_prices,
    load_servegen,
)
from wattplan.settings import PROJECT_ROOT

SERVEGEN = PROJECT_ROOT / "data" / "servegen-alibaba" / "language" / "m-large"
CARBON_HEADER = (
    "Datetime (UTC),Country,Zone Name,Zone Id,Carbon Intensity gCO₂eq/kWh (direct),"
    "Carbon Intensity gCO₂eq/kWh (LCA),Low Carbon Percentage,Renewable Percentage,"
    "Data Source,Data Estimated,Data Estimation Method\n"
)


def rows(engine: sa.Engine, sql: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql))]


def test_carbon_intensity_loads_from_a_user_path_and_rejects_bad_rows(
    engine: sa.Engine, tmp_path: Path
) -> None:
    path = tmp_path / "my-grid.csv"
    path.write_bytes(
        (
            CARBON_HEADER
            + "2025-01-01 00:00:00,DE,Germany,DE,380.5,420.1,40,35,x,false,\n"
            + "2025-01-01 01:00:00,DE,Germany,DE,360,,40,35,x,false,\n"
            + "2025-01-01 01:00:00,DE,Germany,DE,361,,40,35,x,false,\n"  # repeated hour
            + "2025-01-01 02:00:00,DE,Germany,DE,NaN,,40,35,x,false,\n"
            + "2025-01-01 02:30:00,DE,Germany,DE,300,,40,35,x,false,\n"
        ).encode()
        + b"\xff\xfe\x00garbage\n"
    )
    with engine.begin() as conn:
        result = load_carbon_intensity(conn, path)
    assert (result.rows_read, result.rows_loaded, result.rows_rejected) == (6, 2, 4)
    assert rows(engine, "SELECT * FROM grid_carbon_intensities ORDER BY hour_at") == [
        ("DE", datetime(2025, 1, 1, 0, tzinfo=UTC), 380.5, 420.1),
        ("DE", datetime(2025, 1, 1, 1, tzinfo=UTC), 360.0, None),
    ]
    rejected = rows(
        engine, "SELECT source, line_no, reason, source_kind FROM rejected_rows ORDER BY 2"
    )
    assert [(r[0], r[1], r[3]) for r in rejected] == [
        ("my-grid.csv", n, "grid_carbon_intensities") for n in (3, 4, 5, 6)
    ]
    assert "already on line 2" in rejected[0][2]
    assert "not a finite number" in rejected[1][2]
    assert "not on the hour" in rejected[2][2]
    assert "NUL" in rejected[3][2]


def test_electricity_prices_load_for_the_given_zone_keeping_negative_prices(
    engine: sa.Engine, tmp_path: Path
) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(
        "Datetime (UTC),Datetime (Local),Price (USD/MWh)\n"
        "2025-01-01 00:00:00+00:00,2024-12-31 16:00:00-08:00,41.5\n"
        "2025-01-01 01:00:00+00:00,2024-12-31 17:00:00-08:00,-3.25\n"
        "2025-01-01 02:00:00+00:00,2024-12-31 18:00:00-08:00,\n"
    )
    with engine.begin() as conn:
        result = load_electricity_prices(conn, path, "US-CAL-CISO")
    assert (result.rows_loaded, result.rows_rejected) == (2, 1)
    assert rows(engine, "SELECT zone, price_usd_per_mwh FROM electricity_prices ORDER BY 2") == [
        ("US-CAL-CISO", -3.25),
        ("US-CAL-CISO", 41.5),
    ]


def test_gpu_prices_load_and_offers_without_a_per_gpu_price_are_rejected(
    engine: sa.Engine, tmp_path: Path
) -> None:
    path = tmp_path / "gpus.csv"
    path.write_text(
        "Cloud,GPU Type,GPU Arch,GPUs,GPU RAM,vCPUs,RAM,On-demand,Per-GPU,Spot,Name\n"
        "AWS,H100 (80 GB),Hopper,8,640,192,2048,98.32,12.29,,p5.48xlarge\n"
        "Lambda,H100 (80 GB),Hopper,1,80,26,200,2.49,2.49,,\n"
        "Azure,T4 (16 GB),Turing,1,16,4,28,0.53,,,NC4as\n"
        "Oops,H100 (80 GB),Hopper,1,80,26,200,2.49,-1,,x\n"
    )
    with engine.begin() as conn:
        result = load_gpu_prices(conn, path)
    assert (result.rows_read, result.rows_loaded, result.rows_rejected) == (4, 2, 2)
    assert rows(engine, "SELECT * FROM gpu_prices ORDER BY provider") == [
        ("H100-80GB", "AWS", "p5.48xlarge", 12.29),
        ("H100-80GB", "Lambda", "1x", 2.49),
    ]


def test_bundled_reference_files_load_without_rejects(engine: sa.Engine) -> None:
    data = PROJECT_ROOT / "data"
    with engine.begin() as conn:
        carbon = load_carbon_intensity(
            conn,
            data / "electricitymaps-carbon-intensity/US-CAL-CISO/2023/US-CAL-CISO_2023_hourly.csv",
        )
        prices = load_electricity_prices(
            conn,
            data / "sustain-cluster-electricity-prices/US-CAL-CISO/2024/"
            "US-CAL-CISO_electricity_prices_2024.csv",
            "US-CAL-CISO",
        )
    assert (carbon.rows_loaded, carbon.rows_rejected) == (8760, 0)
    assert (prices.rows_loaded, prices.rows_rejected) == (8784, 0)


@pytest.mark.parametrize("loader", ["carbon", "prices", "gpu"])
def test_an_unreadable_or_foreign_file_is_an_input_error(
    engine: sa.Engine, tmp_path: Path, loader: str
) -> None:
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b,c\n1,2,3\n")
    with engine.begin() as conn:
        for path, message in (
            (tmp_path / "missing.csv", "cannot open"),
            (foreign, "missing columns"),
        ):
            with pytest.raises(InputDataError, match=message):
                if loader == "carbon":
                    load_carbon_intensity(conn, path)
                elif loader == "prices":
                    load_electricity_prices(conn, path, "X")
                else:
                    load_gpu_prices(conn, path)


def test_bundled_servegen_subset_loads_and_its_rate_matches_a_pandas_sum(
    engine: sa.Engine,
) -> None:
    with engine.begin() as conn:
        result = load_servegen(conn, SERVEGEN)
    traces = sorted(SERVEGEN.glob("chunk-*-trace.csv"))
    frames = [
        pd.read_csv(t, header=None, names=["ts", "rate", "cv", "pat", "a", "b"]) for t in traces
    ]
    expected = pd.concat(frames).groupby("ts").rate.sum()
    with engine.connect() as conn:
        got = pd.read_sql(
            "SELECT window_start_at, sum(rate_rps) AS rate, count(*) AS clients"
            " FROM workload_rates WHERE workload = 'servegen-m-large'"
            " GROUP BY 1 ORDER BY 1",
            conn,
        )
    day0 = datetime(2024, 1, 1, tzinfo=UTC)
    assert (got.window_start_at.iloc[0], got.window_start_at.iloc[-1]) == (
        day0,
        day0 + timedelta(seconds=int(expected.index[-1])),
    )
    assert got.clients.eq(len(traces)).all() and len(got) == len(expected) == 1440
    assert got.rate.to_numpy() == pytest.approx(expected.to_numpy(), rel=1e-12)

    assert result.rows_rejected == 0
    assert result.rows_read == 8 * 1440 + 2 * 56  # trace lines + dataset windows
    with_tokens = rows(
        engine,
        "SELECT client, count(*) FROM workload_rates WHERE mean_input_tokens IS NOT NULL"
        " GROUP BY 1 ORDER BY 1",
    )
    assert with_tokens == [("chunk-143", 1440), ("chunk-34", 1440)]


def test_servegen_rerun_changes_nothing_and_another_day0_replaces_the_rows(
    engine: sa.Engine,
) -> None:
    def load(**kwargs: object) -> list[tuple]:
        with engine.begin() as conn:
            load_servegen(conn, SERVEGEN, clients=["chunk-34"], **kwargs)  # type: ignore[arg-type]
        return rows(engine, "SELECT * FROM workload_rates ORDER BY client, window_start_at")

    first = load()
    assert len(first) == 1440
    assert load() == first
    day0 = datetime(2025, 6, 2, tzinfo=UTC)
    moved = load(day0_at=day0)
    assert [r[2] for r in moved] == [r[2] - datetime(2024, 1, 1, tzinfo=UTC) + day0 for r in first]
    assert [r[3:] for r in moved] == [r[3:] for r in first]


def test_carbon_reload_leaves_identical_rows(engine: sa.Engine, tmp_path: Path) -> None:
    path = tmp_path / "grid.csv"
    path.write_text(
        CARBON_HEADER + "2025-01-01 00:00:00,DE,Germany,DE,380.5,,40,35,x,false,\nbad\n"
    )
    snapshots = []
    for _ in range(2):
        with engine.begin() as conn:
            load_carbon_intensity(conn, path)
        snapshots.append(
            (
                rows(engine, "SELECT * FROM grid_carbon_intensities"),
                rows(engine, "SELECT * FROM rejected_rows"),
            )
        )
    assert snapshots[0] == snapshots[1] and len(snapshots[0][1]) == 1


def test_servegen_folder_without_traces_is_an_input_error(
    engine: sa.Engine, tmp_path: Path
) -> None:
    with engine.begin() as conn, pytest.raises(InputDataError, match="no ServeGen"):
        load_servegen(conn, tmp_path)

"""Report plots rendered from test data in the real PostgreSQL: valid PNGs with content, one
self-contained HTML page embedding exactly those PNGs, and plots that show the views' figures.
"""

from __future__ import annotations

import base64
import math
import re
from datetime import UTC, date, datetime, timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from matplotlib.image import imread

from profiles import load_profiles
from telemetry.reference import GpuPrice, HourlyValue
from wattplan import report_plots, reporting, store
from wattplan.domain import Layout, LayoutItem, LoadForecast, ServingConfig
from wattplan.settings import PROJECT_ROOT, Settings

CLUSTER = "plotted"
ZONE = "ZP"
DAY0 = date(2024, 5, 6)
DAYS = 3
W = 300
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = ServingConfig("llama2-70b", "H100-80GB", 2, 700, 1400)
LARGE = ServingConfig("llama2-70b", "H100-80GB", 4, 700, 1980)


def sample_settings(**changes: object) -> Settings:
    """Settings of the sample cluster (bundled v1 profiles, 5-minute telemetry)."""
    values: dict = {"cluster": CLUSTER, "carbon_zone": ZONE, "ingest_window_s": W}
    values.update(changes)
    return Settings(**values)


def _rate(moment: datetime, rtype: str) -> float:
    """A daily cycle per type (rps), deterministic."""
    hours = moment.hour + moment.minute / 60
    base = {"SS": 6.0, "MM": 1.2, "LL": 0.25}[rtype]
    return base * (1.0 + 0.8 * math.sin(2 * math.pi * (hours - 9) / 24))


def write_sample_days(conn: sa.Connection, days: int = DAYS) -> None:
    """Three days of a cluster serving SS, MM and LL: layouts every 2 h sized to the load,
    telemetry on the first day, forecasts every 30 min, hourly carbon and prices."""
    store.write_profiles(conn, load_profiles(PROJECT_ROOT / "data" / "profiles" / "v1.csv"))
    start = datetime(DAY0.year, DAY0.month, DAY0.day, tzinfo=UTC)
    end = start + timedelta(days=days)
    moment = start
    while moment < end:  # a layout every two hours
        peak = {t: _rate(moment + timedelta(hours=1), t) * 1.3 for t in ("SS", "MM", "LL")}
        items = (
            LayoutItem("chat", "SS", SMALL, max(1, math.ceil(peak["SS"] / 13))),
            LayoutItem("chat", "MM", SMALL, max(1, math.ceil(peak["MM"] / 2.0))),
            LayoutItem("chat", "LL", LARGE, max(1, math.ceil(peak["LL"] / 0.4))),
        )
        store.write_applied_state(conn, CLUSTER, moment, None, Layout(items))
        moment += timedelta(hours=2)
    windows, telemetry, clocks = [], [], []
    moment = start
    while moment < end:
        for rtype in ("SS", "MM", "LL"):
            rate = _rate(moment, rtype)
            count = round(rate * W)
            windows.append(
                {
                    "s": "chat",
                    "t": rtype,
                    "w": moment,
                    "n": count,
                    "i": count * 300,
                    "o": count * 120,
                    "p": rate * 1.25,
                    "m": count / W,
                }
            )
        if moment < start + timedelta(days=1):
            energy = W * (2200 + 800 * _rate(moment, "SS") / 6.0)  # J: a few kW
            telemetry.append({"w": moment, "e": energy})
            clock = 1980 if moment.hour < 8 else (1755 if moment.hour < 18 else 1410)
            clocks.append({"t": moment, "c": clock})
        moment += timedelta(seconds=W)
    conn.execute(
        sa.text(
            "INSERT INTO request_type_windows (service, request_type, window_start_at, window_s,"
            " request_count, input_tokens, output_tokens, peak_rate_rps, mean_rate_rps)"
            " VALUES (:s, :t, :w, 300, :n, :i, :o, :p, :m)"
        ),
        windows,
    )
    conn.execute(
        sa.text(
            "INSERT INTO instance_windows (instance_id, window_start_at, window_s, node, gpus,"
            " samples, energy_j) VALUES ('inst-1', :w, 300, 'node-1', 8, 300, :e)"
        ),
        telemetry,
    )
    next_day = start + timedelta(days=1)  # partition bounds cannot be bound parameters
    conn.execute(
        sa.text(
            f"CREATE TABLE IF NOT EXISTS gpu_telemetry_p{DAY0:%Y%m%d} PARTITION OF gpu_telemetry"
            f" FOR VALUES FROM ('{start.isoformat()}') TO ('{next_day.isoformat()}')"
        )
    )
    conn.execute(
        sa.text(
            "INSERT INTO gpu_telemetry (gpu_uuid, sampled_at, node, gpu_index, instance_id,"
            " sm_clock_mhz) VALUES ('GPU-0', :t, 'node-1', 0, 'inst-1', :c)"
        ),
        clocks,
    )
    forecasts = []
    moment = start + timedelta(minutes=30)
    while moment < end:
        for k, rtype in enumerate(("SS", "MM", "LL")):
            actual = _rate(moment, rtype) * 1.25
            wobble = 1.0 + 0.15 * math.sin(moment.timestamp() / 5000 + k)
            forecasts.append(
                LoadForecast(
                    "chat",
                    rtype,
                    moment,
                    1800,
                    actual * 0.8,
                    actual * wobble,
                    actual * 1.2,
                    0.95,
                    "p",
                )
            )
        moment += timedelta(minutes=30)
    for made_at in sorted({f.window_start for f in forecasts}):
        store.write_forecasts(
            conn, CLUSTER, [f for f in forecasts if f.window_start == made_at], made_at
        )
    hours = [start + timedelta(hours=h) for h in range(24 * days)]
    store.write_carbon_intensities(
        conn, [HourlyValue(ZONE, h, 250 + 80 * math.cos(2 * math.pi * h.hour / 24)) for h in hours]
    )
    store.write_electricity_prices(
        conn, [HourlyValue(ZONE, h, 40 + 25 * math.sin(2 * math.pi * h.hour / 24)) for h in hours]
    )
    store.write_gpu_prices(conn, [GpuPrice("H100-80GB", "a", "x", 2.5)])


@pytest.fixture
def sample(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        write_sample_days(conn)
    reporting.refresh_reports(engine, sample_settings())
    return engine


def assert_png_with_content(data: bytes, name: str) -> np.ndarray:
    """A decodable PNG of a real size whose pixels are not all one colour."""
    assert data[:8] == PNG_SIGNATURE, f"{name} is not a PNG"
    assert len(data) > 15_000, f"{name} is only {len(data)} bytes"
    pixels = imread(BytesIO(data), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600, pixels.shape
    rgb = pixels[..., :3].reshape(-1, 3)
    not_white = (rgb < 0.97).any(axis=1).mean()
    colours = len(np.unique((rgb * 255).astype(np.uint8), axis=0))
    assert not_white > 0.02, f"{name}: {not_white:.3%} of pixels drawn"
    assert colours > 20, f"{name}: only {colours} colours"
    return pixels


def test_daily_report_renders_pngs_and_one_self_contained_page(
    sample: sa.Engine, tmp_path: Path
) -> None:
    settings = sample_settings(reports_dir=tmp_path / "reports")
    last_day = reporting.last_reported_day(sample, settings)
    assert last_day == DAY0 + timedelta(days=DAYS - 1)
    page = reporting.render_daily_report(sample, settings, last_day, days=DAYS)
    assert page == tmp_path / "reports" / "daily" / f"{last_day:%Y-%m-%d}" / "index.html"
    assert reporting.latest_daily_folder(settings) == page.parent
    files = {p.name: p.read_bytes() for p in page.parent.glob("*.png")}
    assert set(files) == set(report_plots.PLOTS)
    for name, data in files.items():
        assert_png_with_content(data, name)
    text = page.read_text()
    embedded = [
        base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    ]
    assert sorted(embedded) == sorted(files.values())  # the page needs no other file
    assert 'src="http' not in text and "<script" not in text
    assert f"{DAY0:%Y-%m-%d}" in text and CLUSTER in text


def test_plots_show_the_figures_of_the_views(sample: sa.Engine) -> None:
    start = datetime(DAY0.year, DAY0.month, DAY0.day, tzinfo=UTC)
    with sample.connect() as conn:
        data = report_plots.read_report_data(conn, CLUSTER, start, start + timedelta(days=DAYS))
        gpus_by_window = dict(
            conn.execute(
                sa.text(
                    "SELECT window_start_at, sum(gpus) FROM report_pool_windows"
                    " WHERE cluster = :c GROUP BY 1"
                ),
                {"c": CLUSTER},
            ).all()
        )
        daily = conn.execute(
            sa.text(
                "SELECT day, sum(energy_kwh), sum(baseline_energy_kwh) FROM report_savings_daily"
                " WHERE cluster = :c GROUP BY day ORDER BY day"
            ),
            {"c": CLUSTER},
        ).all()
    assert len(daily) == DAYS and len(data.daily) == DAYS
    assert {c.source for c in data.clocks} == {"planned", "measured"}
    # the stacked area's top edge reaches the most GPUs held in any window
    figure = report_plots.plot_gpus_per_pool(data)
    top = max(
        path.vertices[:, 1].max()
        for collection in figure.axes[0].collections
        for path in collection.get_paths()
    )
    assert top == pytest.approx(float(max(gpus_by_window.values())))
    # the energy panel's bars are the daily energy and baseline of the savings view
    figure = report_plots.plot_daily_vs_baseline(data)
    heights = [patch.get_height() for patch in figure.axes[0].patches]
    assert heights == pytest.approx([float(r[1]) for r in daily] + [float(r[2]) for r in daily])
    assert all(r[2] > r[1] for r in daily)  # the planner's pools beat SinglePool here


def test_plots_without_data_say_so_and_are_still_valid_images(engine: sa.Engine) -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    with engine.connect() as conn:
        data = report_plots.read_report_data(conn, "nobody", start, start + timedelta(days=1))
    assert data == report_plots.ReportData("nobody", start, start + timedelta(days=1))
    for name, (_, plot) in report_plots.PLOTS.items():
        figure = plot(data)
        texts = [t.get_text() for ax in figure.axes for t in ax.texts]
        assert any("no data for cluster nobody" in t for t in texts), name
        png = report_plots.figure_png(figure)
        assert png[:8] == PNG_SIGNATURE
        pixels = imread(BytesIO(png), format="png")
        assert (pixels[..., :3] < 0.5).any(), f"{name}: no text drawn"


def test_last_reported_day_without_data_is_an_input_error(engine: sa.Engine) -> None:
    from wattplan.errors import InputDataError

    reporting.refresh_reports(engine, sample_settings())
    with pytest.raises(InputDataError, match="nothing for cluster"):
        reporting.last_reported_day(engine, sample_settings())


def test_cli_renders_the_plots_and_the_plan_report_says_where_they_are(
    sample: sa.Engine,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from wattplan.cli import main

    monkeypatch.setenv("WATTPLAN_DATABASE_URL", database_url)
    monkeypatch.setenv("WATTPLAN_CLUSTER", CLUSTER)
    monkeypatch.setenv("WATTPLAN_CARBON_ZONE", ZONE)
    monkeypatch.setenv("WATTPLAN_REPORTS_DIR", str(tmp_path))
    assert main(["report", "plots", "--days", "2"]) == 0
    printed = capsys.readouterr().out.split()
    folder = tmp_path / "daily" / f"{DAY0 + timedelta(days=DAYS - 1):%Y-%m-%d}"
    assert printed == [str(folder / n) for n in sorted(report_plots.PLOTS)] + [
        str(folder / "index.html")
    ]
    assert main(["report", "plots", "--day", "2024-05-06", "--days", "0"]) == 2
    assert "days=0" in capsys.readouterr().err
    assert main(["report"]) == 1  # no plans in the sample: says so
    assert "no plans yet" in capsys.readouterr().err


def test_reports_dir_defaults_under_the_state_dir_and_can_be_set(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert (
        Settings.from_env({"WATTPLAN_STATE_DIR": str(state)}).reports_dir
        == (state / "reports").resolve()
    )
    custom = Settings.from_env(
        {"WATTPLAN_STATE_DIR": str(state), "WATTPLAN_REPORTS_DIR": str(tmp_path / "r")}
    )
    assert custom.reports_dir == (tmp_path / "r").resolve()
    assert reporting.daily_folder(custom, DAY0) == (tmp_path / "r" / "daily" / "2024-05-06")
    assert reporting.latest_daily_folder(custom) is None

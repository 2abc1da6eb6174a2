"""Plots of the report views: PNG files and one self-contained HTML page that embeds them.

:func:`read_report_data` is the only function that reads the database (the report views);
the plot functions are pure (rows in, a matplotlib ``Figure`` out), drawn with the
object-oriented API and the Agg canvas, so no global pyplot state and no display is needed.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import date2num
from matplotlib.figure import Figure
from sqlalchemy.engine import Connection

from wattplan.domain import REQUEST_TYPES

_DPI = 110


@dataclass(frozen=True)
class ForecastPoint:
    """Newest forecast of one pool and window against what arrived (rates in rps)."""

    window_start: datetime
    service: str
    request_type: str
    forecast_peak_rps: float
    planned_rps: float
    actual_peak_rps: float | None


@dataclass(frozen=True)
class PoolGpus:
    """GPUs a pool held in one telemetry window."""

    window_start: datetime
    window_s: int
    service: str
    request_type: str
    gpus: int


@dataclass(frozen=True)
class ClockShare:
    """GPU time at one SM clock (``None``: not locked), planned (GPU-hours) or measured
    (samples)."""

    source: str
    clock_mhz: int | None
    amount: float


@dataclass(frozen=True)
class DailyTotals:
    """One day's energy, carbon and cost of the cluster's slots against the baseline."""

    day: date
    energy_kwh: float
    baseline_energy_kwh: float | None
    carbon_kg: float | None
    baseline_carbon_kg: float | None
    cost_usd: float
    baseline_cost_usd: float | None
    energy_basis: str


@dataclass(frozen=True)
class ReportData:
    """Everything the plots show for one cluster over ``[start, end)``."""

    cluster: str
    start: datetime
    end: datetime
    forecasts: tuple[ForecastPoint, ...] = ()
    pool_gpus: tuple[PoolGpus, ...] = ()
    clocks: tuple[ClockShare, ...] = ()
    daily: tuple[DailyTotals, ...] = ()


@dataclass(frozen=True)
class RenderedReport:
    """Files written by :func:`render_report`: the PNGs, then the HTML page."""

    pngs: tuple[Path, ...]
    html: Path

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file written."""
        return (*self.pngs, self.html)


def read_report_data(conn: Connection, cluster: str, start: datetime, end: datetime) -> ReportData:
    """Read the plotted series of ``cluster`` for ``[start, end)`` from the report views."""
    params = {"c": cluster, "s": start, "e": end, "d0": start.date(), "d1": end.date()}
    conn.execute(sa.text("SET LOCAL jit = off"))  # see reporting.refresh_report_views
    forecasts = tuple(
        ForecastPoint(*row)
        for row in conn.execute(
            sa.text(
                "SELECT DISTINCT ON (service, request_type, window_start_at) window_start_at,"
                " service, request_type, forecast_peak_rps, planned_rate_rps, actual_peak_rps"
                " FROM report_forecast_accuracy WHERE cluster = :c"
                " AND window_start_at >= :s AND window_start_at < :e"
                " ORDER BY service, request_type, window_start_at, made_at DESC, method"
            ),
            params,
        )
    )
    pool_gpus = tuple(
        PoolGpus(*row)
        for row in conn.execute(
            sa.text(
                "SELECT window_start_at, window_s, service, request_type, gpus"
                " FROM report_pool_windows WHERE cluster = :c"
                " AND window_start_at >= :s AND window_start_at < :e AND served"
                " ORDER BY window_start_at, service, request_type"
            ),
            params,
        )
    )
    clocks = tuple(
        ClockShare(str(row[0]), row[1], float(row[2]))
        for row in conn.execute(
            sa.text(
                "SELECT source, clock_mhz, sum(coalesce(gpu_hours, samples)) FROM"
                " report_clock_distribution WHERE cluster = :c AND day >= :d0 AND day < :d1"
                " GROUP BY source, clock_mhz ORDER BY source, clock_mhz NULLS FIRST"
            ),
            params,
        )
    )
    daily = tuple(
        DailyTotals(*row)
        for row in conn.execute(
            sa.text(
                "SELECT day, sum(energy_kwh), sum(baseline_energy_kwh), sum(carbon_kg),"
                " sum(baseline_carbon_kg), sum(cost_usd), sum(baseline_cost_usd),"
                " CASE WHEN bool_and(energy_basis = 'measured') THEN 'measured'"
                " WHEN bool_and(energy_basis = 'modelled') THEN 'modelled' ELSE 'mixed' END"
                " FROM report_savings_daily WHERE cluster = :c AND day >= :d0 AND day < :d1"
                " GROUP BY day ORDER BY day"
            ),
            params,
        )
    )
    return ReportData(cluster, start, end, forecasts, pool_gpus, clocks, daily)


# --- plots ----------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _no_data(figure: Figure, title: str, data: ReportData) -> Figure:
    ax = figure.add_subplot()
    ax.set_axis_off()
    ax.text(
        0.5,
        0.5,
        f"{title}\nno data for cluster {data.cluster}\n"
        f"{data.start:%Y-%m-%d} to {data.end:%Y-%m-%d}",
        ha="center",
        va="center",
        fontsize=13,
        bbox={"boxstyle": "round", "facecolor": "#f3f3f3", "edgecolor": "#999999"},
    )
    return figure


def plot_forecast_vs_actual(data: ReportData) -> Figure:
    """Forecast peak, planned rate and actual peak per request type (one panel per type)."""
    title = "Forecast vs actual peak load per request type"
    if not data.forecasts:
        return _no_data(_figure(11, 4), title, data)
    types = [t for t in REQUEST_TYPES if any(p.request_type == t for p in data.forecasts)]
    types += sorted({p.request_type for p in data.forecasts} - set(types))
    columns = min(3, len(types))
    rows = math.ceil(len(types) / columns)
    figure = _figure(4.2 * columns, 2.8 * rows + 0.6)
    figure.suptitle(f"{title} ({data.cluster})")
    services = sorted({p.service for p in data.forecasts})
    colours = {s: f"C{i % 10}" for i, s in enumerate(services)}
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
    for index, rtype in enumerate(types):
        ax = axes[index // columns][index % columns]
        for service in services:
            points = [p for p in data.forecasts if p.request_type == rtype and p.service == service]
            if not points:
                continue
            times = [p.window_start for p in points]
            colour = colours[service]
            actual = [math.nan if p.actual_peak_rps is None else p.actual_peak_rps for p in points]
            ax.plot(times, actual, "-o", color=colour, ms=3, label=f"{service} actual")
            ax.plot(
                times,
                [p.forecast_peak_rps for p in points],
                "--",
                color=colour,
                label=f"{service} forecast",
            )
            ax.plot(
                times, [p.planned_rps for p in points], ":", color=colour, label=f"{service} plan"
            )
        ax.set_title(rtype)
        ax.set_ylabel("peak rps")
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    for index in range(len(types), rows * columns):
        axes[index // columns][index % columns].set_axis_off()
    axes[0][0].legend(fontsize=7, loc="best")
    return figure


def plot_gpus_per_pool(data: ReportData) -> Figure:
    """GPUs held per pool over time, stacked."""
    title = "GPUs per pool over time"
    if not data.pool_gpus:
        return _no_data(_figure(11, 4), title, data)
    times = sorted({p.window_start for p in data.pool_gpus})
    pools = sorted({(p.service, p.request_type) for p in data.pool_gpus})
    held = {(p.window_start, p.service, p.request_type): p.gpus for p in data.pool_gpus}
    # Each window holds its GPUs until it ends: repeat the last window's value at its end.
    series = [[held.get((t, s, r), 0) for t in times] for s, r in pools]
    series = [values + values[-1:] for values in series]
    last_end = times[-1] + timedelta(seconds=max(p.window_s for p in data.pool_gpus))
    x = date2num([*times, last_end])
    figure = _figure(11, 4.5)
    ax = figure.add_subplot()
    palette = colormaps["tab20" if len(pools) > 10 else "tab10"]
    ax.stackplot(
        x,
        series,
        labels=[f"{s}/{r}" for s, r in pools],
        colors=[palette(i % palette.N) for i in range(len(pools))],
        step="post",
        alpha=0.9,
    )
    ax.xaxis_date(tz="UTC")
    ax.set_xlabel("UTC")
    ax.set_title(f"{title} ({data.cluster})")
    ax.set_ylabel("GPUs")
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=7, ncol=max(1, len(pools) // 20 + 1), loc="upper left", bbox_to_anchor=(1.01, 1)
    )
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    return figure


def _clock_label(clock_mhz: int | None) -> str:
    return "unlocked" if clock_mhz is None else f"{clock_mhz}"


def plot_clock_distribution(data: ReportData) -> Figure:
    """Share of GPU time per SM clock: planned (layouts) and measured (telemetry)."""
    title = "GPU clock distribution"
    if not data.clocks:
        return _no_data(_figure(9, 4), title, data)
    clocks = sorted({c.clock_mhz for c in data.clocks}, key=lambda c: (c is not None, c or 0))
    sources = [s for s in ("planned", "measured") if any(c.source == s for c in data.clocks)]
    totals = {s: sum(c.amount for c in data.clocks if c.source == s) for s in sources}
    figure = _figure(9, 4)
    ax = figure.add_subplot()
    width = 0.8 / len(sources)
    for k, source in enumerate(sources):
        amount = {c.clock_mhz: c.amount for c in data.clocks if c.source == source}
        shares = [amount.get(c, 0.0) / totals[source] if totals[source] else 0.0 for c in clocks]
        unit = "GPU-hours" if source == "planned" else "samples"
        ax.bar(
            [i + (k - (len(sources) - 1) / 2) * width for i in range(len(clocks))],
            shares,
            width,
            label=f"{source} ({totals[source]:.4g} {unit})",
            color=f"C{k}",
        )
    ax.set_xticks(range(len(clocks)), [_clock_label(c) for c in clocks])
    ax.set_xlabel("SM clock (MHz)")
    ax.set_ylabel("share of GPU time")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{title} ({data.cluster})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def plot_daily_vs_baseline(data: ReportData) -> Figure:
    """Energy, carbon and cost per day against the SinglePool baseline."""
    title = "Energy, carbon and cost per day vs SinglePool baseline"
    if not data.daily:
        return _no_data(_figure(12, 4), title, data)
    figure = _figure(12, 4.2)
    figure.suptitle(f"{title} ({data.cluster})")
    axes = figure.subplots(1, 3)
    days = [d.day for d in data.daily]
    x = list(range(len(days)))
    panels: Sequence[tuple[str, Callable[[DailyTotals], float | None], Callable]] = (
        ("energy (kWh)", lambda d: d.energy_kwh, lambda d: d.baseline_energy_kwh),
        ("carbon (kg CO2eq)", lambda d: d.carbon_kg, lambda d: d.baseline_carbon_kg),
        ("cost ($)", lambda d: d.cost_usd, lambda d: d.baseline_cost_usd),
    )
    for ax, (label, actual, baseline) in zip(axes, panels, strict=True):
        ours = [_nan(actual(d)) for d in data.daily]
        theirs = [_nan(baseline(d)) for d in data.daily]
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="wattplan", color="C2")
        ax.bar([i + 0.2 for i in x], theirs, 0.4, label="SinglePool", color="C7")
        ax.set_title(label)
        ax.set_xticks(x, [f"{d:%m-%d}" for d in days], rotation=30, fontsize=8)
        ax.set_xlim(-0.6, max(len(x), 3) - 0.4)  # a day or two: bars of normal width
        ax.grid(axis="y", alpha=0.3)
    bases = ", ".join(f"{d.day:%m-%d} {d.energy_basis}" for d in data.daily)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(
        handles,
        [f"{labels[0]} (energy {bases})", labels[1]] if len(data.daily) <= 4 else labels,
        loc="outside lower center",
        ncols=2,
        fontsize=8,
    )
    return figure


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


#: File name -> (title, plot function), in page order.
PLOTS: dict[str, tuple[str, Callable[[ReportData], Figure]]] = {
    "forecast_vs_actual.png": ("Forecast vs actual load per type", plot_forecast_vs_actual),
    "gpus_per_pool.png": ("GPUs per pool over time", plot_gpus_per_pool),
    "clock_distribution.png": ("Clock distribution", plot_clock_distribution),
    "daily_vs_baseline.png": (
        "Energy, carbon and cost per day vs baseline",
        plot_daily_vs_baseline,
    ),
}


def figure_png(figure: Figure) -> bytes:
    """The figure as PNG bytes (no timestamp in the metadata)."""
    from io import BytesIO

    buffer = BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def render_html(data: ReportData, images: Sequence[tuple[str, bytes]]) -> str:
    """One self-contained page: a table of daily totals and every image inline (base64)."""
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(_cell(v))}</td>"
            for v in (
                d.day,
                d.energy_kwh,
                d.baseline_energy_kwh,
                d.carbon_kg,
                d.baseline_carbon_kg,
                d.cost_usd,
                d.baseline_cost_usd,
                d.energy_basis,
            )
        )
        + "</tr>"
        for d in data.daily
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{html.escape(title)}'
        "</figcaption></figure>"
        for title, png in images
    )
    heading = (
        f"wattplan report: {data.cluster}, {data.start:%Y-%m-%d} to "
        f"{data.end:%Y-%m-%d} (exclusive, UTC)"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(heading)}</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}figure{margin:2em 0}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(heading)}</h1>"
        "<p>From the report_* views (see docs/reports.md). Energy is measured where GPU "
        "telemetry covers a window, else modelled from the profiles; the baseline is "
        "SinglePool for the same served load.</p>"
        "<table><tr><th>day</th><th>kWh</th><th>baseline kWh</th><th>kg CO2eq</th>"
        "<th>baseline kg</th><th>$</th><th>baseline $</th><th>energy</th></tr>"
        f"{rows}</table>{figures}</body></html>\n"
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_report(data: ReportData, folder: Path) -> RenderedReport:
    """Write every plot as PNG and the HTML page into ``folder``; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    pngs = []
    for name, (title, plot) in PLOTS.items():
        png = figure_png(plot(data))
        path = folder / name
        path.write_bytes(png)
        pngs.append(path)
        images.append((title, png))
    page = folder / "index.html"
    page.write_text(render_html(data, images))
    return RenderedReport(tuple(pngs), page)

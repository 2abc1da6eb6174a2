"""``wattplan bench ingest``: end-to-end ingest throughput on a throwaway database.

Generates realistic telemetry into files in a temporary folder (8 H100s of one node, one
sample per GPU per second, hourly files as the collector writes them), then times file ->
parse -> COPY -> commit into a fresh database created for the run on the configured server
(``WATTPLAN_DATABASE_URL``, else the embedded one) and dropped afterwards. Generation is
not timed. Request logs (Azure trace CSV) are timed the same way when their loader is
available.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import sqlalchemy as sa

from telemetry.gpu import format_sample_line, scan_gpu_bytes, spool_file_name
from wattplan import db
from wattplan.settings import Settings

#: First sample of the generated telemetry (a UTC midnight, so day partitions are whole).
BENCH_START = datetime(2026, 3, 1, tzinfo=UTC)
GPUS_PER_NODE = 8
FILE_S = 3600
H100_POWER_LIMIT_W = 700.0
H100_IDLE_W = 72.0
H100_MEMORY_BYTES = 80 * 1024**3


def _progress(stream: TextIO, message: str) -> None:
    print(message, file=stream, flush=True)


def generate_gpu_files(
    folder: Path, rows: int, *, seed: int = 7, node: str = "bench-node-0"
) -> tuple[list[Path], datetime, datetime]:
    """Write ``rows`` samples (8 GPUs x ceil(rows / 8) s) as hourly canonical JSONL files.

    The sequence is plausible for an H100 SXM serving LLM traffic: load comes in bursts,
    power between ~70 W idle and the 700 W limit, the energy counter rises by power x dt,
    SM clock 1980 MHz (1755 MHz when power-capped), memory clock 2619 MHz, temperature
    30-70 C. GPUs 0-3 and 4-7 are two tensor-parallel instances.

    Returns:
        The files, and the interval ``[start, end)`` they cover (whole minutes).
    """
    rng = np.random.default_rng(seed)
    seconds = math.ceil(rows / GPUS_PER_NODE)
    uuids = [f"GPU-{uuid.UUID(int=int(rng.integers(1 << 62)) << 64 | i)}" for i in range(8)]
    instances = ["inst-a"] * 4 + ["inst-b"] * 4
    t = np.arange(seconds)
    load = np.clip(
        0.55 + 0.35 * np.sin(2 * np.pi * t / 5400.0) + 0.15 * rng.standard_normal((8, seconds)),
        0.0,
        1.0,
    )
    power_w = np.round(H100_IDLE_W + (H100_POWER_LIMIT_W - H100_IDLE_W) * load**1.3, 3)
    energy_mj = 4_100_000_000 + np.cumsum(np.round(power_w * 1000.0).astype(np.int64), axis=1)
    sm_clock = np.where(power_w >= 0.97 * H100_POWER_LIMIT_W, 1755, 1980)
    util = np.round(100 * load).astype(np.int64)
    temp = np.round(30 + 40 * (power_w - H100_IDLE_W) / (H100_POWER_LIMIT_W - H100_IDLE_W), 1)
    memory = (H100_MEMORY_BYTES * (0.80 + 0.1 * load)).astype(np.int64).tolist()
    power_list, energy_list, clock_list = power_w.tolist(), energy_mj.tolist(), sm_clock.tolist()
    util_list, temp_list = util.tolist(), temp.tolist()
    head = [f'{{"gpu_uuid":"{uuids[g]}","sampled_at":"' for g in range(8)]
    mid = [
        f'","node":"{node}","gpu_index":{g},"instance_id":"{instances[g]}","energy_mj":'
        for g in range(8)
    ]
    files: list[Path] = []
    written = 0
    for file_start in range(0, seconds, FILE_S):
        first_at = BENCH_START + timedelta(seconds=file_start)
        path = folder / spool_file_name(node, first_at)
        lines = []
        for s in range(file_start, min(file_start + FILE_S, seconds)):
            ts = (BENCH_START + timedelta(seconds=s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            for g in range(8):
                if written >= rows:
                    break
                lines.append(
                    f'{head[g]}{ts}{mid[g]}{energy_list[g][s]},"power_w":{power_list[g][s]!r},'
                    f'"sm_clock_mhz":{clock_list[g][s]},"memory_clock_mhz":2619,'
                    f'"applied_sm_clock_mhz":1980,"power_limit_w":700.0,'
                    f'"utilization_pct":{util_list[g][s]},"memory_used_bytes":{memory[g][s]},'
                    f'"temperature_c":{temp_list[g][s]!r},"unsupported_fields":[]}}\n'
                )
                written += 1
        path.write_text("".join(lines))
        files.append(path)
    # the template must produce exactly the collector's canonical line
    sample = json.loads(files[0].read_text().split("\n", 1)[0])
    sample["sampled_at"] = datetime.fromisoformat(sample["sampled_at"])
    assert format_sample_line(sample) == files[0].read_text().split("\n", 1)[0]
    end = BENCH_START + timedelta(minutes=math.ceil(seconds / 60))
    return files, BENCH_START, end


def generate_request_files(
    folder: Path, rows: int, *, seed: int = 11
) -> tuple[Path, datetime, datetime]:
    """Write ``rows`` requests in the Azure LLM trace CSV format (~20 requests/s)."""
    rng = np.random.default_rng(seed)
    gaps_s = rng.exponential(0.05, rows)
    arrival_s = np.cumsum(gaps_s)
    context = rng.lognormal(6.5, 1.0, rows).astype(np.int64) + 1
    generated = rng.lognormal(5.0, 0.8, rows).astype(np.int64) + 1
    path = folder / "bench_requests.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens\n"]
    for a, c, g in zip(arrival_s.tolist(), context.tolist(), generated.tolist(), strict=True):
        moment = BENCH_START + timedelta(seconds=a)
        lines.append(f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond:06d}0,{c},{g}\n")
    path.write_text("".join(lines))
    end = BENCH_START + timedelta(minutes=math.ceil(float(arrival_s[-1]) / 60) + 1)
    end = BENCH_START + timedelta(
        seconds=math.ceil((end - BENCH_START).total_seconds() / 300) * 300
    )
    return path, BENCH_START, end


def _throughput(rows: int, seconds: float) -> dict[str, Any]:
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds)}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[len(ordered) // 2], "runs_rows_per_s": [r["rows_per_s"] for r in runs]}


def bench_gpu(
    url: str, folder: Path, rows: int, stream: TextIO, *, repeat: int = 3, window_s: int = 300
) -> dict[str, Any]:
    """Time the GPU telemetry loader and the parser alone; median of ``repeat`` runs.

    ``fresh_partitions``: the day partitions do not exist yet (a backfill, the first load
    of a day): they are filled as plain tables and attached. ``existing_partitions``: the
    partitions exist (emptied): rows go into the indexed partitions directly.
    """
    from wattplan.ingest_gpu import load_with_report, partition_name

    _progress(stream, f"generating {rows:,} GPU samples (8 H100s, 1 Hz, hourly files) ...")
    t0 = time.perf_counter()
    files, start, end = generate_gpu_files(folder, rows)
    end = start + timedelta(seconds=math.ceil((end - start).total_seconds() / window_s) * window_s)
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    _progress(stream, f"  {len(files)} files, {size_mb:.0f} MB in {time.perf_counter() - t0:.1f} s")
    retention_days = max(7, math.ceil((end - start).total_seconds() / 86_400) + 1)
    days = sorted({(start + timedelta(days=d)).date() for d in range((end - start).days + 1)})
    engine = db.create_engine(url)
    results: dict[str, list[dict[str, Any]]] = {"fresh_partitions": [], "existing_partitions": []}
    try:
        for label in ("fresh_partitions", "existing_partitions"):
            for run in range(repeat):
                with engine.begin() as conn:
                    conn.execute(sa.text("TRUNCATE instance_windows, ingest_runs"))
                    if label == "fresh_partitions":
                        for day in days:
                            table = partition_name(day)
                            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
                    else:
                        conn.execute(sa.text("TRUNCATE gpu_telemetry"))
                _progress(
                    stream, f"loading into {label.replace('_', ' ')} ({run + 1}/{repeat}) ..."
                )
                t0 = time.perf_counter()
                with engine.begin() as conn:
                    report = load_with_report(
                        conn, files, start, end, window_s=window_s, retention_days=retention_days
                    )
                seconds = time.perf_counter() - t0
                figures = _throughput(report.result.rows_loaded, seconds)
                figures.update(
                    rejected=report.result.rows_rejected,
                    instance_windows=report.windows,
                    phases_s=report.timings,
                )
                results[label].append(figures)
                _progress(
                    stream,
                    f"  {report.result.rows_loaded:,} rows in {seconds:.2f} s "
                    f"({report.result.rows_loaded / seconds:,.0f} rows/s)",
                )
        with engine.connect() as conn:
            stored = conn.execute(sa.text("SELECT count(*) FROM gpu_telemetry")).scalar_one()
        if stored != rows:
            raise RuntimeError(f"benchmark stored {stored} rows, expected {rows}")
    finally:
        engine.dispose()
    _progress(stream, "parsing only (no database) ...")
    parse_runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        parsed = sum(
            scan_gpu_bytes(
                p.read_bytes(), p.name, start_s=start.timestamp(), end_s=end.timestamp()
            ).rows_loaded
            for p in files
        )
        parse_runs.append(_throughput(parsed, time.perf_counter() - t0))
    return {
        **_median_run(results["fresh_partitions"]),
        "existing_partitions": _median_run(results["existing_partitions"]),
        "parse_only": _median_run(parse_runs),
        "files": len(files),
        "file_mb": round(size_mb, 1),
    }


def bench_requests(url: str, folder: Path, rows: int, stream: TextIO) -> dict[str, Any]:
    """Time the request-log loader if it exists (``wattplan.ingest_requests``)."""
    try:
        module = importlib.import_module("wattplan.ingest_requests")
        load_request_logs: Callable[..., Any] = module.load_request_logs
        request_source: Callable[..., Any] = module.RequestSource
    except (ImportError, AttributeError):
        return {"status": "pending: wattplan.ingest_requests.load_request_logs is not there yet"}
    _progress(stream, f"generating {rows:,} request-log rows (Azure trace CSV) ...")
    path, start, end = generate_request_files(folder, rows)
    engine = db.create_engine(url)
    try:
        _progress(stream, "loading request logs ...")
        t0 = time.perf_counter()
        with engine.begin() as conn:
            result = load_request_logs(
                conn, [request_source("conversation", path, "azure")], start, end, window_s=300
            )
        seconds = time.perf_counter() - t0
    finally:
        engine.dispose()
    _progress(stream, f"  {result.rows_loaded:,} rows in {seconds:.2f} s")
    return {**_throughput(result.rows_loaded, seconds), "rejected": result.rows_rejected}


def run_ingest_bench(
    rows: int, request_rows: int, *, settings: Settings, stream: TextIO, repeat: int = 3
) -> dict[str, Any]:
    """Create a throwaway database, run both benchmarks, drop it; return the figures."""
    if settings.database_url:
        base_url = settings.database_url
    else:
        _progress(stream, "starting the embedded PostgreSQL ...")
        base_url = db.resolve_urls(settings).wattplan
    name = f"wattplan_bench_{uuid.uuid4().hex[:10]}"
    db.ensure_database(base_url, name)
    url = db.with_database(base_url, name)
    folder = Path(tempfile.mkdtemp(prefix="wattplan-bench-"))
    try:
        with db.connect(url) as engine:
            db.upgrade(engine)
        gpu = bench_gpu(url, folder, rows, stream, repeat=repeat)
        requests = bench_requests(url, folder, request_rows, stream) if request_rows else {}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()
    return {
        "gpu_telemetry": gpu,
        "request_logs": requests,
        "cpu_count": _cpu_count(),
        "server": "WATTPLAN_DATABASE_URL" if settings.database_url else "embedded",
    }


def _cpu_count() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wattplan bench``."""
    parser = argparse.ArgumentParser(
        prog="wattplan bench",
        description="Measure ingest throughput end to end (file -> parse -> COPY -> commit) "
        "on a throwaway database (WATTPLAN_DATABASE_URL's server, else the embedded one).",
    )
    sub = parser.add_subparsers(dest="what", required=True)
    ingest = sub.add_parser("ingest", help="GPU telemetry and request-log loaders")
    ingest.add_argument("--rows", type=int, default=1_000_000, help="GPU samples (default 1e6)")
    ingest.add_argument(
        "--request-rows",
        type=int,
        default=200_000,
        help="request-log rows (default 200000; 0 skips)",
    )
    ingest.add_argument(
        "--repeat", type=int, default=3, help="runs per case; the median is reported (default 3)"
    )
    ingest.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.rows < 8 or args.repeat < 1:
        parser.error("--rows must be at least 8 and --repeat at least 1")
    figures = run_ingest_bench(
        args.rows,
        args.request_rows,
        settings=Settings.from_env(),
        stream=sys.stderr,
        repeat=args.repeat,
    )
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        g = figures["gpu_telemetry"]
        print(
            f"GPU telemetry: {g['rows']:,} rows in {g['seconds']} s = {g['rows_per_s']:,} rows/s "
            f"(existing partitions: {g['existing_partitions']['rows_per_s']:,} rows/s; "
            f"parse only: {g['parse_only']['rows_per_s']:,} rows/s)"
        )
        r = figures["request_logs"]
        if "rows_per_s" in r:
            print(
                f"request logs: {r['rows']:,} rows in {r['seconds']} s = {r['rows_per_s']:,} rows/s"
            )
        elif r:
            print(f"request logs: {r['status']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``wattplan bench ingest`` and ``wattplan bench solve``.

``bench solve`` (see :func:`run_solve_bench`) times the layout optimizer on synthetic
instances of two sizes and prints build and solve times, gap and problem size.

``bench ingest``: end-to-end ingest throughput on a throwaway database.

Generates realistic telemetry into files in a temporary folder (8 H100s of one node, one
sample per GPU per second, hourly files as the collector writes them: the spool format, or
JSONL with ``--format jsonl``), then times file ->
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

from telemetry.gpu import (
    JSONL_SUFFIX,
    SPOOL_SUFFIX,
    format_sample_line,
    scan_file_bytes,
    spool_file_name,
)
from telemetry.gpu_spool import SPOOL_HEADER, format_spool_line
from wattplan import db
from wattplan.settings import Settings

#: File formats the GPU benchmark can generate: the collector's spool format, JSONL.
GPU_FORMATS = ("tsv", "jsonl")
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
    folder: Path, rows: int, *, seed: int = 7, node: str = "bench-node-0", fmt: str = "tsv"
) -> tuple[list[Path], datetime, datetime]:
    """Write ``rows`` samples (8 GPUs x ceil(rows / 8) s) as hourly files, each line as the
    collector writes it: ``fmt`` ``tsv`` (spool files) or ``jsonl`` (canonical JSONL).

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
    if fmt not in GPU_FORMATS:
        raise ValueError(f"unknown GPU telemetry format {fmt!r}; choose from {GPU_FORMATS}")
    files: list[Path] = []
    written = 0
    for file_start in range(0, seconds, FILE_S):
        first_at = BENCH_START + timedelta(seconds=file_start)
        suffix = SPOOL_SUFFIX if fmt == "tsv" else JSONL_SUFFIX
        path = folder / spool_file_name(node, first_at, suffix)
        lines = [f"{SPOOL_HEADER}\n"] if fmt == "tsv" else []
        for s in range(file_start, min(file_start + FILE_S, seconds)):
            ts = (BENCH_START + timedelta(seconds=s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            for g in range(8):
                if written >= rows:
                    break
                values = (
                    uuids[g],
                    ts,
                    node,
                    g,
                    instances[g],
                    energy_list[g][s],
                    power_list[g][s],
                    clock_list[g][s],
                    util_list[g][s],
                    memory[g][s],
                    temp_list[g][s],
                )
                lines.append(_TSV_LINE.format(*values) if fmt == "tsv" else _json_line(*values))
                written += 1
        path.write_text("".join(lines))
        files.append(path)
    # the templates must produce exactly the collector's canonical line
    first = files[0].read_text().split("\n", 2)[1 if fmt == "tsv" else 0]
    record = _record(uuids[0], node, instances[0], energy_list, power_list, clock_list)
    record.update(utilization_pct=util_list[0][0], memory_used_bytes=memory[0][0])
    record.update(temperature_c=temp_list[0][0])
    assert first == (format_spool_line(record) if fmt == "tsv" else format_sample_line(record))
    end = BENCH_START + timedelta(minutes=math.ceil(seconds / 60))
    return files, BENCH_START, end


_TSV_LINE = "{0}\t{1}\t{2}\t{3}\t{4}\t{5}\t{6!r}\t{7}\t2619\t1980\t700.0\t{8}\t{9}\t{10!r}\t{{}}\n"


def _json_line(*v: Any) -> str:
    return (
        f'{{"gpu_uuid":"{v[0]}","sampled_at":"{v[1]}","node":"{v[2]}","gpu_index":{v[3]},'
        f'"instance_id":"{v[4]}","energy_mj":{v[5]},"power_w":{v[6]!r},'
        f'"sm_clock_mhz":{v[7]},"memory_clock_mhz":2619,"applied_sm_clock_mhz":1980,'
        f'"power_limit_w":700.0,"utilization_pct":{v[8]},"memory_used_bytes":{v[9]},'
        f'"temperature_c":{v[10]!r},"unsupported_fields":[]}}\n'
    )


def _record(
    gpu_uuid: str,
    node: str,
    instance: str,
    energy: list[list[int]],
    power: list[list[float]],
    clock: list[list[int]],
) -> dict[str, Any]:
    """The first generated sample of GPU 0 as a collector record."""
    return {
        "gpu_uuid": gpu_uuid,
        "sampled_at": BENCH_START,
        "node": node,
        "gpu_index": 0,
        "instance_id": instance,
        "energy_mj": energy[0][0],
        "power_w": power[0][0],
        "sm_clock_mhz": clock[0][0],
        "memory_clock_mhz": 2619,
        "applied_sm_clock_mhz": 1980,
        "power_limit_w": 700.0,
        "unsupported_fields": [],
    }


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
    url: str,
    folder: Path,
    rows: int,
    stream: TextIO,
    *,
    repeat: int = 3,
    window_s: int = 300,
    fmt: str = "tsv",
) -> dict[str, Any]:
    """Time the GPU telemetry loader and the parser alone; median of ``repeat`` runs.

    ``fresh_partitions``: the day partitions do not exist yet (a backfill, the first load
    of a day): they are filled as plain tables and attached. ``existing_partitions``: the
    partitions exist (emptied): rows go into the indexed partitions directly.
    """
    from wattplan.ingest_gpu import load_with_report, partition_name

    _progress(stream, f"generating {rows:,} GPU samples (8 H100s, 1 Hz, hourly files) ...")
    t0 = time.perf_counter()
    files, start, end = generate_gpu_files(folder, rows, fmt=fmt)
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
            scan_file_bytes(
                p.read_bytes(), p.name, start_s=start.timestamp(), end_s=end.timestamp()
            ).rows_loaded
            for p in files
        )
        parse_runs.append(_throughput(parsed, time.perf_counter() - t0))
    return {
        "format": fmt,
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
    rows: int,
    request_rows: int,
    *,
    settings: Settings,
    stream: TextIO,
    repeat: int = 3,
    fmt: str = "tsv",
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
        gpu = bench_gpu(url, folder, rows, stream, repeat=repeat, fmt=fmt)
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


def _clock_loop(args: argparse.Namespace) -> int:
    from agent.instance_twin import compare_with_max_clock, load_azure_trace

    if args.minutes <= 0 or args.instances < 1:
        raise SystemExit("wattplan bench clock-loop: --minutes must be > 0 and --instances >= 1")
    if args.lower_steps is not None and args.lower_steps < 1:
        raise SystemExit("wattplan bench clock-loop: --lower-steps must be >= 1")
    if not 0 <= args.prompt_percentile <= 100 or not 0 < args.margin <= 1:
        raise SystemExit(
            "wattplan bench clock-loop: --prompt-percentile must be in [0, 100] and --margin "
            "in (0, 1]"
        )
    _progress(sys.stderr, f"replaying {args.minutes:g} min of {args.trace.name} ...")
    trace = load_azure_trace(args.trace, minutes=args.minutes, every=args.instances)
    figures = compare_with_max_clock(
        trace,
        max_lower_steps=args.lower_steps,
        prompt_percentile=args.prompt_percentile,
        margin=args.margin,
    )
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        m, c = figures["max_clock"], figures["clock_loop"]
        print(
            f"{figures['requests']} requests: max clock {m['energy_kwh']} kWh, SLO "
            f"{m['slo_attainment']:.2%}; clock loop {c['energy_kwh']} kWh, SLO "
            f"{c['slo_attainment']:.2%}; energy saved {figures['energy_saved']:.1%}"
        )
    return 0


#: The two instance sizes of issue 7 and their targets (seconds, relative gap).
SOLVE_CASES: dict[str, dict[str, Any]] = {
    "dynamollm": {
        "describe": "1 model, 9 pools, TP {2,4,8}, 7 clocks, 1 GPU type, 320 GPUs",
        "target_s": 0.5,
        "target_gap": 1e-4,
    },
    "fleet": {
        "describe": "20 models, 10 pools, TP {1,2,4,8}, 7 clocks, 2 GPU types, 10,000 GPUs, "
        "4 power domains, reconfiguration terms",
        "target_s": 10.0,
        "target_gap": 0.01,
    },
}


def _solve_case(
    name: str,
    clock_mode: str,
    seed: int,
    time_limit_s: float | None,
    highs_options: dict[str, Any] | None = None,
    threads: int | None = None,
) -> Any:
    from dataclasses import replace

    from optimizer.synthetic import dynamollm_instance, fleet_instance

    if name == "dynamollm":
        inputs = dynamollm_instance(seed=seed, clock_mode=clock_mode)
    else:
        inputs = fleet_instance(seed=seed, clock_mode=clock_mode)
    if time_limit_s is not None:
        inputs = replace(inputs, solver=replace(inputs.solver, time_limit_s=time_limit_s))
    if highs_options:
        inputs = replace(inputs, solver=replace(inputs.solver, highs_options=highs_options))
    if threads is not None:
        inputs = replace(inputs, solver=replace(inputs.solver, threads=threads))
    return inputs


def bench_solve(
    name: str,
    clock_mode: str,
    seed: int,
    stream: TextIO,
    time_limit_s: float | None = None,
    highs_options: dict[str, Any] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Build and solve one synthetic instance; return its figures.

    ``total_s`` runs from validation to the plan (catalog, Pyomo build, translation to
    HiGHS, LP relaxation, rounded start, MIP, solution extraction); generating the
    synthetic instance is not timed.
    """
    from optimizer.solve import solve_layout

    inputs = _solve_case(name, clock_mode, seed, time_limit_s, highs_options, threads)
    _progress(stream, f"solving {name} ({clock_mode} clocks, seed {seed}) ...")
    t0 = time.perf_counter()
    solution = solve_layout(inputs)
    total_s = time.perf_counter() - t0
    record = solution.solver
    case = SOLVE_CASES[name]
    gap = record["gap"]
    figures = {
        "instance": case["describe"],
        "clock_mode": clock_mode,
        "seed": seed,
        "total_s": round(total_s, 3),
        "timing_s": record["timing_s"],
        "status": record["status"],
        "termination": record["termination"],
        "objective": record["objective"],
        "bound": record["bound"],
        "bound_source": record["bound_source"],
        "gap": gap,
        "start": record["start"],
        "size": record["size"],
        "options": record["options"],
        "plan": {
            "gpus": solution.prediction.gpus,
            "energy_kwh": round(solution.prediction.energy_kwh, 3),
            "peak_power_w": round(solution.prediction.peak_power_w, 1),
            "instances_started": solution.prediction.instances_started,
            "instances_stopped": solution.prediction.instances_stopped,
        },
        "target": {"total_s": case["target_s"], "gap": case["target_gap"]},
        "target_met": bool(
            total_s <= case["target_s"] and gap is not None and gap <= case["target_gap"] + 1e-9
        ),
    }
    _progress(
        stream,
        f"  {name}: {total_s:.2f} s, gap {gap if gap is None else f'{gap:.4%}'}, "
        f"status {record['status']}",
    )
    return figures


def run_solve_bench(
    cases: Sequence[str],
    clock_modes: Sequence[str],
    *,
    seed: int,
    stream: TextIO,
    time_limit_s: float | None = None,
    highs_options: dict[str, Any] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the chosen cases in the chosen clock modes; figures keyed ``case/mode``."""
    import os

    results = {
        f"{name}/{mode}": bench_solve(
            name, mode, seed, stream, time_limit_s, highs_options, threads
        )
        for name in cases
        for mode in clock_modes
    }
    return {
        "cases": results,
        "cpu_count": _cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wattplan bench``."""
    if argv and argv[0] == "sim":
        from simulator.bench import main as sim_main

        return sim_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="wattplan bench",
        description="Benchmarks. ingest: throughput end to end (file -> parse -> COPY -> "
        "commit) on a throwaway database (WATTPLAN_DATABASE_URL's server, else the embedded "
        "one). solve: the layout optimizer on synthetic instances (no database).",
    )
    sub = parser.add_subparsers(dest="what", required=True)
    ingest = sub.add_parser("ingest", help="GPU telemetry and request-log loaders")
    sub.add_parser("sim", help="simulator speed, both modes (`wattplan bench sim --json`)")
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
    ingest.add_argument(
        "--format",
        choices=GPU_FORMATS,
        default="tsv",
        help="GPU telemetry file format: the collector's spool files (tsv, default) or jsonl",
    )
    ingest.add_argument("--json", action="store_true", help="print the figures as JSON")
    clock = sub.add_parser(
        "clock-loop",
        help="instance clock loop against the fixed maximum clock on a replayed request trace",
    )
    clock.add_argument(
        "--trace",
        type=Path,
        default=Path(__file__).resolve().parents[1]
        / "data"
        / "azure-llm-inference-2023"
        / "AzureLLMInferenceTrace_conv.csv",
        help="Azure LLM trace CSV (default: the bundled conversation trace)",
    )
    clock.add_argument("--minutes", type=float, default=60.0, help="minutes replayed (default 60)")
    clock.add_argument(
        "--instances",
        type=int,
        default=2,
        help="instances behind a round-robin router; one is replayed (default 2)",
    )
    clock.add_argument(
        "--lower-steps",
        type=int,
        default=None,
        help="lower the clock by at most this many supported clocks per change (default: "
        "straight to the lowest feasible clock)",
    )
    clock.add_argument(
        "--prompt-percentile",
        type=float,
        default=90.0,
        help="percentile of the trace's prompt lengths the loop projects prefills with (90)",
    )
    clock.add_argument(
        "--margin",
        type=float,
        default=0.65,
        help="the loop keeps its projections under this fraction of the SLOs (0.65)",
    )
    clock.add_argument("--json", action="store_true", help="print the figures as JSON")
    solve = sub.add_parser(
        "solve",
        help="layout optimizer on synthetic instances: DynamoLLM size and a 10,000-GPU fleet",
    )
    solve.add_argument(
        "--case",
        choices=("dynamollm", "fleet", "all"),
        default="all",
        help="instance size (default all)",
    )
    solve.add_argument(
        "--clock-mode",
        choices=("envelope", "explicit", "both"),
        default="envelope",
        help="clocks as per-load envelope (default) or as integer columns",
    )
    solve.add_argument("--seed", type=int, default=0, help="instance seed (default 0)")
    solve.add_argument(
        "--time-limit", type=float, default=None, help="override the cases' time limit (s)"
    )
    solve.add_argument(
        "--threads",
        type=int,
        default=None,
        help="solver threads for every case (default: the cases' 1; one process must use one "
        "count: HiGHS shares its thread pool)",
    )
    solve.add_argument(
        "--highs-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra HiGHS option (repeatable), e.g. mip_heuristic_effort=0.2",
    )
    solve.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.what == "clock-loop":
        return _clock_loop(args)
    if args.what == "solve":
        return _main_solve(args)
    if args.rows < 8 or args.repeat < 1:
        parser.error("--rows must be at least 8 and --repeat at least 1")
    figures = run_ingest_bench(
        args.rows,
        args.request_rows,
        settings=Settings.from_env(),
        stream=sys.stderr,
        repeat=args.repeat,
        fmt=args.format,
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


def _main_solve(args: argparse.Namespace) -> int:
    cases = ("dynamollm", "fleet") if args.case == "all" else (args.case,)
    modes = ("envelope", "explicit") if args.clock_mode == "both" else (args.clock_mode,)
    highs_options: dict[str, Any] = {}
    for option in args.highs_option:
        name, _, value = option.partition("=")
        highs_options[name] = json.loads(value) if value[:1] in "-0123456789tf" else value
    figures = run_solve_bench(
        cases,
        modes,
        seed=args.seed,
        stream=sys.stderr,
        time_limit_s=args.time_limit,
        threads=args.threads,
        highs_options=highs_options,
    )
    if args.json:
        print(json.dumps(figures, indent=2, default=str))
    else:
        for key, f in figures["cases"].items():
            gap = "n/a" if f["gap"] is None else f"{f['gap']:.3%}"
            print(
                f"{key}: {f['total_s']} s, gap {gap} ({f['status']}), "
                f"{f['size']['integer_variables']} integer / {f['size']['variables']} variables, "
                f"{f['size']['constraints']} rows; target {f['target']} met: {f['target_met']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``wattplan`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime

from wattplan.errors import WattplanError
from wattplan.settings import Settings


def _cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from wattplan import db

    if args.action == "stop":
        stopped = db.stop_embedded(db.embedded_pgdata(settings))
        print("embedded PostgreSQL stopped" if stopped else "no embedded PostgreSQL running")
        return 0
    urls = db.resolve_urls(settings, stop_at_exit=args.action != "start")
    if args.action == "start":
        print(urls.wattplan)
        return 0
    if args.action == "url":
        print(urls.wattplan)
        return 0
    with db.connect(urls.wattplan) as engine:
        applied = db.upgrade(engine)
    print(
        f"applied {len(applied)} migration(s): {', '.join(applied)}"
        if applied
        else "schema is current"
    )
    return 0


def _cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from wattplan import jobs

    engine = jobs.engine_for(settings)
    try:
        if args.action == "show":
            plan, status = jobs.load_plan(engine, args.plan_id)
            print(
                json.dumps(
                    {
                        "plan_id": plan.plan_id,
                        "status": status.value,
                        "degraded": plan.degraded,
                        "gpus": plan.layout.gpus,
                        "items": [
                            {
                                "service": i.service,
                                "request_type": i.request_type,
                                "config": i.config.key,
                                "instances": i.instances,
                            }
                            for i in plan.layout.items
                        ],
                    },
                    indent=2,
                )
            )
            return 0
        decision = "approved" if args.action == "approve" else "rejected"
        jobs.record_decision(
            engine, args.plan_id, decision, args.by, datetime.now(UTC), args.comment
        )
        print(f"plan {args.plan_id} {decision} by {args.by}")
        return 0
    finally:
        engine.dispose()


def _cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    import sqlalchemy as sa

    from wattplan import jobs, report, reporting

    if args.action != "plan":
        return _cmd_report_views(args, settings)
    engine = jobs.engine_for(settings)
    try:
        with engine.connect() as conn:
            plan_id = (
                args.plan_id
                or conn.execute(
                    sa.text(
                        "SELECT plan_id FROM plans WHERE cluster = :c"
                        " ORDER BY window_start_at DESC, created_at DESC LIMIT 1"
                    ),
                    {"c": settings.cluster},
                ).scalar()
            )
            if plan_id is None:
                print("no plans yet: run `wattplan demo` or the plan_cluster DAG", file=sys.stderr)
                return 1
            data = report.plan_report(conn, plan_id)
        paths = report.write_report(data, settings.reports_dir)
        print(json.dumps(data, indent=2))
        print(f"report files: {paths[0]} {paths[1]}", file=sys.stderr)
        latest = reporting.latest_daily_folder(settings)
        print(
            f"plots: {latest / 'index.html'}"
            if latest
            else "plots: none yet (`wattplan report plots` renders them)",
            file=sys.stderr,
        )
        return 0
    finally:
        engine.dispose()


def _cmd_report_views(args: argparse.Namespace, settings: Settings) -> int:
    from wattplan import jobs, reporting

    engine = jobs.engine_for(settings)
    try:
        if args.action == "grant-role":
            with engine.begin() as conn:
                grant = reporting.grant_report_role(conn, args.role)
            verb = "created" if grant.created else "updated"
            print(f"role {grant.role} {verb}: SELECT on {len(grant.relations)} report views")
            print(", ".join(grant.relations))
            return 0
        counts = reporting.refresh_reports(engine, settings)
        print(json.dumps({"refreshed": counts}, indent=2), file=sys.stderr)
        if args.action == "refresh":
            return 0
        day = args.day or reporting.last_reported_day(engine, settings)
        page = reporting.render_daily_report(engine, settings, day, args.days)
        for path in sorted(page.parent.glob("*.png")):
            print(path)
        print(page)
        return 0
    finally:
        engine.dispose()


def _iso(text: str) -> datetime:
    """An ISO 8601 time; without a zone it is read as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _date(text: str) -> date:
    """A calendar day, ``YYYY-MM-DD``."""
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day like 2023-11-16") from exc


def _cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from wattplan import ingest_reference, jobs
    from wattplan.bulk import IngestResult

    data = settings.data_dir
    engine = jobs.engine_for(settings)
    try:
        with engine.begin() as conn:
            result: IngestResult
            if args.source == "requests":
                from wattplan.ingest_requests import RequestSource, load_request_logs

                if args.path:
                    sources = [RequestSource(args.service, Path(args.path), args.format)]
                else:
                    sources = jobs.request_sources(settings)
                if args.end <= args.start:
                    raise WattplanError("--end must be after --start")
                result = load_request_logs(
                    conn, sources, args.start, args.end, window_s=args.window_s
                )
            elif args.source == "carbon":
                zone = settings.carbon_zone
                paths = (
                    [Path(args.path)]
                    if args.path
                    else sorted((data / "electricitymaps-carbon-intensity" / zone).glob("*/*.csv"))
                )
                result = IngestResult(0, 0, 0)
                for path in paths:
                    result = result + ingest_reference.load_carbon_intensity(conn, path)
            elif args.source == "prices":
                zone = args.zone or settings.carbon_zone
                paths = (
                    [Path(args.path)]
                    if args.path
                    else sorted(
                        (data / "sustain-cluster-electricity-prices" / zone).glob("*/*.csv")
                    )
                )
                result = IngestResult(0, 0, 0)
                for path in paths:
                    result = result + ingest_reference.load_electricity_prices(conn, path, zone)
            elif args.source == "gpu-prices":
                path = Path(args.path or data / "fsdl-cloud-gpu-prices" / "cloud-gpus.csv")
                result = ingest_reference.load_gpu_prices(conn, path)
            else:  # servegen
                folder = Path(args.path or data / "servegen-alibaba" / "language" / "m-large")
                kwargs = {"day0_at": args.day0} if args.day0 else {}
                result = ingest_reference.load_servegen(
                    conn, folder, workload=args.workload, clients=args.client or None, **kwargs
                )
    finally:
        engine.dispose()
    print(
        json.dumps(
            {
                "source": args.source,
                "rows_read": result.rows_read,
                "rows_loaded": result.rows_loaded,
                "rows_rejected": result.rows_rejected,
                "files": list(result.files),
            },
            indent=2,
        )
    )
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from wattplan.demo import run_demo

    return run_demo(settings, keep_running=args.keep_running)


def _cmd_forecast(args: argparse.Namespace, settings: Settings) -> int:
    from wattplan import forecasts

    if args.action == "bench":
        figures = forecasts.run_bench(settings, runs=args.runs, start_day=args.start_day)
        print(json.dumps(figures, indent=2) if args.json else figures)
        return 0
    result = forecasts.run_evaluation(
        settings,
        args.workload,
        window_s=args.window_s,
        quantile=args.quantile,
        candidates=[c for c in (args.candidates or "").split(",") if c],
        seed=args.seed,
    )
    print(json.dumps(result, indent=2) if args.json else forecasts.format_evaluation(result))
    return 0


def _cmd_airflow(args: argparse.Namespace, settings: Settings) -> int:
    from wattplan import local_airflow

    if args.action == "start":
        return local_airflow.start(settings)
    if args.action == "stop":
        return local_airflow.stop(settings)
    return local_airflow.status(settings)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="wattplan",
        description="Energy-aware control plane for LLM inference clusters. Settings come from "
        "WATTPLAN_* environment variables; with no WATTPLAN_DATABASE_URL an embedded "
        "PostgreSQL is started in WATTPLAN_STATE_DIR (default ./.wattplan).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("db", help="database: migrate, start/stop the embedded server")
    p.add_argument(
        "action",
        choices=["upgrade", "start", "stop", "url"],
        help="upgrade: apply pending migrations (a no-op when current); start: leave "
        "the embedded server running; stop: stop it; url: print the database URL",
    )
    p.set_defaults(func=_cmd_db)

    p = sub.add_parser("demo", help="run the thin closed loop on the bundled Azure traces")
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the embedded database running afterwards (for `make airflow`)",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "ingest",
        help="load one source from a file you give (--path) or the bundled copy",
        description="Load one telemetry or reference source into PostgreSQL. Bad rows go to "
        "rejected_rows with file, line and reason; the counts printed always satisfy "
        "rows_read = rows_loaded + rows_rejected.",
    )
    p.add_argument("source", choices=["requests", "carbon", "prices", "gpu-prices", "servegen"])
    p.add_argument("--path", help="file (or ServeGen folder) to load; default: bundled data")
    p.add_argument("--service", default="default", help="requests: service of --path")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "azure", "jsonl"],
        help="requests: file format (auto: by extension/header)",
    )
    p.add_argument("--start", type=_iso, help="requests: interval start (ISO 8601, UTC)")
    p.add_argument("--end", type=_iso, help="requests: interval end (ISO 8601, UTC)")
    p.add_argument("--window-s", type=int, default=300, help="requests: window length")
    p.add_argument("--zone", help="prices: zone of --path (default WATTPLAN_CARBON_ZONE)")
    p.add_argument("--workload", help="servegen: workload name (default from the folder)")
    p.add_argument("--day0", type=_iso, help="servegen: UTC time of day 0 (default 2024-01-01)")
    p.add_argument("--client", action="append", help="servegen: client(s) to load, e.g. chunk-61")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("plan", help="show, approve or reject a stored plan")
    p.add_argument("action", choices=["show", "approve", "reject"])
    p.add_argument("plan_id")
    p.add_argument("--by", default=os.environ.get("USER", "operator"), help="who decides")
    p.add_argument("--comment", default="", help="why")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "report",
        help="report a plan against the load that arrived; refresh the report views, render "
        "their plots, set up the read-only BI role",
        description="Reports. plan (the default): one plan against the load that arrived, "
        "written to WATTPLAN_REPORTS_DIR, and where the latest plots are. refresh: record the "
        "cluster's site (zone, window, profile version) and refresh the materialized report "
        "views. plots: refresh, then render the plots (PNG) and one self-contained HTML page "
        "for --days days up to --day into WATTPLAN_REPORTS_DIR/daily/DAY/, and print their "
        "paths. grant-role: create (NOLOGIN) or update a role with SELECT on the report_* "
        "views only, for BI tools (see docs/reports.md).",
    )
    p.add_argument(
        "action",
        nargs="?",
        default="plan",
        choices=["plan", "refresh", "plots", "grant-role"],
        help="what to do (default: plan)",
    )
    p.add_argument("--plan-id", help="plan: plan to report (default: the newest)")
    p.add_argument(
        "--day", type=_date, help="plots: last UTC day shown (default: the last with data)"
    )
    p.add_argument("--days", type=int, default=14, help="plots: days shown (default 14)")
    p.add_argument(
        "--role", default="wattplan_report", help="grant-role: role name (default wattplan_report)"
    )
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "forecast",
        help="evaluate the load forecasters (rolling origin) or time the planning job",
        description="evaluate: rolling-origin evaluation of every model, both baselines and "
        "the per-series selection on a workload (never scoring a window used in fitting): "
        "MAPE/sMAPE of mean and peak, pinball loss, coverage of the upper quantile, "
        "under-provisioning rate, per request type and overall. bench: time the planning "
        "job's forecast step on ServeGen windows in a throwaway database.",
    )
    p.add_argument("action", choices=["evaluate", "bench"])
    p.add_argument(
        "--workload",
        default="servegen",
        help="servegen, azure-conv, azure-code (bundled) or a PATH: a ServeGen model folder "
        "or a request-log file (Azure CSV or JSONL); default servegen",
    )
    p.add_argument(
        "--window-s",
        type=int,
        help="evaluation window in seconds (default 1800; 300 for the one-hour Azure traces)",
    )
    p.add_argument(
        "--quantile", type=float, help="upper quantile (default WATTPLAN_FORECAST_QUANTILE)"
    )
    p.add_argument(
        "--candidates",
        help="comma-separated models the selection picks from (default: all: "
        "ets,fourier_arima,stl_arima,persistence,seasonal_naive,weekly_template)",
    )
    p.add_argument("--seed", type=int, default=0, help="ServeGen: seed of the 1-minute counts")
    p.add_argument("--runs", type=int, default=48, help="bench: planning runs to time")
    p.add_argument("--start-day", type=int, default=7, help="bench: ServeGen day of the first run")
    p.add_argument("--json", action="store_true", help="print the full figures as JSON")
    p.set_defaults(func=_cmd_forecast)

    # Dispatched in main() before parsing; listed here for --help.
    sub.add_parser("agent", help="run the reference cluster agent (`wattplan agent --help`)")

    p = sub.add_parser(
        "airflow",
        help="run Airflow's UI on wattplan's state (api-server, "
        "scheduler, dag-processor as separate processes)",
    )
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=_cmd_airflow)

    sub.add_parser(
        "collect",
        help="run the NVML GPU telemetry collector on this node (`wattplan collect --help`; "
        "--spool-dir defaults to WATTPLAN_GPU_SPOOL_DIR)",
    )
    sub.add_parser(
        "bench",
        help="benchmarks: `wattplan bench ingest --rows 1000000 --json`, "
        "`wattplan bench solve --json` (layout optimizer), `wattplan bench clock-loop --json`, "
        "`wattplan bench sim --json`",
    )
    sub.add_parser(
        "profiles",
        help="`wattplan profiles calibrate`: fit the profile model to the bundled data and "
        "rebuild data/profiles/v1.csv (`wattplan profiles calibrate --help`)",
    )
    sub.add_parser(
        "profile",
        help="measure an OpenAI-compatible streaming endpoint into profile rows "
        "(`wattplan profile --endpoint URL --model NAME --gpus 0,1 --out FILE`; --help)",
    )
    sub.add_parser(
        "backtest",
        help="replay a workload in the cluster simulator under each policy "
        "(`wattplan backtest --workload servegen --policies all --json`)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wattplan`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Commands with their own parsers get the rest of the line as it is (``--help`` included).
    if argv and argv[0] == "agent":
        from agent.server import main as agent_main

        return int(agent_main(argv[1:]) or 0)
    if argv and argv[0] == "collect":
        from telemetry.nvml_collector import main as collect_main

        rest = argv[1:]
        if not any(a == "--spool-dir" or a.startswith("--spool-dir=") for a in rest):
            rest = ["--spool-dir", str(Settings.from_env().gpu_spool_dir), *rest]
        return int(collect_main(rest) or 0)
    if argv and argv[0] == "bench":
        from wattplan.bench import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    if argv and argv[0] == "backtest":
        from simulator.backtest import main as backtest_main

        return int(backtest_main(argv[1:]) or 0)
    if argv and argv[0] == "profiles":
        from profiles.calibrate import main as calibrate_main

        rest = argv[1:]
        if rest and rest[0] == "calibrate":  # the bare form is kept as an alias
            rest = rest[1:]
        return int(calibrate_main(rest) or 0)
    if argv and argv[0] == "profile":
        from profiles.profiler import main as profile_main

        return int(profile_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ingest" and args.source == "requests" and not (args.start and args.end):
        parser.error("ingest requests needs --start and --end (the interval to load)")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env()
        return int(args.func(args, settings) or 0)
    except WattplanError as exc:
        print(f"wattplan: error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"wattplan: error: {exc.args[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

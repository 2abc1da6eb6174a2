"""The thin closed loop, end to end, through the real Airflow DAGs (``dag.test()``).

Starts the embedded database (unless one is configured), migrates, loads reference data,
ingests the bundled Azure 2023 traces interval by interval up to the first planning window,
then plans two windows (forecast -> Pyomo/HiGHS -> store -> approve -> push over HTTP to a
reference cluster agent on loopback -> verify -> record), each followed by the ingest of its
window, which loads the request logs and the GPU telemetry the simulated agent wrote for the
applied layout and the clock changes of its clock loop replayed on twin engines; refreshes
the report views and renders their plots
(report_daily); and prints a report and where the plots are.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from wattplan import db
from wattplan.airflow_env import airflow_environment, cluster_connection
from wattplan.errors import WattplanError
from wattplan.settings import PROJECT_ROOT, Settings


class Progress:
    """Numbered steps with elapsed time, printed as they start and finish."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.step = 0
        self.started = time.perf_counter()
        self._step_started = self.started

    def start(self, text: str) -> None:
        """Announce the next step."""
        self.step += 1
        self._step_started = time.perf_counter()
        print(f"[{self.step}/{self.total}] {text} ...", flush=True)

    def done(self, text: str = "done") -> None:
        """Close the current step with its result."""
        took = time.perf_counter() - self._step_started
        print(f"      {text} ({took:.1f} s)", flush=True)

    @property
    def elapsed_s(self) -> float:
        """Seconds since the first step."""
        return time.perf_counter() - self.started


def trace_span(settings: Settings) -> tuple[datetime, datetime]:
    """First and last arrival over the configured request sources."""
    from telemetry.requests import parse_azure_trace
    from wattplan.domain import RequestTypeBins

    first, last = None, None
    for service, path in settings.request_sources:
        records = parse_azure_trace(Path(path), service, RequestTypeBins()).records
        if records:
            lo = min(r.arrived_at for r in records)
            hi = max(r.arrived_at for r in records)
            first = lo if first is None else min(first, lo)
            last = hi if last is None else max(last, hi)
    if first is None or last is None:
        raise WattplanError("the request sources hold no requests")
    return first, last


def _airflow_migrate(env: dict[str, str], log_path: Path) -> None:
    airflow = Path(sys.executable).with_name("airflow")
    with log_path.open("w") as log:
        result = subprocess.run(
            [str(airflow), "db", "migrate"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    if result.returncode:
        raise WattplanError(f"`airflow db migrate` failed; see {log_path}")


#: Seconds of each plan window over which the twin replays the clock loop (the demo's time).
DEMO_CLOCK_REPLAY_S = 300.0


def run_demo(settings: Settings, *, keep_running: bool = False) -> int:
    """Run the demo; return the process exit code."""
    from wattplan.timefmt import floor_to

    progress = Progress(total=9)
    settings = replace(settings, auto_approve=True)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    logs = settings.state_dir / "logs"
    logs.mkdir(exist_ok=True)

    progress.start("starting PostgreSQL" + ("" if settings.database_url else " (embedded)"))
    urls = db.resolve_urls(settings, stop_at_exit=not keep_running)
    where = urls.embedded_pgdata or "WATTPLAN_DATABASE_URL"
    progress.done(f"wattplan and airflow databases ready ({where})")

    progress.start("migrating wattplan's schema and Airflow's metadata database")
    with db.connect(urls.wattplan) as engine:
        applied = db.upgrade(engine)
    env = dict(os.environ)
    env.update(airflow_environment(settings, urls))
    env.update(
        WATTPLAN_AUTO_APPROVE="true",
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        WATTPLAN_WINDOW_S=str(settings.window_s),
        WATTPLAN_INGEST_WINDOW_S=str(settings.ingest_window_s),
    )
    _airflow_migrate(env, logs / "airflow-db-migrate.log")
    progress.done(f"{len(applied)} wattplan migration(s) applied; Airflow migrated")

    progress.start("starting the reference cluster agent on loopback")
    from agent.control import ControlSettings, WindowClockReplay
    from agent.server import run_in_thread
    from agent.twin import TwinTelemetry

    token = secrets.token_urlsafe(16)
    # The simulated agent writes the GPU samples of each applied plan's window into the
    # spool folder the ingest DAG reads, and replays its clock loop over the first minutes
    # of the window on twin engines into the clock-change spool: the loop closes without GPUs.
    clock_replay = WindowClockReplay(
        ControlSettings(clock_spool_dir=settings.clock_spool_dir, node=f"twin-{settings.cluster}"),
        replay_s=DEMO_CLOCK_REPLAY_S,
    )
    twin = TwinTelemetry(
        settings.gpu_spool_dir,
        settings.cluster,
        window_s=settings.window_s,
        clock_replay=clock_replay,
    )
    base_url, stop_agent = run_in_thread(
        cluster=settings.cluster,
        token=token,
        gpu_capacity=settings.gpu_inventory,
        telemetry=twin,
    )
    env["AIRFLOW_CONN_" + settings.cluster_conn_id.upper()] = cluster_connection(base_url, token)
    os.environ.update(env)  # Airflow reads its configuration when first imported, below
    progress.done(f"agent at {base_url}")

    try:
        progress.start("loading the DAGs")
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
        if bag.import_errors:
            raise WattplanError(f"DAG import errors: {json.dumps(bag.import_errors, indent=2)}")
        progress.done(f"{len(bag.dag_ids)} DAGs: {', '.join(sorted(bag.dag_ids))}")

        progress.start("reference_data: profiles, carbon intensity, prices")
        _run(bag.get_dag("reference_data"), datetime.fromisoformat("2023-11-16T00:00:00+00:00"))
        progress.done()

        first, last = trace_span(settings)
        start = floor_to(first, settings.ingest_window_s)
        end = floor_to(last, settings.ingest_window_s) + timedelta(seconds=settings.ingest_window_s)
        plan_dag = bag.get_dag("plan_cluster")
        ingest = bag.get_dag("telemetry_ingest")
        window = timedelta(seconds=settings.window_s)
        step = timedelta(seconds=settings.ingest_window_s)
        first_plan = floor_to(first, settings.window_s) + window
        plan_starts = [first_plan + k * window for k in range(2) if first_plan + k * window < end]
        moment = start

        def ingest_until(until: datetime) -> None:
            nonlocal moment
            while moment < until:
                _run(ingest, moment + step)
                moment += step
                print(f"      ingested up to {moment:%H:%M}", flush=True)

        progress.start(
            f"telemetry_ingest: {settings.ingest_window_s} s runs, {start:%H:%M}-"
            f"{first_plan:%H:%M} UTC"
        )
        ingest_until(first_plan)
        progress.done()

        progress.start(
            f"closed loop: plan_cluster for {len(plan_starts)} windows (forecast, MILP, approve, "
            "push, verify), each followed by telemetry_ingest of its window (request logs, the "
            "agent's GPU telemetry and clock changes)"
        )
        for window_start in plan_starts:
            # The demo plays the operator: a plan the policy leaves to a person (a degraded
            # plan, a large change) is approved by marking the approval task done, which is
            # recorded as decided by airflow:marked-success.
            _run(plan_dag, window_start, mark_success_pattern="approve_plan")
            print(
                f"      planned window {window_start:%H:%M}-{window_start + window:%H:%M}",
                flush=True,
            )
            ingest_until(min(window_start + window, end))
        progress.done()

        report_day = (end - timedelta(microseconds=1)).date()  # UTC day the trace ends in
        progress.start(f"report_daily: refresh the report views, plot {report_day}")
        _run(
            bag.get_dag("report_daily"),
            datetime(report_day.year, report_day.month, report_day.day, tzinfo=UTC)
            + timedelta(days=1),
        )
        progress.done()

        progress.start("report")
        _print_reports(settings, urls.wattplan, base_url, token)
        progress.done()
        print(f"demo finished in {progress.elapsed_s:.0f} s", flush=True)
    finally:
        stop_agent()
    return 0


def _run(dag, run_after: datetime, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """One ``dag.test()`` run whose data interval ends at ``run_after``; raise if it failed."""
    from airflow.utils.state import DagRunState

    dag_run = dag.test(logical_date=run_after, **kwargs)
    if dag_run.state != DagRunState.SUCCESS:
        raise WattplanError(f"DAG {dag.dag_id} run at {run_after} ended {dag_run.state}")


def _print_reports(settings: Settings, url: str, agent_url: str, token: str) -> None:
    import httpx
    import sqlalchemy as sa

    from wattplan import report, store

    with db.connect(url) as engine, engine.connect() as conn:
        plan_ids = list(
            conn.execute(
                sa.text("SELECT plan_id FROM plans WHERE cluster = :c ORDER BY window_start_at"),
                {"c": settings.cluster},
            ).scalars()
        )
        for plan_id in plan_ids:
            data = report.plan_report(conn, plan_id)
            json_path, md_path = report.write_report(data, settings.reports_dir)
            decided = [f"{d} by {who}" for _, who, d, _ in store.read_approvals(conn, plan_id)]
            print(
                f"      {plan_id} [{data['status']}; {', '.join(decided) or 'undecided'}]: "
                f"{data['gpus']} GPUs in {data['instances']} "
                f"instances, predicted {data['predicted_energy_kwh']} kWh, "
                f"{data['predicted_carbon_kg']} kg CO2eq, ${data['predicted_cost_usd']} for the "
                f"window; SLO attainment estimate {data['slo_attainment_estimate']} over "
                f"{data['actual_requests']} requests"
            )
        for plan_id in plan_ids:
            samples, energy_j = conn.execute(
                sa.text(
                    "SELECT count(*), (SELECT coalesce(sum(w.energy_j), 0) FROM instance_windows w"
                    " WHERE w.window_start_at >= p.window_start_at AND w.window_start_at <"
                    " p.window_start_at + make_interval(secs => p.window_s)) FROM gpu_telemetry t"
                    " JOIN plans p ON p.plan_id = :p WHERE t.sampled_at >= p.window_start_at"
                    " AND t.sampled_at < p.window_start_at + make_interval(secs => p.window_s)"
                    " GROUP BY p.window_start_at, p.window_s"
                ),
                {"p": plan_id},
            ).one_or_none() or (0, 0.0)
            print(
                f"      {plan_id}: {samples} GPU samples from the agent's twin loaded, "
                f"{float(energy_j) / 3.6e6:.3f} kWh in instance_windows"
            )
        for plan_id in plan_ids:
            rows = conn.execute(
                sa.text(
                    "SELECT service, request_type, clock_changes, instances_changed, lowered,"
                    " raised, lowest_mhz, highest_mhz FROM report_clock_windows"
                    " WHERE plan_id = :p ORDER BY service, request_type"
                ),
                {"p": plan_id},
            ).all()
            total = sum(r[2] for r in rows)
            down, up = sum(r[4] for r in rows), sum(r[5] for r in rows)
            low = min((r[6] for r in rows), default=None)
            pools = ", ".join(f"{r[0]}/{r[1]} {r[2]}" for r in rows)
            print(
                f"      {plan_id}: {total} clock changes loaded ({down} down, {up} up, lowest "
                f"{low} MHz; the twin's clock loop over the first "
                f"{DEMO_CLOCK_REPLAY_S / 60:.0f} min of the window); per pool: {pools or '-'}"
            )
        layout = httpx.get(
            f"{agent_url}/v1/layout", headers={"Authorization": f"Bearer {token}"}, timeout=5
        ).json()
        print(f"      cluster agent now runs plan {layout['plan_id']} on {layout['gpus']} GPUs")
        print(f"      report files: {settings.reports_dir}")
    _print_plots(settings)


def _print_plots(settings: Settings) -> None:
    """Where the report_daily run left its plots and page."""
    from wattplan import reporting

    folder = reporting.latest_daily_folder(settings)
    if folder is None:
        print("      no report plots were rendered")
        return
    for path in sorted(folder.glob("*.png")):
        print(f"      plot: {path}")
    print(f"      report page (open in a browser): {folder / 'index.html'}")

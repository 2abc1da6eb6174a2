"""Run the cluster agent under uvicorn: blocking (``serve``, ``main``) or in a thread."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from agent.app import create_app
from agent.backends import BACKENDS, Backend, NvmlBackend, SimulatedBackend
from agent.control import ControlSettings
from agent.twin import TwinFleet, TwinTelemetry
from wattplan.errors import WattplanError

log = logging.getLogger(__name__)

#: Environment variable read when ``--token`` is not given.
TOKEN_ENV = "WATTPLAN_AGENT_TOKEN"


def serve(host: str = "127.0.0.1", port: int = 8765, **app_options: Any) -> None:
    """Serve the agent until interrupted (blocking).

    Args:
        host: Interface to bind.
        port: TCP port to bind.
        **app_options: Passed to :func:`agent.app.create_app` (cluster, token, gpu_capacity,
            apply_delay_s, state_path, max_unavailable, backend, telemetry, control).
    """
    if not app_options.get("token"):
        log.warning("no token set: /v1 routes of the agent are open to anyone who can reach it")
    uvicorn.run(create_app(**app_options), host=host, port=port, log_level="info")


def run_in_thread(
    *,
    cluster: str = "test",
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = 10.0,
    **app_options: Any,
) -> tuple[str, Callable[..., None]]:
    """Start the agent in a background thread and wait until ``/healthz`` answers.

    Args:
        cluster: Name of the serving cluster.
        host: Interface to bind (loopback by default).
        port: TCP port; 0 lets the OS pick a free one (no race between picking and binding).
        startup_timeout_s: How long to wait for the server to answer.
        **app_options: Passed to :func:`agent.app.create_app` (token, gpu_capacity,
            apply_delay_s, state_path, max_unavailable, backend, clock, telemetry, control).

    Returns:
        ``(base_url, stop)``: e.g. ``"http://127.0.0.1:41234"`` and a callable that stops the
        server and waits for its thread (about 0.2 s; ``stop(wait=False)`` returns at once and
        lets it finish in the background); calling ``stop`` twice is harmless.

    Raises:
        RuntimeError: the server did not come up within ``startup_timeout_s``.
    """
    app = create_app(cluster=cluster, **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"wattplan-agent-{cluster}", daemon=True)
    thread.start()

    def stop(wait: bool = True) -> None:
        server.should_exit = True
        if wait:
            thread.join(timeout=10)

    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"agent for cluster {cluster!r} did not start on {host}:{port}")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://{host}:{bound_port}"
    while True:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                return base_url, stop
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"agent at {base_url} did not answer /healthz")
        time.sleep(0.02)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of ``wattplan agent``."""
    parser = argparse.ArgumentParser(
        prog="wattplan agent",
        description="Run the reference cluster agent over HTTP: it keeps the desired and actual "
        "layout of one serving cluster and applies accepted plans in staggered waves. "
        "Backends: simulated (an in-process twin) or nvml (local GPUs through pynvml, serving "
        "processes from --command-template). Unless --no-control, it also runs the clock loop "
        "(each instance's clock from its engine's /metrics, the plan's clock policy as floor) "
        "and the power guard (per power domain of the plan) and records every clock change "
        "in the clock-change spool; on exit it restores the GPUs' default clocks.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (8765)")
    parser.add_argument("--cluster", default="demo", help="serving cluster name (demo)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token required on /v1 routes (default: ${TOKEN_ENV}; unset: no auth)",
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="simulated", help="where plans apply (simulated)"
    )
    parser.add_argument(
        "--gpu-capacity",
        type=int,
        default=None,
        help="GPUs the cluster has (simulated: 64; nvml: the node's GPUs)",
    )
    parser.add_argument(
        "--max-unavailable",
        type=int,
        default=1,
        help="most instances of one pool stopped or retuned at once while applying (1)",
    )
    parser.add_argument(
        "--apply-delay-s",
        type=float,
        default=0.0,
        help="simulated backend: seconds each wave of an apply takes (0)",
    )
    parser.add_argument(
        "--telemetry-spool",
        type=Path,
        default=None,
        help="simulated backend: write the GPU samples of each applied plan's window to this "
        "spool folder (the collectors' format, for the telemetry_ingest DAG)",
    )
    parser.add_argument(
        "--window-s",
        type=int,
        default=1800,
        help="simulated backend: seconds of telemetry written per applied plan (1800)",
    )
    parser.add_argument(
        "--state-path",
        type=Path,
        default=None,
        help="JSON file that keeps the state across restarts (default: memory only; "
        "nvml: required)",
    )
    parser.add_argument(
        "--command-template",
        default=None,
        help="nvml backend: command that serves one instance, e.g. 'vllm serve {model} "
        "--tensor-parallel-size {tp} --port {port}' (fields: "
        + ", ".join("{" + f + "}" for f in NvmlBackend.FIELDS)
        + "); CUDA_VISIBLE_DEVICES is set to the instance's GPUs",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="nvml backend: folder for serving processes' PID files and logs "
        "(default: beside --state-path)",
    )
    control = parser.add_argument_group("instance-level control (docs/control.md)")
    control.add_argument(
        "--no-control",
        action="store_true",
        help="run neither the clock loop nor the power guard",
    )
    control.add_argument(
        "--clock-poll-s",
        type=float,
        default=0.5,
        help="seconds between two reads of each instance's metrics (0.5; a 5 s poll missed "
        "1-5%% of the replayed trace's SLOs, docs/control.md)",
    )
    control.add_argument(
        "--clock-min-change-s",
        type=float,
        default=5.0,
        help="least seconds between two lowering clock changes of an instance (5); raises "
        "are not delayed",
    )
    control.add_argument(
        "--clock-lower-steps",
        type=int,
        default=None,
        help="lower by at most this many supported clocks per change (default: straight to "
        "the lowest feasible clock; 1: about half the saving, SLO attainment within one "
        "request of the maximum clock on the replayed hour, docs/control.md)",
    )
    control.add_argument(
        "--clock-margin",
        type=float,
        default=0.65,
        help="the clock loop keeps its projected TTFT and TBT under this fraction of the SLOs "
        "(0.65)",
    )
    control.add_argument(
        "--guard-interval-s",
        type=float,
        default=1.0,
        help="seconds between two power readings of a power domain (1)",
    )
    control.add_argument(
        "--ttft-slo-s",
        type=float,
        default=None,
        help="TTFT SLO the clock loop keeps (default: the profile model's SLO of each "
        "pool's request type; 1.0 for a model the profiles do not know)",
    )
    control.add_argument(
        "--tbt-slo-s",
        type=float,
        default=None,
        help="mean time-between-tokens SLO the clock loop keeps (default: as for "
        "--ttft-slo-s; 0.075 for a model the profiles do not know)",
    )
    control.add_argument(
        "--power-domain",
        action="append",
        default=[],
        metavar="NAME=GPUS",
        help="GPUs of a power domain of the plan, e.g. row-7=0-3,6 (repeatable; without it "
        "the plan's only budgeted domain covers every GPU)",
    )
    control.add_argument(
        "--clock-spool",
        type=Path,
        default=None,
        help="folder for clock-change event files (default: $WATTPLAN_CLOCK_SPOOL_DIR, else "
        "$WATTPLAN_STATE_DIR/spool/clock)",
    )
    control.add_argument(
        "--node",
        default=None,
        help="node name written with each clock-change event (default: the host name)",
    )
    control.add_argument(
        "--twin-load-rps",
        type=float,
        default=2.0,
        help="simulated backend: requests per second arriving at each twin engine (2.0)",
    )
    parser.add_argument(
        "--start-grace-s",
        type=float,
        default=5.0,
        help="nvml backend: a started serving process must still run after this long (5)",
    )
    return parser


def parse_gpus(text: str) -> tuple[int, ...]:
    """``"0-3,6"`` -> ``(0, 1, 2, 3, 6)``.

    Raises:
        ValueError: the text is not a list of GPU indices and ranges.
    """
    gpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        low, high = int(first), int(last or first)
        if low < 0 or high < low:
            raise ValueError(f"{part!r} is not a GPU index or range")
        gpus.update(range(low, high + 1))
    if not gpus:
        raise ValueError("no GPUs")
    return tuple(sorted(gpus))


def _control_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> ControlSettings | None:
    if args.no_control:
        return None
    from wattplan.settings import Settings

    domains: dict[str, tuple[int, ...]] = {}
    for spec in args.power_domain:
        name, sep, gpus = spec.partition("=")
        try:
            if not sep or not name:
                raise ValueError("expected NAME=GPUS")
            domains[name] = parse_gpus(gpus)
        except ValueError as exc:
            parser.error(f"--power-domain {spec!r}: {exc}")
    spool = args.clock_spool or Settings.from_env().clock_spool_dir
    try:
        return ControlSettings(
            poll_s=args.clock_poll_s,
            min_change_interval_s=args.clock_min_change_s,
            max_lower_steps=args.clock_lower_steps,
            margin=args.clock_margin,
            guard_interval_s=args.guard_interval_s,
            ttft_slo_s=args.ttft_slo_s,
            tbt_slo_s=args.tbt_slo_s,
            power_domains=domains,
            clock_spool_dir=spool,
            node=args.node or socket.gethostname(),
        )
    except WattplanError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and serve the agent until interrupted.

    Returns:
        The process exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gpu_capacity is not None and args.gpu_capacity < 0:
        parser.error(f"--gpu-capacity must be >= 0, got {args.gpu_capacity}")
    if args.apply_delay_s < 0:
        parser.error(f"--apply-delay-s must be >= 0, got {args.apply_delay_s}")
    if args.max_unavailable < 1:
        parser.error(f"--max-unavailable must be >= 1, got {args.max_unavailable}")
    if args.twin_load_rps < 0:
        parser.error(f"--twin-load-rps must be >= 0, got {args.twin_load_rps}")
    control = _control_settings(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    backend: Backend
    if args.backend == "nvml":
        if not args.command_template:
            parser.error("--backend nvml needs --command-template")
        if args.state_path is None:
            parser.error("--backend nvml needs --state-path (serving processes outlive the agent)")
        run_dir = args.run_dir or args.state_path.parent / f"{args.cluster}-instances"
        try:
            nvml = NvmlBackend(args.command_template, run_dir, start_grace_s=args.start_grace_s)
        except WattplanError as exc:
            parser.error(str(exc))
        if args.gpu_capacity is not None and args.gpu_capacity > nvml.gpu_count:
            parser.error(f"--gpu-capacity {args.gpu_capacity} > {nvml.gpu_count} GPUs on this node")
        backend, capacity = nvml, args.gpu_capacity or nvml.gpu_count
    else:
        backend = SimulatedBackend(args.apply_delay_s, fleet=TwinFleet(load_rps=args.twin_load_rps))
        capacity = 64 if args.gpu_capacity is None else args.gpu_capacity
    telemetry = None
    if args.telemetry_spool is not None:
        if args.backend != "simulated":
            parser.error("--telemetry-spool is for the simulated backend (use wattplan collect)")
        telemetry = TwinTelemetry(args.telemetry_spool, args.cluster, window_s=args.window_s)
    serve(
        args.host,
        args.port,
        cluster=args.cluster,
        token=args.token,
        gpu_capacity=capacity,
        state_path=args.state_path,
        max_unavailable=args.max_unavailable,
        backend=backend,
        telemetry=telemetry,
        control=control,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

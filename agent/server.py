"""Run the cluster agent under uvicorn: blocking (``serve``, ``main``) or in a thread."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from agent.app import create_app
from agent.backends import BACKENDS, Backend, NvmlBackend, SimulatedBackend
from agent.twin import TwinTelemetry
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
            apply_delay_s, state_path, max_unavailable, backend).
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
            apply_delay_s, state_path, max_unavailable, backend, clock).

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
        "processes from --command-template).",
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
    parser.add_argument(
        "--start-grace-s",
        type=float,
        default=5.0,
        help="nvml backend: a started serving process must still run after this long (5)",
    )
    return parser


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
        backend = SimulatedBackend(args.apply_delay_s)
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
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

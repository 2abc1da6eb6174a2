"""Run the cluster agent under uvicorn: blocking (``serve``, ``main``) or in a thread."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import uvicorn

from agent.app import create_app

log = logging.getLogger(__name__)

#: Environment variable read when ``--token`` is not given.
TOKEN_ENV = "WATTPLAN_AGENT_TOKEN"


def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    cluster: str = "demo",
    token: str | None = None,
    gpu_capacity: int = 64,
    apply_delay_s: float = 0.0,
    state_path: Path | str | None = None,
) -> None:
    """Serve the agent until interrupted (blocking).

    Args:
        host: Interface to bind.
        port: TCP port to bind.
        cluster: Name of the serving cluster.
        token: Bearer token for ``/v1`` routes; ``None`` leaves them open.
        gpu_capacity: GPUs the cluster has.
        apply_delay_s: Seconds the simulated backend takes to apply a plan.
        state_path: JSON file that keeps the state across restarts.
    """
    if not token:
        log.warning("no token set: /v1 routes of the agent are open to anyone who can reach it")
    app = create_app(
        cluster=cluster,
        token=token,
        gpu_capacity=gpu_capacity,
        apply_delay_s=apply_delay_s,
        state_path=state_path,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")


def run_in_thread(
    *,
    cluster: str = "test",
    token: str | None = None,
    gpu_capacity: int = 64,
    apply_delay_s: float = 0.0,
    state_path: Path | str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = 10.0,
) -> tuple[str, Callable[..., None]]:
    """Start the agent in a background thread and wait until ``/healthz`` answers.

    Args:
        cluster: Name of the serving cluster.
        token: Bearer token for ``/v1`` routes; ``None`` leaves them open.
        gpu_capacity: GPUs the cluster has.
        apply_delay_s: Seconds the simulated backend takes to apply a plan.
        state_path: JSON file that keeps the state across restarts.
        host: Interface to bind (loopback by default).
        port: TCP port; 0 lets the OS pick a free one (no race between picking and binding).
        startup_timeout_s: How long to wait for the server to answer.

    Returns:
        ``(base_url, stop)``: e.g. ``"http://127.0.0.1:41234"`` and a callable that stops the
        server and waits for its thread (about 0.2 s; ``stop(wait=False)`` returns at once and
        lets it finish in the background); calling ``stop`` twice is harmless.

    Raises:
        RuntimeError: the server did not come up within ``startup_timeout_s``.
    """
    app = create_app(
        cluster=cluster,
        token=token,
        gpu_capacity=gpu_capacity,
        apply_delay_s=apply_delay_s,
        state_path=state_path,
    )
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
        description="Run the reference cluster agent (simulated backend) over HTTP.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (8765)")
    parser.add_argument("--cluster", default="demo", help="serving cluster name (demo)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token required on /v1 routes (default: ${TOKEN_ENV}; unset: no auth)",
    )
    parser.add_argument("--gpu-capacity", type=int, default=64, help="GPUs the cluster has (64)")
    parser.add_argument(
        "--apply-delay-s",
        type=float,
        default=0.0,
        help="seconds the simulated backend takes to apply a plan (0)",
    )
    parser.add_argument(
        "--state-path",
        type=Path,
        default=None,
        help="JSON file that keeps the state across restarts (default: memory only)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and serve the agent until interrupted.

    Returns:
        The process exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gpu_capacity < 0:
        parser.error(f"--gpu-capacity must be >= 0, got {args.gpu_capacity}")
    if args.apply_delay_s < 0:
        parser.error(f"--apply-delay-s must be >= 0, got {args.apply_delay_s}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(
        args.host,
        args.port,
        cluster=args.cluster,
        token=args.token,
        gpu_capacity=args.gpu_capacity,
        apply_delay_s=args.apply_delay_s,
        state_path=args.state_path,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

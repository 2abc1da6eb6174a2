"""Reading a serving engine's Prometheus metrics: vLLM's names, garbage refused, real HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.metrics import (
    EngineSnapshot,
    MetricsError,
    fetch_snapshot,
    format_metrics,
    parse_prometheus_text,
    snapshot_from_metrics,
)

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B"} 7.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B"} 5.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B"} 3.0
vllm:gpu_cache_usage_perc{model_name="meta-llama/Llama-3.1-8B"} 0.4125
vllm:generation_tokens_total{model_name="meta-llama/Llama-3.1-8B"} 123456.0 1732000000000
process_cpu_seconds_total 12.5
"""


def test_vllm_metrics_sum_over_engines_and_fall_back_to_the_old_cache_gauge() -> None:
    snap = snapshot_from_metrics(parse_prometheus_text(VLLM_TEXT))
    assert snap == EngineSnapshot(
        running=12, waiting=3, kv_cache_usage=0.4125, generation_tokens_total=123456.0
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vllm:num_requests_running 3\n", "no waiting metric"),
        ("<html>502 Bad Gateway</html>", "not a Prometheus sample"),
        ("vllm:num_requests_running abc\nvllm:num_requests_waiting 0\n", "not a number"),
        ("vllm:num_requests_running NaN\nvllm:num_requests_waiting 0\n", "finite"),
        ("vllm:num_requests_running -1\nvllm:num_requests_waiting 0\n", "finite"),
        (
            "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n"
            "vllm:kv_cache_usage_perc 3.5\n",
            "above 1",
        ),
    ],
)
def test_garbage_or_missing_metrics_raise_metrics_error(text: str, message: str) -> None:
    with pytest.raises(MetricsError, match=message):
        snapshot_from_metrics(parse_prometheus_text(text))


class _Handler(BaseHTTPRequestHandler):
    body: bytes = b""
    status: int = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(type(self).status)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/metrics", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fetch_reads_a_live_endpoint_and_round_trips_the_simulated_format(
    server: tuple[str, type[_Handler]],
) -> None:
    url, handler = server
    snap = EngineSnapshot(running=4, waiting=1, kv_cache_usage=0.25, generation_tokens_total=99.0)
    handler.body = format_metrics(snap, 'model_name="sim"').encode()
    assert fetch_snapshot(url) == snap


def test_fetch_turns_http_errors_and_refused_connections_into_metrics_errors(
    server: tuple[str, type[_Handler]],
) -> None:
    url, handler = server
    handler.status, handler.body = 500, b"oops"
    with pytest.raises(MetricsError, match="HTTP 500"):
        fetch_snapshot(url)
    handler.status, handler.body = 200, b"\xff\xfe garbage"
    with pytest.raises(MetricsError, match="not UTF-8"):
        fetch_snapshot(url)
    with pytest.raises(MetricsError, match="cannot read metrics"):
        fetch_snapshot("http://127.0.0.1:9/metrics", timeout_s=0.5)

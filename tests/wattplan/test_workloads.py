"""Evaluation workloads: ServeGen clients grouped by token distribution, request logs per type."""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from wattplan.domain import RequestTypeBins
from wattplan.errors import InputDataError
from wattplan.settings import PROJECT_ROOT
from wattplan.workloads import (
    UNCLASSIFIED,
    client_type_shares,
    load_workload,
    request_log_workload,
    servegen_workload,
)

BINS = RequestTypeBins()


def _dataset(windows: int, inputs: dict[int, float], outputs: dict[int, float]) -> dict:
    return {
        str(w * 21600): {"input_tokens": repr(inputs), "output_tokens": repr(outputs)}
        for w in range(windows)
    }


def test_type_shares_weigh_each_window_by_its_requests() -> None:
    dataset = {
        "0": {"input_tokens": "{100: 1.0}", "output_tokens": "{50: 1.0}"},  # SS
        "21600": {"input_tokens": "{2000: 0.5, 500: 0.5}", "output_tokens": "{400: 1.0}"},
    }
    rates = {0: 1.0, 21600: 3.0}  # three times the requests in the second window
    shares = client_type_shares(dataset, rates, BINS)
    assert shares["SS"] == pytest.approx(0.25)
    assert shares["LL"] == pytest.approx(0.375) and shares["ML"] == pytest.approx(0.375)
    assert sum(shares.values()) == pytest.approx(1.0)


def _servegen_folder(tmp_path: Path, days: int = 4) -> Path:
    folder = tmp_path / "m-test"
    folder.mkdir()
    rows = days * 144
    for client, rate in (("chunk-1", 20.0), ("chunk-2", 5.0), ("chunk-3", 2.0)):
        t = np.arange(rows)
        r = rate * (1.5 + np.sin(2 * np.pi * t / 144))
        lines = [f"{i * 600},{r[i]},1.0,Gamma,1.0,{1 / r[i]}" for i in range(rows)]
        (folder / f"{client}-trace.csv").write_text("\n".join(lines) + "\n")
    long_in = _dataset(days * 4, {2000: 1.0}, {500: 1.0})
    (folder / "chunk-1-dataset.json").write_text(json.dumps(long_in))
    short = _dataset(days * 4, {50: 0.9, 300: 0.1}, {10: 1.0})
    (folder / "chunk-2-dataset.json.xz").write_bytes(lzma.compress(json.dumps(short).encode()))
    return folder


def test_servegen_clients_join_the_type_holding_most_of_their_requests(tmp_path: Path) -> None:
    w = servegen_workload(_servegen_folder(tmp_path), 1800, bins=BINS, seed=1)
    by_type = {s.request_type: s for s in w.series}
    assert set(by_type) == {"LL", "SS", UNCLASSIFIED}
    assert by_type["LL"].members == ("chunk-1",)
    assert by_type["SS"].members == ("chunk-2",)  # read from the .xz copy
    assert by_type[UNCLASSIFIED].members == ("chunk-3",)
    assert w.grouping["clients"]["chunk-2"]["share_in_type"] == pytest.approx(0.9)
    ll = by_type["LL"]
    assert len(ll) == 4 * 48 and not np.isnan(ll.mean_rps).any()
    # Simulated 1-minute counts keep the published rate: window means within 2% of it.
    t = np.arange(4 * 144)
    expected = (20.0 * (1.5 + np.sin(2 * np.pi * t / 144))).reshape(-1, 3).mean(axis=1)
    np.testing.assert_allclose(ll.mean_rps, expected, rtol=0.02)
    assert (ll.peak_rps >= ll.mean_rps).all()


def test_request_log_counts_requests_per_type_and_minute(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    t0 = datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for k in range(600):  # one request per second for 10 minutes
        at = t0 + timedelta(seconds=k)
        tokens = (100, 10) if k % 3 else (2000, 500)
        lines.append(f"{at:%Y-%m-%d %H:%M:%S}.0000000,{tokens[0]},{tokens[1]}")
    path.write_text("\n".join(lines) + "\n")
    w = request_log_workload(path, "svc", 300, bins=BINS)
    by_type = {s.request_type: s for s in w.series}
    assert set(by_type) == {"SS", "LL"}
    # The first minute (12:00) is cut by the first arrival: unobserved, not quiet.
    ss = by_type["SS"]
    assert ss.mean_rps[0] == pytest.approx(40 / 60, rel=0.05)
    assert ss.peak_rps[0] == pytest.approx(40 / 60, rel=0.05)
    assert "too short" in w.notes[0]


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="does not exist"):
        load_workload(str(tmp_path / "nope"), PROJECT_ROOT / "data", 1800)


def test_bundled_servegen_groups_the_eight_clients(tmp_path: Path) -> None:
    w = load_workload("servegen", PROJECT_ROOT / "data", 1800)
    members = {s.request_type: s.members for s in w.series}
    assert members == {
        "MS": ("chunk-104", "chunk-143"),
        "SL": ("chunk-61",),
        "SS": ("chunk-34",),
        UNCLASSIFIED: ("chunk-112", "chunk-142", "chunk-148", "chunk-73"),
    }
    assert all(len(s) == 480 for s in w.series)  # 10 days of 30-minute windows


def test_evaluate_command_runs_on_a_user_path(tmp_path: Path) -> None:
    folder = _servegen_folder(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wattplan.cli",
            "forecast",
            "evaluate",
            "--workload",
            str(folder),
            "--candidates",
            "fourier_arima,persistence",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["calibrated"] and report["candidates"] == ["fourier_arima", "persistence"]
    assert set(report["models"]) >= {"selected", "weekly_template", "seasonal_naive", "ets"}
    selected = report["models"]["selected"]["overall"]
    assert selected["windows"] == 3 * 48 and selected["fallback_windows"] == 0
    assert set(report["targets"]) >= {"peak_mape_ratio_met", "coverage_met"}
    assert "refit 3/3" in result.stderr  # progress goes to stderr

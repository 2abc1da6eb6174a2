"""Workloads as arrays: Azure and JSONL traces, ServeGen folders, scaling, what policies see."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simulator.workload import (
    RequestTrace,
    classify,
    expected_max_normal,
    load_servegen,
    load_workload,
    view_of,
)
from tests.simulator.conftest import rate_workload
from wattplan.domain import REQUEST_TYPES, RequestTypeBins
from wattplan.errors import InputDataError
from wattplan.settings import PROJECT_ROOT

DATA = PROJECT_ROOT / "data"


def test_vectorised_classification_matches_the_domain_rule() -> None:
    rng = np.random.default_rng(3)
    tin = rng.integers(0, 5000, 2000)
    tout = rng.integers(0, 1000, 2000)
    tin[:6] = [255, 256, 1023, 1024, 0, 1]
    tout[:6] = [99, 100, 349, 350, 0, 1]
    bins = RequestTypeBins()
    codes = classify(tin, tout, bins)
    assert [REQUEST_TYPES[c] for c in codes] == [
        bins.classify(int(i), int(o)) for i, o in zip(tin, tout, strict=True)
    ]


def test_azure_trace_loads_sorted_with_bad_rows_counted(tmp_path: Path) -> None:
    path = tmp_path / "svc.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "not a time,1,1\n"
        "2023-11-16 18:16:00,2000,-5\n"
        "2023-11-16 18:16:01,2000,500\n"
    )
    trace = load_workload(str(path), tmp_path)
    assert isinstance(trace, RequestTrace)
    assert len(trace) == 3
    assert trace.start_at.isoformat() == "2023-11-16T18:15:46+00:00"
    assert trace.arrival_s.tolist() == pytest.approx([0.68059, 4.995169, 15.0])
    assert [trace.pools[c] for c in trace.pool_code] == [
        ("svc", "MS"),
        ("svc", "MM"),
        ("svc", "LL"),
    ]
    assert any("2 row(s)" in n for n in trace.notes)


def test_wrong_azure_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("time,in,out\n1,2,3\n")
    with pytest.raises(InputDataError, match="Azure trace header"):
        load_workload(str(path), tmp_path)


def test_jsonl_request_log_loads_through_the_ingest_parser(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    lines = [
        {"arrived_at": "2025-03-01T12:00:05Z", "input_tokens": 812, "output_tokens": 143},
        {"arrived_at": "2025-03-01T12:00:01Z", "input_tokens": 50, "output_tokens": 20},
        {"arrived_at": "2025-03-01T12:00:09", "input_tokens": 5, "output_tokens": 2},  # no zone
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    trace = load_workload(str(path), tmp_path)
    assert isinstance(trace, RequestTrace)
    assert len(trace) == 2
    assert [trace.pools[c] for c in trace.pool_code] == [("chat", "SS"), ("chat", "MM")]
    assert trace.arrival_s.tolist() == [0.0, 4.0]


def test_missing_workload_names_what_exists(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="azure-conv"):
        load_workload(str(tmp_path / "nope.csv"), tmp_path)


def _servegen_folder(folder: Path) -> None:
    folder.mkdir()
    # Client a: 10 windows at 2 rps, cv 1; it publishes a distribution (all SS).
    (folder / "chunk-1-trace.csv").write_text(
        "".join(f"{600 * i},2.0,1.0,Gamma,1.0,0.5\n" for i in range(10))
    )
    dataset = {"0": {"input_tokens": "{100: 1.0}", "output_tokens": "{10: 0.5, 500: 0.5}"}}
    (folder / "chunk-1-dataset.json").write_text(json.dumps(dataset))
    # Client b: 1 rps, no distribution: follows a's mix (half SS, half SL).
    (folder / "chunk-2-trace.csv").write_text(
        "".join(f"{600 * i},1.0,2.0,Gamma,1.0,0.5\n" for i in range(10))
    )


def test_servegen_rates_are_split_by_the_token_mix(tmp_path: Path) -> None:
    _servegen_folder(tmp_path / "m")
    w = load_servegen(tmp_path / "m")
    assert w.pools == (("m", "SS"), ("m", "SL"))
    assert w.rate_rps[:, 0].tolist() == pytest.approx([1.5, 1.5])
    assert w.rate_rps.sum() == pytest.approx(30.0)  # every request kept
    # cv^2 of a thinned renewal stream: s cv^2 + 1 - s, rate-weighted over the clients.
    expected = np.sqrt((1.0 * (0.5 * 1 + 0.5) + 0.5 * (0.5 * 4 + 0.5)) / 1.5)
    assert w.cv[0, 0] == pytest.approx(expected)
    assert w.grouping["clients_with_pooled_mix"] == ["chunk-2"]


def test_bundled_workloads_load() -> None:
    sg = load_workload("servegen", DATA)
    assert sg.window_s == 600 and sg.windows == 1440  # type: ignore[union-attr]
    conv = load_workload("azure-conv", DATA)
    assert isinstance(conv, RequestTrace) and len(conv) == 19366
    assert {s for s, _ in conv.pools} == {"conversation"}


def test_scaling_a_trace_keeps_its_shape() -> None:
    trace = load_workload("azure-code", DATA)
    assert isinstance(trace, RequestTrace)
    bigger = trace.scaled(2.5, seed=1)
    assert len(bigger) == pytest.approx(2.5 * len(trace), rel=0.02)
    assert np.all(np.diff(bigger.arrival_s) >= 0)
    a, b = view_of(trace, 300), view_of(bigger, 300)
    assert b.mean_rps.sum() == pytest.approx(2.5 * a.mean_rps.sum(), rel=0.02)
    assert np.array_equal(trace.scaled(2.5, seed=1).arrival_s, bigger.arrival_s)


def test_view_of_a_trace_has_minute_peaks(tmp_path: Path) -> None:
    trace = rate_workload({"SS": [1.0, 3.0]}).to_requests(seed=2)
    view = view_of(trace, 600)
    assert view.mean_rps[0].tolist() == pytest.approx([1.0, 3.0], rel=0.1)
    assert np.all(view.peak_rps >= view.mean_rps)


def test_view_of_rates_estimates_the_minute_peak() -> None:
    w = rate_workload({"SS": [60.0]}, cv=2.0)
    view = view_of(w, 600)
    assert expected_max_normal(10) == pytest.approx(1.5388, abs=1e-3)
    assert view.peak_rps[0, 0] == pytest.approx(60 + 1.5388 * 2.0 * 1.0, abs=1e-3)
    with pytest.raises(InputDataError):
        view_of(w, 300)

"""``wattplan bench solve`` prints its figures as JSON (timings are reported, not asserted)."""

from __future__ import annotations

import json

import pytest

from wattplan.bench import main


def test_bench_solve_prints_size_gap_and_timings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["solve", "--case", "dynamollm", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    case = figures["cases"]["dynamollm/envelope"]
    assert case["status"] in ("optimal", "start_within_gap")
    assert case["gap"] <= 1e-4
    assert case["size"]["integer_variables"] == 27  # 9 pools x TP {2,4,8}, clocks enveloped
    assert set(case["timing_s"]) >= {"build_s", "translate_s", "mip_s", "total_s"}
    assert case["target"] == {"total_s": 0.5, "gap": 1e-4}
    assert isinstance(case["target_met"], bool)
    assert figures["cpu_count"] >= 1

"""The simulated instance and the clock loop against the fixed maximum clock on the bundled
Azure conversation trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.clock_control import ClockController
from agent.instance_twin import (
    H100_CLOCKS_MHZ,
    LLAMA70B_TP4_H100,
    InstanceTwin,
    PowerModel,
    TraceRequest,
    compare_with_max_clock,
    load_azure_trace,
    replay,
)
from wattplan.errors import InputDataError

CONV = (
    Path(__file__).parents[2]
    / "data"
    / "azure-llm-inference-2023"
    / "AzureLLMInferenceTrace_conv.csv"
)


def test_on_ten_minutes_of_conversation_the_loop_saves_energy_at_equal_slo_attainment() -> None:
    trace = load_azure_trace(CONV, minutes=10, every=2)
    assert 1000 < len(trace) < 2000
    figures = compare_with_max_clock(trace)
    fixed, loop = figures["max_clock"], figures["clock_loop"]
    assert loop["slo_attainment"] == fixed["slo_attainment"] == 1.0
    assert loop["energy_kwh"] < 0.9 * fixed["energy_kwh"]
    assert loop["clock_changes"] > 0 and "800" in loop["time_share_by_clock_mhz"]


def test_over_the_hour_the_cautious_loop_saves_energy_at_equal_slo_attainment() -> None:
    """The whole hour: lowering one clock step a change, projecting the 95th-percentile
    prompt and keeping 0.8 x SLO (chosen on this trace, docs/control.md) misses no more
    requests than the maximum clock and still uses less energy (the default loop saves
    more but misses more: not equal over the hour)."""
    trace = load_azure_trace(CONV, minutes=60, every=2)
    cautious = compare_with_max_clock(trace, max_lower_steps=1, prompt_percentile=95.0, margin=0.8)
    fixed, loop = cautious["max_clock"], cautious["clock_loop"]
    assert loop["slo_attainment"] >= fixed["slo_attainment"]
    assert loop["energy_kwh"] < 0.95 * fixed["energy_kwh"]


def test_a_lower_fixed_clock_draws_less_power_and_serves_slower() -> None:
    trace = [TraceRequest(0.1 * i, 600, 80) for i in range(50)]
    fast = replay(
        trace, LLAMA70B_TP4_H100, PowerModel(), ttft_slo_s=1, tbt_slo_s=0.075, clock_rule=1980
    )
    slow = replay(
        trace, LLAMA70B_TP4_H100, PowerModel(), ttft_slo_s=1, tbt_slo_s=0.075, clock_rule=1000
    )
    assert slow.ttft_p99_s > fast.ttft_p99_s and slow.tbt_mean_p99_s > fast.tbt_mean_p99_s
    busy_fast = fast.energy_j / fast.seconds
    busy_slow = slow.energy_j / slow.seconds
    assert busy_slow < busy_fast


def test_the_twin_reports_its_state_and_charges_a_clock_change() -> None:
    twin = InstanceTwin(LLAMA70B_TP4_H100, PowerModel(), clock_mhz=1980)
    twin.waiting.extend([0, 1, 2])
    snap = twin.snapshot()
    assert (snap.running, snap.waiting, snap.prompt_tokens_total) == (0, 3, 0.0)
    twin.set_clock(1200)
    assert twin.clock_changes == 1 and twin.now_s == pytest.approx(0.07)
    assert twin.energy_j == pytest.approx(0.07 * 4 * 90.0)  # idle while it stalls
    controller = ClockController(
        LLAMA70B_TP4_H100, H100_CLOCKS_MHZ, tbt_slo_s=0.075, ttft_slo_s=1.0, prompt_tokens=500
    )
    assert controller.clock_mhz == 1980


def test_an_empty_or_missing_trace_is_an_input_error(tmp_path: Path) -> None:
    empty = tmp_path / "t.csv"
    empty.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(InputDataError, match="no requests"):
        load_azure_trace(empty, minutes=1)
    with pytest.raises(InputDataError):
        load_azure_trace(tmp_path / "missing.csv", minutes=1)

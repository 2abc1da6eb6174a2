"""The clock loop's per-instance performance model and SLOs come from the profile model:
they reproduce the calibrated latencies and the default table's SLOs, and an unknown model
falls back (with a warning) to the configured model and SLOs."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from agent.control import FALLBACK_SLOS_S, ControlSettings, instance_model, make_controller
from agent.performance import instance_performance
from agent.rollout import Instance
from profiles import load_profile_records
from profiles.calibrate import ConfigLatency
from profiles.fit import calibrate
from profiles.hardware import MODELS
from wattplan.domain import ServingConfig
from wattplan.settings import PROJECT_ROOT

DATA = PROJECT_ROOT / "data"
CONFIGS = [
    ServingConfig("llama2-70b", "H100-80GB", 4, 700),
    ServingConfig("llama2-70b", "H100-80GB", 8, 700),
    ServingConfig("llama3.1-8b", "A100-80GB", 1, 400),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.key)
@pytest.mark.parametrize("request_type", ["SS", "MM", "LL"])
def test_the_fitted_model_reproduces_the_calibrated_latencies(
    config: ServingConfig, request_type: str
) -> None:
    perf = instance_performance(config, request_type)
    assert perf is not None
    gpu_cal = calibrate(DATA).gpus[config.gpu_type]
    clocks = gpu_cal.gpu.clocks_mhz
    prompt, output = perf.prompt_tokens, perf.output_tokens
    for clock in (max(clocks), clocks[len(clocks) // 2], min(clocks)):
        lat = ConfigLatency(
            gpu_cal, MODELS[config.model], replace(config, clock_mhz=clock), prompt, output
        )
        for batch in (1, 16, 64, 128):
            # Decode is affine in the batch: exact at the top clock, and at the largest batch
            # at every clock; below it the slowdown is over-estimated (by at most ~21% at a
            # batch of one at the lowest clock), never under-estimated.
            tbt, own_tbt = perf.model.tbt_s(batch, clock), lat.decode_s(batch)
            if clock == max(clocks) or batch == 128:
                assert tbt == pytest.approx(own_tbt, rel=1e-9)
            else:
                assert own_tbt * (1 - 1e-9) <= tbt <= own_tbt * 1.25
        own = lat.prefill_s(prompt)
        projected = perf.model.prefill_s(prompt, clock)
        if clock == max(clocks):
            assert projected == pytest.approx(own, rel=1e-9)
        else:  # f_max / f slows all of it: the projection errs towards a higher clock
            assert own <= projected <= own * max(clocks) / clock * 1.0001


@pytest.mark.parametrize("model", ["llama2-70b", "llama3.1-8b"])
def test_slos_are_the_default_tables(model: str) -> None:
    table = {
        (r.profile.request_type): (r.profile.ttft_slo_s, r.profile.tbt_slo_s)
        for r in load_profile_records(DATA / "profiles" / "v1.csv")
        if r.profile.config.model == model
    }
    for request_type, (ttft, tbt) in table.items():
        perf = instance_performance(ServingConfig(model, "H100-80GB", 8, 700), request_type)
        assert perf is not None
        assert (round(perf.ttft_slo_s, 4), round(perf.tbt_slo_s, 4)) == (ttft, tbt)


def test_an_unknown_model_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    config = ServingConfig("mystery-13b", "H100-80GB", 2, 700)
    assert instance_performance(config, "MM") is None
    inst = Instance("i00001", "chat", "MM", config, (0, 1))
    settings = ControlSettings()
    with caplog.at_level(logging.WARNING, logger="agent.control"):
        model, slos = instance_model(inst, settings)
    assert slos == FALLBACK_SLOS_S
    assert model.tbt_base_s == pytest.approx(settings.base_model.tbt_base_s * 2)  # TP4 -> TP2
    assert "no profile model for mystery-13b" in caplog.text
    # Explicit SLOs win over the profile's.
    known = Instance("i00002", "chat", "MM", CONFIGS[0], (0, 1, 2, 3))
    controller = make_controller(known, [800, 1980], replace(settings, ttft_slo_s=0.5))
    assert controller.ttft_slo_s == 0.5
    perf = instance_performance(CONFIGS[0], "MM")
    assert perf is not None and controller.tbt_slo_s == perf.tbt_slo_s

"""The v1 default profile table: regeneration, coverage, physics, SLOs, gangs, an oracle."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

from profiles import load_profile_records
from profiles.calibrate import main
from profiles.fit import Calibration, calibrate
from profiles.hardware import A100, GPUS, H100, MODELS
from profiles.model import erlang_c, poisson_quantile
from profiles.physics import decode_ms, prefill_ms
from profiles.table import ProfileRecord
from wattplan.domain import LONG_CONTEXT_TYPE, REQUEST_TYPES

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
COMMITTED_CSV = DATA_DIR / "profiles" / "v1.csv"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cal") / "v1.csv"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["--data-dir", str(DATA_DIR), "--out", str(out)]) == 0
    return out, json.loads(buffer.getvalue())


@pytest.fixture(scope="module")
def records(regenerated: tuple[Path, dict]) -> list[ProfileRecord]:
    return load_profile_records(regenerated[0])


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    return calibrate(DATA_DIR)


def test_regeneration_is_byte_identical_to_the_committed_table(
    regenerated: tuple[Path, dict],
) -> None:
    out, summary = regenerated
    assert out.read_bytes() == COMMITTED_CSV.read_bytes()
    assert summary["rows"] == len(load_profile_records(COMMITTED_CSV))
    assert summary["version"] == "v1"


def test_covers_both_models_both_gpus_every_fitting_tp_and_every_clock(
    records: list[ProfileRecord],
) -> None:
    seen = defaultdict(set)
    for r in records:
        c = r.profile.config
        if r.profile.request_type != LONG_CONTEXT_TYPE:
            seen[(c.model, c.gpu_type)].add((c.tp, c.clock_mhz))
    for model in MODELS:
        for gpu in GPUS.values():
            tps = {tp for tp, _ in seen[(model, gpu.name)]}
            clocks = {clock for _, clock in seen[(model, gpu.name)]}
            assert tps == ({2, 4, 8} if model == "llama2-70b" else {1, 2, 4, 8}), (model, gpu)
            assert clocks == set(gpu.clocks_mhz), (model, gpu)
    assert H100.clocks_mhz == (800, 1000, 1200, 1400, 1600, 1800, 1980)
    assert A100.clocks_mhz[0] < A100.clocks_mhz[-1] == A100.max_clock_mhz


def test_the_planned_model_has_all_nine_types_on_h100_at_every_tp_and_clock(
    records: list[ProfileRecord],
) -> None:
    # The demo and DAG tests plan llama2-70b on H100 for the nine types.
    cells = {
        (r.profile.config.tp, r.profile.config.clock_mhz, r.profile.request_type)
        for r in records
        if r.profile.config.model == "llama2-70b" and r.profile.config.gpu_type == H100.name
    }
    assert cells == {(tp, c, t) for tp in (2, 4, 8) for c in H100.clocks_mhz for t in REQUEST_TYPES}


def test_every_row_meets_its_slos_and_stays_within_physical_power(
    records: list[ProfileRecord],
) -> None:
    for r in records:
        p, gpu = r.profile, GPUS[r.profile.config.gpu_type]
        assert p.ttft_p99_s <= p.ttft_slo_s + 1e-4 and p.tbt_p99_s <= p.tbt_slo_s + 1e-4, p
        assert p.idle_power_w == pytest.approx(p.config.gpus * gpu.loaded_idle_w, abs=0.05)
        assert all(w <= p.config.gpus * gpu.tdp_w for _, w in p.power_curve)
        assert len(p.power_curve) == 5 and r.method == "calibrated"
        for a, b in zip(r.points, r.points[1:], strict=False):
            assert b.power_w >= a.power_w - 1.0, p  # more load never draws (much) less power
            assert b.ttft_p99_s >= a.ttft_p99_s - 1e-4 and b.ttft_p99_s >= b.ttft_p50_s - 1e-4


def test_clock_model_follows_the_physics_it_states(calibration: Calibration) -> None:
    cal, shape = calibration.gpus[H100.name], MODELS["llama2-70b"]
    # Prefill is compute bound: its compute part scales ~1/clock (beta near 1).
    assert 0.7 < cal.clock.time_share <= 1.0
    slow = prefill_ms(cal, shape, 8192, 8192, 8, 800) - cal.prefill.overhead_ms
    fast = prefill_ms(cal, shape, 8192, 8192, 8, 1980) - cal.prefill.overhead_ms
    assert 1.5 < slow / fast < 1980 / 800
    # Decode of one request is memory bound: under 5% slower at 40% of the max clock.
    assert decode_ms(cal, shape, 1, 600, 8, 800) / decode_ms(cal, shape, 1, 600, 8, 1980) < 1.05
    # Dynamic power is superlinear in clock: it falls faster than the clock.
    for x in (0.4, 0.6, 0.8):
        assert cal.clock.power_factor(x) < x
    assert cal.clock.power_exponent > 1


def test_lower_clocks_trade_capacity_for_energy_per_request(records: list[ProfileRecord]) -> None:
    by_key = {
        (r.profile.config.model, r.profile.config.gpu_type, r.profile.config.tp)
        + (r.profile.config.clock_mhz, r.profile.request_type): r.profile
        for r in records
    }
    # Short decode-light type on 70B TP8: the lowest clock is slower but cheaper per request.
    low = by_key[("llama2-70b", H100.name, 8, 800, "SS")]
    top = by_key[("llama2-70b", H100.name, 8, 1980, "SS")]
    assert low.capacity_rps < top.capacity_rps
    assert low.energy_per_request_j < top.energy_per_request_j
    assert low.power_at_capacity_w < top.power_at_capacity_w


def test_slos_follow_the_5x_rule_on_the_largest_h100_config(
    records: list[ProfileRecord], calibration: Calibration
) -> None:
    # Oracle: representative lengths recomputed from the raw traces for one type (LL).
    inputs, outputs = [], []
    for name in ("code", "conv"):
        path = DATA_DIR / "azure-llm-inference-2023" / f"AzureLLMInferenceTrace_{name}.csv"
        with path.open() as handle:
            for row in csv.DictReader(handle):
                i, o = int(row["ContextTokens"]), int(row["GeneratedTokens"])
                if i >= 1024 and o >= 350:
                    inputs.append(i)
                    outputs.append(o)
    p, n = statistics.median(inputs), statistics.median(outputs)
    cal = calibration.gpus[H100.name]
    slos = defaultdict(set)
    for r in records:
        slos[(r.profile.config.model, r.profile.request_type)].add(
            (r.profile.ttft_slo_s, r.profile.tbt_slo_s)
        )
    assert all(len(v) == 1 for v in slos.values())  # one SLO per model and type
    for model, shape in MODELS.items():
        (ttft, tbt) = next(iter(slos[(model, "LL")]))
        assert ttft == pytest.approx(5 * prefill_ms(cal, shape, p, p, 8) / 1000, abs=6e-5)
        assert tbt == pytest.approx(5 * decode_ms(cal, shape, 1, p + n / 2, 8) / 1000, abs=6e-5)
    assert next(iter(slos[("llama3.1-8b", LONG_CONTEXT_TYPE)]))[1] == 0.03  # absolute override


def test_long_context_gangs_are_sized_by_kv_memory_and_the_tbt_slo(
    records: list[ProfileRecord], calibration: Calibration
) -> None:
    from profiles.calibrate import LC_OUTPUT_TOKENS, LC_PROMPT_TOKENS, ConfigLatency, kv_tokens

    gangs = [r.profile for r in records if r.profile.request_type == LONG_CONTEXT_TYPE]
    assert gangs, "the 8B model has long-context gangs"
    assert any(g.config.kvp > 1 for g in gangs) and any(g.config.spp > 1 for g in gangs)
    need = LC_PROMPT_TOKENS + LC_OUTPUT_TOKENS
    for g in gangs:
        shape, gpu = MODELS[g.config.model], GPUS[g.config.gpu_type]
        # KV bytes per token from the shape: 2 x layers x kv_heads x head_dim x 2 bytes.
        assert shape.kv_bytes_per_token == 2 * shape.layers * shape.kv_heads * shape.head_dim * 2
        assert kv_tokens(shape, gpu, g.config) >= need  # holds one request
        if g.config.kvp > 1:  # half the KV shards would not hold it or not meet 30 ms alone
            smaller = replace(g.config, kvp=g.config.kvp // 2, clock_mhz=None)
            alone_s = ConfigLatency(
                calibration.gpus[gpu.name], shape, smaller, LC_PROMPT_TOKENS, LC_OUTPUT_TOKENS
            ).decode_s(1)
            assert kv_tokens(shape, gpu, smaller) < need or alone_s > 0.03
        assert g.tbt_p99_s <= 0.03 + 1e-4
    # Llama-3.1-8B: 128 KiB of KV per token, as DOMAIN.md states.
    assert MODELS["llama3.1-8b"].kv_bytes_per_token == 128 * 1024


def test_capacity_never_beats_all_slots_decoding_back_to_back(
    records: list[ProfileRecord], calibration: Calibration
) -> None:
    from profiles.calibrate import MAX_BATCH, type_lengths

    lengths = type_lengths(DATA_DIR)
    for r in records[::17]:
        p, c = r.profile, r.profile.config
        prompt, output = lengths[p.request_type]
        cal, shape = calibration.gpus[c.gpu_type], MODELS[c.model]
        fastest_s = output * decode_ms(cal, shape, 1, prompt, c.tp, c.clock_mhz) / 1000
        assert p.capacity_rps < MAX_BATCH / fastest_s, p


def test_queueing_helpers_match_textbook_values() -> None:
    assert erlang_c(1, 0.3) == pytest.approx(0.3)  # M/M/1: wait probability = utilisation
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(4, 4.0) == 1.0
    assert poisson_quantile(0.0, 0.99) == 0
    assert poisson_quantile(1.0, 0.99) == 4  # P[X<=3] = 0.981, P[X<=4] = 0.996
    assert math.isclose(erlang_c(1, 0.0), 0.0)


def test_slo_override_and_help_on_the_command_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        main(["--slo", "LC:tbt=fast"])
    assert info.value.code == 2
    assert "expected TYPE:ttft=SECONDS,tbt=SECONDS" in capsys.readouterr().err


def test_a_missing_dataset_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "zeus-perseus-frequency-profiles" in err and "is the dataset bundled?" in err

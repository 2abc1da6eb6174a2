"""The v0 default profile table: regeneration, physical sanity, SLOs, an oracle, CSV I/O."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from profiles import PROFILE_COLUMNS, load_profiles, write_profiles_csv
from profiles.calibrate import build_default_profiles, main
from profiles.model import erlang_c, poisson_quantile
from profiles.sources import read_splitwise_perf
from wattplan.domain import REQUEST_TYPES, Profile
from wattplan.errors import InputDataError

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
COMMITTED_CSV = DATA_DIR / "profiles" / "v0.csv"


@pytest.fixture(scope="module")
def profiles() -> list[Profile]:
    return build_default_profiles(DATA_DIR)


def _by_key(profiles: list[Profile]) -> dict[tuple[int, int, str], Profile]:
    return {(p.config.tp, p.config.power_cap_w, p.request_type): p for p in profiles}


def test_regeneration_is_byte_identical_to_committed_csv(tmp_path: Path, capsys) -> None:
    out = tmp_path / "v0.csv"
    assert main(["--data-dir", str(DATA_DIR), "--out", str(out)]) == 0
    assert out.read_bytes() == COMMITTED_CSV.read_bytes()
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 54 and summary["configs"] == 6


def test_committed_csv_loads_back_to_the_built_profiles(profiles: list[Profile]) -> None:
    assert load_profiles(COMMITTED_CSV) == profiles


def test_every_config_has_all_nine_types_with_positive_capacity(profiles: list[Profile]) -> None:
    keys = _by_key(profiles)
    assert len(keys) == len(profiles) == 3 * 2 * 9
    for tp in (2, 4, 8):
        for cap_w in (700, 490):
            for request_type in REQUEST_TYPES:
                profile = keys[(tp, cap_w, request_type)]
                assert profile.capacity_rps > 0
                assert profile.version == "v0"
                assert profile.config.clock_mhz is None


def test_larger_tp_never_has_lower_capacity(profiles: list[Profile]) -> None:
    keys = _by_key(profiles)
    for cap_w in (700, 490):
        for request_type in REQUEST_TYPES:
            capacities = [keys[(tp, cap_w, request_type)].capacity_rps for tp in (2, 4, 8)]
            assert capacities == sorted(capacities), (cap_w, request_type, capacities)


def test_capped_power_stays_under_490_w_per_gpu_and_capacity_under_uncapped(
    profiles: list[Profile],
) -> None:
    keys = _by_key(profiles)
    for tp in (2, 4, 8):
        for request_type in REQUEST_TYPES:
            capped, uncapped = keys[(tp, 490, request_type)], keys[(tp, 700, request_type)]
            assert capped.power_at_capacity_w <= 490 * tp
            assert uncapped.power_at_capacity_w <= 700 * tp
            assert capped.capacity_rps <= uncapped.capacity_rps
            for profile in (capped, uncapped):
                assert 0 < profile.idle_power_w <= profile.power_at_capacity_w


def test_modelled_tail_latencies_meet_the_slos(profiles: list[Profile]) -> None:
    for profile in profiles:
        assert profile.ttft_p99_s <= profile.ttft_slo_s, profile
        assert profile.tbt_p99_s <= profile.tbt_slo_s, profile


def test_slos_are_shared_by_every_config_of_a_type(profiles: list[Profile]) -> None:
    slos = defaultdict(set)
    for profile in profiles:
        slos[profile.request_type].add((profile.ttft_slo_s, profile.tbt_slo_s))
    assert all(len(values) == 1 for values in slos.values())


def test_tp8_uncapped_ll_row_matches_an_independent_oracle(profiles: list[Profile]) -> None:
    # Representative lengths: medians over both raw Azure traces, DynamoLLM default bins.
    inputs, outputs = [], []
    for name in ("code", "conv"):
        path = DATA_DIR / "azure-llm-inference-2023" / f"AzureLLMInferenceTrace_{name}.csv"
        with path.open() as handle:
            for row in csv.DictReader(handle):
                i, o = int(row["ContextTokens"]), int(row["GeneratedTokens"])
                if i >= 1024 and o >= 350:
                    inputs.append(i)
                    outputs.append(o)
    prompt_tokens, output_tokens = statistics.median(inputs), statistics.median(outputs)

    # TP8 uncapped H100 runs: prefill by total prompt tokens, decode by batch size.
    prefill, decode = defaultdict(list), defaultdict(list)
    with (DATA_DIR / "splitwise-sim-perf-model" / "perf_model.csv").open() as handle:
        for row in csv.DictReader(handle):
            if (row["model"], row["hardware"], row["tensor_parallel"]) == (
                "llama2-70b",
                "h100-80gb",
                "8",
            ):
                tokens = int(row["prompt_size"]) * int(row["batch_size"])
                prefill[tokens].append(float(row["prompt_time"]))
                decode[int(row["batch_size"])].append(float(row["token_time"]))
    xs = sorted(prefill)
    log_prefill_ms = np.interp(
        np.log(prompt_tokens), np.log(xs), np.log([np.mean(prefill[x]) for x in xs])
    )
    ttft_slo_s = 5 * np.exp(log_prefill_ms) / 1000
    tbt_slo_s = 5 * np.mean(decode[1]) / 1000

    row = _by_key(profiles)[(8, 700, "LL")]
    assert row.ttft_slo_s == pytest.approx(ttft_slo_s, abs=6e-5)
    assert row.tbt_slo_s == pytest.approx(tbt_slo_s, abs=6e-5)
    # TBT is one decode step at a measured batch size (TP8 has KV room for 64 x LL).
    assert row.tbt_p99_s in {round(np.mean(v) / 1000, 4) for v in decode.values()}
    # Throughput cannot beat 64 slots each decoding the median output at full batch.
    assert row.capacity_rps < 64 / (output_tokens * np.mean(decode[64]) / 1000)
    assert row.idle_power_w == 8 * 120.0


def test_tp2_drops_the_batch_64_run_that_cannot_fit_its_kv_cache() -> None:
    from profiles.calibrate import _kv_tokens
    from profiles.model import build_latency_curves

    # 64 x (512 + 128) = 40,960 KV tokens > what 2 x 80 GB hold next to fp16 weights.
    assert 30_000 < _kv_tokens(2) < 40_960 < _kv_tokens(4)
    curves = build_latency_curves(
        read_splitwise_perf(DATA_DIR, "llama2-70b"), "h100-80gb", 2, _kv_tokens(2)
    )
    assert curves.max_batch == 32


def test_queueing_helpers_match_textbook_values() -> None:
    assert erlang_c(1, 0.3) == pytest.approx(0.3)  # M/M/1: wait probability = utilisation
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(4, 4.0) == 1.0
    assert poisson_quantile(0.0, 0.99) == 0
    assert poisson_quantile(1.0, 0.99) == 4  # P[X<=3] = 0.981, P[X<=4] = 0.996


def test_write_then_load_round_trips_exactly(tmp_path: Path, profiles: list[Profile]) -> None:
    path = tmp_path / "nested" / "table.csv"
    write_profiles_csv(profiles[:3], path)
    assert load_profiles(path) == profiles[:3]
    assert path.read_text().splitlines()[0] == ",".join(PROFILE_COLUMNS)


def _edited_table(tmp_path: Path, line: int, column: str | None, value: str) -> Path:
    """Committed table with one cell (or, if ``column`` is None, a whole line) replaced."""
    lines = COMMITTED_CSV.read_text().splitlines()
    if column is None:
        lines[line - 1] = value
    else:
        cells = lines[line - 1].split(",")  # the committed table has no quoted commas
        cells[PROFILE_COLUMNS.index(column)] = value
        lines[line - 1] = ",".join(cells)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("line", "column", "value", "expected"),
    [
        (4, "request_type", "XX", "line 4: column request_type: 'XX' is not one of"),
        (3, "capacity_rps", "fast", "line 3: column capacity_rps: 'fast' is not a valid float"),
        (7, "capacity_rps", "0", "line 7: column capacity_rps: '0' must be a finite number >0"),
        (6, "clock_mhz", "-5", "line 6: column clock_mhz: '-5' must be"),
        (9, "power_at_capacity_w", "1.0", "line 9: column power_at_capacity_w: .* below idle"),
        (3, "source", "", "line 3: column source: '' must not be empty"),
        (5, None, "v0,llama2-70b", "line 5: expected 15 fields"),
        (1, "tbt_slo_s", "tbt", "line 1: missing column"),
    ],
)
def test_load_profiles_rejects_a_malformed_cell_naming_file_line_and_column(
    tmp_path: Path, line: int, column: str | None, value: str, expected: str
) -> None:
    path = _edited_table(tmp_path, line, column, value)
    with pytest.raises(InputDataError, match=expected) as info:
        load_profiles(path)
    assert str(path) in str(info.value)


def test_load_profiles_rejects_a_duplicate_row(tmp_path: Path) -> None:
    duplicate = COMMITTED_CSV.read_text().splitlines()[3]
    path = _edited_table(tmp_path, 5, None, duplicate)
    with pytest.raises(InputDataError, match="line 5: duplicate of line 4"):
        load_profiles(path)


def test_load_profiles_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="cannot read"):
        load_profiles(tmp_path / "absent.csv")


def test_main_help_exits_cleanly() -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


def test_readers_reject_a_bad_bundled_cell_naming_file_line_and_column(tmp_path: Path) -> None:
    perf = tmp_path / "splitwise-sim-perf-model" / "perf_model.csv"
    perf.parent.mkdir()
    lines = (DATA_DIR / "splitwise-sim-perf-model" / "perf_model.csv").read_text().splitlines()
    perf.write_text("\n".join([lines[0], lines[1], "llama2-70b,x"]) + "\n")
    with pytest.raises(InputDataError, match=r"perf_model.csv: line 3: column tensor_parallel"):
        read_splitwise_perf(tmp_path, "llama2-70b")
    with pytest.raises(InputDataError, match="is the dataset bundled"):
        build_default_profiles(tmp_path / "missing")

"""The calibrated model against the measurements it was fitted on and those held out."""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from profiles.fit import SPLITWISE_HELD_OUT, Calibration, bounded_lstsq, calibrate
from profiles.hardware import H100, LLAMA2_70B
from profiles.physics import decode_ms, decode_power_w

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "data"


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    return calibrate(DATA_DIR)


def test_every_fitted_source_is_within_10_percent_mape(calibration: Calibration) -> None:
    fitted = [c for c in calibration.comparisons if c.split == "fitted"]
    assert {c.source.split()[0] for c in fitted} == {
        "perseus",
        "splitwise",
        "mlenergy-v3",
        "argonne",
    }
    for comparison in fitted:
        assert comparison.mape < 0.10, comparison


def test_held_out_points_of_the_fitted_sources_stay_close(calibration: Calibration) -> None:
    held = {(c.source, c.quantity): c for c in calibration.comparisons if c.split == "held-out"}
    for gpu in ("H100-80GB", "A100-80GB"):
        for quantity in ("prefill time", "decode step time"):
            assert held[(f"splitwise {gpu} llama2-70b", quantity)].mape < 0.12
    assert held[("perseus", "forward time vs clock")].mape < 0.03
    assert held[("perseus", "forward power vs clock")].mape < 0.06


def test_splitwise_decode_error_matches_an_independent_recount(calibration: Calibration) -> None:
    # Oracle: read the raw CSV, average repeated runs, skip held-out and KV-overflowing runs,
    # evaluate the fitted formula, and recount the MAPE.
    runs = defaultdict(list)
    with (DATA_DIR / "splitwise-sim-perf-model" / "perf_model.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["model"] != "llama2-70b" or row["hardware"] != "h100-80gb":
                continue
            key = tuple(int(row[c]) for c in ("tensor_parallel", "prompt_size", "batch_size"))
            key += (int(row["token_size"]),)
            runs[key].append(float(row["token_time"]))
    cal, errors = calibration.gpus[H100.name], []
    for (tp, prompt, batch, output), times in runs.items():
        if tp == 2 and batch == 64:  # 40,960 KV tokens do not fit TP2 next to the weights
            continue
        if (prompt, batch, output) and (
            prompt == SPLITWISE_HELD_OUT["prompt_tokens"]
            or batch == SPLITWISE_HELD_OUT["batch_size"]
            or output == SPLITWISE_HELD_OUT["output_tokens"]
        ):
            continue
        measured = statistics.fmean(times)
        predicted = decode_ms(cal, LLAMA2_70B, batch, prompt + output / 2, tp)
        errors.append(abs(predicted - measured) / measured)
    reported = next(
        c
        for c in calibration.comparisons
        if c.source == "splitwise H100-80GB llama2-70b"
        and c.quantity == "decode step time"
        and c.split == "fitted"
    )
    assert reported.points == len(errors)
    assert reported.mape == pytest.approx(statistics.fmean(errors))


def test_h100_power_curve_rises_with_batch_and_falls_per_gpu_with_tp(
    calibration: Calibration,
) -> None:
    cal = calibration.gpus[H100.name]
    watts = [decode_power_w(cal, b, 1) for b in (0.0, 0.5, 1, 8, 64, 256)]
    assert watts[0] == H100.loaded_idle_w
    assert watts == sorted(watts) and watts[-1] <= H100.tdp_w
    assert decode_power_w(cal, 64, 4) < decode_power_w(cal, 64, 1)
    assert decode_power_w(cal, 64, 1, 800) < decode_power_w(cal, 64, 1, 1980)


def test_bounded_least_squares_solves_a_hand_example() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Unbounded optimum of y = (3, -1, 2) is (3, -1); with b >= 0 it is (2.5, 0).
    assert bounded_lstsq(x, np.array([3.0, -1.0, 2.0]), [-np.inf, -np.inf]) == pytest.approx(
        [3.0, -1.0]
    )
    assert bounded_lstsq(x, np.array([3.0, -1.0, 2.0]), [-np.inf, 0.0]) == pytest.approx([2.5, 0.0])


def test_the_readme_reports_every_error_the_calibration_computes(
    calibration: Calibration,
) -> None:
    readme = (ROOT / "README.md").read_text()
    for c in calibration.comparisons:
        row = c.as_dict()
        line = (
            f"| {row['source']} | {row['quantity']} | {row['split']} | {row['points']} "
            f"| {row['mape_pct']}% | {row['max_ape_pct']}% |"
        )
        assert line in readme, line

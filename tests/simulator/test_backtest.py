"""``wattplan backtest`` end to end on short slices of the bundled workloads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from profiles import load_profiles
from wattplan import store
from wattplan.cli import main
from wattplan.settings import PROJECT_ROOT


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["backtest", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_backtest_on_an_azure_slice_writes_results_and_a_plot(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "bt"
    rc, stdout, stderr = _run(
        capsys,
        "--workload", "azure-code", "--hours", "0.5", "--scale", "4",
        "--policies", "singlepool,heuristic,wattplan,oracle", "--out", str(out), "--json",
    )  # fmt: skip
    assert rc == 0, stderr
    assert "policy wattplan: planned" in stderr  # progress
    doc = json.loads(stdout)
    assert doc["workload"]["mode"] == "per-request"
    policies = doc["policies"]
    assert policies["singlepool"]["peak_gpus"] == 32  # 4 servers of 8 GPUs
    cluster = doc["workload"]["cluster_gpus"]  # what SinglePool or MultiPool needs
    assert cluster >= 32
    assert all(p["peak_gpus"] <= cluster for p in policies.values())
    assert list(policies) == ["singlepool", "heuristic", "wattplan", "oracle"]
    for p in policies.values():
        for key in ("energy_kwh", "gpu_hours", "carbon_kg", "cost_usd", "reconfigurations"):
            assert key in p
        assert set(p["slo_attainment"]) == set(doc["workload"]["pools"])
        assert p["energy_kwh"] > 0 and p["carbon_kg"] > 0 and p["cost_usd"] > 0
        assert "series" not in p  # per-step series only in results.json
    assert policies["singlepool"]["saving_vs_singlepool"] == 0
    # Planning policies say why requests missed: the causes add up to the misses per type.
    assert "slo_miss_causes" not in policies["heuristic"]
    for name in ("wattplan", "oracle"):
        causes = policies[name]["slo_miss_causes"]
        for pool, attained in policies[name]["slo_attainment"].items():
            if attained is not None:
                assert sum(causes[pool].values()) == pytest.approx(1 - attained, abs=1e-3)
    assert all(c["under_forecast"] == 0 for c in policies["oracle"]["slo_miss_causes"].values())
    assert policies["oracle"]["energy_kwh"] <= policies["singlepool"]["energy_kwh"]
    assert set(doc["targets"]) >= {
        "saving_ge_0.5",
        "beats_heuristic_energy",
        "within_10pct_of_oracle",
    }
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["policies"]["wattplan"]["series"]["energy_kwh"]) == saved["workload"]["steps"]
    assert (out / "backtest.png").stat().st_size > 10_000
    with (out / "steps.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * saved["workload"]["steps"]
    total = sum(float(r["energy_kwh"]) for r in rows if r["policy"] == "wattplan")
    assert total == pytest.approx(policies["wattplan"]["energy_kwh"], rel=1e-3)


def test_backtest_on_servegen_runs_every_policy_per_window(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, stdout, stderr = _run(capsys, "--workload", "servegen", "--hours", "3", "--scale", "5")
    assert rc == 0, stderr
    assert "| wattplan |" in stdout and "| oracle |" in stdout
    assert "per-window" in stderr


def test_backtest_reads_profiles_from_the_database(
    capsys: pytest.CaptureFixture[str],
    engine,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with engine.begin() as conn:
        store.write_profiles(conn, load_profiles(PROJECT_ROOT / "data" / "profiles" / "v1.csv"))
    monkeypatch.setenv("WATTPLAN_DATABASE_URL", database_url)
    rc, stdout, stderr = _run(
        capsys,
        "--workload", "azure-conv", "--hours", "0.25", "--scale", "2",
        "--policies", "singlepool,multipool", "--profiles-from-db", "--json",
    )  # fmt: skip
    assert rc == 0, stderr
    assert json.loads(stdout)["policies"]["multipool"]["energy_kwh"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workload", "nowhere.csv"], "does not exist"),
        (["--workload", "azure-code", "--policies", "bogus"], "unknown policies"),
        (["--workload", "servegen", "--step-s", "60"], "its window"),
        (["--workload", "azure-code", "--window-s", "450"], "multiple of the step"),
    ],
)
def test_backtest_refuses_bad_input_with_a_clear_error(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    rc, _, stderr = _run(capsys, *args)
    assert rc == 2
    assert message in stderr

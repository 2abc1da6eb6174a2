"""The profile contract (power curve rules) and the profile CSV format: round trip, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from profiles import PROFILE_COLUMNS, load_profile_records, load_profiles, write_profiles_csv
from profiles.table import LoadPoint, make_record
from wattplan.domain import LayoutItem, Profile, ServingConfig
from wattplan.errors import InputDataError

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
COMMITTED_CSV = DATA_DIR / "profiles" / "v1.csv"
CONFIG = ServingConfig("m", "H100-80GB", 4, 700, 1400)


def _profile(curve: tuple[tuple[float, float], ...], capacity: float = 4.0) -> Profile:
    return Profile(CONFIG, "MM", capacity, curve, 0.2, 0.05, 0.3, 0.1, "t", "hand")


def test_gang_config_counts_all_its_gpus_and_names_the_gang_in_its_key() -> None:
    gang = ServingConfig("m", "H100-80GB", 4, 700, 1980, spp=2, kvp=4)
    assert gang.gpus == 32
    assert gang.key == "m/H100-80GB/tp4/spp2kvp4/cap700/1980mhz"
    assert CONFIG.key == "m/H100-80GB/tp4/cap700/1400mhz"  # unchanged without a gang
    assert LayoutItem("s", "LC", gang, instances=2).gpus == 64


def test_power_interpolates_on_the_curve_and_clamps_outside_it() -> None:
    profile = _profile(((0.0, 400.0), (1.0, 1000.0), (4.0, 1600.0)))
    assert profile.idle_power_w == 400.0
    assert profile.power_at_capacity_w == 1600.0
    assert profile.power_w(0.5) == pytest.approx(700.0)
    assert profile.power_w(2.5) == pytest.approx(1300.0)
    assert profile.power_w(-1.0) == 400.0
    assert profile.power_w(9.0) == 1600.0
    assert profile.energy_per_request_j == pytest.approx(400.0)


@pytest.mark.parametrize(
    ("curve", "message"),
    [
        (((0.0, 400.0),), "at least 2 points"),
        (((0.5, 400.0), (4.0, 900.0)), "start at rate 0.0"),
        (((0.0, 400.0), (2.0, 600.0), (2.0, 700.0), (4.0, 900.0)), "strictly increasing"),
        (((0.0, 400.0), (3.0, 900.0)), "end at capacity_rps=4.0"),
        (((0.0, -1.0), (4.0, 900.0)), "watts must be >= 0"),
    ],
)
def test_profile_rejects_a_bad_power_curve_naming_the_profile(
    curve: tuple[tuple[float, float], ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        _profile(curve)
    assert "m/H100-80GB/tp4/cap700/1400mhz MM" in str(info.value)


def test_write_then_load_round_trips_exactly(tmp_path: Path) -> None:
    points = (
        LoadPoint(0.0, 480.0, 0.05, 0.05, 0.03, 0.03),
        LoadPoint(0.5, 900.5, 0.08, 0.12, 0.031, 0.04),
        LoadPoint(1.000001, 1200.25, 0.09, 0.2, 0.032, 0.045),
    )
    record = make_record(CONFIG, "LC", points, 0.3, 0.05, "vt", "test", method="measured")
    gang = make_record(
        ServingConfig("m", "A100-80GB", 2, 400, None, 2, 8), "SS", points, 0.3, 0.05, "vt", "t"
    )
    path = tmp_path / "nested" / "table.csv"
    write_profiles_csv([record, gang], path)
    assert load_profile_records(path) == [record, gang]
    assert load_profiles(path) == [record.profile, gang.profile]
    assert path.read_text().splitlines()[0] == ",".join(PROFILE_COLUMNS)
    assert record.profile.ttft_p50_s == 0.09 and record.profile.tbt_p99_s == 0.045


def _edited_table(tmp_path: Path, line: int, column: str | None, value: str) -> Path:
    """The committed table's first lines with one cell (or a whole line) replaced."""
    lines = COMMITTED_CSV.read_text().splitlines()[:12]
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
        (5, "kvp", "0", "line 5: column kvp: '0' must be a finite number >0"),
        (9, "power_w", "1;2", "line 9: column load_rps: .* list lengths differ"),
        (8, "load_rps", "0.0;2.0;1.0;3.0;4.0", "line 8: column load_rps: .* must end at"),
        (10, "power_w", "1;2;x;4;5", r"line 10: column power_w: .* item 3 \('x'\) is not a valid"),
        (11, "energy_per_request_j", "1.0", "line 11: column energy_per_request_j: .* disagrees"),
        (3, "method", "guessed", "line 3: column method: 'guessed' is not one of"),
        (3, "source", "", "line 3: column source: '' must not be empty"),
        (5, None, "v1,llama2-70b", "line 5: expected 21 fields"),
        (1, "tbt_slo_s", "tbt", "line 1: missing column"),
    ],
)
def test_load_rejects_a_malformed_cell_naming_file_line_and_column(
    tmp_path: Path, line: int, column: str | None, value: str, expected: str
) -> None:
    path = _edited_table(tmp_path, line, column, value)
    with pytest.raises(InputDataError, match=expected) as info:
        load_profiles(path)
    assert str(path) in str(info.value)


def test_load_rejects_a_curve_that_is_not_increasing_in_rate(tmp_path: Path) -> None:
    lines = COMMITTED_CSV.read_text().splitlines()[:3]
    cells = lines[2].split(",")
    rates = cells[PROFILE_COLUMNS.index("load_rps")].split(";")
    rates[1], rates[2] = rates[2], rates[1]
    cells[PROFILE_COLUMNS.index("load_rps")] = ";".join(rates)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([*lines[:2], ",".join(cells)]) + "\n")
    with pytest.raises(InputDataError, match="line 3: column load_rps: .* strictly increasing"):
        load_profiles(path)


def test_load_rejects_a_duplicate_row(tmp_path: Path) -> None:
    duplicate = COMMITTED_CSV.read_text().splitlines()[3]
    path = _edited_table(tmp_path, 5, None, duplicate)
    with pytest.raises(InputDataError, match="line 5: duplicate of line 4"):
        load_profiles(path)


def test_load_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="cannot read"):
        load_profiles(tmp_path / "absent.csv")

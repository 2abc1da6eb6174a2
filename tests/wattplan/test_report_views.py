"""The report_* views on known data, against numbers computed here independently: a few by
hand (in comments), the rest by a small Python oracle of the rules in docs/reports.md."""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa

from telemetry.reference import GpuPrice, HourlyValue
from wattplan import reporting, store
from wattplan.domain import (
    Layout,
    LayoutItem,
    Plan,
    PlanPrediction,
    PlanStatus,
    Profile,
    ServingConfig,
)
from wattplan.errors import ConfigError
from wattplan.settings import Settings

T0 = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
W = 300  # telemetry window (s)
VERSION = "vt"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


# --- the known data -------------------------------------------------------------------------

A = ServingConfig("m1", "G1", 2, 700)
B = ServingConfig("m1", "G1", 4, 700)
B1410 = ServingConfig("m1", "G1", 4, 700, 1410)
C = ServingConfig("m1", "G1", 8, 700)  # the SinglePool config: largest TP, unlocked clock
C1200 = ServingConfig("m1", "G1", 8, 700, 1200)  # same TP, lower clock: not the baseline

# config -> type -> (capacity rps, idle W, power at capacity W)
CURVES: dict[ServingConfig, dict[str, tuple[float, float, float]]] = {
    A: {"SS": (10, 200, 1000), "LL": (2, 200, 1200), "MS": (5, 200, 1100)},
    B: {"SS": (25, 400, 2000), "LL": (5, 400, 2400), "MS": (12, 400, 2200)},
    B1410: {"SS": (22, 380, 1800), "LL": (4.5, 380, 2100), "MS": (10, 380, 2000)},
    C: {"SS": (60, 800, 4000), "LL": (12, 800, 4400), "MS": (30, 800, 4200)},
    C1200: {"SS": (40, 700, 3000), "LL": (8, 700, 3200), "MS": (20, 700, 3100)},
}
SLO = {"SS": (0.5, 0.1), "LL": (2.0, 0.1), "MS": (1.0, 0.1)}  # (ttft, tbt) seconds

LAYOUT1 = Layout(
    (
        LayoutItem("svc", "SS", A, 2),
        LayoutItem("svc", "SS", B, 1),
        LayoutItem("svc", "LL", A, 1),
    )
)
LAYOUT2 = Layout((LayoutItem("svc", "SS", B1410, 2), LayoutItem("svc", "LL", A, 1)))
# (valid from, plan id, layout)
APPLIED = [(at(0), "p1", LAYOUT1), (at(10), "p2", LAYOUT2)]

# window start (minutes from T0) -> type -> (requests, peak rps, input tokens, output tokens)
LOAD: dict[int, dict[str, tuple[int, float, int, int]]] = {
    -5: {"SS": (600, 3.0, 60_000, 6_000)},
    0: {"SS": (3000, 14.0, 300_000, 30_000), "LL": (300, 1.5, 600_000, 150_000)},
    5: {"SS": (6000, 30.0, 600_000, 60_000), "LL": (300, 2.5, 600_000, 150_000)},
    10: {"SS": (18000, 70.0, 1_800_000, 180_000), "LL": (0, 0.0, 0, 0)},
    15: {"SS": (1500, 8.0, 150_000, 15_000), "LL": (0, 0.0, 0, 0), "MS": (150, 1.0, 60_000, 6_000)},
}
# window start (minutes) -> measured energy (J) of the cluster's instances
MEASURED = {-5: 60_000.0, 0: 900_000.0, 5: 1_200_000.0}
CARBON = {at(-60): 100.0, at(0): 200.0}  # g/kWh per hour; no value for other hours
PRICES = {at(0): 50.0, at(14 * 60): 70.0}  # $/MWh; hour 09:00 falls back to the median 60
GPU_PRICE = 3.0  # median of the offers 2, 3, 10


def _profiles() -> list[Profile]:
    return [
        Profile(
            cfg, rtype, cap, ((0.0, idle), (cap, full)), 0.1, 0.05, *SLO[rtype], VERSION, "test"
        )
        for cfg, types in CURVES.items()
        for rtype, (cap, idle, full) in types.items()
    ]


def _plan(plan_id: str, start: datetime, layout: Layout, energy_kwh: float) -> Plan:
    prediction = PlanPrediction(energy_kwh, energy_kwh * 150.0, 4.2, layout.gpus, 2500.0, 0.1)
    return Plan(plan_id, "c1", start, 600, layout, prediction, {"profile_version": VERSION})


def write_known_data(conn: sa.Connection) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO cluster_sites (cluster, zone, window_s, node_pattern, profile_version)"
            " VALUES ('c1', 'Z1', 300, '%', :v), ('c2', 'Z2', 300, 'east-%', :v)"
        ),
        {"v": VERSION},
    )
    store.write_profiles(conn, _profiles())
    store.write_plan(conn, _plan("p1", at(0), LAYOUT1, 0.5), created_at=at(0))
    store.write_plan(conn, _plan("p2", at(10), LAYOUT2, 0.6), created_at=at(5))
    store.write_plan(conn, _plan("p3", at(20), LAYOUT2, 0.7), created_at=at(15))
    store.record_approval(conn, "p1", "approved", "policy:auto_approve", at(0), "policy")
    store.record_approval(conn, "p2", "approved", "alice", at(8), "looks fine")
    store.record_approval(conn, "p3", "rejected", "bob", at(16), "too many GPUs")
    before = Layout()
    for observed_at, plan_id, layout in APPLIED:
        store.write_applied_state(conn, "c1", observed_at, plan_id, layout)
        store.write_reconfiguration_events(conn, "c1", plan_id, before, layout, observed_at, 420.0)
        store.set_plan_status(conn, plan_id, PlanStatus.APPLIED, observed_at)
        before = layout
    store.set_plan_status(conn, "p3", PlanStatus.REJECTED, at(16))

    windows = []
    for minute, types in LOAD.items():
        for rtype, (count, peak, tin, tout) in types.items():
            windows.append(("svc", rtype, at(minute), W, count, tin, tout, peak, count / W))
    windows.append(("other", "SS", at(0), W, 999, 9, 9, 9.0, 999 / W))  # not the cluster's
    windows.append(("svc", "SS", at(0), 60, 999, 9, 9, 9.0, 999 / 60))  # other window length
    conn.execute(
        sa.text(
            "INSERT INTO request_type_windows (service, request_type, window_start_at, window_s,"
            " request_count, input_tokens, output_tokens, peak_rate_rps, mean_rate_rps)"
            " VALUES (:s, :t, :w, :ws, :n, :i, :o, :p, :m)"
        ),
        [
            dict(zip(("s", "t", "w", "ws", "n", "i", "o", "p", "m"), row, strict=True))
            for row in windows
        ],
    )
    telemetry = [
        ("i0", at(-5), "n1", 2, 60_000.0),
        ("i1", at(0), "n1", 4, 500_000.0),
        ("i2", at(0), "n1", 6, 400_000.0),
        ("i1", at(5), "n1", 4, 700_000.0),
        ("i2", at(5), "n1", 6, 500_000.0),
        ("e1", at(0), "east-1", 8, 999.0),  # the other cluster's node
    ]
    conn.execute(
        sa.text(
            "INSERT INTO instance_windows (instance_id, window_start_at, window_s, node, gpus,"
            " samples, energy_j) VALUES (:i, :w, :ws, :n, :g, 300, :e)"
        ),
        [{"i": i, "w": w, "ws": W, "n": n, "g": g, "e": e} for i, w, n, g, e in telemetry]
        + [{"i": "i1", "w": at(0), "ws": 60, "n": "n1", "g": 4, "e": 1e9}],  # other length
    )
    # Requests with latencies: window 10:00 (SS) and 10:05 (LL).
    logs = [
        ("SS", at(1), 0.2, 0.05, "ok"),  # within
        ("SS", at(2), 0.6, 0.05, "ok"),  # TTFT too slow
        ("SS", at(3), 0.3, 0.2, "ok"),  # TBT too slow
        ("SS", at(4), None, None, "timeout"),  # failed: measured, missed
        ("SS", at(4.5), None, None, None),  # no latency: not measured
        ("LL", at(6), 1.0, 0.05, None),  # within (no outcome counts as ok)
    ]
    conn.execute(
        sa.text(
            "INSERT INTO request_logs (source, line_no, service, arrived_at, input_tokens,"
            " output_tokens, request_type, ttft_s, tbt_s, outcome)"
            " VALUES ('t.jsonl', :n, 'svc', :a, 10, 10, :t, :ttft, :tbt, :o)"
        ),
        [
            {"n": n, "t": t, "a": a, "ttft": ttft, "tbt": tbt, "o": o}
            for n, (t, a, ttft, tbt, o) in enumerate(logs, start=1)
        ],
    )
    store.write_carbon_intensities(conn, [HourlyValue("Z1", h, v) for h, v in CARBON.items()])
    store.write_electricity_prices(conn, [HourlyValue("Z1", h, v) for h, v in PRICES.items()])
    store.write_gpu_prices(
        conn,
        [
            GpuPrice("G1", "x", "a", 2.0),
            GpuPrice("G1", "y", "b", 3.0),
            GpuPrice("G1", "z", "c", 10),
        ],
    )
    forecasts = [
        ("svc", "SS", at(0), "peak", at(0), 12.0, 25.0, 28.0),
        ("svc", "SS", at(0), "old", at(-10), 8.0, 10.0, 11.0),
        ("svc", "LL", at(10), "peak", at(10), 0.5, 1.0, 1.2),
        ("svc", "SS", at(20), "peak", at(20), 5.0, 6.0, 7.0),  # no actuals yet
    ]
    conn.execute(
        sa.text(
            "INSERT INTO load_forecasts (cluster, service, request_type, window_start_at,"
            " window_s, method, made_at, mean_rate_rps, peak_rate_rps, planned_rate_rps,"
            " quantile) VALUES ('c1', :s, :t, :w, 600, :m, :made, :mean, :peak, :plan, 0.95)"
        ),
        [
            dict(zip(("s", "t", "w", "m", "made", "mean", "peak", "plan"), f, strict=True))
            for f in forecasts
        ],
    )
    reporting.refresh_report_views(conn)


@pytest.fixture
def known(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        write_known_data(conn)
    return engine


def query(engine: sa.Engine, sql: str, **params: object) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]


# --- the oracle -----------------------------------------------------------------------------


def power_w(cfg: ServingConfig, rtype: str, rate: float) -> float:
    cap, idle, full = CURVES[cfg][rtype]
    return idle + min(max(rate / cap, 0.0), 1.0) * (full - idle)


@dataclass
class SlotWindow:
    minute: int
    rtype: str
    cfg: ServingConfig
    instances: int
    served_rps: float
    served_peak_rps: float
    modelled_w: float
    share: float
    energy_j: float = 0.0
    measured: bool = False


def layout_at(minute: int) -> tuple[str, Layout] | None:
    in_force = [(p, lay) for start, p, lay in APPLIED if start <= at(minute)]
    return in_force[-1] if in_force else None


def oracle_slots() -> list[SlotWindow]:
    """Modelled power per slot and the measured energy split by it, window by window."""
    out = []
    for minute in sorted(set(LOAD) | set(MEASURED)):
        current = layout_at(minute)
        if current is None:
            continue
        rows = []
        for rtype in {i.request_type for i in current[1].items}:
            items = [i for i in current[1].items if i.request_type == rtype]
            capacity = sum(i.instances * CURVES[i.config][rtype][0] for i in items)
            count, peak, _, _ = LOAD.get(minute, {}).get(rtype, (0, 0.0, 0, 0))
            u = min(1.0, count / W / capacity)
            for i in items:
                cap = CURVES[i.config][rtype][0]
                share = i.instances * cap / capacity
                rows.append(
                    SlotWindow(
                        minute,
                        rtype,
                        i.config,
                        i.instances,
                        u * i.instances * cap,
                        share * min(peak, capacity),
                        i.instances * power_w(i.config, rtype, u * cap),
                        share,
                    )
                )
        total_w = sum(r.modelled_w for r in rows)
        for r in rows:
            if minute in MEASURED:
                r.energy_j, r.measured = MEASURED[minute] * r.modelled_w / total_w, True
            else:
                r.energy_j = r.modelled_w * W
        out.extend(rows)
    return out


def hour_of(minute: int) -> datetime:
    moment = at(minute)
    return moment.replace(minute=0)


def carbon_at(minute: int) -> float:
    return CARBON[hour_of(minute)]


def price_at(minute: int) -> float:
    return PRICES.get(hour_of(minute), 60.0)


def test_power_anchor_by_hand(known: sa.Engine) -> None:
    # 10:00, pool SS: capacity 2 x 10 + 25 = 45 rps, load 10 rps, u = 2/9.
    # A: 2 x (200 + 2/9 x 800) = 755.56 W; B: 400 + 2/9 x 1600 = 755.56 W.
    # Pool LL: A at u = 0.5: 200 + 0.5 x 1000 = 700 W. Total 2211.11 W.
    rows = query(
        known,
        "SELECT request_type, config_key, modelled_power_w, measured_energy_j, utilisation"
        " FROM report_slot_windows WHERE cluster = 'c1' AND window_start_at = :w"
        " AND row_kind = 'slot' ORDER BY request_type, config_key",
        w=at(0),
    )
    power = {(r["request_type"], r["config_key"]): r["modelled_power_w"] for r in rows}
    assert power[("SS", A.key)] == pytest.approx(755.5556, abs=1e-3)
    assert power[("SS", B.key)] == pytest.approx(755.5556, abs=1e-3)
    assert power[("LL", A.key)] == pytest.approx(700.0)
    assert sum(power.values()) == pytest.approx(2211.1111, abs=1e-3)
    # The window's 900 kJ measured split by those shares: LL gets 900k x 700 / 2211.11.
    measured = {(r["request_type"], r["config_key"]): r["measured_energy_j"] for r in rows}
    assert measured[("LL", A.key)] == pytest.approx(900_000 * 700 / 2211.1111, rel=1e-6)
    assert sum(measured.values()) == pytest.approx(900_000.0)


def test_slot_windows_match_the_oracle(known: sa.Engine) -> None:
    rows = query(
        known,
        "SELECT window_start_at, request_type, config_key, instances, gpus, gpu_hours,"
        " served_rps, served_peak_rps, modelled_power_w, energy_j, energy_basis"
        " FROM report_slot_windows WHERE cluster = 'c1' AND row_kind = 'slot'",
    )
    got = {(r["window_start_at"], r["request_type"], r["config_key"]): r for r in rows}
    expected = oracle_slots()
    assert len(got) == len(expected) == 3 + 3 + 2 + 2
    for e in expected:
        r = got[(at(e.minute), e.rtype, e.cfg.key)]
        assert r["instances"] == e.instances
        assert r["gpus"] == e.instances * e.cfg.tp
        assert r["gpu_hours"] == pytest.approx(e.instances * e.cfg.tp * W / 3600)
        assert r["served_rps"] == pytest.approx(e.served_rps)
        assert r["served_peak_rps"] == pytest.approx(e.served_peak_rps)
        assert r["modelled_power_w"] == pytest.approx(e.modelled_w)
        assert r["energy_j"] == pytest.approx(e.energy_j)
        assert r["energy_basis"] == ("measured" if e.measured else "modelled")


def test_unserved_pools_and_unattributed_telemetry_are_rows_of_their_own(
    known: sa.Engine,
) -> None:
    rows = query(
        known,
        "SELECT cluster, window_start_at, row_kind, service, request_type, requests, energy_j,"
        " gpus FROM report_slot_windows WHERE row_kind <> 'slot'"
        " ORDER BY cluster, window_start_at, row_kind",
    )
    simple = [
        (r["cluster"], r["window_start_at"], r["row_kind"], r["request_type"], r["requests"])
        for r in rows
    ]
    assert simple == [
        ("c1", at(-5), "unattributed", None, 0),  # telemetry before the first layout
        ("c1", at(-5), "unserved", "SS", 600),  # requests before the first layout
        ("c1", at(15), "unserved", "MS", 150),  # a type the layout has no pool for
        ("c2", at(0), "unattributed", None, 0),  # east-1 belongs to c2 (longer pattern)
    ]
    assert rows[0]["energy_j"] == 60_000.0 and rows[0]["gpus"] == 2
    assert rows[3]["energy_j"] == 999.0
    assert all(r["energy_j"] == 0 for r in rows if r["row_kind"] == "unserved")


def test_hourly_and_daily_energy_carbon_and_cost(known: sa.Engine) -> None:
    slots = oracle_slots()
    # expected per (hour, type, gpu type) from the oracle; carbon and price of each window's hour
    expected: dict[tuple[datetime, str | None], dict[str, float]] = defaultdict(
        lambda: defaultdict(float)
    )
    for s in slots:
        e = expected[(hour_of(s.minute), s.rtype)]
        kwh = s.energy_j / 3.6e6
        gpu_hours = s.instances * s.cfg.tp * W / 3600
        e["energy_kwh"] += kwh
        e["carbon_kg"] += kwh * carbon_at(s.minute) / 1000
        e["cost_usd"] += gpu_hours * GPU_PRICE + kwh * price_at(s.minute) / 1000
        e["gpu_hours"] += gpu_hours
    # unattributed 09:55: 60 kJ at 100 g/kWh and the median price 60 $/MWh (no GPU type)
    kwh = 60_000 / 3.6e6
    expected[(hour_of(-5), None)].update(
        energy_kwh=kwh, carbon_kg=kwh * 100 / 1000, cost_usd=kwh * 60 / 1000, gpu_hours=2 * W / 3600
    )
    rows = query(
        known,
        "SELECT hour_at, request_type, gpu_type, model, service, energy_kwh, carbon_kg, cost_usd,"
        " gpu_hours, requests, energy_basis, carbon_basis, price_basis FROM report_energy_hourly"
        " WHERE cluster = 'c1'",
    )
    # unserved pools have requests and no energy
    by_key = {(r["hour_at"], r["request_type"]): r for r in rows if r["energy_kwh"] > 0}
    assert set(by_key) == set(expected)
    for key, e in expected.items():
        r = by_key[key]
        for column in ("energy_kwh", "carbon_kg", "cost_usd", "gpu_hours"):
            assert r[column] == pytest.approx(e[column], rel=1e-9), (key, column)
    ss10 = by_key[(hour_of(0), "SS")]
    assert ss10["energy_basis"] == "mixed"  # 10:00-10:05 measured, 10:10-10:15 modelled
    assert (ss10["carbon_basis"], ss10["price_basis"]) == ("hourly", "hourly")
    assert by_key[(hour_of(-5), None)]["price_basis"] == "zone median"

    daily = query(
        known,
        "SELECT day, request_type, energy_kwh, carbon_kg, cost_usd, requests,"
        " price_fallback_hours FROM report_energy_daily WHERE cluster = 'c1'",
    )
    total = sum(e["energy_kwh"] for e in expected.values())
    assert sum(r["energy_kwh"] for r in daily) == pytest.approx(total)
    assert sum(r["cost_usd"] for r in daily) == pytest.approx(
        sum(e["cost_usd"] for e in expected.values())
    )
    assert {r["day"] for r in daily} == {date(2024, 3, 1)}
    # requests per pool and day: every request of the cluster's pools, served or not
    requests: dict[str, float] = defaultdict(float)
    for r in daily:
        if r["request_type"]:
            requests[r["request_type"]] += r["requests"]
    assert requests["SS"] == pytest.approx(600 + 3000 + 6000 + 18000 + 1500)
    assert requests["MS"] == pytest.approx(150)
    c2 = query(known, "SELECT energy_kwh, carbon_kg FROM report_energy_daily WHERE cluster='c2'")
    assert c2 == [{"energy_kwh": pytest.approx(999 / 3.6e6), "carbon_kg": None}]  # no Z2 data


def test_efficiency_per_pool_and_day(known: sa.Engine) -> None:
    slots = oracle_slots()
    rows = {
        r["request_type"]: r
        for r in query(
            known,
            "SELECT request_type, tokens, energy_kwh, j_per_token, g_co2_per_1k_tokens,"
            " usd_per_million_tokens FROM report_efficiency_daily WHERE cluster = 'c1'",
        )
    }
    for rtype in ("SS", "LL"):
        energy_j = sum(s.energy_j for s in slots if s.rtype == rtype)
        carbon_g = sum(s.energy_j / 3.6e6 * carbon_at(s.minute) for s in slots if s.rtype == rtype)
        cost = sum(
            s.instances * s.cfg.tp * W / 3600 * GPU_PRICE + s.energy_j / 3.6e9 * price_at(s.minute)
            for s in slots
            if s.rtype == rtype
        )
        tokens = sum(v[rtype][2] + v[rtype][3] for v in LOAD.values() if rtype in v)
        r = rows[rtype]
        assert r["tokens"] == pytest.approx(tokens)
        assert r["j_per_token"] == pytest.approx(energy_j / tokens)
        assert r["g_co2_per_1k_tokens"] == pytest.approx(carbon_g / tokens * 1000)
        assert r["usd_per_million_tokens"] == pytest.approx(cost / tokens * 1e6)
    # MS was never served: its tokens count, with no energy
    assert rows["MS"]["tokens"] == pytest.approx(66_000) and rows["MS"]["j_per_token"] == 0


def test_plan_against_actual(known: sa.Engine) -> None:
    slots = oracle_slots()
    rows = {r["plan_id"]: r for r in query(known, "SELECT * FROM report_plan_vs_actual")}
    assert set(rows) == {"p1", "p2"}  # p3 was rejected and never ran
    p1, p2 = rows["p1"], rows["p2"]
    p1_kwh = sum(s.energy_j for s in slots if s.minute in (0, 5)) / 3.6e6
    assert p1["actual_energy_kwh"] == pytest.approx(p1_kwh)
    assert p1["actual_energy_kwh"] == pytest.approx(2_100_000 / 3.6e6)  # all measured
    assert p1["actual_energy_basis"] == "measured" and p1["telemetry_coverage"] == 1.0
    assert p1["data_coverage"] == 1.0
    assert p1["energy_error_ratio"] == pytest.approx((p1_kwh - 0.5) / 0.5)
    p2_kwh = sum(s.energy_j for s in slots if s.minute in (10, 15)) / 3.6e6
    assert p2["actual_energy_kwh"] == pytest.approx(p2_kwh)
    assert p2["actual_energy_basis"] == "modelled" and p2["telemetry_coverage"] == 0.0
    assert (p1["predicted_gpus"], p1["actual_max_gpus"]) == (10, 10)
    # SLO: 10:00-10:10 has 5 measured requests (4 SS incl. a timeout, 1 LL), 2 within SLO
    assert p1["requests_with_latency"] == 5
    assert p1["measured_slo_attainment"] == pytest.approx(2 / 5)
    # capacity estimate: LL at 10:05 peaked at 2.5 rps > 2 rps capacity (300 requests missed)
    assert p1["capacity_slo_estimate"] == pytest.approx((9600 - 300) / 9600)
    # p2: SS capacity 2 x 22 = 44 < 70 peak at 10:10; MS had no pool at 10:15
    assert p2["capacity_slo_estimate"] == pytest.approx(1500 / (18000 + 1500 + 150))
    assert p2["measured_slo_attainment"] is None


def test_forecast_against_actual_peak(known: sa.Engine) -> None:
    rows = query(
        known,
        "SELECT request_type, window_start_at, method, actual_mean_rps, actual_peak_rps,"
        " actual_coverage, peak_error_rps, peak_error_ratio, planned_covers_peak"
        " FROM report_forecast_accuracy ORDER BY window_start_at, request_type, method",
    )
    got = {(r["request_type"], r["window_start_at"], r["method"]): r for r in rows}
    ss = got[("SS", at(0), "peak")]
    assert ss["actual_mean_rps"] == pytest.approx((3000 + 6000) / 600)
    assert ss["actual_peak_rps"] == 30.0 and ss["actual_coverage"] == 1.0
    assert ss["peak_error_rps"] == pytest.approx(25.0 - 30.0)
    assert ss["peak_error_ratio"] == pytest.approx(-5.0 / 30.0)
    assert ss["planned_covers_peak"] is False
    assert got[("SS", at(0), "old")]["peak_error_rps"] == pytest.approx(10.0 - 30.0)
    ll = got[("LL", at(10), "peak")]
    assert (ll["actual_peak_rps"], ll["peak_error_ratio"], ll["planned_covers_peak"]) == (
        0.0,
        None,
        True,
    )
    future = got[("SS", at(20), "peak")]
    assert future["actual_peak_rps"] is None and future["actual_coverage"] == 0.0


def baseline_oracle() -> dict[str, float]:
    """SinglePool on config C for the served load of each window with slots (one day)."""
    slots = oracle_slots()
    minutes = sorted({s.minute for s in slots})
    served = {m: defaultdict(float) for m in minutes}
    peak = {m: defaultdict(float) for m in minutes}
    for s in slots:
        served[s.minute][s.rtype] += s.served_rps
        peak[s.minute][s.rtype] += s.served_peak_rps
    cap = {t: CURVES[C][t][0] for t in CURVES[C]}
    instances = max(
        1, math.ceil(max(sum(peak[m][t] / cap[t] for t in peak[m]) for m in minutes) - 1e-9)
    )
    energy_j = carbon_g = cost = 0.0
    for m in minutes:
        # linear profiles: N x idle + sum_t served_t / cap_t x (full_t - idle_t)
        watts = instances * 800 + sum(
            served[m][t] / cap[t] * (CURVES[C][t][2] - CURVES[C][t][1]) for t in served[m]
        )
        e = watts * W
        energy_j += e
        carbon_g += e / 3.6e6 * carbon_at(m)
        cost += e / 3.6e9 * price_at(m) + instances * 8 * W / 3600 * GPU_PRICE
    return {
        "instances": instances,
        "energy_kwh": energy_j / 3.6e6,
        "carbon_kg": carbon_g / 1000,
        "cost_usd": cost,
    }


def test_savings_against_the_single_pool_baseline(known: sa.Engine) -> None:
    base = baseline_oracle()
    # by hand: the highest peak work is 10:10, SS served at capacity 44 rps: 44/60 < 1
    assert base["instances"] == 1
    slots = oracle_slots()
    actual_kwh = sum(s.energy_j for s in slots) / 3.6e6
    modelled_kwh = sum(s.modelled_w * W for s in slots) / 3.6e6
    (row,) = query(known, "SELECT * FROM report_savings_daily WHERE cluster = 'c1'")
    assert row["baseline_config_key"] == C.key
    assert row["baseline_instances"] == 1
    assert row["baseline_energy_kwh"] == pytest.approx(base["energy_kwh"])
    assert row["baseline_carbon_kg"] == pytest.approx(base["carbon_kg"])
    assert row["baseline_cost_usd"] == pytest.approx(base["cost_usd"])
    assert row["energy_kwh"] == pytest.approx(actual_kwh)
    assert row["energy_saving_kwh"] == pytest.approx(base["energy_kwh"] - actual_kwh)
    assert row["modelled_energy_saving_ratio"] == pytest.approx(
        1 - modelled_kwh / base["energy_kwh"]
    )
    assert row["energy_basis"] == "mixed"


def test_approvals_and_reconfigurations(known: sa.Engine) -> None:
    decisions = query(
        known,
        "SELECT plan_id, decided_by, decision, decision_delay_s, automatic"
        " FROM report_plan_decisions ORDER BY plan_id",
    )
    assert [
        (d["plan_id"], d["decided_by"], d["decision"], d["decision_delay_s"], d["automatic"])
        for d in decisions
    ] == [
        ("p1", "policy:auto_approve", "approved", 0.0, True),
        ("p2", "alice", "approved", 180.0, False),
        ("p3", "bob", "rejected", 60.0, False),
    ]
    changes = {r["plan_id"]: r for r in query(known, "SELECT * FROM report_reconfigurations")}
    p1, p2 = changes["p1"], changes["p2"]
    # p1 starts 2 x A (SS), 1 x B (SS), 1 x A (LL): 10 GPUs, 420 s each
    assert (p1["instances_started"], p1["instances_stopped"], p1["gpus_started"]) == (4, 0, 10)
    assert p1["overhead_instance_s"] == pytest.approx(4 * 420)
    assert p1["overhead_gpu_hours"] == pytest.approx(10 * 420 / 3600)
    assert p1["overhead_energy_kwh"] == pytest.approx((3 * 200 + 400) * 420 / 3.6e6)
    assert p1["approved_by"] == "policy:auto_approve"
    # p2 stops 2 x A and 1 x B (SS), starts 2 x B1410: only starts cost time
    assert (p2["instances_started"], p2["instances_stopped"], p2["gpus_stopped"]) == (2, 3, 8)
    assert p2["overhead_energy_kwh"] == pytest.approx(2 * 380 * 420 / 3.6e6)
    (day,) = query(known, "SELECT * FROM report_changes_daily WHERE cluster = 'c1'")
    assert (day["plans"], day["approvals"], day["rejections"]) == (3, 2, 1)
    assert (day["automatic_decisions"], day["human_decisions"]) == (1, 2)
    assert day["mean_human_decision_delay_s"] == pytest.approx(120.0)
    assert (day["instances_started"], day["instances_stopped"]) == (6, 3)


def test_clock_distribution_planned_and_measured(known: sa.Engine) -> None:
    with known.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS gpu_telemetry_p20240301 PARTITION OF gpu_telemetry"
                " FOR VALUES FROM ('2024-03-01 00:00+00') TO ('2024-03-02 00:00+00')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO gpu_telemetry (gpu_uuid, sampled_at, node, gpu_index, instance_id,"
                " sm_clock_mhz) VALUES (:u, :t, :n, 0, :i, :c)"
            ),
            [
                {"u": "g0", "t": at(s), "n": "n1", "i": "i1", "c": 1980 if s < 3 else 1410}
                for s in range(4)
            ]
            + [{"u": "g1", "t": at(0), "n": "n1", "i": None, "c": 1000}]  # unassigned GPU
            + [{"u": "g2", "t": at(0), "n": "east-1", "i": "e1", "c": 900}],  # cluster c2
        )
    rows = query(
        known,
        "SELECT source, clock_mhz, gpu_hours, samples, share FROM report_clock_distribution"
        " WHERE cluster = 'c1' ORDER BY source, clock_mhz NULLS FIRST",
    )
    # planned: 10:00-10:10 10 GPUs unlocked; 10:10-10:20 8 GPUs at 1410 + 2 unlocked
    unlocked = (10 * 2 + 2 * 2) * W / 3600
    locked = 8 * 2 * W / 3600
    assert [(r["source"], r["clock_mhz"]) for r in rows] == [
        ("measured", 1410),
        ("measured", 1980),
        ("planned", None),
        ("planned", 1410),
    ]
    assert rows[0]["samples"] == 1 and rows[1]["samples"] == 3
    assert rows[1]["share"] == pytest.approx(0.75)
    assert rows[2]["gpu_hours"] == pytest.approx(unlocked)
    assert rows[3]["share"] == pytest.approx(locked / (locked + unlocked))


def test_a_piecewise_power_curve_from_a_later_migration_is_used(known: sa.Engine) -> None:
    """profiles gains power_curve (the profiles issue): the views read it through to_jsonb."""
    curve = [[0, 200], [5, 800], [10, 1000]]  # A, SS: concave instead of the line
    with known.begin() as conn:
        conn.execute(sa.text("ALTER TABLE profiles ADD COLUMN IF NOT EXISTS power_curve jsonb"))
        conn.execute(
            sa.text(
                "UPDATE profiles SET power_curve = CAST(:c AS jsonb)"
                " WHERE config_key = :k AND request_type = 'SS'"
            ),
            {"c": str(curve), "k": A.key},
        )
        values = [
            conn.execute(
                sa.text(
                    "SELECT wattplan_profile_power_w(to_jsonb(p), :r) FROM profiles p"
                    " WHERE config_key = :k AND request_type = :t"
                ),
                {"r": rate, "k": A.key, "t": rtype},
            ).scalar_one()
            for rate, rtype in ((2.5, "SS"), (7.5, "SS"), (20, "SS"), (-1, "SS"), (1.0, "LL"))
        ]
        reporting.refresh_report_views(conn)
    assert values == pytest.approx([500.0, 900.0, 1000.0, 200.0, 700.0])  # LL: still the line
    (row,) = query(
        known,
        "SELECT modelled_power_w, utilisation FROM report_slot_windows WHERE window_start_at = :w"
        " AND request_type = 'SS' AND config_key = :k",
        w=at(0),
        k=A.key,
    )
    rate = row["utilisation"] * 10  # per instance, on the curve's first segment
    assert row["modelled_power_w"] == pytest.approx(2 * (200 + rate / 5 * 600))


def test_refresh_is_idempotent_and_sees_new_data(known: sa.Engine) -> None:
    before = query(known, "SELECT * FROM report_slot_windows ORDER BY cluster, window_start_at")
    with known.begin() as conn:
        reporting.refresh_report_views(conn)
    assert query(known, "SELECT * FROM report_slot_windows ORDER BY cluster, window_start_at") == (
        before
    )
    with known.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO instance_windows (instance_id, window_start_at, window_s, node, gpus,"
                " samples, energy_j) VALUES ('i1', :w, 300, 'n1', 4, 300, 1000000)"
            ),
            {"w": at(15)},
        )
        reporting.refresh_report_views(conn)
    (row,) = query(known, "SELECT * FROM report_plan_vs_actual WHERE plan_id = 'p2'")
    assert row["actual_energy_basis"] == "mixed" and row["telemetry_coverage"] == 0.5


def test_site_row_comes_from_settings_and_keeps_the_node_pattern(engine: sa.Engine) -> None:
    settings = Settings(cluster="east", carbon_zone="Z9", ingest_window_s=600, profile_version="v7")
    with engine.begin() as conn:
        reporting.write_cluster_site(conn, settings)
        conn.execute(sa.text("UPDATE cluster_sites SET node_pattern = 'east-%'"))
        reporting.write_cluster_site(conn, settings)
    assert query(engine, "SELECT * FROM cluster_sites") == [
        {
            "cluster": "east",
            "zone": "Z9",
            "window_s": 600,
            "node_pattern": "east-%",
            "profile_version": "v7",
        }
    ]
    with pytest.raises(ConfigError, match="divide 3600"), engine.begin() as conn:
        reporting.write_cluster_site(conn, Settings(ingest_window_s=420, window_s=840))


# --- the read-only role ---------------------------------------------------------------------


@pytest.fixture
def report_role(known: sa.Engine) -> object:
    role = f"wattplan_report_t{uuid.uuid4().hex[:8]}"
    with known.begin() as conn:
        grant = reporting.grant_report_role(conn, role)
    yield grant
    with known.begin() as conn:
        conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
        conn.execute(sa.text(f'DROP ROLE "{role}"'))


def test_report_role_reads_every_report_view(known: sa.Engine, report_role) -> None:  # type: ignore[no-untyped-def]
    assert report_role.created
    assert {"report_energy_daily", "report_slot_windows", "report_savings_daily"} <= set(
        report_role.relations
    )
    with known.connect() as conn:
        conn.execute(sa.text(f'SET ROLE "{report_role.role}"'))
        for name in report_role.relations:
            conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar_one()
        assert conn.execute(sa.text("SELECT count(*) FROM report_savings_daily")).scalar() == 1
        conn.rollback()


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT count(*) FROM plans",
        "SELECT count(*) FROM instance_windows",
        "INSERT INTO plan_approvals (plan_id, decided_at, decided_by, decision)"
        " VALUES ('p1', now(), 'mallory', 'approved')",
        "UPDATE plans SET status = 'approved'",
        "DELETE FROM report_plan_decisions",
        "CREATE TABLE report_evil (x integer)",
        "REFRESH MATERIALIZED VIEW report_slot_windows",
        "INSERT INTO cluster_sites (cluster, zone) VALUES ('x', 'y')",
    ],
)
def test_report_role_cannot_write_or_read_base_tables(
    known: sa.Engine,
    report_role,  # type: ignore[no-untyped-def]
    statement: str,
) -> None:
    with known.connect() as conn:
        conn.execute(sa.text(f'SET ROLE "{report_role.role}"'))
        with pytest.raises(sa.exc.DBAPIError) as caught:
            conn.execute(sa.text(statement))
        conn.rollback()
    assert type(caught.value.orig).__name__ in {
        "InsufficientPrivilege",
        "ObjectNotInPrerequisiteState",
        "WrongObjectType",
    }, caught.value


def test_grant_is_idempotent_and_rejects_odd_role_names(known: sa.Engine, report_role) -> None:  # type: ignore[no-untyped-def]
    with known.begin() as conn:
        again = reporting.grant_report_role(conn, report_role.role)
    assert not again.created and again.relations == report_role.relations
    with pytest.raises(ConfigError, match="role name"), known.begin() as conn:
        reporting.grant_report_role(conn, 'x"; DROP TABLE plans; --')

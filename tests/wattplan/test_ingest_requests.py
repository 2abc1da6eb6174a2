"""load_request_logs against the real PostgreSQL, checked with an independent pandas oracle."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattplan.domain import REQUEST_TYPES
from wattplan.errors import InputDataError
from wattplan.ingest_requests import RequestSource, load_request_logs
from wattplan.settings import PROJECT_ROOT

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
END = START + timedelta(minutes=20)
WINDOW_S = 300
BAD_LINES = [
    '{"arrived_at": "2025-03-01T12:03:00Z", "input_tokens": -4, "output_tokens": 9}',
    '{"arrived_at": "2025-03-01T12:04:00Z", "input_tok',
    "\x00\x01binary",
]


def generate_log(path: Path, n: int = 3000, seed: int = 11) -> pd.DataFrame:
    """Write a JSONL request log and return the truth it was written from."""
    rng = np.random.default_rng(seed)
    offsets_ms = np.sort(rng.integers(-5 * 60_000, 25 * 60_000, n))
    arrived = [START + timedelta(milliseconds=int(ms)) for ms in offsets_ms]
    input_tokens = rng.lognormal(6.0, 1.2, n).astype(int)
    output_tokens = rng.lognormal(4.5, 1.0, n).astype(int)
    kind = rng.choice(["explicit", "token_times", "none"], n, p=[0.7, 0.15, 0.15])
    truth, lines = [], []
    for i in range(n):
        obj: dict[str, object] = {
            "request_id": f"req-{i}",
            "arrived_at": arrived[i].isoformat() if i % 2 else arrived[i].timestamp(),
            "input_tokens": int(input_tokens[i]),
            "output_tokens": int(output_tokens[i]),
            "model": "llama3-70b",
            "pool": "any",
            "instance_id": f"inst-{i % 7}",
            "outcome": "ok",
        }
        ttft = tbt = None
        if kind[i] == "explicit":
            ttft, tbt = float(rng.gamma(2.0, 0.2)), float(rng.gamma(3.0, 0.01))
            obj.update(ttft_s=ttft, tbt_s=tbt, e2e_s=ttft + tbt * int(output_tokens[i]))
        elif kind[i] == "token_times":
            gaps = rng.gamma(3.0, 0.01, 5)
            times = list(np.cumsum(np.concatenate([[rng.gamma(2.0, 0.2)], gaps])))
            obj["token_times_s"] = [float(t) for t in times]
            ttft, tbt = float(times[0]), float(np.diff(times).mean())
        lines.append(json.dumps(obj))
        truth.append(
            {
                "arrived_at": arrived[i],
                "input_tokens": int(input_tokens[i]),
                "output_tokens": int(output_tokens[i]),
                "ttft_s": ttft,
                "tbt_s": tbt,
            }
        )
    lines[100:100] = BAD_LINES  # bad lines arrive between 12:00 and 12:20 neighbours
    path.write_text("\n".join(lines) + "\n")
    return pd.DataFrame(truth)


def oracle(truth: pd.DataFrame, start: datetime, end: datetime) -> pd.DataFrame:
    """Per (window, type): count, token sums, 1-minute peak rate, TTFT/TBT P50/P99."""
    d = truth[(truth.arrived_at >= start) & (truth.arrived_at < end)].copy()
    edges_in, edges_out = [0, 256, 1024, np.inf], [0, 100, 350, np.inf]
    d["request_type"] = pd.cut(d.input_tokens, edges_in, right=False, labels=list("SML")).astype(
        str
    ) + pd.cut(d.output_tokens, edges_out, right=False, labels=list("SML")).astype(str)
    d["window_start_at"] = d.arrived_at.dt.floor(f"{WINDOW_S}s")
    d["minute"] = d.arrived_at.dt.floor("60s")
    keys = ["window_start_at", "request_type"]
    g = d.groupby(keys)
    out = pd.DataFrame(
        {
            "request_count": g.size(),
            "input_tokens": g.input_tokens.sum(),
            "output_tokens": g.output_tokens.sum(),
            "peak_rate_rps": d.groupby([*keys, "minute"]).size().groupby(level=[0, 1]).max() / 60,
            "ttft_p50_s": g.ttft_s.quantile(0.5),
            "ttft_p99_s": g.ttft_s.quantile(0.99),
            "tbt_p50_s": g.tbt_s.quantile(0.5),
            "tbt_p99_s": g.tbt_s.quantile(0.99),
        }
    )
    grid = pd.MultiIndex.from_product(
        [pd.date_range(start, end, freq=f"{WINDOW_S}s", inclusive="left"), list(REQUEST_TYPES)],
        names=keys,
    )
    out = out.reindex(grid)
    counts = ["request_count", "input_tokens", "output_tokens", "peak_rate_rps"]
    out[counts] = out[counts].fillna(0)
    return out


def table(engine: sa.Engine, sql: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(sql))]


def load(engine: sa.Engine, sources: list[RequestSource], start: datetime, end: datetime):  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        return load_request_logs(conn, sources, start, end, window_s=WINDOW_S)


@pytest.fixture
def log_file(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    path = tmp_path / "engine-2025-03-01.jsonl"
    return path, generate_log(path)


def test_windows_match_an_independent_pandas_oracle(
    engine: sa.Engine, log_file: tuple[Path, pd.DataFrame]
) -> None:
    path, truth = log_file
    result = load(engine, [RequestSource("chat", path)], START, END)

    expected = oracle(truth, START, END)
    with engine.connect() as conn:
        got = pd.read_sql(
            "SELECT * FROM request_type_windows WHERE service = 'chat' ORDER BY 3, 2", conn
        ).set_index(["window_start_at", "request_type"])
    assert len(got) == len(expected) == 4 * 9
    got = got.reindex(expected.index)
    for column in ["request_count", "input_tokens", "output_tokens"]:
        assert got[column].tolist() == expected[column].astype(int).tolist(), column
    for column in ["peak_rate_rps", "ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s"]:
        pd.testing.assert_series_equal(
            got[column].astype(float), expected[column].astype(float), rtol=1e-9, check_names=False
        )
    assert got.ttft_p99_s.notna().sum() > 20  # the comparison is not vacuous

    in_interval = int(((truth.arrived_at >= START) & (truth.arrived_at < END)).sum())
    assert result.rows_loaded == in_interval
    assert result.rows_rejected == len(BAD_LINES)
    assert result.rows_read == in_interval + len(BAD_LINES)
    ((count, tokens),) = table(
        engine, "SELECT count(*), sum(input_tokens + output_tokens) FROM request_logs"
    )
    d = truth[(truth.arrived_at >= START) & (truth.arrived_at < END)]
    assert (count, tokens) == (in_interval, int((d.input_tokens + d.output_tokens).sum()))


def test_loading_the_same_interval_twice_leaves_identical_rows(
    engine: sa.Engine, log_file: tuple[Path, pd.DataFrame]
) -> None:
    path, _ = log_file
    sources = [RequestSource("chat", path)]

    def snapshot() -> list[list[tuple]]:
        return [
            table(engine, "SELECT * FROM request_logs ORDER BY source, line_no"),
            table(engine, "SELECT * FROM request_type_windows ORDER BY 1, 2, 3"),
            table(engine, "SELECT * FROM rejected_rows ORDER BY source, line_no"),
            table(engine, "SELECT * FROM ingest_runs ORDER BY 1, 2"),
        ]

    first_result = load(engine, sources, START, END)
    first = snapshot()
    assert load(engine, sources, START, END) == first_result
    assert snapshot() == first
    assert len(first[0]) == first_result.rows_loaded > 0


def test_rows_outside_the_interval_are_neither_loaded_nor_counted(
    engine: sa.Engine, log_file: tuple[Path, pd.DataFrame]
) -> None:
    path, truth = log_file
    sources = [RequestSource("chat", path)]
    edges = [START + timedelta(minutes=m) for m in (-10, 0, 10, 20, 30)]
    results = [load(engine, sources, a, b) for a, b in zip(edges, edges[1:], strict=False)]
    for (a, b), r in zip(zip(edges, edges[1:], strict=False), results, strict=True):
        assert r.rows_loaded == int(((truth.arrived_at >= a) & (truth.arrived_at < b)).sum())
        assert r.rows_read == r.rows_loaded + r.rows_rejected
    lines = [x for x in path.read_bytes().split(b"\n") if x.strip()]
    assert sum(r.rows_read for r in results) == len(lines)  # each line counted exactly once
    assert sum(r.rows_rejected for r in results) == len(BAD_LINES)
    assert table(engine, "SELECT count(*) FROM request_logs") == [(len(truth),)]
    runs = table(
        engine,
        "SELECT rows_read, rows_loaded, rows_rejected FROM ingest_runs"
        " WHERE source_kind = 'request_logs' ORDER BY interval_start_at",
    )
    assert runs == [(r.rows_read, r.rows_loaded, r.rows_rejected) for r in results]


def test_rejected_lines_are_stored_with_file_line_reason_and_raw(
    engine: sa.Engine, log_file: tuple[Path, pd.DataFrame]
) -> None:
    path, _ = log_file
    load(engine, [RequestSource("chat", path)], START, END)
    rows = table(
        engine,
        "SELECT source, line_no, raw, reason, source_kind FROM rejected_rows ORDER BY line_no",
    )
    assert [(r[0], r[1], r[4]) for r in rows] == [
        ("engine-2025-03-01.jsonl", 101 + i, "request_logs") for i in range(3)
    ]
    assert [r[2] for r in rows] == [BAD_LINES[0], BAD_LINES[1], "\x01binary"]
    assert "input_tokens -4 must be in" in rows[0][3]
    assert "NUL" in rows[2][3]


def test_azure_and_jsonl_sources_load_together_by_extension(
    engine: sa.Engine, log_file: tuple[Path, pd.DataFrame]
) -> None:
    path, _ = log_file
    conv = PROJECT_ROOT / "data" / "azure-llm-inference-2023" / "AzureLLMInferenceTrace_conv.csv"
    azure_start = datetime(2023, 11, 16, 18, 30, tzinfo=UTC)
    sources = [RequestSource("conversation", conv), RequestSource("chat", path)]
    result = load(engine, sources, azure_start, azure_start + timedelta(minutes=10))
    assert result.rows_loaded == table(engine, "SELECT count(*) FROM request_logs")[0][0] > 1000
    assert table(engine, "SELECT DISTINCT service FROM request_logs") == [("conversation",)]
    assert table(
        engine, "SELECT service, count(*) FROM request_type_windows GROUP BY 1 ORDER BY 1"
    ) == [("chat", 18), ("conversation", 18)]
    assert result.files == (str(conv), str(path))


def test_a_file_with_the_wrong_header_fails_the_load_and_changes_nothing(
    engine: sa.Engine, log_file: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    path, _ = log_file
    bad = tmp_path / "other.csv"
    bad.write_text("time,in,out\n")
    with pytest.raises(InputDataError, match="other.csv: header"):
        load(engine, [RequestSource("chat", path), RequestSource("chat", bad)], START, END)
    assert table(engine, "SELECT count(*) FROM request_logs") == [(0,)]


def test_two_sources_with_the_same_name_are_refused(tmp_path: Path, engine: sa.Engine) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for folder in (a, b):
        (folder / "x.jsonl").write_text("")
    with pytest.raises(InputDataError, match="share a name"):
        load(
            engine,
            [RequestSource("s", a / "x.jsonl"), RequestSource("s", b / "x.jsonl")],
            START,
            END,
        )


def test_a_rotated_file_reusing_a_name_is_refused_with_advice(
    engine: sa.Engine, tmp_path: Path
) -> None:
    path = tmp_path / "engine.jsonl"
    path.write_text(
        json.dumps({"arrived_at": "2025-03-01T12:01:00Z", "input_tokens": 1, "output_tokens": 1})
        + "\n"
    )
    load(engine, [RequestSource("chat", path)], START, END)
    path.write_text(
        json.dumps({"arrived_at": "2025-03-01T12:21:00Z", "input_tokens": 1, "output_tokens": 1})
        + "\n"
    )
    with pytest.raises(InputDataError, match="distinct, stable source name"):
        load(engine, [RequestSource("chat", path)], END, END + timedelta(minutes=20))


_VALID = [
    '{"arrived_at": "2025-03-01T12:00:05Z", "input_tokens": 300, "output_tokens": 120, '
    '"model": "m", "pool": "MM", "instance_id": "i\\t1", "outcome": "ok", "ttft_s": 0.2}',
    '{"arrived_at": 1740830405.25, "input_tokens": 3000, "output_tokens": 4, '
    '"token_times_s": [0.2, 0.25, 0.3, 0.41], "request_id": 7}',
]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_every_line_the_parser_accepts_fits_the_tables(
    engine: sa.Engine, data: st.DataObject
) -> None:
    lines = []
    for _ in range(data.draw(st.integers(1, 8))):
        text = data.draw(st.sampled_from(_VALID)).encode()
        i = data.draw(st.integers(0, len(text)))
        text = (
            text[:i] + data.draw(st.binary(max_size=3)) + text[i + data.draw(st.integers(0, 3)) :]
        )
        lines.append(text)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.jsonl"
        path.write_bytes(b"\n".join(lines))
        result = load(engine, [RequestSource("chat", path)], START, END)
    stored = table(
        engine,
        "SELECT count(*) FROM request_logs WHERE source = 'fuzz.jsonl'"
        " AND arrived_at >= '2025-03-01T12:00Z' AND arrived_at < '2025-03-01T12:20Z'",
    )
    assert stored == [(result.rows_loaded,)]
    assert result.rows_read == result.rows_loaded + result.rows_rejected

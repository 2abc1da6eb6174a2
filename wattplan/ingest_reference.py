"""Load reference data from a path: grid carbon intensity, electricity and GPU prices, and
ServeGen workload rates. The database edge for ``telemetry.reference`` and
``telemetry.servegen``.

Each loader works in the caller's transaction and returns an
:class:`~wattplan.bulk.IngestResult` (``rows_read == rows_loaded + rows_rejected``): bad rows
go to ``rejected_rows`` (upserted on (source, line_no), ``source_kind`` = the target table),
never raise; a file that cannot be read at all, or lacks a required column, raises
:class:`~wattplan.errors.InputDataError`. Re-running a load leaves identical rows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from telemetry.lines import RejectedRow
from telemetry.reference import (
    parse_carbon_intensity_rows,
    parse_electricity_price_rows,
    parse_gpu_price_rows,
)
from telemetry.servegen import (
    SERVEGEN_DAY0,
    SERVEGEN_WINDOW_S,
    RateWindow,
    TokenWindow,
    client_of,
    parse_rate_trace,
    parse_token_windows,
    workload_rates,
)
from wattplan import store
from wattplan.bulk import IngestResult, copy_rows, upsert_rejected_rows
from wattplan.errors import InputDataError

log = logging.getLogger(__name__)

WORKLOAD_RATE_COLUMNS = (
    "workload",
    "client",
    "window_start_at",
    "window_s",
    "rate_rps",
    "cv",
    "pattern",
    "mean_input_tokens",
    "mean_output_tokens",
)


def _result(
    conn: Connection, path: Path, loaded: int, rejected: Sequence[RejectedRow], kind: str
) -> IngestResult:
    upsert_rejected_rows(conn, rejected, kind)
    result = IngestResult(loaded + len(rejected), loaded, len(rejected), (str(path),))
    log.info("%s: loaded %d rows from %s, rejected %d", kind, loaded, path, len(rejected))
    return result


def load_carbon_intensity(conn: Connection, path: Path) -> IngestResult:
    """Upsert an Electricity Maps hourly CSV into ``grid_carbon_intensities``.

    The zone comes from each row's ``Zone Id``.

    Raises:
        InputDataError: the file cannot be read or lacks a required column.
    """
    parsed = parse_carbon_intensity_rows(path)
    loaded = store.write_carbon_intensities(conn, parsed.rows)
    return _result(conn, path, loaded, parsed.rejected, "grid_carbon_intensities")


def load_electricity_prices(conn: Connection, path: Path, zone: str) -> IngestResult:
    """Upsert a SustainCluster hourly price CSV into ``electricity_prices`` for ``zone``.

    Raises:
        InputDataError: the file cannot be read or lacks a required column.
    """
    parsed = parse_electricity_price_rows(path, zone)
    loaded = store.write_electricity_prices(conn, parsed.rows)
    return _result(conn, path, loaded, parsed.rejected, "electricity_prices")


def load_gpu_prices(conn: Connection, path: Path) -> IngestResult:
    """Upsert the FSDL ``cloud-gpus.csv`` table into ``gpu_prices``.

    Offers without a per-GPU price and repeated (GPU type, provider, offer) rows are
    rejected with their reason, so they stay visible in ``rejected_rows``.

    Raises:
        InputDataError: the file cannot be read or lacks a required column.
    """
    parsed = parse_gpu_price_rows(path)
    loaded = store.write_gpu_prices(conn, parsed.rows)
    return _result(conn, path, loaded, parsed.rejected, "gpu_prices")


def _client_order(path: Path) -> tuple[int, str]:
    match = re.search(r"(\d+)", client_of(path))
    return (int(match.group(1)) if match else -1, path.name)


def load_servegen(
    conn: Connection,
    folder: Path,
    *,
    workload: str | None = None,
    day0_at: datetime = SERVEGEN_DAY0,
    window_s: int = SERVEGEN_WINDOW_S,
    clients: Sequence[str] | None = None,
) -> IngestResult:
    """Load a ServeGen model folder (``chunk-<client>-trace.csv`` [+ ``-dataset.json``]).

    Replaces the workload's rows of the loaded clients in ``workload_rates`` (DELETE, then
    COPY). Each rate window gets the client's mean input/output tokens of the dataset window
    containing it, where the client has a dataset file.

    Row accounting: ``rows_read`` counts trace lines and dataset windows (top-level JSON
    entries); ``rows_loaded`` counts trace lines stored in ``workload_rates`` and dataset
    windows whose token means were read; the rest are rejected. Rejected rows are stored
    with source ``<workload>/<file name>``.

    Args:
        conn: Connection in an open transaction (psycopg 3 driver, for COPY).
        folder: The model folder, e.g. ``data/servegen-alibaba/language/m-large``.
        workload: Name stored in each row; defaults to ``servegen-<folder name>``.
        day0_at: Instant of ServeGen's day 0, 00:00 (see ``telemetry.servegen``).
        window_s: Length of one rate window in seconds (ServeGen: 600).
        clients: Load only these clients (e.g. ``["chunk-61"]``); default all in the folder.

    Raises:
        InputDataError: the folder holds no trace file (of the requested clients), or a
            file cannot be read.
    """
    workload = workload or f"servegen-{folder.name}"
    traces = sorted(folder.glob("*-trace.csv"), key=_client_order)
    if clients is not None:
        wanted = set(clients)
        traces = [t for t in traces if client_of(t) in wanted]
    if not traces:
        raise InputDataError(
            f"no ServeGen *-trace.csv files{' of ' + str(sorted(clients)) if clients else ''} "
            f"in {folder}: point at a model folder such as data/servegen-alibaba/language/m-large"
        )
    rates: list[RateWindow] = []
    tokens: dict[str, tuple[TokenWindow, ...]] = {}
    rejected: list[RejectedRow] = []
    read = used_token_windows = 0
    for trace in traces:
        client = client_of(trace)
        parsed = parse_rate_trace(trace, client=client, source=f"{workload}/{trace.name}")
        rates.extend(parsed.rows)
        rejected.extend(parsed.rejected)
        read += parsed.rows_read
        dataset = trace.with_name(f"{client}-dataset.json")
        if dataset.exists():
            windows = parse_token_windows(
                dataset, client=client, source=f"{workload}/{dataset.name}"
            )
            tokens[client] = windows.windows
            rejected.extend(windows.rejected)
            read += windows.rows_read
            used_token_windows += len(windows.windows)
    rows = workload_rates(rates, tokens, workload=workload, day0_at=day0_at, window_s=window_s)
    conn.execute(
        sa.text("DELETE FROM workload_rates WHERE workload = :w AND client = ANY(:clients)"),
        {"w": workload, "clients": sorted({client_of(t) for t in traces})},
    )
    loaded = copy_rows(
        conn,
        "workload_rates",
        WORKLOAD_RATE_COLUMNS,
        (
            (
                r.workload,
                r.client,
                r.window_start_at,
                r.window_s,
                r.rate_rps,
                r.cv,
                r.pattern,
                r.mean_input_tokens,
                r.mean_output_tokens,
            )
            for r in rows
        ),
    )
    upsert_rejected_rows(conn, rejected, "workload_rates")
    result = IngestResult(
        read, loaded + used_token_windows, len(rejected), tuple(str(t) for t in traces)
    )
    log.info(
        "workload %s: %d rate windows of %d clients loaded, %d rejected rows",
        workload,
        loaded,
        len(traces),
        len(rejected),
    )
    return result

"""Workloads for forecast evaluation: files -> one load series per (service, request type).

- **ServeGen** folders (``chunk-<client>-trace.csv``, optional ``-dataset.json[.xz]``):
  ServeGen publishes per-client 10-minute arrival rates with the fitted inter-arrival
  coefficient of variation (cv), and for some clients 6-hourly token-length distributions.
  Clients are **grouped into request types by their token distributions**: for each
  client, the share of its requests in each of the nine DynamoLLM classes is
  ``sum_w n_w * P_w(input class) * P_w(output class)`` over its 6-hour dataset windows ``w``
  (``n_w`` its requests there; input and output taken as independent within a window,
  ServeGen publishes only the marginals), and the client joins the class holding the
  largest share. Clients without a published distribution form the pool
  ``unclassified``. The 1-minute counts a peak needs are not published: they are drawn
  from the renewal-process approximation of each client's fitted process, a Gamma count
  with mean ``60 * rate`` and variance ``cv^2 * 60 * rate`` per minute, with a fixed seed.
- **Request logs** (Azure trace CSV or JSONL, one service per file): each request is
  classified by its tokens (:class:`wattplan.domain.RequestTypeBins`) and counted per
  minute; minutes cut by the trace's first and last arrival are treated as unobserved.

File reading only; the series are built by :mod:`forecasting.series`.
"""

from __future__ import annotations

import ast
import json
import lzma
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from forecasting.series import LoadSeries, minute_counts_to_series
from telemetry.servegen import SERVEGEN_DAY0, client_of, parse_rate_trace
from wattplan.domain import RequestTypeBins
from wattplan.errors import InputDataError
from wattplan.ingest_requests import RequestSource, parse_source

#: Pool of ServeGen clients that publish no token distribution.
UNCLASSIFIED = "unclassified"
#: Names of the bundled workloads and where they live under the data folder.
BUNDLED = {
    "servegen": "servegen-alibaba/language/m-large",
    "azure-conv": "azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv",
    "azure-code": "azure-llm-inference-2023/AzureLLMInferenceTrace_code.csv",
}
_SERVICE_OF_BUNDLED = {"azure-conv": "conversation", "azure-code": "code"}


@dataclass(frozen=True)
class Workload:
    """Series of a workload and how they were made.

    Attributes:
        name: Workload name (bundled name or the path).
        source: File or folder read.
        series: One series per (service, request type).
        grouping: How requests or clients became request types (for the report).
        notes: Caveats to print with any figure made from it.
    """

    name: str
    source: str
    series: tuple[LoadSeries, ...]
    grouping: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def default_window_s(name: str) -> int:
    """Default evaluation window: 30 min, or 5 min for the one-hour Azure traces."""
    return 300 if name.startswith("azure") else 1800


def load_workload(
    name: str,
    data_dir: Path,
    window_s: int,
    *,
    bins: RequestTypeBins | None = None,
    seed: int = 0,
) -> Workload:
    """A bundled workload by name, or any ServeGen folder or request-log file by path.

    Raises:
        InputDataError: the path does not exist or holds nothing usable.
    """
    bins = bins or RequestTypeBins()
    if name in BUNDLED:
        path = data_dir / BUNDLED[name]
        service = _SERVICE_OF_BUNDLED.get(name)
    else:
        path, service = Path(name), None
    if not path.exists():
        raise InputDataError(
            f"workload {name!r}: {path} does not exist; use one of {', '.join(BUNDLED)} or "
            "the path of a ServeGen model folder or a request-log file (Azure CSV or JSONL)"
        )
    if path.is_dir():
        return servegen_workload(path, window_s, bins=bins, seed=seed, name=name)
    return request_log_workload(path, service or path.stem, window_s, bins=bins, name=name)


# --- ServeGen -------------------------------------------------------------------------------


def read_servegen_dataset(path: Path) -> dict[str, Any]:
    try:
        raw = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
        document = json.loads(raw.decode("utf-8"))
    except (OSError, lzma.LZMAError, ValueError) as exc:
        raise InputDataError(f"cannot read ServeGen dataset {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise InputDataError(f"{path}: not a JSON object of windows")
    return document


def class_shares(literal: Any, edges: tuple[int, int]) -> np.ndarray | None:
    """Shares of a ``{tokens: probability}`` distribution below, between and above edges."""
    try:
        pdf = ast.literal_eval(literal) if isinstance(literal, str) else literal
    except (ValueError, SyntaxError, RecursionError, MemoryError):
        return None
    if not isinstance(pdf, dict):
        return None
    shares = np.zeros(3)
    for tokens, p in pdf.items():
        if isinstance(tokens, bool) or not isinstance(tokens, int | float):
            continue
        if not isinstance(p, int | float):
            continue
        if not (math.isfinite(tokens) and math.isfinite(p)) or p < 0:
            continue
        shares[0 if tokens < edges[0] else 1 if tokens < edges[1] else 2] += p
    total = shares.sum()
    return shares / total if total > 0 else None


def client_type_shares(
    dataset: Mapping[str, Any],
    rate_by_window: Mapping[int, float],
    bins: RequestTypeBins,
    window_s: int = 600,
) -> dict[str, float]:
    """Share of a client's requests per request type, from its token distributions.

    Args:
        dataset: ServeGen dataset document ``{window_start_s: {input_tokens, output_tokens}}``.
        rate_by_window: The client's rate (req/s) per rate-window start (seconds since day 0).
        bins: Token bin edges of the request types.
        window_s: Length of a rate window.

    Returns:
        ``{request_type: share}`` summing to 1, or empty when no window is usable.
    """
    starts = sorted(int(k) for k in dataset if str(k).isdigit())
    matrix = np.zeros((3, 3))
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else start + 21600
        entry = dataset[str(start)]
        if not isinstance(entry, dict):
            continue
        p_in = class_shares(entry.get("input_tokens"), bins.input_edges)
        p_out = class_shares(entry.get("output_tokens"), bins.output_edges)
        requests = sum(r * window_s for t, r in rate_by_window.items() if start <= t < end)
        if p_in is None or p_out is None or requests <= 0:
            continue
        matrix += requests * np.outer(p_in, p_out)
    total = matrix.sum()
    if total <= 0:
        return {}
    classes = "SML"
    return {
        classes[i] + classes[o]: float(matrix[i, o] / total) for i in range(3) for o in range(3)
    }


def _datasets(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        match = re.fullmatch(r"(.+)-dataset\.json(\.xz)?", path.name)
        if match:
            found.setdefault(match.group(1), path)
    return found


def servegen_workload(
    folder: Path,
    window_s: int,
    *,
    bins: RequestTypeBins,
    seed: int = 0,
    name: str | None = None,
    day0_at: datetime = SERVEGEN_DAY0,
) -> Workload:
    """Series of a ServeGen model folder, clients grouped into request types.

    Raises:
        InputDataError: no trace file in the folder, or a file cannot be read.
    """
    traces = sorted(folder.glob("*-trace.csv"))
    if not traces:
        raise InputDataError(f"no ServeGen *-trace.csv files in {folder}")
    datasets = _datasets(folder)
    service = folder.name
    rng = np.random.default_rng(seed)
    day0_minute = int(day0_at.timestamp()) // 60
    per_type: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    members: dict[str, list[str]] = defaultdict(list)
    clients: dict[str, Any] = {}
    first_minute, last_minute = math.inf, -math.inf
    for trace in traces:
        client = client_of(trace)
        rows = parse_rate_trace(trace, client=client).rows
        if not rows:
            continue
        rates = {r.timestamp_s: r.rate_rps for r in rows}
        shares = (
            client_type_shares(read_servegen_dataset(datasets[client]), rates, bins)
            if client in datasets
            else {}
        )
        rtype = max(shares, key=lambda k: shares[k]) if shares else UNCLASSIFIED
        members[rtype].append(client)
        clients[client] = {
            "request_type": rtype,
            "share_in_type": round(shares[rtype], 4) if shares else None,
            "requests": round(sum(r.rate_rps * 600 for r in rows)),
        }
        counts = per_type[rtype]
        for r in rows:
            minute0 = day0_minute + r.timestamp_s // 60
            first_minute = min(first_minute, minute0)
            last_minute = max(last_minute, minute0 + 10)
            mu = r.rate_rps * 60.0
            if mu <= 0:
                for k in range(10):
                    counts[minute0 + k] += 0.0
                continue
            var_ratio = (r.cv or 0.0) ** 2
            draws = (
                rng.gamma(mu / var_ratio, var_ratio, size=10) if var_ratio > 0 else np.full(10, mu)
            )
            for k in range(10):
                counts[minute0 + k] += float(draws[k])
    if not per_type:
        raise InputDataError(f"{folder}: no readable rate rows in its trace files")
    first, last = int(first_minute), int(last_minute)
    series = []
    for rtype in sorted(per_type):
        arr = np.full(last - first, np.nan)
        for minute, count in per_type[rtype].items():
            arr[minute - first] = count
        series.append(
            minute_counts_to_series(
                arr,
                first,
                window_s,
                service=service,
                request_type=rtype,
                members=tuple(sorted(members[rtype])),
            )
        )
    return Workload(
        name or str(folder),
        str(folder),
        tuple(series),
        {
            "method": "clients grouped by token distribution: each client joins the request "
            "type holding the largest share of its requests (sum over its 6-hour dataset "
            "windows of requests x P(input class) x P(output class)); clients without a "
            f"dataset file form {UNCLASSIFIED!r}",
            "bins": {"input_edges": bins.input_edges, "output_edges": bins.output_edges},
            "clients": clients,
        },
        (
            "ServeGen publishes 10-minute rates, not arrivals: 1-minute counts (for the "
            f"peak) are drawn from each client's fitted process (Gamma counts, seed {seed})",
            f"ServeGen day 0 placed at {day0_at.isoformat()} (a Monday; the data names no date)",
        ),
    )


# --- request logs ---------------------------------------------------------------------------


def request_log_workload(
    path: Path,
    service: str,
    window_s: int,
    *,
    bins: RequestTypeBins,
    name: str | None = None,
) -> Workload:
    """Series of one request-log file (Azure CSV or JSONL), one per request type.

    Raises:
        InputDataError: the file cannot be read or holds no request.
    """
    parsed = parse_source(RequestSource(service, path), bins)
    if not parsed.records:
        raise InputDataError(f"{path}: no readable request ({len(parsed.rejected)} rejected)")
    minutes = [int(r.arrived_at.timestamp() // 60) for r in parsed.records]
    first_seen = min(r.arrived_at.timestamp() for r in parsed.records)
    # Minutes cut by the first and last arrival are not fully observed.
    first = math.floor(first_seen / 60) + (0 if first_seen % 60 == 0 else 1)
    last = max(minutes)
    if last <= first:
        raise InputDataError(f"{path}: spans less than one whole minute")
    per_type: dict[str, np.ndarray] = {}
    for r, minute in zip(parsed.records, minutes, strict=True):
        if first <= minute < last:
            arr = per_type.setdefault(r.request_type, np.zeros(last - first))
            arr[minute - first] += 1
    series = tuple(
        minute_counts_to_series(arr, first, window_s, service=service, request_type=t)
        for t, arr in sorted(per_type.items())
    )
    return Workload(
        name or str(path),
        str(path),
        series,
        {
            "method": "each request classified by its tokens into the nine DynamoLLM types",
            "bins": {"input_edges": bins.input_edges, "output_edges": bins.output_edges},
            "requests": len(parsed.records),
            "rejected": len(parsed.rejected),
        },
        (
            f"{(last - first) / 60:.2f} hours of requests: too short for daily seasonality; "
            "every forecast falls back to a baseline",
        )
        if (last - first) < 3 * 1440
        else (),
    )


def describe_series(series: Sequence[LoadSeries]) -> list[dict[str, Any]]:
    """Per-series summary for reports."""
    out = []
    for s in series:
        mean = s.mean_rps[np.isfinite(s.mean_rps)]
        out.append(
            {
                "service": s.service,
                "request_type": s.request_type,
                "windows": len(s),
                "missing_windows": int((~np.isfinite(s.mean_rps)).sum()),
                "mean_rps": round(float(mean.mean()), 4) if mean.size else None,
                "members": list(s.members),
            }
        )
    return out

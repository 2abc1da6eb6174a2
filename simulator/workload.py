"""Workloads the simulator replays, as NumPy arrays (no per-request Python objects).

- :class:`RequestTrace`: one row per request (arrival offset, pool, tokens), from an Azure
  trace CSV or a JSONL request log; replayed by the per-request mode.
- :class:`RateWorkload`: a mean rate and an arrival-burstiness figure (cv) per pool and
  window, from a ServeGen model folder; replayed by the per-window mode.
- :class:`LoadView`: what a policy observes of either (mean and 1-minute peak rate per
  pool and step).

A pool here is ``(service, request type)``. ServeGen publishes rates per *client*, and
token-length distributions for a few clients only: each client's rate is split over the
nine types by the share of its requests in each type, from its 6-hourly distributions
(input and output class taken as independent within a window, ServeGen publishes only the
marginals); clients without a published distribution follow the request-weighted mix of
those with one (``docs/simulator.md``).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from telemetry.requests import AZURE_COLUMNS
from telemetry.servegen import SERVEGEN_DAY0, SERVEGEN_WINDOW_S, client_of, parse_rate_trace
from wattplan.domain import REQUEST_TYPES, RequestTypeBins
from wattplan.errors import InputDataError
from wattplan.workloads import class_shares, read_servegen_dataset

Pool = tuple[str, str]  # (service, request type)

#: Bundled workloads by name: (path under the data folder, service name).
BUNDLED: dict[str, tuple[str, str]] = {
    "azure-conv": ("azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv", "conversation"),
    "azure-code": ("azure-llm-inference-2023/AzureLLMInferenceTrace_code.csv", "code"),
    "servegen": ("servegen-alibaba/language/m-large", "m-large"),
}
#: Representative tokens of each class (inside the default bins) for synthetic requests.
_CLASS_TOKENS_IN = (128, 512, 2048)
_CLASS_TOKENS_OUT = (50, 200, 500)


def classify(
    input_tokens: np.ndarray, output_tokens: np.ndarray, bins: RequestTypeBins
) -> np.ndarray:
    """Index into ``REQUEST_TYPES`` of each request (vectorised ``bins.classify``)."""
    i = np.searchsorted(np.asarray(bins.input_edges), input_tokens, side="right")
    o = np.searchsorted(np.asarray(bins.output_edges), output_tokens, side="right")
    return (i * 3 + o).astype(np.int16)


@dataclass(frozen=True, eq=False)
class RequestTrace:
    """Requests as arrays, sorted by arrival.

    Attributes:
        name: Workload name.
        start_at: Time of offset 0 (aware).
        duration_s: Length of the trace (arrivals lie in ``[0, duration_s)``).
        pools: The pools, indexed by ``pool_code``.
        arrival_s: Arrival offsets (float64, sorted).
        pool_code: Pool of each request (int16).
        input_tokens, output_tokens: Token counts (int32).
        notes: Caveats to report with results.
    """

    name: str
    start_at: datetime
    duration_s: float
    pools: tuple[Pool, ...]
    arrival_s: np.ndarray
    pool_code: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    def sliced(self, start_s: float, end_s: float) -> RequestTrace:
        """The requests of ``[start_s, end_s)``, re-based to offset 0."""
        lo, hi = np.searchsorted(self.arrival_s, [start_s, end_s])
        return RequestTrace(
            self.name,
            self.start_at + timedelta(seconds=start_s),
            min(end_s, self.duration_s) - start_s,
            self.pools,
            self.arrival_s[lo:hi] - start_s,
            self.pool_code[lo:hi],
            self.input_tokens[lo:hi],
            self.output_tokens[lo:hi],
            self.notes,
        )

    def scaled(self, factor: float, seed: int = 0, jitter_s: float = 30.0) -> RequestTrace:
        """``factor`` times the load: each request kept ``floor(factor)`` or one more times.

        Copies beyond the first are moved by a uniform offset within ``+-jitter_s``
        (clamped to the trace), so the minute-level rate scales by ``factor`` while copies
        do not arrive at the same instant. Seeded: the same factor gives the same trace.
        """
        if factor <= 0:
            raise InputDataError(f"scale factor {factor} must be positive")
        rng = np.random.default_rng(seed)
        whole = math.floor(factor)
        copies = np.full(len(self), whole, dtype=np.int64)
        copies += rng.random(len(self)) < (factor - whole)
        source = np.repeat(np.arange(len(self)), copies)
        first = np.ones(source.size, dtype=bool)
        first[1:] = source[1:] != source[:-1]
        arrival = self.arrival_s[source].copy()
        moved = ~first
        arrival[moved] += rng.uniform(-jitter_s, jitter_s, int(moved.sum()))
        np.clip(arrival, 0.0, np.nextafter(self.duration_s, 0.0), out=arrival)
        order = np.argsort(arrival, kind="stable")
        return RequestTrace(
            self.name,
            self.start_at,
            self.duration_s,
            self.pools,
            arrival[order],
            self.pool_code[source][order],
            self.input_tokens[source][order],
            self.output_tokens[source][order],
            self.notes + (f"load scaled x{factor:.4g} (copies jittered +-{jitter_s:g} s)",),
        )


@dataclass(frozen=True, eq=False)
class RateWorkload:
    """Mean arrival rate and burstiness per pool and window.

    Attributes:
        name: Workload name.
        start_at: Start of window 0 (aware).
        window_s: Length of one window.
        pools: Pools, the rows of the arrays.
        rate_rps: Mean arrival rate, shape (pools, windows).
        cv: Coefficient of variation of inter-arrival times (1 = Poisson), same shape.
        notes: Caveats to report with results.
        grouping: How the pools were made (for the report).
    """

    name: str
    start_at: datetime
    window_s: int
    pools: tuple[Pool, ...]
    rate_rps: np.ndarray
    cv: np.ndarray
    notes: tuple[str, ...] = ()
    grouping: dict[str, Any] = field(default_factory=dict)

    @property
    def windows(self) -> int:
        """Number of windows."""
        return int(self.rate_rps.shape[1])

    @property
    def duration_s(self) -> float:
        """Length of the workload."""
        return float(self.windows * self.window_s)

    def sliced(self, first: int, count: int) -> RateWorkload:
        """Windows ``[first, first + count)``."""
        return RateWorkload(
            self.name,
            self.start_at + timedelta(seconds=first * self.window_s),
            self.window_s,
            self.pools,
            self.rate_rps[:, first : first + count],
            self.cv[:, first : first + count],
            self.notes,
            self.grouping,
        )

    def scaled(self, factor: float) -> RateWorkload:
        """``factor`` times the rates (independent copies: cv unchanged)."""
        if factor <= 0:
            raise InputDataError(f"scale factor {factor} must be positive")
        return RateWorkload(
            self.name,
            self.start_at,
            self.window_s,
            self.pools,
            self.rate_rps * factor,
            self.cv,
            self.notes + (f"load scaled x{factor:.4g}",),
            self.grouping,
        )

    def to_requests(self, seed: int = 0) -> RequestTrace:
        """Arrivals drawn from the rates: Poisson where cv is 1, Gamma renewal otherwise.

        Tokens are a representative value of each type's input and output class. Used to
        replay one workload in both modes (agreement checks) and for the speed benchmark.
        """
        rng = np.random.default_rng(seed)
        times: list[np.ndarray] = []
        codes: list[np.ndarray] = []
        for p in range(len(self.pools)):
            for k in range(self.windows):
                rate, cv = float(self.rate_rps[p, k]), float(self.cv[p, k])
                if rate <= 0:
                    continue
                t = _renewal_arrivals(rng, rate, cv, self.window_s) + k * self.window_s
                times.append(t)
                codes.append(np.full(t.size, p, dtype=np.int16))
        arrival = np.concatenate(times) if times else np.zeros(0)
        code = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int16)
        order = np.argsort(arrival, kind="stable")
        arrival, code = arrival[order], code[order]
        type_index = np.array(
            [REQUEST_TYPES.index(t) if t in REQUEST_TYPES else 4 for _, t in self.pools]
        )
        tin = np.array(_CLASS_TOKENS_IN)[type_index // 3]
        tout = np.array(_CLASS_TOKENS_OUT)[type_index % 3]
        return RequestTrace(
            self.name,
            self.start_at,
            self.duration_s,
            self.pools,
            arrival,
            code,
            tin[code].astype(np.int32),
            tout[code].astype(np.int32),
            self.notes + (f"arrivals drawn from the rates (seed {seed})",),
        )


def _renewal_arrivals(
    rng: np.random.Generator, rate: float, cv: float, length_s: float
) -> np.ndarray:
    """Arrival times in ``[0, length_s)`` of a stationary renewal process."""
    if abs(cv - 1.0) < 1e-9:
        n = rng.poisson(rate * length_s)
        return np.sort(rng.uniform(0.0, length_s, n))
    shape = 1.0 / max(cv, 1e-3) ** 2
    expected = rate * length_s
    gaps = rng.gamma(shape, 1.0 / (shape * rate), int(expected + 10 * math.sqrt(expected + 1) + 20))
    t = np.cumsum(gaps) - rng.uniform(0, gaps[0])
    return t[(t >= 0) & (t < length_s)]


# --- loading ----------------------------------------------------------------------------------


def resolve_workload(name: str, data_dir: Path) -> tuple[Path, str | None]:
    """Path and service of a bundled workload name, or ``(Path(name), None)``."""
    if name in BUNDLED:
        rel, service = BUNDLED[name]
        return data_dir / rel, service
    return Path(name), None


def load_workload(
    name: str,
    data_dir: Path,
    *,
    bins: RequestTypeBins | None = None,
) -> RequestTrace | RateWorkload:
    """A bundled workload by name, or any file or folder in a supported format.

    A ``.csv`` file is an Azure trace, ``.jsonl``/``.ndjson``/``.json`` a JSONL request log
    (service: the file's stem); a folder with ``*-trace.csv`` files is a ServeGen model
    folder; any other folder is read as request-log files, one service per file.

    Raises:
        InputDataError: the path does not exist or holds nothing usable.
    """
    bins = bins or RequestTypeBins()
    path, service = resolve_workload(name, data_dir)
    if not path.exists():
        raise InputDataError(
            f"workload {name!r}: {path} does not exist; use one of {', '.join(BUNDLED)} or the "
            "path of an Azure trace (.csv), a JSONL request log, or a ServeGen model folder"
        )
    if path.is_dir():
        if any(path.glob("*-trace.csv")):
            return load_servegen(path, bins=bins, name=name)
        files = sorted(
            p for p in path.iterdir() if p.suffix.lower() in (".csv", ".jsonl", ".ndjson", ".json")
        )
        if not files:
            raise InputDataError(f"{path}: no ServeGen *-trace.csv nor request-log files inside")
        return merge_traces([load_request_file(p, p.stem, bins) for p in files], name)
    return load_request_file(path, service or path.stem, bins, name=name)


def load_request_file(
    path: Path, service: str, bins: RequestTypeBins, *, name: str | None = None
) -> RequestTrace:
    """One request-log file (Azure CSV or JSONL) as a :class:`RequestTrace`.

    Azure traces are read with pandas' C parser; rows it cannot read (bad timestamp or token
    count) are dropped and counted in the notes. JSONL goes through the ingest parser
    (:func:`wattplan.ingest_requests.parse_source`), with the same rejection rules as the
    ingest DAG.

    Raises:
        InputDataError: unreadable file, wrong header, or no usable request.
    """
    from wattplan.ingest_requests import RequestSource, detect_format, parse_source

    fmt = detect_format(path)
    if fmt == "azure":
        at, tin, tout, dropped = _read_azure(path)
    else:
        parsed = parse_source(RequestSource(service, path, "jsonl"), bins)
        dropped = len(parsed.rejected)
        at = np.array([r.arrived_at.timestamp() for r in parsed.records], dtype=np.float64)
        tin = np.array([r.input_tokens for r in parsed.records], dtype=np.int64)
        tout = np.array([r.output_tokens for r in parsed.records], dtype=np.int64)
    if at.size == 0:
        raise InputDataError(f"{path}: no readable request ({dropped} rejected)")
    order = np.argsort(at, kind="stable")
    at, tin, tout = at[order], tin[order], tout[order]
    start = math.floor(at[0])
    codes = classify(tin, tout, bins)
    present = np.unique(codes)
    remap = np.full(9, -1, dtype=np.int16)
    remap[present] = np.arange(present.size, dtype=np.int16)
    pools = tuple((service, REQUEST_TYPES[int(c)]) for c in present)
    notes = (
        (f"{path.name}: {dropped} row(s) could not be read and were left out",) if dropped else ()
    )
    return RequestTrace(
        name or str(path),
        datetime.fromtimestamp(start, UTC),
        float(at[-1] - start) + 1e-6,
        pools,
        at - start,
        remap[codes],
        tin.astype(np.int32),
        tout.astype(np.int32),
        notes,
    )


def _read_azure(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, on_bad_lines="skip")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputDataError(f"cannot read Azure trace {path}: {exc}") from exc
    if tuple(frame.columns) != AZURE_COLUMNS:
        raise InputDataError(
            f"{path}: header {','.join(map(str, frame.columns))!r} is not the Azure trace header "
            f"{','.join(AZURE_COLUMNS)!r}"
        )
    stamps = pd.to_datetime(
        frame["TIMESTAMP"].str.slice(0, 26),
        format="%Y-%m-%d %H:%M:%S.%f",
        errors="coerce",
        utc=True,
    )
    missing_frac = stamps.isna() & frame["TIMESTAMP"].str.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    )
    if missing_frac.any():
        stamps[missing_frac] = pd.to_datetime(
            frame["TIMESTAMP"][missing_frac], format="%Y-%m-%d %H:%M:%S", utc=True
        )
    tin = pd.to_numeric(
        frame["ContextTokens"].where(frame["ContextTokens"].str.isdigit()), errors="coerce"
    )
    tout = pd.to_numeric(
        frame["GeneratedTokens"].where(frame["GeneratedTokens"].str.isdigit()), errors="coerce"
    )
    ok = stamps.notna() & tin.notna() & tout.notna()
    micros = stamps[ok].dt.tz_convert(None).to_numpy().astype("datetime64[us]").astype(np.int64)
    seconds = micros / 1e6
    return (
        seconds.astype(np.float64),
        tin[ok].to_numpy(dtype=np.int64),
        tout[ok].to_numpy(dtype=np.int64),
        int((~ok).sum()),
    )


def merge_traces(traces: Sequence[RequestTrace], name: str) -> RequestTrace:
    """Several traces (e.g. one per service) as one, on a common clock."""
    if len(traces) == 1:
        return traces[0]
    start = min(t.start_at for t in traces)
    pools: list[Pool] = []
    arrivals, codes, tins, touts = [], [], [], []
    end = 0.0
    for t in traces:
        shift = (t.start_at - start).total_seconds()
        remap = np.array([_index_of(pools, p) for p in t.pools], dtype=np.int16)
        arrivals.append(t.arrival_s + shift)
        codes.append(remap[t.pool_code])
        tins.append(t.input_tokens)
        touts.append(t.output_tokens)
        end = max(end, shift + t.duration_s)
    arrival = np.concatenate(arrivals)
    order = np.argsort(arrival, kind="stable")
    return RequestTrace(
        name,
        start,
        end,
        tuple(pools),
        arrival[order],
        np.concatenate(codes)[order],
        np.concatenate(tins)[order],
        np.concatenate(touts)[order],
        tuple(n for t in traces for n in t.notes),
    )


def _index_of(items: list[Pool], item: Pool) -> int:
    if item not in items:
        items.append(item)
    return items.index(item)


# --- ServeGen ---------------------------------------------------------------------------------


def dataset_mix(document: dict[str, Any], bins: RequestTypeBins) -> list[tuple[int, np.ndarray]]:
    """Type mix (9 shares, ``REQUEST_TYPES`` order) of each 6-hour dataset window."""
    mixes = []
    for key in sorted((k for k in document if str(k).isdigit()), key=int):
        entry = document[key]
        if not isinstance(entry, dict):
            continue
        p_in = class_shares(entry.get("input_tokens"), bins.input_edges)
        p_out = class_shares(entry.get("output_tokens"), bins.output_edges)
        if p_in is None or p_out is None:
            continue
        mixes.append((int(key), np.outer(p_in, p_out).ravel()))
    return mixes


def load_servegen(
    folder: Path,
    *,
    bins: RequestTypeBins | None = None,
    name: str | None = None,
    day0_at: datetime = SERVEGEN_DAY0,
) -> RateWorkload:
    """A ServeGen model folder as per-type rates (module docstring for the split).

    Raises:
        InputDataError: no trace file, or no readable rate row.
    """
    bins = bins or RequestTypeBins()
    traces = sorted(folder.glob("*-trace.csv"))
    if not traces:
        raise InputDataError(f"no ServeGen *-trace.csv files in {folder}")
    datasets: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        match = re.fullmatch(r"(.+)-dataset\.json(\.xz)?", path.name)
        if match:
            datasets.setdefault(match.group(1), path)
    rows_by_client = {}
    for trace in traces:
        rows = parse_rate_trace(trace).rows
        if rows:
            rows_by_client[client_of(trace)] = rows
    if not rows_by_client:
        raise InputDataError(f"{folder}: no readable rate rows in its trace files")
    first = min(r.timestamp_s for rows in rows_by_client.values() for r in rows)
    last = max(r.timestamp_s for rows in rows_by_client.values() for r in rows)
    windows = (last - first) // SERVEGEN_WINDOW_S + 1
    rate = np.zeros((9, windows))
    var_num = np.zeros((9, windows))  # sum of rate x (share cv^2 + 1 - share)
    per_client_mix: dict[str, np.ndarray] = {}
    known_requests = np.zeros(9)
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for client, rows in sorted(rows_by_client.items()):
        idx = np.array([(r.timestamp_s - first) // SERVEGEN_WINDOW_S for r in rows])
        lam = np.array([r.rate_rps for r in rows])
        cv2 = np.array([(r.cv if r.cv is not None else 1.0) ** 2 for r in rows])
        mixes = (
            dataset_mix(read_servegen_dataset(datasets[client]), bins) if client in datasets else []
        )
        if not mixes:
            pending.append((idx, lam, cv2))
            continue
        starts = [s for s, _ in mixes]
        share = np.stack(
            [mixes[max(bisect.bisect_right(starts, r.timestamp_s) - 1, 0)][1] for r in rows], axis=1
        )  # (9, rows)
        _accumulate(rate, var_num, idx, lam, cv2, share)
        known_requests += (share * lam).sum(axis=1)
        per_client_mix[client] = (share * lam).sum(axis=1) / max(lam.sum(), 1e-12)
    if known_requests.sum() > 0:
        pooled = known_requests / known_requests.sum()
    else:
        pooled = np.zeros(9)
        pooled[REQUEST_TYPES.index("MM")] = 1.0
    for idx, lam, cv2 in pending:
        _accumulate(rate, var_num, idx, lam, cv2, np.repeat(pooled[:, None], lam.size, axis=1))
    keep = [t for t in range(9) if rate[t].sum() > 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        cv = np.sqrt(np.where(rate > 0, var_num / rate, 1.0))
    service = folder.name
    without = sorted(set(rows_by_client) - set(per_client_mix))
    return RateWorkload(
        name or str(folder),
        day0_at + timedelta(seconds=first),
        SERVEGEN_WINDOW_S,
        tuple((service, REQUEST_TYPES[t]) for t in keep),
        rate[keep],
        cv[keep],
        (
            f"ServeGen day 0 placed at {day0_at.isoformat()} (the data names no date)",
            f"{len(without)} of {len(rows_by_client)} clients publish no token distribution "
            "and follow the request-weighted type mix of the others",
        ),
        {
            "method": "each client's rate split over the nine types by its 6-hourly token "
            "distributions (input and output class independent within a window)",
            "clients_with_distribution": sorted(per_client_mix),
            "clients_with_pooled_mix": without,
            "pooled_mix": {REQUEST_TYPES[t]: round(float(pooled[t]), 4) for t in range(9)},
        },
    )


def _accumulate(
    rate: np.ndarray,
    var_num: np.ndarray,
    idx: np.ndarray,
    lam: np.ndarray,
    cv2: np.ndarray,
    share: np.ndarray,
) -> None:
    """Add one client's split rates; a thinned renewal stream has cv^2 = s cv^2 + 1 - s."""
    for t in range(9):
        part = share[t] * lam
        np.add.at(rate[t], idx, part)
        np.add.at(var_num[t], idx, part * (share[t] * cv2 + 1.0 - share[t]))


# --- what policies observe --------------------------------------------------------------------


def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals] (0 for n = 1)."""
    if n <= 1:
        return 0.0
    from scipy.stats import norm

    x = np.linspace(-8, 8, 4001)
    density = n * norm.pdf(x) * norm.cdf(x) ** (n - 1)
    return float(np.trapezoid(x * density, x))


@dataclass(frozen=True, eq=False)
class LoadView:
    """Observed load per pool and step: what policies see.

    Attributes:
        start_at: Start of step 0.
        step_s: Length of one step.
        pools: Pools (rows).
        mean_rps: Mean arrival rate per pool and step.
        peak_rps: Highest 1-minute rate per pool and step (estimated for rate workloads).
    """

    start_at: datetime
    step_s: int
    pools: tuple[Pool, ...]
    mean_rps: np.ndarray
    peak_rps: np.ndarray

    @property
    def steps(self) -> int:
        """Number of steps."""
        return int(self.mean_rps.shape[1])

    def step_start(self, k: int) -> datetime:
        """Start of step ``k``."""
        return self.start_at + timedelta(seconds=k * self.step_s)


PEAK_BUCKET_S = 60


def view_of(workload: RequestTrace | RateWorkload, step_s: int) -> LoadView:
    """The :class:`LoadView` of a workload on a grid of ``step_s``.

    Request traces: counts per step, and the busiest whole minute per step (``step_s`` a
    multiple of 60, or the step's own mean below a minute). Rate workloads: ``step_s`` must
    equal the workload's window; the 1-minute peak is estimated as the mean plus the
    expected maximum of ``step_s / 60`` normal minute counts with variance
    ``cv^2 x rate x 60`` (renewal approximation).

    Raises:
        InputDataError: the step does not fit the workload.
    """
    if isinstance(workload, RateWorkload):
        if step_s != workload.window_s:
            raise InputDataError(
                f"a rate workload is planned on its own {workload.window_s}-s windows, "
                f"not {step_s} s"
            )
        z = expected_max_normal(max(step_s // PEAK_BUCKET_S, 1))
        sigma = workload.cv * np.sqrt(workload.rate_rps / PEAK_BUCKET_S)
        return LoadView(
            workload.start_at,
            step_s,
            workload.pools,
            workload.rate_rps.copy(),
            workload.rate_rps + z * sigma,
        )
    steps = max(1, math.ceil(workload.duration_s / step_s - 1e-9))
    pools = len(workload.pools)
    k = np.minimum((workload.arrival_s // step_s).astype(np.int64), steps - 1)
    counts = np.bincount(workload.pool_code.astype(np.int64) * steps + k, minlength=pools * steps)
    mean = counts.reshape(pools, steps) / step_s
    if step_s % PEAK_BUCKET_S == 0 and step_s > PEAK_BUCKET_S:
        per = step_s // PEAK_BUCKET_S
        minutes = steps * per
        m = np.minimum((workload.arrival_s // PEAK_BUCKET_S).astype(np.int64), minutes - 1)
        by_minute = np.bincount(
            workload.pool_code.astype(np.int64) * minutes + m, minlength=pools * minutes
        ).reshape(pools, steps, per)
        peak = by_minute.max(axis=2) / PEAK_BUCKET_S
    else:
        peak = mean.copy()
    return LoadView(workload.start_at, step_s, workload.pools, mean, np.maximum(peak, mean))

"""Readers for the bundled public datasets the default profiles are derived from.

The only module of ``profiles`` that reads files. Each reader returns plain frozen values
and raises :class:`~wattplan.errors.InputDataError` naming the file, line and column of
anything it cannot use.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from wattplan.errors import InputDataError

#: Bundled dataset files, relative to the data directory.
SPLITWISE_PERF_CSV = Path("splitwise-sim-perf-model/perf_model.csv")
AZURE_TRACE_CSVS = (
    Path("azure-llm-inference-2023/AzureLLMInferenceTrace_code.csv"),
    Path("azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv"),
)
MLENERGY_V3_MODELS = Path("mlenergy-leaderboard-v3/models")
MLENERGY_V2_CHAT = Path("mlenergy-leaderboard-v2/llm_text_generation/chat")
PERSEUS_DIR = Path("zeus-perseus-frequency-profiles")
ARGONNE_POWER_CSV = Path("argonne-llm-inference-bench/power_results.csv")


@dataclass(frozen=True)
class PerfRow:
    """One measured run of SplitwiseSim's performance model (``perf_model.csv``)."""

    model: str
    hardware: str
    tp: int
    prompt_tokens: int
    batch_size: int
    output_tokens: int
    prompt_time_ms: float
    token_time_ms: float


@dataclass(frozen=True)
class PowerPoint:
    """One ML.ENERGY v3 configuration: average GPU power at a running batch size."""

    model_id: str
    gpu_model: str
    num_gpus: int
    tp: int
    max_num_seqs: int
    avg_batch_size: float
    power_per_gpu_w: float
    median_itl_ms: float = 0.0
    avg_output_len: float = 0.0


@dataclass(frozen=True)
class FrequencyPoint:
    """One Perseus measurement: a pipeline stage's forward or backward pass at a locked clock."""

    stage: int
    instruction: str
    frequency_mhz: int
    time_s: float
    energy_j: float

    @property
    def power_w(self) -> float:
        """Average GPU power over the pass (W)."""
        return self.energy_j / self.time_s


@dataclass(frozen=True)
class BenchPowerPoint:
    """One LLM-Inference-Bench (Argonne) run: a static batch of equal-length requests."""

    hardware: str
    framework: str
    model: str
    gpus: int
    length_tokens: int  # input length = output length
    batch_size: int
    latency_s: float  # end to end for the batch
    throughput_tps: float  # tokens per second
    power_w: float  # average power of the one GPU


@dataclass(frozen=True)
class LeaderboardV2Point:
    """One ML.ENERGY leaderboard v2 configuration (``bs<max>+tp<TP>+pp<PP>.json``)."""

    path: str
    model: str
    gpu: str
    tp: int
    pp: int
    avg_tpot_s: float
    token_throughput_tps: float
    avg_output_tokens: float
    avg_batch_size: float
    max_batch_size: int
    energy_per_request_j: float


def _rows(path: Path, columns: Iterable[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line number, row)`` of a CSV file after checking its header."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise InputDataError(f"{path}: cannot open ({exc}); is the dataset bundled?") from exc
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise InputDataError(f"{path}: line 1: missing column(s) {', '.join(missing)}")
        for row in reader:
            yield reader.line_num, row


def _number(
    path: Path, line: int, row: dict[str, str], column: str, kind: type, zero_ok: bool = False
) -> float:
    """Parse one cell as ``int`` or ``float``; reject negative, zero and non-finite values."""
    text = row.get(column) or ""
    try:
        value = kind(text)
    except ValueError as exc:
        raise InputDataError(
            f"{path}: line {line}: column {column}: {text!r} is not a {kind.__name__}"
        ) from exc
    lowest_ok = value >= 0 if zero_ok else value > 0
    if not lowest_ok or not math.isfinite(value):
        bound = ">= 0" if zero_ok else "> 0"
        raise InputDataError(f"{path}: line {line}: column {column}: {text!r} must be {bound}")
    return value


def read_splitwise_perf(data_dir: Path, model: str) -> tuple[PerfRow, ...]:
    """Read SplitwiseSim's measured prefill and decode times for one model.

    Args:
        data_dir: Folder holding the bundled datasets (``data/``).
        model: Value of the ``model`` column to keep, e.g. ``"llama2-70b"``.

    Returns:
        One :class:`PerfRow` per CSV row of that model, in file order.
    """
    path = data_dir / SPLITWISE_PERF_CSV
    columns = (
        "model",
        "hardware",
        "tensor_parallel",
        "prompt_size",
        "batch_size",
        "token_size",
        "prompt_time",
        "token_time",
    )
    out = []
    for line, row in _rows(path, columns):
        if row["model"] != model:
            continue
        out.append(
            PerfRow(
                model=model,
                hardware=row["hardware"],
                tp=int(_number(path, line, row, "tensor_parallel", int)),
                prompt_tokens=int(_number(path, line, row, "prompt_size", int)),
                batch_size=int(_number(path, line, row, "batch_size", int)),
                output_tokens=int(_number(path, line, row, "token_size", int)),
                prompt_time_ms=_number(path, line, row, "prompt_time", float),
                token_time_ms=_number(path, line, row, "token_time", float),
            )
        )
    if not out:
        raise InputDataError(f"{path}: no rows with model={model!r}")
    return tuple(out)


def read_azure_requests(data_dir: Path) -> tuple[tuple[int, int], ...]:
    """Read ``(input tokens, output tokens)`` of every request in both Azure 2023 traces.

    Args:
        data_dir: Folder holding the bundled datasets (``data/``).

    Returns:
        The code trace's requests followed by the conversation trace's, in file order.
    """
    out: list[tuple[int, int]] = []
    for name in AZURE_TRACE_CSVS:
        path = data_dir / name
        for line, row in _rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
            out.append(
                (
                    int(_number(path, line, row, "ContextTokens", int, zero_ok=True)),
                    int(_number(path, line, row, "GeneratedTokens", int, zero_ok=True)),
                )
            )
    return tuple(out)


def read_mlenergy_v3_power(data_dir: Path, file_stem: str) -> tuple[PowerPoint, ...]:
    """Read the per-configuration average power of one ML.ENERGY v3 model file.

    Args:
        data_dir: Folder holding the bundled datasets (``data/``).
        file_stem: File name without ``.json`` under ``mlenergy-leaderboard-v3/models``,
            e.g. ``"meta-llama__Llama-3.1-70B-Instruct__lm-arena-chat"``.

    Returns:
        One :class:`PowerPoint` per configuration, in file order; ``avg_power_watts``
        (summed over the configuration's GPUs) is divided by ``num_gpus``.
    """
    path = data_dir / MLENERGY_V3_MODELS / f"{file_stem}.json"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        out = []
        for index, cfg in enumerate(payload["configurations"]):
            num_gpus = int(cfg["num_gpus"])
            point = PowerPoint(
                model_id=str(payload["model_id"]),
                gpu_model=str(cfg["gpu_model"]),
                num_gpus=num_gpus,
                tp=int(cfg["parallelization"]["tensor_parallel"]),
                max_num_seqs=int(cfg["max_num_seqs"]),
                avg_batch_size=float(cfg["avg_batch_size"]),
                power_per_gpu_w=float(cfg["avg_power_watts"]) / num_gpus,
                median_itl_ms=float(cfg["median_itl_ms"]),
                avg_output_len=float(cfg["avg_output_len"]),
            )
            if not (point.num_gpus > 0 and point.avg_batch_size > 0 and point.power_per_gpu_w > 0):
                raise InputDataError(f"{path}: configurations[{index}] has non-positive values")
            out.append(point)
    except OSError as exc:
        raise InputDataError(f"{path}: cannot open ({exc}); is the dataset bundled?") from exc
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, InputDataError):
            raise
        raise InputDataError(f"{path}: not an ML.ENERGY v3 model file ({exc!r})") from exc
    return tuple(out)


def read_perseus(data_dir: Path, file_name: str) -> tuple[FrequencyPoint, ...]:
    """Read one Perseus stage profile (time and energy per pass at every locked SM clock).

    Args:
        data_dir: Folder holding the bundled datasets (``data/``).
        file_name: File under ``zeus-perseus-frequency-profiles``, e.g.
            ``"gpt3-175b+a100_sxm_bf16.csv"``.

    Returns:
        One :class:`FrequencyPoint` per CSV row, in file order.
    """
    path = data_dir / PERSEUS_DIR / file_name
    out = []
    for line, row in _rows(path, ("stage", "instruction", "frequency", "time", "energy")):
        instruction = row["instruction"]
        if instruction not in ("forward", "backward"):
            raise InputDataError(
                f"{path}: line {line}: column instruction: {instruction!r} is not "
                "forward or backward"
            )
        out.append(
            FrequencyPoint(
                stage=int(_number(path, line, row, "stage", int, zero_ok=True)),
                instruction=instruction,
                frequency_mhz=int(_number(path, line, row, "frequency", int)),
                time_s=_number(path, line, row, "time", float),
                energy_j=_number(path, line, row, "energy", float),
            )
        )
    if not out:
        raise InputDataError(f"{path}: no data rows")
    return tuple(out)


def read_argonne_power(data_dir: Path) -> tuple[BenchPowerPoint, ...]:
    """Read LLM-Inference-Bench's single-GPU power-vs-batch runs (``power_results.csv``).

    Blank lines in the file are skipped; ``avg_power`` is stored in milliwatts and
    returned in watts.

    Args:
        data_dir: Folder holding the bundled datasets (``data/``).

    Returns:
        One :class:`BenchPowerPoint` per data row, in file order.
    """
    path = data_dir / ARGONNE_POWER_CSV
    columns = (
        "Hardware",
        "Num of Hardware",
        "Framework",
        "Model",
        "Input Output Length",
        "Batch Size",
        "Latency",
        "Throughput",
        "avg_power",
    )
    out = []
    for line, row in _rows(path, columns):
        if not any((value or "").strip() for value in row.values()):
            continue
        out.append(
            BenchPowerPoint(
                hardware=row["Hardware"],
                framework=row["Framework"],
                model=row["Model"],
                gpus=int(_number(path, line, row, "Num of Hardware", int)),
                length_tokens=int(_number(path, line, row, "Input Output Length", int)),
                batch_size=int(_number(path, line, row, "Batch Size", int)),
                latency_s=_number(path, line, row, "Latency", float),
                throughput_tps=_number(path, line, row, "Throughput", float),
                power_w=_number(path, line, row, "avg_power", float) / 1000.0,
            )
        )
    if not out:
        raise InputDataError(f"{path}: no data rows")
    return tuple(out)


def read_mlenergy_v2(data_dir: Path) -> tuple[LeaderboardV2Point, ...]:
    """Read every bundled ML.ENERGY leaderboard v2 chat configuration.

    Args:
        data_dir: Folder holding the bundled datasets (``data/``).

    Returns:
        One :class:`LeaderboardV2Point` per JSON file, sorted by path.
    """
    root = data_dir / MLENERGY_V2_CHAT
    paths = sorted(root.glob("*/*/*/*.json"))
    if not paths:
        raise InputDataError(f"{root}: no configuration files; is the dataset bundled?")
    out = []
    for path in paths:
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
            point = LeaderboardV2Point(
                path=str(path.relative_to(root)),
                model=str(cfg["Model"]),
                gpu=str(cfg["GPU"]),
                tp=int(cfg["TP"]),
                pp=int(cfg["PP"]),
                avg_tpot_s=float(cfg["Avg TPOT (s)"]),
                token_throughput_tps=float(cfg["Token tput (tok/s)"]),
                avg_output_tokens=float(cfg["Avg Output Tokens"]),
                avg_batch_size=float(cfg["Avg BS (reqs)"]),
                max_batch_size=int(cfg["Max BS (reqs)"]),
                energy_per_request_j=float(cfg["Energy/req (J)"]),
            )
        except OSError as exc:
            raise InputDataError(f"{path}: cannot open ({exc})") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise InputDataError(f"{path}: not an ML.ENERGY v2 file ({exc!r})") from exc
        if not (point.avg_tpot_s > 0 and point.avg_batch_size > 0 and point.tp > 0):
            raise InputDataError(f"{path}: non-positive TPOT, batch or TP")
        out.append(point)
    return tuple(out)

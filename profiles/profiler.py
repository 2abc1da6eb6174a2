"""Measure a real OpenAI-compatible streaming endpoint into profile rows (``wattplan profile``).

For each locked SM clock (optional) and each request type, the profiler

1. measures **loaded-idle power**: the instance's NVML energy counters over ``idle_s`` with no
   request in flight;
2. measures the type's **latency alone**: a few requests one after another; TTFT is the time
   from sending to the first streamed token, TBT the gaps between streamed tokens;
3. raises the **load** step by step (Poisson arrivals at a fixed rate for ``step_s``, open
   loop): every request streams; TTFT and TBT come from the stream; instance power is the
   energy counters' increase over the arrival window divided by its length (NVML's
   total-energy counter, not sampled power);
4. stops at the first step whose P99 TTFT or P99 TBT breaks the SLO, or that loses a request
   (error, timeout), optionally bisecting between the last good and the first bad rate;
5. writes one profile row: loaded idle at rate 0, then every passing step; the highest
   passing rate is the **SLO capacity**.

SLOs: ``--slo TYPE:ttft=S,tbt=S`` overrides; otherwise those of the same model and type in
``--slo-table`` (e.g. ``data/profiles/v1.csv``); otherwise ``--slo-multiplier`` (5) x the
latency alone at the first clock profiled (list the highest clock first).

Clocks are locked with ``nvmlDeviceSetGpuLockedClocks`` (needs root or the driver's
permission) and reset with ``nvmlDeviceResetGpuLockedClocks`` when the run ends, fails, is
interrupted (Ctrl-C) or receives SIGTERM. NVML is reached through
``telemetry.nvml_collector`` (one import point for tests to patch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from profiles.table import LoadPoint, ProfileRecord, load_profile_records, make_record
from profiles.table import write_profiles_csv as _write_csv
from telemetry import nvml_collector
from wattplan.domain import REQUEST_TYPES, ServingConfig
from wattplan.errors import ConfigError, WattplanError

#: The engine is asked to stream exactly this many tokens (vLLM honours ``min_tokens`` and
#: ``ignore_eos``; other servers ignore unknown fields and may stop earlier).
PROMPT_WORD = "hello"
PROMPT_TOKEN_ID = 1000


class ProfilerError(WattplanError, RuntimeError):
    """The endpoint or the GPUs could not be measured (the message says what to check)."""


# --- GPUs -----------------------------------------------------------------------------------


class GpuMeter:
    """The instance's GPUs through NVML: summed energy counter, clock locking.

    The energy counter of each GPU is read as a delta from the previous read; a counter
    that goes backwards (driver reload) counts from zero, so no energy is lost or invented.
    """

    def __init__(self, indices: Sequence[int]) -> None:
        nvml_collector.start_nvml()
        pynvml = nvml_collector.pynvml
        try:
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except pynvml.NVMLError as exc:
            raise ProfilerError(f"NVML cannot open GPU(s) {list(indices)}: {exc}") from exc
        self.indices = tuple(indices)
        self._last = [self._counter_mj(h) for h in self.handles]
        self._total_mj = 0
        self.locked = False

    @staticmethod
    def _counter_mj(handle: Any) -> int:
        try:
            return int(nvml_collector.READERS["energy_mj"](handle))
        except nvml_collector.pynvml.NVMLError as exc:
            raise ProfilerError(
                f"NVML cannot read the total-energy counter ({exc}); it needs a Volta or "
                "newer data-centre GPU"
            ) from exc

    def energy_j(self) -> float:
        """Energy of all the instance's GPUs since this meter started (J)."""
        for i, handle in enumerate(self.handles):
            value = self._counter_mj(handle)
            previous = self._last[i]
            self._total_mj += value - previous if value >= previous else value
            self._last[i] = value
        return self._total_mj / 1000.0

    def power_limit_w(self) -> int:
        """Enforced power limit of the first GPU (W)."""
        pynvml = nvml_collector.pynvml
        return round(pynvml.nvmlDeviceGetEnforcedPowerLimit(self.handles[0]) / 1000.0)

    def lock_clocks(self, clock_mhz: int) -> None:
        """Lock every GPU's SM clock to ``clock_mhz``.

        Raises:
            ProfilerError: NVML refused (typically: not root).
        """
        pynvml = nvml_collector.pynvml
        self.locked = True  # set first: a partial lock is reset too
        try:
            for handle in self.handles:
                pynvml.nvmlDeviceSetGpuLockedClocks(handle, clock_mhz, clock_mhz)
        except pynvml.NVMLError as exc:
            raise ProfilerError(
                f"cannot lock the SM clock at {clock_mhz} MHz ({exc}): run as root, or "
                "profile without --clocks"
            ) from exc

    def reset_clocks(self) -> list[str]:
        """Unlock every GPU's clocks (best effort; returns the errors, if any)."""
        pynvml = nvml_collector.pynvml
        errors = []
        for index, handle in zip(self.indices, self.handles, strict=True):
            try:
                pynvml.nvmlDeviceResetGpuLockedClocks(handle)
            except pynvml.NVMLError as exc:
                errors.append(f"GPU {index}: {exc}")
        self.locked = False
        return errors

    def close(self) -> None:
        """Reset clocks if locked and shut NVML down."""
        if self.locked:
            self.reset_clocks()
        with contextlib.suppress(nvml_collector.pynvml.NVMLError):
            nvml_collector.pynvml.nvmlShutdown()


@contextlib.contextmanager
def clock_locked(meter: GpuMeter, clock_mhz: int | None, progress: TextIO | None) -> Iterator[None]:
    """Lock the clock for the block and reset it afterwards, whatever ends the block."""
    if clock_mhz is None:
        yield
        return
    try:
        meter.lock_clocks(clock_mhz)
        _say(progress, f"locked SM clock at {clock_mhz} MHz on GPU(s) {list(meter.indices)}")
        yield
    finally:
        errors = meter.reset_clocks()
        _say(progress, "reset the SM clock" + (f" with errors: {errors}" if errors else ""))


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the block (main thread only), so clean-up
    (clock reset) runs as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestResult:
    """One streamed request as the client saw it."""

    ok: bool
    ttft_s: float | None = None
    gaps_s: tuple[float, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send requests."""

    url: str
    served_model: str
    api: str = "completions"  # or "chat"
    prompt_style: str = "text"  # or "ids" (a list of token ids; exact prompt length)
    timeout_s: float = 300.0

    def payload(self, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
        """Request body asking for a ``prompt_tokens`` prompt and ``output_tokens`` tokens."""
        body: dict[str, Any] = {
            "model": self.served_model,
            "max_tokens": output_tokens,
            "min_tokens": output_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
        }
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": _text_prompt(prompt_tokens)}]
        elif self.prompt_style == "ids":
            body["prompt"] = [PROMPT_TOKEN_ID] * prompt_tokens
        else:
            body["prompt"] = _text_prompt(prompt_tokens)
        return body


def _text_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of text: one common word per token in Llama-style tokenizers."""
    return " ".join([PROMPT_WORD] * max(tokens, 1))


def _chunk_has_token(chunk: Mapping[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


async def send_request(
    client: httpx.AsyncClient, endpoint: Endpoint, prompt_tokens: int, output_tokens: int
) -> RequestResult:
    """Send one streaming request and time its tokens (never raises for endpoint errors)."""
    started = time.perf_counter()
    stamps: list[float] = []
    try:
        async with client.stream(
            "POST",
            endpoint.url,
            json=endpoint.payload(prompt_tokens, output_tokens),
            timeout=endpoint.timeout_s,
        ) as response:
            if response.status_code != 200:
                body = (await response.aread())[:200].decode(errors="replace")
                return RequestResult(False, error=f"HTTP {response.status_code}: {body}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                if _chunk_has_token(json.loads(data)):
                    stamps.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    if not stamps:
        return RequestResult(False, error="the stream carried no token")
    gaps = tuple(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    return RequestResult(True, stamps[0] - started, gaps)


# --- measurement ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]): never below the ``q`` share of values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class StepResult:
    """One load step: offered rate, what came back, power over the arrival window."""

    rate_rps: float
    requests: int
    failed: int
    ttft_p50_s: float
    ttft_p99_s: float
    tbt_p50_s: float
    tbt_p99_s: float
    power_w: float
    window_s: float
    passed: bool
    errors: tuple[str, ...] = ()

    def point(self) -> LoadPoint:
        """The step as a load point (rounded like the calibrated table)."""
        return LoadPoint(
            float(f"{self.rate_rps:.6g}"),
            round(self.power_w, 1),
            round(self.ttft_p50_s, 4),
            round(self.ttft_p99_s, 4),
            round(self.tbt_p50_s, 4),
            round(self.tbt_p99_s, 4),
        )


def summarise(
    rate_rps: float,
    results: Sequence[RequestResult],
    power_w: float,
    window_s: float,
    slo: tuple[float, float],
) -> StepResult:
    """Percentiles of one step and whether it meets the SLOs with no request lost."""
    good = [r for r in results if r.ok and r.ttft_s is not None]
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    gaps = [g for r in good for g in r.gaps_s]
    failed = len(results) - len(good)
    ttft_p99 = percentile(ttfts, 0.99)
    tbt_p99 = percentile(gaps, 0.99) if gaps else 0.0
    passed = bool(good) and failed == 0 and ttft_p99 <= slo[0] and tbt_p99 <= slo[1]
    return StepResult(
        rate_rps=rate_rps,
        requests=len(results),
        failed=failed,
        ttft_p50_s=percentile(ttfts, 0.5) if ttfts else math.nan,
        ttft_p99_s=ttft_p99,
        tbt_p50_s=percentile(gaps, 0.5) if gaps else 0.0,
        tbt_p99_s=tbt_p99,
        power_w=power_w,
        window_s=window_s,
        passed=passed,
        errors=tuple(sorted({r.error for r in results if r.error})),
    )


def poisson_arrivals(rate_rps: float, duration_s: float, rng: random.Random) -> list[float]:
    """Arrival offsets (s) of a Poisson process over ``duration_s``; at least one."""
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate_rps)
        if t >= duration_s:
            return out or [0.0]
        out.append(t)


async def run_load(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    meter: GpuMeter,
    lengths: tuple[int, int],
    rate_rps: float,
    duration_s: float,
    rng: random.Random,
    drain_s: float,
) -> tuple[list[RequestResult], float, float]:
    """Open-loop Poisson load for ``duration_s``; returns the results, the instance's mean
    power over the arrival window (W) and that window's length (s). Requests still running
    ``drain_s`` after the window count as failed (timed out)."""
    arrivals = poisson_arrivals(rate_rps, duration_s, rng)
    start = time.perf_counter()
    energy_start = meter.energy_j()
    tasks = []
    for offset in arrivals:
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send_request(client, endpoint, *lengths)))
    await asyncio.sleep(max(0.0, start + duration_s - time.perf_counter()))
    window_s = time.perf_counter() - start
    power_w = (meter.energy_j() - energy_start) / window_s
    done, pending = await asyncio.wait(tasks, timeout=drain_s)
    for task in pending:
        task.cancel()
    results = [t.result() for t in tasks if t in done]
    results += [RequestResult(False, error="timed out") for _ in pending]
    return results, power_w, window_s


@dataclass(frozen=True)
class ProfilerConfig:
    """What to profile and how hard.

    Attributes:
        endpoint: Where requests go.
        model: wattplan's model name written into the rows.
        gpu_type: wattplan GPU type name, e.g. ``H100-80GB``.
        gpus: NVML indices of the instance's GPUs.
        tp, spp, kvp: Parallel degrees of the instance (``tp x spp x kvp`` GPUs).
        clocks_mhz: SM clocks to lock, in order (``None``: leave the clock alone).
        request_types: Types to profile, with ``lengths[type] = (prompt, output)`` tokens.
        rates_rps: Offered rates tried in order (increasing).
        step_s: Seconds of arrivals per step.
        idle_s: Seconds of the loaded-idle measurement.
        alone_requests: Requests sent one at a time to measure latency alone.
        refine_steps: Bisection steps between the last good and the first bad rate.
        retries: A failing step is measured again up to this many times; the rate fails
            only when every try fails (one stall on a busy host must not halve a capacity).
        slos: Explicit ``(ttft, tbt)`` SLOs per type; others from the multiplier.
        slo_multiplier: SLO = this x latency alone at the first clock.
        version: Profile version of the rows.
        seed: Seed of the arrival process.
        drain_s: Seconds to wait for a step's requests after its arrivals end.
        settle_s: Seconds to let the endpoint go quiet (after an overload step, the engine
            may still be finishing abandoned requests) before measuring loaded idle.
    """

    endpoint: Endpoint
    model: str
    gpu_type: str
    gpus: tuple[int, ...]
    tp: int
    clocks_mhz: tuple[int | None, ...]
    request_types: tuple[str, ...]
    lengths: Mapping[str, tuple[int, int]]
    rates_rps: tuple[float, ...]
    spp: int = 1
    kvp: int = 1
    power_cap_w: int | None = None
    step_s: float = 30.0
    idle_s: float = 10.0
    alone_requests: int = 3
    refine_steps: int = 0
    retries: int = 1
    slos: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    slo_multiplier: float = 5.0
    version: str = "measured"
    seed: int = 0
    drain_s: float = 60.0
    settle_s: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        if not self.gpus:
            problems.append("--gpus names no GPU")
        if self.tp * self.spp * self.kvp != len(self.gpus):
            problems.append(
                f"tp x spp x kvp = {self.tp * self.spp * self.kvp} but --gpus names "
                f"{len(self.gpus)} GPU(s)"
            )
        if not self.rates_rps or any(r <= 0 for r in self.rates_rps):
            problems.append("rates must be positive")
        if list(self.rates_rps) != sorted(set(self.rates_rps)):
            problems.append("rates must be strictly increasing")
        missing = [t for t in self.request_types if t not in self.lengths]
        if missing:
            problems.append(f"no prompt/output lengths for type(s) {missing}")
        if self.retries < 0:
            problems.append("retries must be >= 0")
        if self.step_s <= 0 or self.idle_s <= 0 or self.alone_requests < 1:
            problems.append("step_s and idle_s must be > 0 and alone_requests >= 1")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class ProfileRun:
    """What a profiler run produced (rows, and every step for the record)."""

    records: list[ProfileRecord] = field(default_factory=list)
    steps: list[tuple[int | None, str, StepResult]] = field(default_factory=list)
    idle_w: dict[int | None, float] = field(default_factory=dict)
    alone: dict[tuple[int | None, str], tuple[float, float]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _say(progress: TextIO | None, text: str) -> None:
    if progress is not None:
        print(f"[profile] {text}", file=progress, flush=True)


async def _measure_alone(
    client: httpx.AsyncClient, config: ProfilerConfig, request_type: str
) -> tuple[float, float]:
    """Median TTFT and median TBT of requests sent one at a time."""
    ttfts: list[float] = []
    gaps: list[float] = []
    for _ in range(config.alone_requests):
        result = await send_request(client, config.endpoint, *config.lengths[request_type])
        if not result.ok or result.ttft_s is None:
            raise ProfilerError(
                f"{config.endpoint.url}: a single {request_type} request failed "
                f"({result.error}); is the endpoint up and the model name right?"
            )
        ttfts.append(result.ttft_s)
        gaps.extend(result.gaps_s)
    return percentile(ttfts, 0.5), (percentile(gaps, 0.5) if gaps else 0.0)


async def _profile_type(
    client: httpx.AsyncClient,
    config: ProfilerConfig,
    meter: GpuMeter,
    clock: int | None,
    request_type: str,
    slo: tuple[float, float],
    run: ProfileRun,
    progress: TextIO | None,
) -> list[StepResult]:
    """The passing steps of one type at one clock (increasing rate)."""
    rng = random.Random(f"{config.seed}/{clock}/{request_type}")

    async def measure(rate: float) -> StepResult:
        """One rate, re-measured up to ``config.retries`` times while it fails."""
        for attempt in range(config.retries + 1):
            results, power_w, window_s = await run_load(
                client,
                config.endpoint,
                meter,
                config.lengths[request_type],
                rate,
                config.step_s,
                rng,
                config.drain_s,
            )
            step = summarise(rate, results, power_w, window_s, slo)
            run.steps.append((clock, request_type, step))
            verdict = "pass" if step.passed else "FAIL"
            _say(
                progress,
                f"{clock or 'unlocked'} MHz {request_type} {rate:g} req/s"
                + (f" (try {attempt + 1})" if attempt else "")
                + f": {step.requests} requests ({step.failed} failed),"
                f" P99 TTFT {step.ttft_p99_s:.4f} s (SLO {slo[0]:.4f}),"
                f" P99 TBT {step.tbt_p99_s:.4f} s (SLO {slo[1]:.4f}), {step.power_w:.1f} W"
                f" -> {verdict}" + (f" {list(step.errors)[:2]}" if step.errors else ""),
            )
            if step.passed:
                break
        return step

    passing: list[StepResult] = []
    rates = list(config.rates_rps)
    bad: float | None = None
    while rates:
        rate = rates.pop(0)
        step = await measure(rate)
        if step.passed:
            passing.append(step)
        else:
            bad = rate
            break
    good = passing[-1].rate_rps if passing else 0.0
    for _ in range(config.refine_steps if bad is not None and passing else 0):
        assert bad is not None
        rate = (good + bad) / 2
        step = await measure(rate)
        _say(progress, f"refine {rate:g} req/s -> {'pass' if step.passed else 'FAIL'}")
        if step.passed:
            passing.append(step)
            good = rate
        else:
            bad = rate
    return sorted(passing, key=lambda s: s.rate_rps)


async def _profile(config: ProfilerConfig, meter: GpuMeter, progress: TextIO | None) -> ProfileRun:
    run = ProfileRun()
    power_cap_w = config.power_cap_w or meter.power_limit_w()
    slos: dict[str, tuple[float, float]] = {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits) as client:
        for clock in config.clocks_mhz:
            with clock_locked(meter, clock, progress):
                await asyncio.sleep(config.settle_s)
                start, started = meter.energy_j(), time.perf_counter()
                await asyncio.sleep(config.idle_s)
                idle_w = (meter.energy_j() - start) / (time.perf_counter() - started)
                run.idle_w[clock] = idle_w
                _say(progress, f"{clock or 'unlocked'} MHz: loaded idle {idle_w:.1f} W")
                config_key = ServingConfig(
                    config.model,
                    config.gpu_type,
                    config.tp,
                    power_cap_w,
                    clock,
                    config.spp,
                    config.kvp,
                )
                for request_type in config.request_types:
                    alone = await _measure_alone(client, config, request_type)
                    run.alone[(clock, request_type)] = alone
                    if request_type not in slos:
                        ttft, tbt = config.slos.get(request_type, (None, None))
                        slos[request_type] = (
                            ttft if ttft is not None else config.slo_multiplier * alone[0],
                            tbt if tbt is not None else config.slo_multiplier * alone[1],
                        )
                    _say(
                        progress,
                        f"{clock or 'unlocked'} MHz {request_type}: alone TTFT {alone[0]:.4f} s,"
                        f" TBT {alone[1]:.4f} s",
                    )
                    passing = await _profile_type(
                        client,
                        config,
                        meter,
                        clock,
                        request_type,
                        slos[request_type],
                        run,
                        progress,
                    )
                    if not passing:
                        run.skipped.append(f"{config_key.key} {request_type}")
                        _say(progress, f"{config_key.key} {request_type}: no rate meets the SLOs")
                        continue
                    idle = LoadPoint(
                        0.0,
                        round(idle_w, 1),
                        round(alone[0], 4),
                        round(alone[0], 4),
                        round(alone[1], 4),
                        round(alone[1], 4),
                    )
                    run.records.append(
                        make_record(
                            config_key,
                            request_type,
                            (idle, *(s.point() for s in passing)),
                            ttft_slo_s=round(slos[request_type][0], 4),
                            tbt_slo_s=round(slos[request_type][1], 4),
                            version=config.version,
                            source=(
                                f"wattplan profile {config.endpoint.url} "
                                f"(served model {config.endpoint.served_model}), NVML GPUs "
                                f"{'/'.join(str(g) for g in config.gpus)}, "
                                f"{sum(s.requests for s in passing)} requests"
                            ),
                            method="measured",
                        )
                    )
    return run


def run_profiler(
    config: ProfilerConfig, meter: GpuMeter | None = None, progress: TextIO | None = sys.stderr
) -> ProfileRun:
    """Profile the endpoint (see the module docstring); clocks are reset however it ends.

    Args:
        config: What to profile.
        meter: The instance's GPUs (default: opened through NVML from ``config.gpus``).
        progress: Stream for progress lines (None: quiet).

    Raises:
        ProfilerError: The endpoint fails a single request or NVML refuses a call.
        NvmlUnavailableError: NVML cannot start.
        KeyboardInterrupt: Ctrl-C or SIGTERM (after the clocks are reset).
    """
    meter = meter or GpuMeter(config.gpus)
    try:
        with sigterm_as_interrupt():
            return asyncio.run(_profile(config, meter, progress))
    finally:
        meter.close()


# --- command line ---------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 0.5,1,2") from exc


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 0,1") from exc


def _lengths_arg(text: str) -> dict[str, tuple[int, int]]:
    out = {}
    try:
        for part in text.split(","):
            name, _, value = part.partition("=")
            prompt, _, output = value.partition(":")
            out[name.strip()] = (int(prompt), int(output))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected TYPE=PROMPT:OUTPUT,... e.g. SS=143:16,LL=1091:409"
        ) from exc
    return out


def _endpoint_url(base: str, api: str) -> str:
    base = base.rstrip("/")
    if base.endswith(("/completions", "/chat/completions")):
        return base
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    return base[: -len("/v1")] + path if base.endswith("/v1") else base + path


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``wattplan profile``."""
    from profiles.calibrate import _parse_override  # the same TYPE:ttft=S,tbt=S syntax

    p = argparse.ArgumentParser(
        prog="wattplan profile",
        description=(
            "Measure an OpenAI-compatible streaming endpoint (vLLM or similar) into profile "
            "rows: per clock and request type, loaded-idle power, latency alone, then "
            "increasing Poisson load until the P99 TTFT/TBT SLO breaks; GPU energy from the "
            "NVML counters of --gpus over each step."
        ),
    )
    p.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name in the rows (e.g. llama3.1-8b)")
    p.add_argument("--served-model", help="model name the endpoint expects (default --model)")
    p.add_argument("--gpus", type=_ints, required=True, help="NVML indices of the instance, 0,1")
    p.add_argument("--gpu-type", default="H100-80GB", help="GPU type name (default H100-80GB)")
    p.add_argument("--tp", type=int, help="tensor-parallel degree (default: number of GPUs)")
    p.add_argument("--spp", type=int, default=1, help="sequence-pipeline degree (default 1)")
    p.add_argument("--kvp", type=int, default=1, help="KV-parallel degree (default 1)")
    p.add_argument("--power-cap-w", type=int, help="written as power_cap_w (default: NVML)")
    p.add_argument(
        "--clocks", type=_ints, default=(), help="SM clocks to lock, MHz, highest first (root)"
    )
    p.add_argument("--types", default=",".join(REQUEST_TYPES), help="request types to profile")
    p.add_argument(
        "--lengths",
        type=_lengths_arg,
        default={},
        help="TYPE=PROMPT:OUTPUT tokens (default: bundled Azure 2023 medians)",
    )
    p.add_argument("--rates", type=_floats, help="offered rates, req/s, increasing")
    p.add_argument("--start-rate", type=float, default=0.5, help="first rate (default 0.5)")
    p.add_argument("--growth", type=float, default=2.0, help="rate ratio per step (default 2)")
    p.add_argument("--max-steps", type=int, default=8, help="steps when --rates is absent")
    p.add_argument("--refine", type=int, default=0, help="bisection steps after the first FAIL")
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="re-measure a failing step this many times; a rate fails only if every try fails",
    )
    p.add_argument("--step-s", type=float, default=30.0, help="seconds of arrivals per step")
    p.add_argument("--idle-s", type=float, default=10.0, help="seconds of idle measurement")
    p.add_argument("--alone", type=int, default=3, help="requests measured alone per type")
    p.add_argument("--drain-s", type=float, default=60.0, help="wait for a step's requests")
    p.add_argument("--settle-s", type=float, default=5.0, help="quiet time before idle")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    p.add_argument(
        "--slo",
        type=_parse_override,
        action="append",
        default=[],
        metavar="TYPE:ttft=S,tbt=S",
        help="absolute SLO per type (repeatable)",
    )
    p.add_argument("--slo-table", type=Path, help="take SLOs from this profile CSV")
    p.add_argument("--slo-multiplier", type=float, default=5.0, help="x latency alone")
    p.add_argument("--api", choices=["completions", "chat"], default="completions")
    p.add_argument("--prompt-style", choices=["text", "ids"], default="text")
    p.add_argument("--version", default="measured", help="profile version of the rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    p.add_argument("--out", type=Path, required=True, help="CSV to write (profile format)")
    p.add_argument("--db", action="store_true", help="also upsert the rows into the database")
    return p


def _default_lengths() -> dict[str, tuple[int, int]]:
    from profiles.model import representative_lengths
    from profiles.sources import read_azure_requests
    from wattplan.domain import RequestTypeBins
    from wattplan.settings import Settings

    medians = representative_lengths(
        read_azure_requests(Settings.from_env().data_dir), RequestTypeBins()
    )
    return {t: (round(p), round(n)) for t, (p, n) in medians.items()}


def _slos_from(
    args: argparse.Namespace, model: str, types: Sequence[str]
) -> dict[str, tuple[float | None, float | None]]:
    slos: dict[str, tuple[float | None, float | None]] = {}
    if args.slo_table:
        for record in load_profile_records(args.slo_table):
            p = record.profile
            if p.config.model == model and p.request_type in types:
                slos.setdefault(p.request_type, (p.ttft_slo_s, p.tbt_slo_s))
    slos.update(dict(args.slo))
    return slos


def config_from_args(args: argparse.Namespace) -> ProfilerConfig:
    """Turn parsed arguments into a validated :class:`ProfilerConfig`."""
    types = tuple(t.strip() for t in args.types.split(",") if t.strip())
    lengths = {**(_default_lengths() if not all(t in args.lengths for t in types) else {})}
    lengths.update(args.lengths)
    rates = args.rates or tuple(
        round(args.start_rate * args.growth**k, 6) for k in range(args.max_steps)
    )
    return ProfilerConfig(
        endpoint=Endpoint(
            _endpoint_url(args.endpoint, args.api),
            args.served_model or args.model,
            args.api,
            args.prompt_style,
            args.timeout_s,
        ),
        model=args.model,
        gpu_type=args.gpu_type,
        gpus=tuple(args.gpus),
        tp=args.tp or len(args.gpus) // (args.spp * args.kvp),
        spp=args.spp,
        kvp=args.kvp,
        power_cap_w=args.power_cap_w,
        clocks_mhz=tuple(args.clocks) or (None,),
        request_types=types,
        lengths=lengths,
        rates_rps=tuple(rates),
        step_s=args.step_s,
        idle_s=args.idle_s,
        alone_requests=args.alone,
        refine_steps=args.refine,
        retries=args.retries,
        slos=_slos_from(args, args.model, types),
        slo_multiplier=args.slo_multiplier,
        version=args.version,
        seed=args.seed,
        drain_s=args.drain_s,
        settle_s=args.settle_s,
    )


def write_to_database(records: Sequence[ProfileRecord], csv_path: Path, endpoint: str) -> int:
    """Upsert measured records and describe their version(s) in the configured database."""
    from wattplan import store
    from wattplan.jobs import engine_for
    from wattplan.settings import Settings

    engine = engine_for(Settings.from_env())
    digest = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    with engine.begin() as conn:
        for version in sorted({r.profile.version for r in records}):
            rows = [r for r in records if r.profile.version == version]
            store.write_profile_version(
                conn,
                version,
                f"{len(rows)} measured profiles of {endpoint}",
                csv_path.name,
                digest,
                len(rows),
            )
        return store.write_profile_records(conn, records)


def main(argv: Sequence[str] | None = None) -> int:
    """``wattplan profile``: measure, write the CSV (and the database with ``--db``).

    Returns:
        0 when rows were written, 1 when no rate met the SLOs, 2 on bad input or a failed
        endpoint/NVML, 130 on Ctrl-C (clocks reset, nothing written).
    """
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        run = run_profiler(config, progress=sys.stderr)
    except KeyboardInterrupt:
        print("wattplan: interrupted; GPU clocks were reset, nothing written", file=sys.stderr)
        return 130
    except WattplanError as exc:
        print(f"wattplan: error: {exc}", file=sys.stderr)
        return 2
    _write_csv(run.records, args.out)
    summary: dict[str, Any] = {
        "out": str(args.out),
        "rows": len(run.records),
        "steps": len(run.steps),
        "skipped": run.skipped,
        "capacity_rps": {
            f"{r.profile.config.key} {r.profile.request_type}": r.profile.capacity_rps
            for r in run.records
        },
    }
    if args.db and run.records:
        summary["db_rows"] = write_to_database(run.records, args.out, config.endpoint.url)
    print(json.dumps(summary, sort_keys=True))
    return 0 if run.records else 1

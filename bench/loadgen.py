"""Load generators: wrk (closed loop, preferred), an aiohttp fallback, and an open-loop rate.

Closed loop finds the throughput ceiling; the open loop fires at a fixed rate whatever the
answers, so a slow server shows up as latency and errors instead of as fewer requests.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Coroutine

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True)
class LoadSettings:
    """One closed-loop load, applied identically to every target."""

    threads: int
    connections: int
    seconds: float
    warmup_seconds: float

    def describe(self, tool: str) -> str:
        """The settings in one line, for the output."""
        return (
            f"{tool}, {self.threads} thread(s), {self.connections} connections, "
            f"{self.seconds:g} s per run after {self.warmup_seconds:g} s warm-up, keep-alive"
        )


@dataclass(frozen=True)
class ClosedLoopResult:
    """Throughput and latency of one closed-loop run."""

    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list (nan when empty)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def closed_loop_tool() -> str:
    """'wrk' when installed, else the aiohttp fallback."""
    return "wrk" if shutil.which("wrk") else "aiohttp (wrk not found)"


def closed_loop(url: str, headers: dict[str, str], settings: LoadSettings) -> ClosedLoopResult:
    """Warm up, then measure url at full speed with the chosen tool."""
    if shutil.which("wrk"):
        if settings.warmup_seconds:
            _wrk(url, headers, settings, settings.warmup_seconds)
        return _wrk(url, headers, settings, settings.seconds)
    if settings.warmup_seconds:
        asyncio.run(_aiohttp_closed_loop(url, headers, settings, settings.warmup_seconds))
    return asyncio.run(_aiohttp_closed_loop(url, headers, settings, settings.seconds))


def _wrk(
    url: str, headers: dict[str, str], settings: LoadSettings, seconds: float
) -> ClosedLoopResult:
    command = [
        "wrk",
        f"-t{settings.threads}",
        f"-c{settings.connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
    ]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    command.append(url)
    result = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + 60
    )
    return parse_wrk(result.stdout)


def parse_wrk(output: str) -> ClosedLoopResult:
    """Requests, errors, req/s, p50 and p99 from `wrk --latency` output."""
    requests = int(_search(r"(\d+) requests in", output))
    socket_errors = re.search(r"Socket errors: (.*)", output)
    errors = sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1))) if socket_errors else 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return ClosedLoopResult(
        requests=requests,
        errors=errors,
        rps=float(_search(r"Requests/sec:\s+([\d.]+)", output)),
        p50_ms=_duration_ms(_search(r"50%\s+([\d.]+\w+)", output)),
        p99_ms=_duration_ms(_search(r"99%\s+([\d.]+\w+)", output)),
    )


def _search(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise ValueError(f"wrk output lacks {pattern!r}:\n{text}")
    return match.group(1)


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unreadable wrk duration {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


async def _aiohttp_closed_loop(
    url: str, headers: dict[str, str], settings: LoadSettings, seconds: float
) -> ClosedLoopResult:
    # Like wrk: no certificate check, one keep-alive connection per worker.
    connector = aiohttp.TCPConnector(ssl=False, limit=settings.connections)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                async with session.get(url, headers=headers) as answer:
                    await answer.read()
                    ok = 200 <= answer.status < 400
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            latencies.append((time.perf_counter() - started) * 1000.0)
            errors += not ok

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(settings.connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return ClosedLoopResult(
        requests=len(latencies),
        errors=errors,
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
    )


@dataclass(frozen=True)
class OpenLoopResult:
    """What a constant-rate run saw."""

    rate: float
    seconds: float
    requests: int
    errors: int
    statuses: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    send_lag_p99_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan


async def fire_on_schedule(
    n: int, rate: float, start: Callable[[int], Coroutine[Any, Any, None]]
) -> list[float]:
    """Start start(i) for i in 0..n-1, one every 1/rate s, never waiting for answers.

    Waits for all of them; returns the generator's lag behind the schedule (ms) per start.
    """
    interval = 1.0 / rate
    lags: list[float] = []
    tasks = []
    begin = time.perf_counter()
    for i in range(n):
        due = begin + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append((time.perf_counter() - due) * 1000.0)
        tasks.append(asyncio.create_task(start(i)))
    await asyncio.gather(*tasks)
    return lags


async def open_loop(
    url: str, token: str, *, rate: float, seconds: float, ssl_context: ssl.SSLContext
) -> OpenLoopResult:
    """Fire one GET every 1/rate s for seconds, never waiting for answers (verifying TLS).

    Latency runs from the moment the request is handed to aiohttp to the last body byte; the
    generator's own lag behind the schedule is reported apart, so a late client is visible.
    """
    total = round(rate * seconds)
    headers = {"Authorization": f"Bearer {token}"}
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=5.0)

    async def one(session: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        try:
            async with session.get(url, headers=headers, timeout=timeout) as answer:
                await answer.read()
                outcome = str(answer.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = type(exc).__name__
        latencies.append((time.perf_counter() - started) * 1000.0)
        statuses[outcome] = statuses.get(outcome, 0) + 1

    connector = aiohttp.TCPConnector(ssl=ssl_context)
    async with aiohttp.ClientSession(connector=connector) as session:
        lags = await fire_on_schedule(total, rate, lambda _i: one(session))
    latencies.sort()
    lags.sort()
    errors = sum(n for status, n in statuses.items() if not status.startswith("2"))
    return OpenLoopResult(
        rate=rate,
        seconds=seconds,
        requests=total,
        errors=errors,
        statuses=statuses,
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        max_ms=latencies[-1] if latencies else math.nan,
        send_lag_p99_ms=percentile(lags, 99),
    )

"""Statistical checks: IQR fences, z-scores and robust (median/MAD) z-scores per numeric field.

The baseline of each stream (count, mean, stddev, median, MAD, quartiles per field) comes from
the upstream's DuckDB over the stream's recent accepted records, refreshed in the background
every `refresh_seconds`, never per request. A baseline past `max_age_seconds` (the refresh
keeps failing) is an error, not a pass: the stream's `on_error` action applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from gateway.validation.streams import StatCheck, StreamSpec

log = structlog.get_logger("gateway.validation.baseline")
# Iglewicz and Hoaglin's modified z-score: 0.6745 (the 0.75 quantile of the standard normal)
# makes the MAD a consistent estimator of the standard deviation for normal data.
_MAD_SCALE = 0.6745
FIRST_FETCH_WAIT_SECONDS = 2.0
# A stream whose baseline is short of min_samples (or missing) is refreshed at least this often:
# a new stream's history grows fast, and its checks should start judging soon after.
COLD_REFRESH_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class FieldStats:
    """The summary of one field over the baseline window."""

    count: int
    mean: float | None = None
    stddev: float | None = None
    median: float | None = None
    mad: float | None = None
    q1: float | None = None
    q3: float | None = None

    @classmethod
    def parse(cls, raw: Any) -> FieldStats:
        """From the upstream's JSON; anything malformed reads as no data."""
        if not isinstance(raw, dict) or not isinstance(raw.get("count"), int):
            return cls(count=0)

        def number(key: str) -> float | None:
            value = raw.get(key)
            if not isinstance(value, int | float) or isinstance(value, bool):
                return None
            return float(value) if math.isfinite(value) else None

        return cls(
            count=raw["count"],
            mean=number("mean"),
            stddev=number("stddev"),
            median=number("median"),
            mad=number("mad"),
            q1=number("q1"),
            q3=number("q3"),
        )


@dataclass(frozen=True, slots=True)
class Baseline:
    """A stream's field summaries, with when they were fetched (monotonic seconds)."""

    fields: dict[str, FieldStats]
    fetched_at: float


def outlier_message(  # noqa: PLR0911 - one early return per method and per missing statistic
    check: StatCheck, stats: FieldStats, value: float
) -> str | None:
    """Why `value` is an outlier for this check, or None when it is not (or cannot be told)."""
    t = check.threshold
    if check.method == "iqr":
        if stats.q1 is None or stats.q3 is None or stats.q3 <= stats.q1:
            return None  # no spread: a field that never varies cannot be fenced
        spread = stats.q3 - stats.q1
        low, high = stats.q1 - t * spread, stats.q3 + t * spread
        if low <= value <= high:
            return None
        return f"outside the IQR fences [{low:.6g}, {high:.6g}] (k={t:g})"
    if check.method == "zscore":
        if stats.mean is None or not stats.stddev:
            return None
        z = abs(value - stats.mean) / stats.stddev
        return f"z-score {z:.2f} is above {t:g}" if z > t else None
    if stats.median is None or not stats.mad:
        return None
    robust = _MAD_SCALE * abs(value - stats.median) / stats.mad
    return f"robust z-score {robust:.2f} is above {t:g}" if robust > t else None


class Baselines:
    """The baselines of every stream with statistical checks, kept fresh in the background."""

    def __init__(
        self,
        specs: list[StreamSpec],
        # (stream, fields, window_hours, max_records) -> the upstream's stats document
        fetch: Callable[[str, tuple[str, ...], int, int], Awaitable[dict[str, Any]]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._specs = {spec.name: spec for spec in specs if spec.statistics is not None}
        self._fetch = fetch
        self._clock = clock
        self._current: dict[str, Baseline] = {}
        self._errors: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}

    async def current(self, stream: str) -> Baseline | None:
        """The stream's baseline; None when there is none fresh enough (an error)."""
        if stream not in self._current and stream not in self._errors:
            # Nothing fetched yet (just started): wait briefly for the first fetch.
            task = self._start(stream)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), FIRST_FETCH_WAIT_SECONDS)
        baseline = self._current.get(stream)
        stats = self._specs[stream].statistics
        if baseline is None or stats is None:
            return None
        if self._clock() - baseline.fetched_at > stats.max_age_seconds:
            return None
        return baseline

    def error(self, stream: str) -> str:
        """The last refresh error of a stream ("" when the last refresh worked)."""
        return self._errors.get(stream, "")

    def status(self) -> dict[str, Any]:
        """Per stream: the baseline's age and sample counts, or the refresh error."""
        now = self._clock()
        report: dict[str, Any] = {}
        for name in self._specs:
            baseline = self._current.get(name)
            report[name] = {
                "age_seconds": round(now - baseline.fetched_at, 1) if baseline else None,
                "counts": {f: s.count for f, s in baseline.fields.items()} if baseline else {},
                "error": self._errors.get(name) or None,
            }
        return report

    async def refresh(self, stream: str) -> None:
        """Fetch one stream's baseline now; a failure keeps the previous one and is logged."""
        spec = self._specs[stream]
        stats = spec.statistics
        if stats is None:
            return
        try:
            document = await self._fetch(
                stream, stats.fields, stats.window_hours, stats.max_records
            )
            raw_fields = document.get("fields")
            if not isinstance(raw_fields, dict):
                raise TypeError("the answer has no 'fields' object")  # noqa: TRY301
        except Exception as exc:  # noqa: BLE001 - any failure keeps the last baseline
            self._errors[stream] = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("validation.baseline_refresh_failed", stream=stream, error=str(exc)[:300])
            return
        self._current[stream] = Baseline(
            fields={name: FieldStats.parse(raw_fields.get(name)) for name in stats.fields},
            fetched_at=self._clock(),
        )
        self._errors.pop(stream, None)

    async def run(self) -> None:
        """Refresh each stream on its own period, forever (cancelled at shutdown)."""
        due = dict.fromkeys(self._specs, 0.0)
        while True:
            now = self._clock()
            for name, at in due.items():
                stats = self._specs[name].statistics
                if at <= now and stats is not None:
                    self._start(name)
                    period = stats.refresh_seconds
                    if not self._is_warm(name, stats.min_samples):
                        period = min(period, COLD_REFRESH_SECONDS)
                    due[name] = now + period
            await asyncio.sleep(max(0.05, min(due.values(), default=now + 1.0) - self._clock()))

    def _is_warm(self, stream: str, min_samples: int) -> bool:
        baseline = self._current.get(stream)
        if baseline is None:
            return False
        return all(summary.count >= min_samples for summary in baseline.fields.values())

    def _start(self, stream: str) -> asyncio.Task[None]:
        task = self._inflight.get(stream)
        if task is None or task.done():
            task = asyncio.create_task(self.refresh(stream), name=f"baseline-{stream}")
            self._inflight[stream] = task
        return task

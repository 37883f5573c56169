"""The activity anomaly job: unusual behaviour of a subject or an address, from the audit store.

Every `interval_seconds` the job reads the last `window_minutes` of audit events and computes,
per subject and per remote address: the request rate, the denial ratio, the number of distinct
routes, and the share of off-hours activity. Each feature is compared with the population of
entities in the same window by a robust z-score (median and MAD, Iglewicz-Hoaglin), high side
only; a floor on the scale keeps a population where almost nobody is denied from flagging a
single denial. A flag is an audit event (`anomaly.activity`) and a metric; the alert rule
`GatewayActivityAnomaly` fires on it.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from collections.abc import Callable

    import duckdb

    from gateway.audit import AuditWriter
    from gateway.config import ActivityConfig

log = structlog.get_logger("gateway.activity")
_MAD_SCALE = 0.6745
# The smallest spread each feature is judged with (a population of identical users has MAD 0).
SCALE_FLOORS = {"rate_per_minute": 0.25, "denial_ratio": 0.1, "distinct_routes": 2.0,
                "off_hours_ratio": 0.15}  # fmt: skip
ENTITIES = {"subject": "subject", "remote_addr": "remote_addr"}  # entity type -> column
_FEATURES_SQL = """
SELECT {column} AS entity,
       count(*) AS events,
       avg(CASE WHEN decision = 'deny' THEN 1.0 ELSE 0.0 END) AS denial_ratio,
       count(DISTINCT route) AS distinct_routes,
       avg(CASE WHEN hour(time AT TIME ZONE 'UTC') >= ? OR hour(time AT TIME ZONE 'UTC') < ?
           THEN 1.0 ELSE 0.0 END) AS off_hours_ratio
FROM audit_events
WHERE time >= CAST(? AS TIMESTAMPTZ) AND time < CAST(? AS TIMESTAMPTZ)
  AND {column} IS NOT NULL AND request_id IS NOT NULL
GROUP BY 1
"""


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One entity whose feature stands out from the population."""

    entity_type: str
    entity: str
    feature: str
    value: float
    median: float
    score: float

    def as_dict(self) -> dict[str, Any]:
        """For the audit event and the log."""
        return {
            "entity_type": self.entity_type, "entity": self.entity, "feature": self.feature,
            "value": round(self.value, 4), "median": round(self.median, 4),
            "score": round(self.score, 2),
        }  # fmt: skip


def features(
    cursor: duckdb.DuckDBPyConnection, config: ActivityConfig, now: datetime
) -> dict[str, dict[str, dict[str, float]]]:
    """Per entity type, per entity: its features over the window ending at `now`."""
    since = now - timedelta(minutes=config.window_minutes)
    found: dict[str, dict[str, dict[str, float]]] = {}
    for entity_type, column in ENTITIES.items():
        sql = _FEATURES_SQL.format(column=column)  # a fixed column name from ENTITIES
        rows = cursor.execute(
            sql,
            [config.off_hours_start, config.off_hours_end, since.isoformat(), now.isoformat()],
        ).fetchall()
        found[entity_type] = {
            str(entity): {
                "events": float(events),
                "rate_per_minute": events / config.window_minutes,
                "denial_ratio": float(denials),
                "distinct_routes": float(routes),
                "off_hours_ratio": float(off_hours),
            }
            for entity, events, denials, routes, off_hours in rows
        }
    return found


def detect(table: dict[str, dict[str, dict[str, float]]], config: ActivityConfig) -> list[Anomaly]:
    """Entities whose robust z-score on a feature is above the threshold (high side only)."""
    anomalies: list[Anomaly] = []
    for entity_type, entities in table.items():
        judged = {e: f for e, f in entities.items() if f["events"] >= config.min_events}
        if len(entities) < config.min_entities:
            continue  # too few to call anyone unusual
        for feature, floor in SCALE_FLOORS.items():
            values = [f[feature] for f in entities.values()]
            median = statistics.median(values)
            mad = statistics.median(abs(v - median) for v in values)
            scale = max(mad / _MAD_SCALE, floor)
            for entity, row in judged.items():
                score = (row[feature] - median) / scale
                if score > config.threshold:
                    anomalies.append(
                        Anomaly(entity_type, entity, feature, row[feature], median, score)
                    )
    return anomalies


class ActivityJob:
    """Runs the detection periodically on the audit store; reports each new anomaly once."""

    def __init__(
        self,
        audit: AuditWriter,
        config: ActivityConfig,
        *,
        report: Callable[[Anomaly], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._audit = audit
        self._config = config
        self._report = report
        self._clock = clock
        self._reported: dict[tuple[str, str, str], datetime] = {}

    async def run_once(self) -> list[Anomaly]:
        """Detect now; the anomalies not reported within the last window are reported."""
        now = self._clock()
        table = await self._audit.run(lambda cursor: features(cursor, self._config, now))
        anomalies = detect(table, self._config)
        quiet = timedelta(minutes=self._config.window_minutes)
        fresh = []
        for anomaly in anomalies:
            key = (anomaly.entity_type, anomaly.entity, anomaly.feature)
            last = self._reported.get(key)
            if last is None or now - last >= quiet:
                self._reported[key] = now
                fresh.append(anomaly)
                self._report(anomaly)
        return fresh

    async def run(self) -> None:
        """Forever, every interval (cancelled at shutdown); a failed run is logged, not fatal."""
        while True:
            await asyncio.sleep(self._config.interval_seconds)
            try:
                await self.run_once()
            except Exception:
                log.exception("activity.run_failed")

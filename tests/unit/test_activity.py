"""The activity anomaly job on a real audit store: a synthetic abnormal subject is flagged (once),
a normal population is not."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from support.datakeys import CIPHER

from gateway.activity import ActivityJob, Anomaly, detect
from gateway.audit import AuditWriter
from gateway.config import ActivityConfig

NOW = datetime(2026, 11, 23, 16, 0, tzinfo=UTC)
ROUTES = ["tickets.list", "tickets.get", "employees.list", "departments.list"]
CONFIG = ActivityConfig(window_minutes=60, min_events=20, min_entities=5, threshold=5.0)


def request(subject: str, at: datetime, route: str, decision: str, addr: str) -> dict:
    return {
        "event_id": f"{subject}-{at.timestamp()}-{route}-{random.random()}",  # noqa: S311
        "time": at.isoformat(timespec="milliseconds"), "kind": "request",
        "request_id": "r", "subject": subject, "roles": ["reader"], "issuer": None,
        "method": "GET", "path": "/", "route": route, "decision": decision,
        "reason_id": "authz.denied" if decision == "deny" else None,
        "status": 403 if decision == "deny" else 200, "latency_ms": 1.0, "upstream_ms": None,
        "policy_revision": "r1", "reasons": [], "remote_addr": addr, "user_agent": "t",
        "detail": {},
    }  # fmt: skip


def normal_population(rng: random.Random) -> list[dict]:
    """30 office-hours users: ~30 requests an hour each on 2-3 routes, a rare denial."""
    events = []
    for n in range(30):
        subject = f"user-{n}"
        for _ in range(rng.randint(25, 40)):
            at = NOW - timedelta(minutes=rng.uniform(0, 59))
            decision = "deny" if rng.random() < 0.02 else "allow"
            events.append(request(subject, at, rng.choice(ROUTES[:3]), decision, f"10.0.0.{n}"))
    return events


def intruder() -> list[dict]:
    """Enumeration: 300 requests in 50 minutes, nine in ten denied, on 20 routes, one address."""
    return [
        request("mallory", NOW - timedelta(seconds=10 * i), f"route-{i % 20}",
                "deny" if i % 10 else "allow", "203.0.113.9")
        for i in range(300)
    ]  # fmt: skip


async def store(tmp_path, events: list[dict]) -> AuditWriter:
    writer = AuditWriter(
        jsonl_path=str(tmp_path / "audit.jsonl"), db_path=tmp_path / "audit.duckdb",
        flush_interval_seconds=3600, batch_size=100_000, cipher=CIPHER,
    )  # fmt: skip
    await writer.start()
    for event in events:
        writer.emit(event)
    await writer.flush()
    return writer


async def test_an_abnormal_subject_is_flagged_and_a_normal_population_is_not(tmp_path):
    """Mallory stands out on rate, denials and routes, as a subject and as an address."""
    rng = random.Random(3)  # noqa: S311 - synthetic traffic
    writer = await store(tmp_path, normal_population(rng) + intruder())
    reported: list[Anomaly] = []
    job = ActivityJob(writer, CONFIG, report=reported.append, clock=lambda: NOW)
    try:
        found = await job.run_once()
        again = await job.run_once()
    finally:
        await writer.close()
    flagged = {(a.entity_type, a.entity, a.feature) for a in found}
    assert {e for _, e, _ in flagged} == {"mallory", "203.0.113.9"}
    assert ("subject", "mallory", "denial_ratio") in flagged
    assert ("subject", "mallory", "rate_per_minute") in flagged
    assert ("remote_addr", "203.0.113.9", "distinct_routes") in flagged
    assert reported == found
    assert again == []  # reported once per window, not at every run


async def test_normal_traffic_raises_nothing(tmp_path):
    """The same population without the intruder: no flag."""
    writer = await store(tmp_path, normal_population(random.Random(4)))  # noqa: S311
    job = ActivityJob(writer, CONFIG, report=lambda _a: None, clock=lambda: NOW)
    try:
        assert await job.run_once() == []
    finally:
        await writer.close()


def test_off_hours_activity_is_a_feature_of_its_own():
    """An entity active only at night among day workers is flagged on off_hours_ratio."""
    day = {"events": 30.0, "rate_per_minute": 0.5, "denial_ratio": 0.0, "distinct_routes": 3.0,
           "off_hours_ratio": 0.0}  # fmt: skip
    table = {"subject": {f"u{i}": dict(day) for i in range(10)}}
    table["subject"]["night-owl"] = {**day, "off_hours_ratio": 1.0}
    (anomaly,) = detect(table, CONFIG)
    assert (anomaly.entity, anomaly.feature) == ("night-owl", "off_hours_ratio")


@pytest.mark.parametrize("entities", [2, 4])
def test_too_small_a_population_judges_nobody(entities):
    """Below min_entities nobody is unusual: there is no population to compare with."""
    table = {"subject": {f"u{i}": {"events": 500.0, "rate_per_minute": 50.0 * i,
                                   "denial_ratio": 1.0, "distinct_routes": 40.0,
                                   "off_hours_ratio": 1.0} for i in range(entities)}}  # fmt: skip
    assert detect(table, CONFIG) == []

"""A stream defined in config, fed as an ingest process would, through the real gateway and EMP
service: receipts, baselines from the upstream's DuckDB, a model trained by the CLI and picked up
live, the quarantine reviewed by a data steward, and every failure audited and counted."""

from __future__ import annotations

import asyncio
import json
import random
import time
from contextlib import ExitStack
from typing import Any

import aiohttp
import pytest
from support.identity import start_identity_gateway

from gateway.testing import wait_for_audit_events

STREAM = "e2e-readings"
STREAMS_TOML = f"""
[defaults]
mode = "all_or_nothing"

[[stream]]
name = "{STREAM}"
record_schema = "sensor_reading.json"
mode = "partial"
sensitive = ["operator_email"]

[stream.statistics]
refresh_seconds = 1
min_samples = 100

[[stream.statistics.checks]]
field = "temperature"
method = "mad"
threshold = 5.0

[stream.model]
features = ["temperature", "humidity", "power_w"]
min_samples = 200
"""


def reading(rng: random.Random, **overrides: Any) -> dict[str, Any]:
    temperature = rng.gauss(21, 2)
    record = {
        "sensor": f"ab-{rng.randrange(100)}",
        "at": "2026-11-23T10:00:00Z",
        "temperature": round(temperature, 2),
        "humidity": round(rng.gauss(45, 8), 2),
        "power_w": round(50 + 12 * temperature + rng.gauss(0, 5), 1),
    }
    return {**record, **overrides}


@pytest.fixture(scope="module")
def quality_gateway(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    streams = root / "streams.toml"
    streams.write_text(STREAMS_TOML)
    with ExitStack() as processes:
        yield start_identity_gateway(
            processes, root / "gw", upstream_port=stack.upstream_port,
            upstream_secret=stack.secret, streams_file=streams,
        )  # fmt: skip


async def call(gateway, method: str, path: str, token: str, body: Any = None):
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=gateway.ssl_context())) as s,
        s.request(method, gateway.url(path), json=body, headers=headers) as response,
    ):
        return response.status, await response.json(), response.headers.get("X-Request-Id")


async def admin_get(gateway, path: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{gateway.admin_port}{path}") as response,
    ):
        return await response.text()


async def wait_until(predicate, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.25)
    raise AssertionError("condition not met in time")


def check_audit(gw, request_id: str) -> None:
    """One audit event, with the failures in context and the sensitive value masked."""
    (event,) = wait_for_audit_events(gw.audit_file, request_id)
    validation = event["detail"]["validation"]
    assert (validation["stream"], validation["model"]) == (STREAM, f"{STREAM}@v0001")
    assert validation["rules"] == {
        "rejected": {"schema.maximum": 1, "schema.format": 1},
        "quarantined": {"stats.mad": 1, "model.hbos": 1},
    }
    shown = {(f["index"], f["rule"]): f["value"] for f in validation["failures"]}
    assert shown[(2, "schema.maximum")] == "140"
    assert shown[(3, "schema.format")] == "***"
    assert event["subject"] == "etl-1"
    assert "planted-secret-mail" not in gw.audit_file.read_text()
    assert "planted-secret-mail" not in (gw.root / "gateway.log").read_text()


async def review_quarantine(gw, odd: dict[str, Any], score: float) -> None:
    """The steward sees the odd record with its flags and accepts it once; others may not."""
    ingest = gw.mint("etl-1", ("ingest_process",))
    steward = gw.mint("dana", ("data_steward",))
    path = f"/api/ingest/{STREAM}/quarantine"
    status, listed, _ = await call(gw, "GET", path, steward)
    assert status == 200
    (item,) = listed["items"]
    assert (item["record"], item["status"]) == (odd, "pending")
    assert item["score"] == score
    status, _, _ = await call(gw, "GET", path, ingest)
    assert status == 403
    accept = f"{path}/{item['id']}/accept"
    status, decided, _ = await call(gw, "POST", accept, steward, {"note": "heat wave"})
    assert (status, decided["status"], decided["reviewed_by"]) == (200, "accepted", "dana")
    status, again, _ = await call(gw, "POST", accept, steward, {})
    assert status == 409, again
    status, recent, _ = await call(gw, "GET", f"/api/ingest/{STREAM}?limit=5", ingest)
    assert odd in [i["record"] for i in recent["items"]]


async def test_a_stream_from_config_end_to_end(quality_gateway):
    """History in, baseline and model built from it, then an odd and a bad record handled."""
    gw = quality_gateway
    rng = random.Random(7)  # noqa: S311 - synthetic data, not a secret
    ingest = gw.mint("etl-1", ("ingest_process",))

    # A cold stream: no baseline yet, no model: good history is accepted as it comes.
    history = [reading(rng) for _ in range(400)]
    status, receipt, _ = await call(gw, "POST", f"/api/ingest/{STREAM}", ingest, history)
    assert status == 201, receipt
    assert (receipt["accepted"], receipt["quarantined"], receipt["rejected"]) == (400, 0, 0)

    async def baseline_ready():
        ready = json.loads(await admin_get(gw, "/readyz"))
        counts = ready.get("baselines", {}).get(STREAM, {}).get("counts", {})
        return counts.get("temperature", 0) >= 400

    await wait_until(baseline_ready)

    # The model, trained by the CLI from the upstream's DuckDB, picked up without a restart.
    trained = gw.cli("anomaly", "train", "--stream", STREAM)
    assert trained.returncode == 0, trained.stderr
    meta = json.loads(trained.stdout[: trained.stdout.rindex("}") + 1])
    assert (meta["model"], meta["samples"], meta["algorithm"]) == (f"{STREAM}@v0001", 400, "hbos")

    good = reading(rng)
    odd = reading(rng, temperature=45.0, power_w=120.0)
    bad = reading(rng, humidity=140)
    secret_mail = reading(rng, operator_email="planted-secret-mail")
    batch = [good, odd, bad, secret_mail]
    status, receipt, request_id = await call(gw, "POST", f"/api/ingest/{STREAM}", ingest, batch)
    assert status == 201, receipt
    assert (receipt["accepted"], receipt["quarantined"], receipt["rejected"]) == (1, 1, 2)
    entries = receipt["records"]
    assert [e["status"] for e in entries] == ["accepted", "quarantined", "rejected", "rejected"]
    assert isinstance(entries[0]["score"], float)
    assert entries[1]["score"] > entries[0]["score"]
    assert {f["rule"] for f in entries[1]["flags"]} == {"stats.mad", "model.hbos"}
    assert entries[2]["failures"][0] == {
        "pointer": "/2/humidity", "rule": "schema.maximum",
        "message": "140 is greater than the maximum of 100",
    }  # fmt: skip
    assert "planted-secret-mail" not in json.dumps(receipt)

    check_audit(gw, request_id)

    # Counted by stream, outcome and rule.
    metrics = await admin_get(gw, "/metrics")
    assert f'gateway_ingest_records_total{{outcome="quarantined",stream="{STREAM}"}} 1.0' in metrics
    assert (
        f'gateway_records_rejected_total{{rule="schema.maximum",stream="{STREAM}"}} 1.0' in metrics
    )

    await review_quarantine(gw, odd, entries[1]["score"])

    # Rejected records per hour, from the audit store.
    hourly = json.loads(await admin_get(gw, "/validation/hourly?hours=2"))
    row = next(i for i in hourly["items"] if i["stream"] == STREAM)
    assert (row["rejected"], row["quarantined"], row["accepted"]) == (2, 1, 401)


async def test_unlisted_streams_are_all_or_nothing(quality_gateway):
    """A stream not in the file gets the route's schema; one bad record stores nothing."""
    gw = quality_gateway
    ingest = gw.mint("etl-1", ("ingest_process",))
    batch = [{"n": 1}, {"n": 2, "location": {"lat": 95, "lon": 0}}]
    status, body, request_id = await call(gw, "POST", "/api/ingest/e2e-unlisted", ingest, batch)
    assert (status, body["reason_id"], body["pointer"]) == (
        422,
        "validation.rule",
        "/1/location/lat",
    )
    assert body["receipt"]["stored"] == 0
    assert [r["index"] for r in body["receipt"]["records"]] == [1]
    status, recent, _ = await call(gw, "GET", "/api/ingest/e2e-unlisted", ingest)
    assert (status, recent["items"]) == (200, [])
    (event,) = wait_for_audit_events(gw.audit_file, request_id)
    assert event["reason_id"] == "validation.rule"
    assert event["detail"]["validation"]["listed"] is False
    assert "receipt" not in event["detail"]
    metrics = await admin_get(gw, "/metrics")
    assert 'gateway_ingest_records_total{outcome="not_stored",stream="_unlisted"}' in metrics

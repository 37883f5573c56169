"""Micro-benchmarks of per-request costs on their own: the policy decision, schema checks, and
the per-record checks of an ingest stream (schema + rules, statistics, the outlier model).

Each runs in this process, with no network, so its figure is the stage's CPU cost alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import regopy
from aiohttp.test_utils import make_mocked_request
from loadgen import percentile

from gateway.pipeline import Principal, RequestContext
from gateway.policy.embedded import EmbeddedPolicyEngine, PolicySources, new_interpreter
from gateway.policy.regoinput import to_rego_input
from gateway.routes import load_routes
from gateway.stages.authz import policy_input
from gateway.stages.normalize import normalise_path, parse_query
from gateway.stages.validate import _validator, parse_json  # the gateway's own compile step
from gateway.validation import anomaly
from gateway.validation.baseline import Baseline, FieldStats
from gateway.validation.records import RecordChecker
from gateway.validation.streams import load_streams

if TYPE_CHECKING:
    from collections.abc import Callable

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = "gateway/authz/decision"


@dataclass(frozen=True)
class Timing:
    """Percentiles of one repeated call, in microseconds."""

    label: str
    calls: int
    p50_us: float
    p99_us: float
    mean_us: float


def time_calls(label: str, call: Callable[[], object], calls: int) -> Timing:
    """Time each of calls invocations (after a short warm-up) one by one."""
    for _ in range(min(1000, calls)):
        call()
    samples: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        started = clock()
        call()
        samples.append((clock() - started) / 1000.0)
    samples.sort()
    return Timing(
        label, calls, percentile(samples, 50), percentile(samples, 99), sum(samples) / calls
    )


def full_policy_input() -> dict[str, Any]:
    """The input gateway.stages.authz.policy_input builds for a reader's GET /api/tickets/42."""
    now = int(time.time())
    request = make_mocked_request(
        "GET", "/api/tickets/42", headers={"Accept": "*/*", "User-Agent": "wrk"}
    )
    ctx = RequestContext.start(request)
    ctx.path, ctx.segments = normalise_path("/api/tickets/42")
    ctx.query = parse_query("")
    table = load_routes(REPO / "config" / "routes.toml", REPO / "config" / "schemas")
    found, _ = table.match("GET", ctx.path)
    if found is None:
        raise RuntimeError("the route table has no GET /api/tickets/{id}")
    ctx.route, ctx.params = found.route, found.params
    claims = {"sub": "bench", "iss": "https://localhost:8443", "aud": "emp-api",
              "exp": now + 3600, "iat": now}  # fmt: skip
    ctx.principal = Principal("bench", ("reader",), "https://localhost:8443", claims, ("dev",))
    return policy_input(ctx)


def trimmed_policy_input() -> dict[str, Any]:
    """Only what the policy reads to allow: subject.sub and .roles, route.resource and .action."""
    return {
        "subject": {"sub": "bench", "roles": ["reader"]},
        "route": {"resource": "tickets", "action": "read"},
    }


def policy_timings(calls: int) -> list[Timing]:
    """engine.decide for the full and the trimmed input (both must allow)."""
    engine = EmbeddedPolicyEngine.from_directory(REPO / "policies", ENTRYPOINT)
    timings = []
    for label, document in (
        ("full input", full_policy_input()),
        ("trimmed input", trimmed_policy_input()),
    ):
        decision = engine.decide(document)
        if not decision.allow:
            raise RuntimeError(f"policy denies the bench's {label}: {decision.reasons}")
        timings.append(time_calls(f"decide, {label}", lambda d=document: engine.decide(d), calls))
    # What the gateway runs by default: the per-revision memo, here on a repeated input.
    memo = EmbeddedPolicyEngine.from_directory(REPO / "policies", ENTRYPOINT, memo_size=4096)
    document = full_policy_input()
    timings.append(time_calls("decide, full input, memo hit", lambda: memo.decide(document), calls))
    return timings


def ticket_record(size: int = 1024) -> dict[str, Any]:
    """A valid ticket whose JSON is about size bytes (the description makes up the rest)."""
    record: dict[str, Any] = {
        "title": "Printer on floor 3 jams on duplex jobs",
        "description": "",
        "status": "open",
        "priority": "high",
        "department_id": 3,
        "assignee_id": 17,
    }
    filler = "Steps: print a duplex job from any laptop; the second page jams. "
    record["description"] = (filler * (size // len(filler) + 1))[: size - len(json.dumps(record))]
    return record


def schema_timings(calls: int) -> tuple[int, list[Timing]]:
    """The record's size, then: schema check alone, and strict parse + check (the stage's work)."""
    schema = json.loads((REPO / "config" / "schemas" / "ticket.json").read_text())
    validator = _validator(schema)
    record = ticket_record()
    body = json.dumps(record).encode()
    if validator.errors(record):
        raise RuntimeError("the bench's ticket record does not pass config/schemas/ticket.json")

    # The same call the validate stage makes (SchemaCheck.errors: empty when valid).
    def check() -> object:
        return validator.errors(record)

    def parse_and_check() -> object:
        return validator.errors(parse_json(body.decode("utf-8")))

    return len(body), [
        time_calls("schema check", check, calls),
        time_calls("strict JSON parse + schema check", parse_and_check, calls),
    ]


def decide_breakdown(calls: int) -> list[Timing]:
    """Where engine.decide spends its time: turning the dict into a regopy Input, then the query.

    Built from the same public pieces the engine uses (PolicySources, new_interpreter), so the
    split is the engine's own, without reaching into it.
    """
    interpreter = new_interpreter(PolicySources.read(REPO / "policies"))
    bundle = interpreter.build(None, [ENTRYPOINT])
    timings = []
    for label, document in (("full", full_policy_input()), ("trimmed", trimmed_policy_input())):
        timings.append(
            time_calls(f"regopy.Input(dict), {label}", lambda d=document: regopy.Input(d), calls)
        )
        timings.append(
            time_calls(
                f"to_rego_input (gateway), {label}", lambda d=document: to_rego_input(d), calls
            )
        )
    prepared = regopy.Input(full_policy_input())
    interpreter.set_input(prepared)
    timings.append(
        time_calls("set_input(prepared Input)", lambda: interpreter.set_input(prepared), calls)
    )
    timings.append(
        time_calls(
            "query_bundle_entrypoint",
            lambda: interpreter.query_bundle_entrypoint(bundle, ENTRYPOINT),
            calls,
        )
    )
    return timings


def reading_record(size: int = 1024) -> dict[str, Any]:
    """A valid record of the `readings` stream whose JSON is about size bytes (a long note)."""
    record: dict[str, Any] = {
        "sensor": "ab-12", "at": "2026-11-23T10:00:00Z", "temperature": 21.4,
        "humidity": 44.0, "power_w": 307.0, "latency_ms": 21.0,
        "operator_email": "facilities@example.com", "location": {"lat": 48.1, "lon": 11.6},
        "note": "",
    }  # fmt: skip
    filler = "Calibrated on site; readings nominal after the filter change. "
    record["note"] = (filler * (size // len(filler) + 1))[: size - len(json.dumps(record))]
    return record


def ingest_timings(calls: int) -> tuple[int, list[Timing]]:
    """The record's size, then per record: schema + rules, + statistics, + the HBOS model (one
    record per call), and every stage per record in a batch of 100."""
    routes = load_routes(REPO / "config" / "routes.toml", REPO / "config" / "schemas")
    route = next(r for r in routes.routes if r.name == "ingest.write")
    spec = load_streams(REPO / "config" / "streams.toml", REPO / "config" / "schemas").streams[
        "readings"
    ]
    if spec.statistics is None or spec.model is None:
        raise RuntimeError("config/streams.toml's readings stream has no statistics or model")
    checker = RecordChecker(
        spec, spec.record_schema, tuple(r for r in (route.rules, spec.rules) if r)
    )
    record = reading_record()
    if checker.check([record], batched=True)[0].failures:
        raise RuntimeError("the bench's reading does not pass the readings stream's checks")
    summary = FieldStats(1000, 21.0, 2.0, 21.0, 1.35, 19.65, 22.35)
    baseline = Baseline(dict.fromkeys(spec.statistics.fields, summary), 0.0)
    rng = __import__("random").Random(0)
    rows = []
    for _ in range(2000):
        t = rng.gauss(21, 2)
        rows.append([t, rng.gauss(45, 8), 50 + 12 * t + rng.gauss(0, 5)])
    model = anomaly.train(rows, stream="readings", features=spec.model.names)

    def rules_only() -> object:
        return checker.check([record], batched=True)

    def with_stats() -> object:
        outcomes = checker.check([record], batched=True)
        checker.flag_statistics(outcomes, baseline)
        return outcomes

    def with_model(batch: list[dict[str, Any]]) -> object:
        outcomes = checker.check(batch, batched=True)
        checker.flag_statistics(outcomes, baseline)
        scored, feature_rows = checker.model_rows(outcomes)
        checker.flag_model(scored, anomaly.score(model, feature_rows), model)
        return outcomes

    batch = [record] * 100
    per_batch = time_calls(
        "all stages, batch of 100", lambda: with_model(batch), max(calls // 50, 50)
    )
    per_record = Timing(
        "all stages, per record of a 100-batch", per_batch.calls, per_batch.p50_us / 100,
        per_batch.p99_us / 100, per_batch.mean_us / 100,
    )  # fmt: skip
    return len(json.dumps(record)), [
        time_calls("schema + rules", rules_only, calls),
        time_calls("schema + rules + statistics", with_stats, calls),
        time_calls("+ HBOS model, 1 record per call", lambda: with_model([record]), calls // 4),
        per_record,
    ]


# --- the audit writer: encrypted columns vs the plaintext baseline ---------------------------


@dataclass(frozen=True)
class WriterThroughput:
    """Events per second through AuditWriter (emit, then flush into a real DuckDB file)."""

    events: int
    encrypted_per_s: float
    plain_per_s: float

    @property
    def ratio(self) -> float:
        """Encrypted over plain throughput (1.0: encryption costs nothing)."""
        return self.encrypted_per_s / self.plain_per_s


def audit_event(n: int) -> dict[str, Any]:
    """A request event as the pipeline builds it, with an ingest summary in its detail."""
    return {
        "event_id": f"{n:032x}", "time": "2026-11-23T10:00:00.000+00:00", "kind": "request",
        "request_id": f"{n:032x}", "subject": "etl-1", "roles": ["ingest"],
        "issuer": "https://localhost:8443", "method": "POST", "path": "/api/ingest/readings",
        "route": "ingest.write", "decision": "allow", "reason_id": None, "status": 200,
        "latency_ms": 3.2, "upstream_ms": 1.9, "policy_revision": "r1", "reasons": [],
        "remote_addr": "127.0.0.1", "user_agent": "python-requests/2.32.3",
        "detail": {"validation": {
            "stream": "readings", "listed": True, "mode": "per_record", "received": 100,
            "accepted": 99, "quarantined": 1, "rejected": 0, "model": "readings@v0001",
            "rules": {"quarantined": {"stats.mad": 1}},
            "failures": [{"index": 7, "outcome": "quarantined", "pointer": "/7/temperature",
                          "rule": "stats.mad", "message": "robust z-score 8.95 is above 5",
                          "value": 39.0}],
            "failures_omitted": 0}},
    }  # fmt: skip


def audit_writer_throughput(events: int, rounds: int = 5) -> WriterThroughput:
    """The best of `rounds` for each: `events` emitted and flushed in batches of 2,000 (the
    gateway's default), with the data key ring's cipher and with the bench-only plain writer."""
    import asyncio  # noqa: PLC0415 - this benchmark only
    import tempfile  # noqa: PLC0415

    from empsecrets.fieldcrypt import DataKeyRing, FieldCipher  # noqa: PLC0415
    from gateway.audit import AuditWriter  # noqa: PLC0415

    cipher = FieldCipher(DataKeyRing.generate())
    batch = 2000

    async def one(root: Path, encrypted: bool) -> float:
        writer = AuditWriter(
            jsonl_path=str(root / "audit.jsonl"), db_path=root / "audit.duckdb",
            flush_interval_seconds=3600, batch_size=10**9,
            cipher=cipher if encrypted else None, plaintext=not encrypted,
        )  # fmt: skip
        await writer.start()
        started = time.perf_counter()
        for n in range(events):
            writer.emit(audit_event(n))
            if (n + 1) % batch == 0:
                await writer.flush()
        await writer.flush()
        elapsed = time.perf_counter() - started
        await writer.close()
        return events / elapsed

    best = {True: 0.0, False: 0.0}
    for _ in range(rounds):
        for encrypted in (True, False):  # interleaved: drift in the machine hits both
            with tempfile.TemporaryDirectory() as directory:
                rate = asyncio.run(one(Path(directory), encrypted))
            best[encrypted] = max(best[encrypted], rate)
    return WriterThroughput(events, best[True], best[False])

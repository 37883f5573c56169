"""Ingest batches through the validate stage with the shipped config: a table of bad records.

Each row is one kind of bad record or malformed body, with the outcome and message expected;
the `readings` stream of config/streams.toml is partial, unlisted streams are all-or-nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from support.stack import REPO

from gateway.pipeline import Denial, RequestContext
from gateway.routes import load_routes
from gateway.stages.validate import ENVELOPE, ValidateStage
from gateway.validation.baseline import Baselines
from gateway.validation.streams import StreamCatalog, load_streams

ROUTES = load_routes(REPO / "config/routes.toml", REPO / "config/schemas")
CATALOG = load_streams(REPO / "config/streams.toml", REPO / "config/schemas")
# The sensors stream's schema and rules alone (its statistics and model are tested below).
PLAIN = StreamCatalog(streams={
    "readings": dataclasses.replace(CATALOG.streams["readings"], statistics=None, model=None),
})  # fmt: skip
INGEST = next(r for r in ROUTES.routes if r.name == "ingest.write")
JSON = "application/json"
NDJSON = "application/x-ndjson"
GOOD = {"sensor": "ab-12", "at": "2026-11-23T10:00:00Z", "temperature": 21.0,
        "humidity": 45.0, "power_w": 302.0}  # fmt: skip


def stage(catalog: StreamCatalog = PLAIN, **kwargs: Any) -> ValidateStage:
    return ValidateStage(ROUTES, max_body_bytes=8 << 20, streams=catalog, **kwargs)


async def run(
    validate: ValidateStage, stream: str, body: Any, content_type: str = JSON
) -> RequestContext:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = make_mocked_request(
        "POST", f"/api/ingest/{stream}", headers={"Content-Type": content_type}
    )
    ctx = RequestContext.start(request)
    ctx.route, ctx.params, ctx.body = INGEST, {"stream": stream}, raw
    await validate(ctx)
    return ctx


async def refused(
    validate: ValidateStage, stream: str, body: Any, content_type: str = JSON
) -> Denial:
    with pytest.raises(Denial) as caught:
        await run(validate, stream, body, content_type)
    return caught.value


def envelope(ctx: RequestContext) -> dict[str, Any]:
    assert ctx.upstream_content_type == ENVELOPE
    assert ctx.body is not None
    return json.loads(ctx.body)


# (bad record, rule, pointer in a one-record batch, a phrase of the message)
BAD_RECORDS = [
    pytest.param({k: v for k, v in GOOD.items() if k != "temperature"}, "schema.required",
                 "/0/temperature", "'temperature' is a required property", id="required_missing"),
    pytest.param({**GOOD, "temperature": "21"}, "schema.type", "/0/temperature",
                 "is not of type 'number'", id="wrong_type"),
    pytest.param({**GOOD, "temperature": True}, "schema.type", "/0/temperature",
                 "is not of type 'number'", id="boolean_is_not_a_number"),
    pytest.param({**GOOD, "humidity": 120}, "schema.maximum", "/0/humidity",
                 "greater than the maximum of 100", id="above_schema_maximum"),
    pytest.param({**GOOD, "power_w": -1}, "schema.minimum", "/0/power_w",
                 "less than the minimum of 0", id="below_schema_minimum"),
    pytest.param({**GOOD, "sensor": "AB12"}, "schema.pattern", "/0/sensor",
                 "does not match", id="pattern"),
    pytest.param({**GOOD, "at": "yesterday"}, "schema.format", "/0/at",
                 "is not a 'date-time'", id="format_date_time"),
    pytest.param({**GOOD, "extra": 1}, "schema.additionalProperties", "/0/extra",
                 "Additional properties are not allowed", id="unknown_field"),
    pytest.param({**GOOD, "at": "2026-11-23T10:00:00+02:00"}, "at_in_utc", "/0/at",
                 "does not match", id="stream_rule_pattern"),
    pytest.param({**GOOD, "start": "2026-11-23T10:00:00Z", "end": "2026-11-23T09:00:00Z"},
                 "end_not_before_start", "/0/end", "must be >= start", id="cross_field_compare"),
    pytest.param({**GOOD, "location": {"lat": 91, "lon": 0}}, "lat_in_range",
                 "/0/location/lat", "must be <= 90", id="route_rule_range"),
    pytest.param(7, "record.type", "/0", "a record must be a JSON object", id="not_an_object"),
    pytest.param([GOOD], "record.type", "/0", "a record must be a JSON object", id="nested_array"),
    pytest.param({**GOOD, "operator_email": "not-an-email"}, "schema.format", "/0/operator_email",
                 "fails the schema's 'format' check", id="sensitive_field_message_masked"),
    pytest.param({**GOOD, "operator_email": "a@@b.example"}, "schema.format", "/0/operator_email",
                 "fails the schema's 'format' check", id="email_only_the_strict_checker_refuses"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "rule", "pointer", "phrase"), BAD_RECORDS)
async def test_bad_record_is_rejected_with_rule_pointer_and_message(record, rule, pointer, phrase):
    """In a partial stream the bad record is rejected, named in the envelope, the good one kept."""
    ctx = await run(stage(), "readings", [record, GOOD])
    sent = envelope(ctx)
    assert [r["index"] for r in sent["records"]] == [1]
    assert sent["records"][0]["status"] == "accepted"
    failure = sent["rejected"][0]["failures"][0]
    assert (sent["rejected"][0]["index"], failure["rule"], failure["pointer"]) == (0, rule, pointer)
    assert phrase in failure["message"]
    summary = ctx.detail["validation"]
    assert (summary["accepted"], summary["rejected"], summary["quarantined"]) == (1, 1, 0)


@pytest.mark.parametrize(("record", "rule", "pointer", "phrase"), BAD_RECORDS)
async def test_bad_record_refuses_an_all_or_nothing_batch(record, rule, pointer, phrase):
    """An unlisted stream is all-or-nothing: one bad record is a 422 with a receipt, nothing sent."""
    strict = dataclasses.replace(PLAIN.streams["readings"], mode="all_or_nothing")
    catalog = StreamCatalog(streams={"readings": strict})
    denial = await refused(stage(catalog), "readings", [GOOD, record])
    assert denial.status == 422
    assert denial.reason_id in {"validation.schema", "validation.rule"}
    assert denial.receipt is not None
    assert (denial.receipt["stored"], denial.receipt["rejected"]) == (0, 1)
    entry = denial.receipt["records"][0]
    assert entry["index"] == 1
    assert entry["failures"][0]["rule"] == rule
    assert entry["failures"][0]["pointer"] == "/1" + pointer[2:]
    assert denial.detail["rule"] == rule
    assert phrase in denial.detail["message"]


async def test_sensitive_values_never_reach_the_audit_summary():
    """A failing value in a field marked sensitive is masked; others are shown, truncated."""
    ctx = await run(stage(), "readings", [
        {**GOOD, "operator_email": "alice-secret.example"},
        {**GOOD, "humidity": 120},
        GOOD,
    ])  # fmt: skip
    failures = ctx.detail["validation"]["failures"]
    assert [(f["index"], f["value"]) for f in failures] == [(0, "***"), (1, "120")]
    assert "alice-secret" not in json.dumps(ctx.detail)
    assert "alice-secret" not in ctx.body.decode()


MALFORMED = [
    pytest.param(b'[{"n": NaN}]', JSON, 400, "validation.malformed_json", "NaN", id="nan"),
    pytest.param(b'[{"n": Infinity}]', JSON, 400, "validation.malformed_json", "Infinity",
                 id="infinity"),
    pytest.param(b'[{"n": 1e999}]', JSON, 400, "validation.malformed_json", "out of range",
                 id="overflow_to_infinity"),
    pytest.param(b'[{"n": 1, "n": 2}]', JSON, 400, "validation.malformed_json", "duplicate key",
                 id="duplicate_key"),
    pytest.param(b"[" + b'{"a":' * 40 + b"1" + b"}" * 40 + b"]", JSON, 400,
                 "validation.malformed_json", "deeper than 32", id="nesting"),
    pytest.param(b"[" * 100_000, JSON, 400, "validation.malformed_json", "",
                 id="deep_unclosed_arrays"),
    pytest.param(b'[{"n": "\xff"}]', JSON, 400, "validation.malformed_json", "not UTF-8",
                 id="not_utf8"),
    pytest.param(b'\xef\xbb\xbf[{"n": 1}]', JSON, 400, "validation.malformed_json", "",
                 id="utf8_bom"),
    pytest.param(b'[{"n": 1}', JSON, 400, "validation.malformed_json", "not valid JSON",
                 id="truncated"),
    pytest.param(b'{"n": 1}\n{"n": }\n', NDJSON, 400, "validation.malformed_json", "line 2",
                 id="ndjson_bad_line"),
    pytest.param(b"n,1\n", "text/csv", 415, "validation.content_type", "text/csv",
                 id="wrong_content_type"),
    pytest.param(b'[{"n": "\\ud800"}]', JSON, 400, "validation.malformed_json",
                 "unpaired surrogate", id="lone_surrogate"),
    pytest.param(b'[{"n": ' + b"9" * 5000 + b"}]", JSON, 400, "validation.malformed_json",
                 "not valid JSON", id="integer_of_5000_digits"),
    pytest.param(b"[]", JSON, 422, "validation.schema", "no records", id="empty_batch"),
    pytest.param(b"[" + b",".join([b'{"n":1}'] * 10_001) + b"]", JSON, 413,
                 "validation.batch_too_large", "at most 10000", id="too_many_records"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "content_type", "status", "reason", "phrase"), MALFORMED)
async def test_malformed_bodies_are_refused_before_any_record_check(
    body, content_type, status, reason, phrase
):
    """Malformed input is refused as a whole, with a clear error, before schemas or models."""
    denial = await refused(stage(), "readings", body, content_type)
    assert (denial.status, denial.reason_id) == (status, reason)
    assert phrase in denial.message


async def test_unknown_stream_is_refused_when_the_config_says_so():
    """unknown_streams = "reject": a stream not in the file is 404 validation.unknown_stream."""
    catalog = StreamCatalog(streams=PLAIN.streams, unknown_streams="reject")
    denial = await refused(stage(catalog), "nobody-knows", [GOOD])
    assert (denial.status, denial.reason_id) == (404, "validation.unknown_stream")
    ctx = await run(stage(catalog), "readings", [GOOD])
    assert envelope(ctx)["rejected"] == []


async def test_a_batch_with_no_good_record_is_refused_even_in_partial_mode():
    """Partial mode stores what passes; when nothing passes the answer is a 422 with a receipt."""
    denial = await refused(stage(), "readings", [{**GOOD, "humidity": 120}, 5])
    assert denial.reason_id == "validation.schema"
    assert denial.receipt is not None
    assert [r["index"] for r in denial.receipt["records"]] == [0, 1]
    assert denial.receipt["note"] == "no record passed"


def _baselines(fields: dict[str, dict[str, float]]) -> Baselines:
    async def fetch(_stream, _fields, _window, _max):
        return {"fields": fields}

    return Baselines(CATALOG.with_statistics(), fetch)


STATS = StreamCatalog(streams={
    "readings": dataclasses.replace(CATALOG.streams["readings"], model=None),
})  # fmt: skip
NORMAL = {"count": 1000, "mean": 21.0, "stddev": 2.0, "median": 21.0, "mad": 1.35,
          "q1": 19.65, "q3": 22.35}  # fmt: skip
HUMID = {"count": 1000, "mean": 45.0, "stddev": 8.0, "median": 45.0, "mad": 5.4,
         "q1": 39.6, "q3": 50.4}  # fmt: skip


async def test_statistical_outliers_are_quarantined_with_the_rule_and_field():
    """A 10-sigma temperature and an out-of-fence humidity are quarantined, not rejected."""
    baselines = _baselines({"temperature": NORMAL, "humidity": HUMID,
                            "latency_ms": {"count": 0}})  # fmt: skip
    await baselines.refresh("readings")
    ctx = await run(stage(STATS, baselines=baselines), "readings", [
        GOOD, {**GOOD, "temperature": 41.0}, {**GOOD, "humidity": 95.0},
    ])  # fmt: skip
    sent = envelope(ctx)
    assert [(r["index"], r["status"]) for r in sent["records"]] == [
        (0, "accepted"), (1, "quarantined"), (2, "quarantined"),
    ]  # fmt: skip
    flags = {r["index"]: r["flags"][0] for r in sent["records"] if "flags" in r}
    assert (flags[1]["rule"], flags[1]["pointer"]) == ("stats.mad", "/1/temperature")
    assert "robust z-score" in flags[1]["message"]
    assert (flags[2]["rule"], flags[2]["pointer"]) == ("stats.iqr", "/2/humidity")
    assert ctx.detail["validation"]["rules"] == {"quarantined": {"stats.mad": 1, "stats.iqr": 1}}


async def test_too_few_samples_is_a_cold_start_and_accepts_by_default():
    """Below min_samples the check cannot judge: on_cold_start (accept) applies."""
    baselines = _baselines({"temperature": {**NORMAL, "count": 10}, "humidity": HUMID})
    await baselines.refresh("readings")
    ctx = await run(stage(STATS, baselines=baselines), "readings", [{**GOOD, "temperature": 41.0}])
    assert envelope(ctx)["records"][0]["status"] == "accepted"


async def test_no_baseline_is_an_error_that_quarantines_never_a_pass():
    """When the upstream cannot give a baseline, records are quarantined (on_error)."""

    async def broken(*_args):
        raise ConnectionError("upstream down")

    baselines = Baselines(CATALOG.with_statistics(), broken)
    started = time.monotonic()
    ctx = await run(stage(STATS, baselines=baselines), "readings", [GOOD])
    assert time.monotonic() - started < 3.0
    record = envelope(ctx)["records"][0]
    assert (record["status"], record["flags"][0]["rule"]) == ("quarantined", "stats.unavailable")
    assert "ConnectionError" in baselines.error("readings")


async def test_a_stale_baseline_is_an_error_too():
    """A baseline older than max_age_seconds (refresh failing since) no longer passes records."""
    now = [1000.0]
    baselines = Baselines(
        CATALOG.with_statistics(),
        _baselines({"temperature": NORMAL, "humidity": HUMID})._fetch,
        clock=lambda: now[0],
    )
    await baselines.refresh("readings")
    assert await baselines.current("readings") is not None
    now[0] += 1801.0
    assert await baselines.current("readings") is None

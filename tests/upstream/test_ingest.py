"""Ingest streams: JSON, NDJSON and envelope batches, receipts, refusals, and reading back."""

import json

import pytest
from support.envelopes import (
    FAILURE,
    FLAG,
    MODEL,
    accepted,
    envelope,
    post_envelope,
    quarantined,
    rejected,
    sql,
)

JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}


async def post(api, stream: str, body: bytes, headers: dict[str, str], status: int):
    return await api.json("POST", f"/api/ingest/{stream}", status, data=body, headers=headers)


async def test_json_array_is_one_batch_with_a_receipt_per_record(api) -> None:
    """A JSON array of objects is accepted whole, with one receipt line per record."""
    body = json.dumps([{"n": 1}, {"n": 2}, {"n": 3}]).encode()
    receipt = await post(api, "clicks", body, JSON, 201)
    assert receipt["stream"] == "clicks"
    assert (receipt["received"], receipt["accepted"]) == (3, 3)
    assert (receipt["quarantined"], receipt["rejected"]) == (0, 0)
    assert receipt["records"] == [{"index": i, "status": "accepted"} for i in range(3)]
    assert len(receipt["batch_id"]) == 36


async def test_single_json_object_is_a_batch_of_one(api) -> None:
    """A lone JSON object is stored as a one-record batch."""
    receipt = await post(api, "clicks", b'{"n": 1}', JSON, 201)
    assert receipt["received"] == 1


async def test_ndjson_skips_blank_lines(api) -> None:
    """NDJSON stores one record per non-blank line."""
    receipt = await post(api, "logs", b'{"n": 1}\n\n{"n": 2}\r\n', NDJSON, 201)
    assert receipt["received"] == 2


async def test_recent_records_are_newest_first(api, subject: str) -> None:
    """GET answers the newest records first, across batches, with their batch and index."""
    first = await post(api, "logs", b'{"n": 1}\n{"n": 2}', NDJSON, 201)
    second = await post(api, "logs", b'[{"n": 3}]', JSON, 201)
    await post(api, "other", b'{"n": 99}', JSON, 201)
    answer = await api.json("GET", "/api/ingest/logs", 200)
    assert answer["stream"] == "logs"
    assert [item["record"] for item in answer["items"]] == [{"n": 3}, {"n": 2}, {"n": 1}]
    assert [(item["batch_id"], item["index"]) for item in answer["items"]] == [
        (second["batch_id"], 0),
        (first["batch_id"], 1),
        (first["batch_id"], 0),
    ]
    assert answer["items"][0]["received_at"].endswith("Z")


async def test_recent_records_honour_limit(api) -> None:
    """?limit caps how many records come back."""
    await post(api, "logs", b"\n".join(b'{"n": %d}' % n for n in range(5)), NDJSON, 201)
    answer = await api.json("GET", "/api/ingest/logs?limit=2", 200)
    assert [item["record"]["n"] for item in answer["items"]] == [4, 3]


async def test_records_keep_their_nested_json(api) -> None:
    """Records round-trip unchanged, nested values and unicode included."""
    record = {"user": {"id": 7, "tags": ["a", "b"]}, "ok": True, "note": "caf\u00e9 \u2028"}
    await post(api, "events", json.dumps(record).encode(), JSON, 201)
    answer = await api.json("GET", "/api/ingest/events", 200)
    assert answer["items"][0]["record"] == record


@pytest.mark.parametrize(
    ("body", "headers", "mentions"),
    [
        pytest.param(b'{"n": 1}\n{oops\n', NDJSON, "line 2", id="malformed NDJSON line"),
        pytest.param(b'{"n": 1}\n[1, 2]\n', NDJSON, "line 2", id="NDJSON line not an object"),
        pytest.param(b'[{"n": 1}, 2]', JSON, "record 1", id="array item not an object"),
        pytest.param(b"[{", JSON, "not valid JSON", id="malformed JSON"),
        pytest.param(b'"just a string"', JSON, "record 0", id="JSON scalar"),
        pytest.param(b"[]", JSON, "empty", id="empty array"),
        pytest.param(b"\n \n", NDJSON, "empty", id="blank NDJSON"),
        pytest.param(b"", JSON, "not valid JSON", id="no body"),
        pytest.param(b'{"n": NaN}', JSON, "NaN", id="NaN"),
    ],
)
async def test_bad_batch_is_400_naming_the_record(api, body, headers, mentions: str) -> None:
    """A bad record refuses the whole batch and says which line or index."""
    answer = await post(api, "logs", body, headers, 400)
    assert answer["reason_id"] == "upstream.bad_request"
    assert mentions in answer["error"]
    stored = await api.json("GET", "/api/ingest/logs", 200)
    assert stored["items"] == []


async def test_batch_over_the_record_limit_is_400(api) -> None:
    """More than 10,000 records in one batch is refused."""
    body = b"\n".join([b"{}"] * 10_001)
    answer = await post(api, "logs", body, NDJSON, 400)
    assert "10000" in answer["error"]


async def test_batch_at_the_record_limit_is_accepted(api) -> None:
    """Exactly 10,000 records is one accepted batch."""
    body = json.dumps([{"n": n} for n in range(10_000)]).encode()
    receipt = await post(api, "bulk", body, JSON, 201)
    assert receipt["accepted"] == 10_000


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data"])
async def test_other_content_types_are_415(api, content_type: str) -> None:
    """Only JSON, NDJSON and the gateway's envelope are ingested; the 415 names all three."""
    answer = await post(api, "logs", b"{}", {"Content-Type": content_type}, 415)
    assert answer["reason_id"] == "upstream.unsupported_media_type"
    assert "application/vnd.emp.ingest-batch+json" in answer["error"]


async def test_number_too_large_for_a_double_is_400(api) -> None:
    """1e400 parses to infinity, which is not JSON, so the batch is refused."""
    answer = await post(api, "logs", b'[{"n": 1}, {"n": 1e400}]', JSON, 400)
    assert "record 1" in answer["error"]


@pytest.mark.parametrize(
    "stream",
    ["Upper", "_leading", "-leading", "has.dot", "a" * 65, "sp%20ace"],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_bad_stream_name_is_400(api, method: str, stream: str) -> None:
    """Stream names match ^[a-z0-9][a-z0-9_-]{0,63}$."""
    answer = await api.json(method, f"/api/ingest/{stream}", 400, data=b"{}", headers=JSON)
    assert answer["reason_id"] == "upstream.bad_request"


@pytest.mark.parametrize("query", ["limit=1001", "limit=x", "since=1"])
async def test_bad_recent_query_is_400(api, query: str) -> None:
    """limit is 0-1000 and the only parameter."""
    await api.json("GET", f"/api/ingest/logs?{query}", 400)


async def _stored(api) -> tuple[list[tuple], list[tuple]]:
    records = await sql(api, "SELECT record_index FROM ingest_records ORDER BY record_index")
    quarantine = await sql(api, "SELECT record_index FROM ingest_quarantine ORDER BY record_index")
    return records, quarantine


async def test_envelope_stores_accepted_and_quarantined_and_answers_in_index_order(
    api, subject: str
) -> None:
    """Accepted records are stored, quarantined ones set aside, rejected ones only reported."""
    document = envelope(
        [
            accepted(0, {"temperature": 21.5}, score=0.12),
            quarantined(2, {"temperature": 99.0}, score=9.1),
        ],
        [rejected(1), rejected(3)],
    )
    receipt = await post_envelope(api, "sensors", document)
    counts = [receipt[key] for key in ("received", "accepted", "quarantined", "rejected")]
    assert (receipt["stream"], counts) == ("sensors", [4, 1, 1, 2])
    (quarantine_id,) = [row[0] for row in await sql(api, "SELECT id FROM ingest_quarantine")]
    assert receipt["records"] == [
        {"index": 0, "status": "accepted", "score": 0.12},
        {"index": 1, "status": "rejected", "failures": [FAILURE]},
        {
            "index": 2,
            "status": "quarantined",
            "quarantine_id": quarantine_id,
            "score": 9.1,
            "flags": [FLAG],
        },
        {"index": 3, "status": "rejected", "failures": [FAILURE]},
    ]
    stored = await sql(
        api, "SELECT batch_id, record_index, score, model, received_by FROM ingest_records"
    )
    assert [(str(row[0]), *row[1:]) for row in stored] == [
        (receipt["batch_id"], 0, 0.12, MODEL, subject)
    ]
    held = await sql(
        api,
        "SELECT batch_id, record_index, score, model, received_by, status, flags::VARCHAR"
        " FROM ingest_quarantine",
    )
    assert [(str(row[0]), *row[1:6], json.loads(row[6])) for row in held] == [
        (receipt["batch_id"], 2, 9.1, MODEL, subject, "pending", [FLAG])
    ]
    recent = await api.json("GET", "/api/ingest/sensors", 200)
    assert [item["record"] for item in recent["items"]] == [{"temperature": 21.5}]
    assert (recent["items"][0]["score"], recent["items"][0]["model"]) == (0.12, MODEL)


async def test_envelope_without_scores_omits_them_from_the_receipt(api) -> None:
    """A null or absent score is stored as NULL and left out of the receipt line."""
    entry = {"index": 0, "status": "accepted", "record": {"n": 1}}
    receipt = await post_envelope(api, "sensors", {"received": 1, "records": [entry]})
    assert receipt["records"] == [{"index": 0, "status": "accepted"}]
    assert await sql(api, "SELECT score, model FROM ingest_records") == [(None, None)]


async def test_envelope_of_only_quarantined_records_stores_no_accepted_record(api) -> None:
    """When every record is quarantined, the stream gains nothing readable yet."""
    document = envelope([quarantined(0, {"t": 1}), quarantined(1, {"t": 2})])
    receipt = await post_envelope(api, "sensors", document)
    assert (receipt["accepted"], receipt["quarantined"]) == (0, 2)
    assert len({line["quarantine_id"] for line in receipt["records"]}) == 2
    assert await _stored(api) == ([], [(0,), (1,)])


async def test_envelope_at_the_record_limit_is_stored_whole(api) -> None:
    """A 10,000-record envelope, mixed accepted/quarantined/rejected, is one batch."""
    records = []
    refused = []
    for index in range(10_000):
        if index % 10 == 0:
            refused.append(rejected(index))
        elif index % 10 == 1:
            records.append(quarantined(index, {"n": index}))
        else:
            records.append(accepted(index, {"n": index}, score=index / 10))
    receipt = await post_envelope(api, "bulk", envelope(records, refused))
    assert [receipt[key] for key in ("accepted", "quarantined", "rejected")] == [8000, 1000, 1000]
    assert [line["index"] for line in receipt["records"]] == list(range(10_000))
    counts = await sql(
        api,
        "SELECT (SELECT count(DISTINCT batch_seq) FROM ingest_records),"
        " (SELECT count(*) FROM ingest_records), (SELECT count(*) FROM ingest_quarantine)",
    )
    assert counts == [(1, 8000, 1000)]


def _with(entry: dict, **changes: object) -> dict:
    return {**entry, **changes}


def _without(entry: dict, key: str) -> dict:
    return {name: value for name, value in entry.items() if name != key}


_OK = accepted(0, {"n": 1})
_HELD = quarantined(1, {"n": 2})
_LONG = "x" * 501


@pytest.mark.parametrize(
    ("document", "mentions"),
    [
        pytest.param({"received": 3, "records": [_OK, _HELD]}, "index 2 is missing", id="missing index"),
        pytest.param({"received": 2, "records": [_OK, _with(_HELD, index=0)]}, "more than once", id="duplicate index"),
        pytest.param({"received": 2, "records": [_OK], "rejected": [rejected(0)]}, "more than once", id="index both accepted and rejected"),
        pytest.param({"received": 2, "records": [_OK, _with(_HELD, index=2)]}, "/records/1/index", id="index out of range"),
        pytest.param({"received": 1, "records": [_with(_OK, index=-1)]}, "/records/0/index", id="negative index"),
        pytest.param({"received": 1, "records": [_with(_OK, index=True)]}, "/records/0/index", id="boolean index"),
        pytest.param({"received": 1, "records": [_with(_OK, index=0.0)]}, "/records/0/index", id="float index"),
        pytest.param({"received": 1, "records": [_without(_OK, "index")]}, "/records/0/index is required", id="index missing"),
        pytest.param({"received": 1, "records": [_with(_OK, status="rejected")]}, "/records/0/status", id="status rejected in records"),
        pytest.param({"received": 1, "records": [_with(_OK, status="ok")]}, "/records/0/status", id="unknown status"),
        pytest.param({"received": 1, "records": [_with(_OK, score="0.1")]}, "/records/0/score", id="score as string"),
        pytest.param({"received": 1, "records": [_with(_OK, score=True)]}, "/records/0/score", id="score as boolean"),
        pytest.param({"received": 1, "records": [_with(_OK, record=[1, 2])]}, "/records/0/record", id="record is an array"),
        pytest.param({"received": 1, "records": [_with(_OK, record="text")]}, "/records/0/record", id="record is a string"),
        pytest.param({"received": 1, "records": [_without(_OK, "record")]}, "/records/0/record is required", id="record missing"),
        pytest.param({"received": 1, "records": [_OK], "extra": 1}, "/extra", id="unknown top-level key"),
        pytest.param({"received": 1, "records": [_with(_OK, weight=1)]}, "/records/0/weight", id="unknown record key"),
        pytest.param({"received": 2, "records": [_OK], "rejected": [_with(rejected(1), why="x")]}, "/rejected/0/why", id="unknown rejected key"),
        pytest.param({"received": 2, "records": [_OK, _with(_HELD, flags=[{**FLAG, "severity": 1}])]}, "/records/1/flags/0/severity", id="unknown flag key"),
        pytest.param({"received": 2, "records": [_OK, _without(_HELD, "flags")]}, "/records/1/flags is required", id="quarantined without flags"),
        pytest.param({"received": 2, "records": [_OK, _with(_HELD, flags=[])]}, "/records/1/flags", id="quarantined with empty flags"),
        pytest.param({"received": 1, "records": [_with(_OK, flags=[FLAG])]}, "/records/0/flags", id="accepted with flags"),
        pytest.param({"received": 2, "records": [_OK, _with(_HELD, flags=[{**FLAG, "rule": 5}])]}, "/records/1/flags/0/rule", id="flag rule not a string"),
        pytest.param({"received": 2, "records": [_OK, _with(_HELD, flags=[_without(FLAG, "message")])]}, "/records/1/flags/0/message is required", id="flag without message"),
        pytest.param({"received": 2, "records": [_OK, _with(_HELD, flags=[FLAG] * 51)]}, "more than 50", id="51 flags"),
        pytest.param({"received": 2, "records": [_OK, _with(_HELD, flags=[{**FLAG, "message": _LONG}])]}, "longer than 500", id="flag message over 500"),
        pytest.param({"received": 2, "records": [_OK, _with(_HELD, flags=[{**FLAG, "pointer": _LONG}])]}, "longer than 500", id="flag pointer over 500"),
        pytest.param({"received": 2, "records": [_OK], "rejected": [{"index": 1, "failures": [{**FAILURE, "rule": _LONG}]}]}, "longer than 500", id="failure rule over 500"),
        pytest.param({"received": 2, "records": [_OK], "rejected": [{"index": 1, "failures": [FAILURE] * 51}]}, "more than 50", id="51 failures"),
        pytest.param({"received": 2, "records": [_OK], "rejected": [{"index": 1, "failures": []}]}, "/rejected/0/failures", id="rejected without failures"),
        pytest.param({"received": 1, "records": [_with(_OK, model="m" * 101)]}, "longer than 100", id="model over 100"),
        pytest.param({"received": 1, "records": [_with(_OK, model=3)]}, "/records/0/model", id="model not a string"),
        pytest.param({"received": 1, "records": []}, "empty", id="empty records"),
        pytest.param({"received": 1, "records": [], "rejected": [rejected(0)]}, "empty", id="every record rejected"),
        pytest.param({"received": 0, "records": [_OK]}, "/received", id="received zero"),
        pytest.param({"received": 10_001, "records": [_OK]}, "/received", id="received over the limit"),
        pytest.param({"received": "1", "records": [_OK]}, "/received", id="received as string"),
        pytest.param({"records": [_OK]}, "/received is required", id="received missing"),
        pytest.param({"received": 1}, "/records is required", id="records missing"),
        pytest.param({"received": 1, "records": {"0": _OK}}, "/records must be a JSON array", id="records not an array"),
        pytest.param([_OK], "must be a JSON object", id="envelope is an array"),
        pytest.param({"received": 1, "records": ["x"]}, "/records/0 must be a JSON object", id="entry not an object"),
    ],
)  # fmt: skip
async def test_bad_envelope_is_400_and_stores_nothing(api, document, mentions: str) -> None:
    """Every malformed envelope is refused whole, naming the JSON pointer at fault."""
    answer = await post_envelope(api, "sensors", document, 400)
    assert answer["reason_id"] == "upstream.bad_request"
    assert mentions in answer["error"]
    assert await _stored(api) == ([], [])


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        pytest.param(b'{"received": 1, "records": [{"index": 0, "status": "accepted", "record": {}, "score": NaN}]}', "NaN", id="NaN score"),
        pytest.param(b'{"received": 1, "records": [{"index": 0, "status": "accepted", "record": {}, "score": Infinity}]}', "Infinity", id="Infinity score"),
        pytest.param(b'{"received": 1, "records": [{"index": 0, "status": "accepted", "record": {}, "score": 1e400}]}', "/records/0/score", id="score overflowing to infinity"),
        pytest.param(b'{"received": 1, "records": [{"index": 0, "status": "accepted", "record": {"t": -1e400}}]}', "/records/0/record", id="record number overflowing"),
        pytest.param(b'{"received": 1, "records": [{"index": 0, "status": "accepted", "record": {"t": NaN}}]}', "NaN", id="NaN in record"),
        pytest.param(b'{"received": 1, "records": [', "not valid JSON", id="truncated JSON"),
        pytest.param(b"", "not valid JSON", id="empty body"),
        pytest.param(b"\xff\xfe", "UTF-8", id="not UTF-8"),
    ],
)  # fmt: skip
async def test_envelope_that_is_not_strict_json_is_400(api, body: bytes, mentions: str) -> None:
    """NaN, Infinity, overflowing numbers and broken JSON refuse the whole envelope."""
    answer = await post_envelope(api, "sensors", body, 400)
    assert mentions in answer["error"]
    assert await _stored(api) == ([], [])

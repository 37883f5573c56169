"""Ingest streams: JSON and NDJSON batches, receipts, refusals, and reading back."""

import json

import pytest

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
    """Only application/json and application/x-ndjson are ingested."""
    answer = await post(api, "logs", b"{}", {"Content-Type": content_type}, 415)
    assert answer["reason_id"] == "upstream.unsupported_media_type"


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

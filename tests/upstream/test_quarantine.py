"""The ingest quarantine: listing flagged records, accepting or discarding each exactly once."""

import asyncio

import pytest
from support.envelopes import FLAG, MODEL, accepted, envelope, post_envelope, quarantined, sql

ITEM_KEYS = {
    "id", "batch_id", "index", "record", "score", "model", "flags", "received_at",
    "received_by", "status", "reviewed_by", "reviewed_at", "review_note",
}  # fmt: skip
REVIEWER = {"X-Gateway-Subject": "reviewer@example.com"}


async def hold(api, stream: str, *records: dict) -> list[int]:
    """Quarantine records in one envelope (after one accepted record); return their ids."""
    entries = [accepted(0, {"ok": True})]
    entries += [quarantined(index, record) for index, record in enumerate(records, start=1)]
    receipt = await post_envelope(api, stream, envelope(entries))
    return [line["quarantine_id"] for line in receipt["records"] if "quarantine_id" in line]


async def listing(api, stream: str, query: str = "") -> list[dict]:
    answer = await api.json("GET", f"/api/ingest/{stream}/quarantine?{query}", 200)
    assert answer["stream"] == stream
    return answer["items"]


async def decide(api, stream: str, row_id: object, decision: str, status: int, **kwargs):
    path = f"/api/ingest/{stream}/quarantine/{row_id}/{decision}"
    return await api.json("POST", path, status, **kwargs)


async def test_pending_records_are_listed_newest_first(api, subject: str) -> None:
    """The default listing is pending records of the stream, newest first, with every field."""
    first, second = await hold(api, "sensors", {"t": 90}, {"t": 95})
    (third,) = await hold(api, "sensors", {"t": 99})
    await hold(api, "other", {"t": 1})
    items = await listing(api, "sensors")
    assert [item["id"] for item in items] == [third, second, first]
    item = items[-1]
    assert set(item) == ITEM_KEYS
    assert (item["index"], item["record"]) == (1, {"t": 90})
    assert (item["score"], item["model"]) == (9.1, MODEL)
    assert (item["flags"], item["received_by"], item["status"]) == ([FLAG], subject, "pending")
    assert item["received_at"].endswith("Z")
    assert (item["reviewed_by"], item["reviewed_at"], item["review_note"]) == (None, None, None)


async def test_listing_pages_with_limit_and_offset(api) -> None:
    """limit and offset page through the newest-first listing."""
    ids = await hold(api, "sensors", *({"t": n} for n in range(5)))
    page = await listing(api, "sensors", "limit=2&offset=1")
    assert [item["id"] for item in page] == [ids[3], ids[2]]


async def test_accept_copies_the_record_into_the_stream(api) -> None:
    """Accepting marks the row and makes the record readable, with its batch and index kept."""
    (row_id,) = await hold(api, "sensors", {"t": 99})
    item = await decide(
        api, "sensors", row_id, "accept", 200, json={"note": "a real heat wave"}, headers=REVIEWER
    )
    assert (item["id"], item["status"]) == (row_id, "accepted")
    assert item["review_note"] == "a real heat wave"
    assert item["reviewed_by"] == "reviewer@example.com"
    assert item["reviewed_at"].endswith("Z")
    recent = await api.json("GET", "/api/ingest/sensors", 200)
    newest = recent["items"][0]
    assert newest["record"] == {"t": 99}
    assert (newest["batch_id"], newest["index"]) == (item["batch_id"], 1)
    assert newest["received_at"] == item["received_at"]
    stored = await sql(
        api, "SELECT score, model, received_by FROM ingest_records WHERE record_index = 1"
    )
    assert stored == [(9.1, MODEL, item["received_by"])]
    stats = await api.json("GET", "/api/ingest/sensors/stats?field=t", 200)
    assert stats["fields"]["t"]["count"] == 1
    assert await listing(api, "sensors") == []
    assert [i["id"] for i in await listing(api, "sensors", "status=accepted")] == [row_id]


async def test_discard_only_marks_the_row(api) -> None:
    """Discarding keeps the record out of the stream and lists it as discarded."""
    (row_id,) = await hold(api, "sensors", {"t": 99})
    item = await decide(api, "sensors", row_id, "discard", 200)
    assert (item["status"], item["review_note"]) == ("discarded", None)
    recent = await api.json("GET", "/api/ingest/sensors", 200)
    assert [i["record"] for i in recent["items"]] == [{"ok": True}]
    assert [i["id"] for i in await listing(api, "sensors", "status=discarded")] == [row_id]
    assert len(await listing(api, "sensors", "status=all")) == 1


@pytest.mark.parametrize(
    ("first", "second", "done"),
    [
        pytest.param("accept", "accept", "accepted", id="accept twice"),
        pytest.param("accept", "discard", "accepted", id="discard after accept"),
        pytest.param("discard", "accept", "discarded", id="accept after discard"),
        pytest.param("discard", "discard", "discarded", id="discard twice"),
    ],
)
async def test_second_review_is_409(api, subject: str, first: str, second: str, done: str) -> None:
    """A record is reviewed once; a second review is a conflict that changes nothing."""
    (row_id,) = await hold(api, "sensors", {"t": 99})
    await decide(api, "sensors", row_id, first, 200)
    answer = await decide(api, "sensors", row_id, second, 409)
    assert answer["reason_id"] == "upstream.conflict"
    assert f"already {done} by {subject}" in answer["error"]
    accepted_rows = await sql(api, "SELECT count(*) FROM ingest_records WHERE record_index = 1")
    assert accepted_rows == [(1 if done == "accepted" else 0,)]


async def test_concurrent_accepts_copy_the_record_once(api) -> None:
    """Two reviewers racing to accept: one wins, the other gets 409."""
    (row_id,) = await hold(api, "sensors", {"t": 99})
    path = f"/api/ingest/sensors/quarantine/{row_id}/accept"
    responses = await asyncio.gather(*(api.call("POST", path) for _ in range(5)))
    assert sorted(response.status for response in responses) == [200, 409, 409, 409, 409]
    assert await sql(api, "SELECT count(*) FROM ingest_records WHERE record_index = 1") == [(1,)]


@pytest.mark.parametrize("decision", ["accept", "discard"])
@pytest.mark.parametrize(
    ("stream", "row_id"),
    [
        pytest.param("sensors", "999", id="unknown id"),
        pytest.param("other", "{id}", id="another stream's id"),
        pytest.param("sensors", "0", id="zero"),
        pytest.param("sensors", "abc", id="not a number"),
        pytest.param("sensors", "99999999999999999999", id="too large"),
    ],
)
async def test_review_of_a_record_the_stream_does_not_hold_is_404(
    api, decision: str, stream: str, row_id: str
) -> None:
    """Ids of other streams answer like missing ones, so ids do not leak across streams."""
    (held,) = await hold(api, "sensors", {"t": 99})
    answer = await decide(api, stream, row_id.format(id=held), decision, 404)
    assert answer["reason_id"] == "upstream.not_found"
    assert f"stream '{stream}' has no quarantined record" in answer["error"]
    assert [item["status"] for item in await listing(api, "sensors")] == ["pending"]


@pytest.mark.parametrize(
    ("kwargs", "status", "mentions"),
    [
        pytest.param({"json": {"note": "x" * 501}}, 400, "at most 500", id="note over 500"),
        pytest.param({"json": {"note": 5}}, 400, "'note'", id="note not a string"),
        pytest.param({"json": {"note": "ok", "status": "accepted"}}, 400, "'status'", id="unknown key"),
        pytest.param({"json": ["note"]}, 400, "JSON object", id="body is an array"),
        pytest.param({"data": b"{oops", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON", id="malformed JSON"),
        pytest.param({"data": b'{"note": NaN}', "headers": {"Content-Type": "application/json"}}, 400, "NaN", id="NaN"),
        pytest.param({"data": b"note", "headers": {"Content-Type": "text/plain"}}, 415, "application/json", id="not JSON"),
    ],
)  # fmt: skip
async def test_bad_review_body_is_refused_and_changes_nothing(
    api, kwargs: dict, status: int, mentions: str
) -> None:
    """The optional body is {"note": "..."} at most; anything else leaves the record pending."""
    (row_id,) = await hold(api, "sensors", {"t": 99})
    answer = await decide(api, "sensors", row_id, "accept", status, **kwargs)
    assert mentions in answer["error"]
    assert [item["status"] for item in await listing(api, "sensors")] == ["pending"]


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="no body"),
        pytest.param({"json": {}}, id="empty object"),
        pytest.param({"json": {"note": None}}, id="null note"),
    ],
)
async def test_review_without_a_note_is_allowed(api, kwargs: dict) -> None:
    """An empty body, {} and a null note all review without a note."""
    (row_id,) = await hold(api, "sensors", {"t": 99})
    item = await decide(api, "sensors", row_id, "discard", 200, **kwargs)
    assert (item["status"], item["review_note"]) == ("discarded", None)


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("status=rejected", id="unknown status"),
        pytest.param("status=pending&status=all", id="status twice"),
        pytest.param("limit=0", id="limit zero"),
        pytest.param("limit=501", id="limit over 500"),
        pytest.param("offset=-1", id="negative offset"),
        pytest.param("stream=other", id="unknown parameter"),
    ],
)
async def test_bad_listing_query_is_400(api, query: str) -> None:
    """status is pending, accepted, discarded or all; limit 1-500; nothing else."""
    answer = await api.json("GET", f"/api/ingest/sensors/quarantine?{query}", 400)
    assert answer["reason_id"] == "upstream.bad_request"


async def test_quarantine_routes_refuse_other_methods(api) -> None:
    """Reviews are POST only and the listing is GET only."""
    (row_id,) = await hold(api, "sensors", {"t": 99})
    await api.json("GET", f"/api/ingest/sensors/quarantine/{row_id}/accept", 405)
    await api.json("DELETE", "/api/ingest/sensors/quarantine", 405)

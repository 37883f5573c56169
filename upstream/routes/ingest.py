"""``/api/ingest/{stream}``: append a batch of JSON records, read a stream's newest records.

A batch is parsed completely before anything is stored, so it must never be half-written.
"""

import asyncio
import json

from aiohttp import web

from upstream.batches import ENVELOPE, parse_batch, serialise_record
from upstream.envelope import Envelope, parse_envelope
from upstream.routes import ingest_stats, quarantine
from upstream.routes.common import database, subject
from upstream.routes.streams import refuse_unknown_parameters, stream_name
from upstream.store.ingest import StoredEnvelope, append_batch, append_envelope, recent_records
from upstream.validation import parse_count

STREAM_PATH = "/api/ingest/{stream}"
DEFAULT_RECENT = 100
MAX_RECENT = 1000


def _serialised_records(content_type: str, body: bytes) -> list[str]:
    records = parse_batch(content_type, body)
    return [serialise_record(record, f"record {index}") for index, record in enumerate(records)]


async def _post_records(request: web.Request, stream: str) -> dict[str, object]:
    body = await request.read()
    # Parsing and re-serialising up to 10,000 records takes tens of milliseconds:
    # too long for the event loop, so it runs in a thread.
    serialised = await asyncio.to_thread(_serialised_records, request.content_type, body)
    received_by = subject(request)
    batch_id = await database(request).write(
        lambda cursor: append_batch(cursor, stream, serialised, received_by)
    )
    return {
        "stream": stream,
        "batch_id": str(batch_id),
        "received": len(serialised),
        "accepted": len(serialised),
        "quarantined": 0,
        "rejected": 0,
        "records": [{"index": index, "status": "accepted"} for index in range(len(serialised))],
    }


def _with_score(line: dict[str, object], score: float | None) -> dict[str, object]:
    if score is not None:
        line["score"] = score
    return line


def _envelope_lines(envelope: Envelope, stored: StoredEnvelope) -> list[dict[str, object]]:
    lines: dict[int, dict[str, object]] = {}
    for record in envelope.accepted:
        lines[record.index] = _with_score(
            {"index": record.index, "status": "accepted"}, record.score
        )
    for record in envelope.quarantined:
        line = {
            "index": record.index,
            "status": "quarantined",
            "quarantine_id": stored.quarantine_ids[record.index],
        }
        lines[record.index] = {**_with_score(line, record.score), "flags": record.flags}
    for rejected in envelope.rejected:
        lines[rejected.index] = {
            "index": rejected.index,
            "status": "rejected",
            "failures": rejected.failures,
        }
    # The envelope was checked to name every index exactly once.
    return [lines[index] for index in range(envelope.received)]


async def _post_envelope(request: web.Request, stream: str) -> dict[str, object]:
    body = await request.read()
    # Checking up to 10,000 records and their flags is too slow for the event loop.
    envelope = await asyncio.to_thread(parse_envelope, body)
    received_by = subject(request)
    db = database(request)
    sealer = db.sealer
    stored = await db.write(
        lambda cursor: append_envelope(cursor, sealer, stream, envelope, received_by)
    )
    return {
        "stream": stream,
        "batch_id": str(stored.batch_id),
        "received": envelope.received,
        "accepted": len(envelope.accepted),
        "quarantined": len(envelope.quarantined),
        "rejected": len(envelope.rejected),
        "records": _envelope_lines(envelope, stored),
    }


async def post_batch(request: web.Request) -> web.Response:
    """Store a batch (records, or the gateway's envelope) and answer a per-record receipt."""
    stream = stream_name(request)
    if request.content_type == ENVELOPE:
        receipt = await _post_envelope(request, stream)
    else:
        receipt = await _post_records(request, stream)
    # Encoding a 10,000-line receipt takes ~25 ms: too long for the event loop.
    body = await asyncio.to_thread(json.dumps, receipt)
    return web.Response(text=body, status=201, content_type="application/json")


async def get_recent(request: web.Request) -> web.Response:
    """The newest records of a stream, newest first."""
    stream = stream_name(request)
    refuse_unknown_parameters(request.query, ("limit",))
    limit = parse_count(request.query, "limit", default=DEFAULT_RECENT, maximum=MAX_RECENT)
    items = await database(request).read(lambda cursor: recent_records(cursor, stream, limit))
    return web.json_response({"stream": stream, "items": items})


def add_routes(app: web.Application) -> None:
    """Register the ingest routes, the longer paths under a stream first."""
    ingest_stats.add_routes(app)
    quarantine.add_routes(app)
    app.router.add_post(STREAM_PATH, post_batch)
    app.router.add_get(STREAM_PATH, get_recent, allow_head=False)

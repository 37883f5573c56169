"""``/api/ingest/{stream}``: append a batch of JSON records, read a stream's newest records.

A batch is parsed completely before anything is stored, so it must never be half-written.
"""

import asyncio
import json
import re

from aiohttp import web

from upstream.batches import parse_batch
from upstream.errors import bad_request
from upstream.routes.common import database, subject
from upstream.store.ingest import append_batch, recent_records
from upstream.validation import parse_count

STREAM_PATH = "/api/ingest/{stream}"
_STREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DEFAULT_RECENT = 100
MAX_RECENT = 1000


def _stream(request: web.Request) -> str:
    stream = request.match_info["stream"]
    if not _STREAM_NAME.match(stream):
        raise bad_request(
            "stream names are 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter"
            " or digit"
        )
    return stream


def _serialised_records(content_type: str, body: bytes) -> list[str]:
    records = parse_batch(content_type, body)
    return [json.dumps(record, separators=(",", ":")) for record in records]


async def post_batch(request: web.Request) -> web.Response:
    """Store every record of the body as one batch and answer a per-record receipt."""
    stream = _stream(request)
    body = await request.read()
    # Parsing and re-serialising up to 10,000 records takes tens of milliseconds:
    # too long for the event loop, so it runs in a thread.
    serialised = await asyncio.to_thread(_serialised_records, request.content_type, body)
    received_by = subject(request)
    batch_id = await database(request).write(
        lambda cursor: append_batch(cursor, stream, serialised, received_by)
    )
    receipt = {
        "stream": stream,
        "batch_id": str(batch_id),
        "received": len(serialised),
        "accepted": len(serialised),
        "records": [{"index": index, "status": "accepted"} for index in range(len(serialised))],
    }
    return web.json_response(receipt, status=201)


async def get_recent(request: web.Request) -> web.Response:
    """The newest records of a stream, newest first."""
    stream = _stream(request)
    for name in request.query:
        if name != "limit":
            raise bad_request(f"unknown query parameter '{name}'; allowed: limit")
    limit = parse_count(request.query, "limit", default=DEFAULT_RECENT, maximum=MAX_RECENT)
    items = await database(request).read(lambda cursor: recent_records(cursor, stream, limit))
    return web.json_response({"stream": stream, "items": items})


def add_routes(app: web.Application) -> None:
    """Register the ingest routes."""
    app.router.add_post(STREAM_PATH, post_batch)
    app.router.add_get(STREAM_PATH, get_recent, allow_head=False)

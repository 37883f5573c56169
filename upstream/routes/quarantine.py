"""``/api/ingest/{stream}/quarantine``: list flagged records, accept or discard them.

Handlers must never decide a review themselves: the store checks and changes the row in one
transaction on the writer thread, so two reviewers cannot both win.
"""

from aiohttp import web

from upstream.errors import bad_request, not_found
from upstream.routes.common import database, read_json_body, subject
from upstream.routes.streams import refuse_unknown_parameters, stream_name
from upstream.schema import MAX_ID
from upstream.store.quarantine import ACCEPTED, DISCARDED, STATUSES, list_quarantine, review
from upstream.validation import parse_count, parse_limit, parse_row_id

QUARANTINE_PATH = "/api/ingest/{stream}/quarantine"
ACCEPT_PATH = "/api/ingest/{stream}/quarantine/{id}/accept"
DISCARD_PATH = "/api/ingest/{stream}/quarantine/{id}/discard"
ALL = "all"
MAX_NOTE = 500


def _status(request: web.Request) -> str | None:
    values = request.query.getall("status", ["pending"])
    choices = (*STATUSES, ALL)
    if len(values) > 1 or values[0] not in choices:
        raise bad_request(f"query parameter 'status' must be one of: {', '.join(choices)}")
    return None if values[0] == ALL else values[0]


async def list_items(request: web.Request) -> web.Response:
    """A page of a stream's quarantined records, newest first, by status."""
    stream = stream_name(request)
    refuse_unknown_parameters(request.query, ("status", "limit", "offset"))
    status = _status(request)
    limit = parse_limit(request.query)
    offset = parse_count(request.query, "offset", default=0, maximum=MAX_ID)
    db = database(request)
    sealer = db.sealer
    items = await db.read(
        lambda cursor: list_quarantine(cursor, sealer, stream, status, limit=limit, offset=offset)
    )
    return web.json_response({"stream": stream, "items": items})


async def _note(request: web.Request) -> str | None:
    if not await request.read():
        return None
    body = await read_json_body(request)
    if not isinstance(body, dict):
        raise bad_request('the body must be a JSON object like {"note": "..."}, or empty')
    for name in body:
        if name != "note":
            raise bad_request(f"unknown field '{name}'; allowed: note")
    note = body.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
        raise bad_request(f"field 'note' must be a string of at most {MAX_NOTE} characters")
    return note


async def _review(request: web.Request, decision: str) -> web.Response:
    stream = stream_name(request)
    raw_id = request.match_info["id"]
    row_id = parse_row_id(raw_id)
    if row_id is None:
        raise not_found(f"stream '{stream}' has no quarantined record with id {raw_id}")
    note = await _note(request)
    reviewed_by = subject(request)
    db = database(request)
    sealer = db.sealer
    item = await db.write(
        lambda cursor: review(
            cursor, sealer, stream, row_id, decision=decision, reviewed_by=reviewed_by, note=note
        )
    )
    return web.json_response(item)


async def accept_item(request: web.Request) -> web.Response:
    """Copy one pending record into the stream and mark it accepted; 404 or 409 otherwise."""
    return await _review(request, ACCEPTED)


async def discard_item(request: web.Request) -> web.Response:
    """Mark one pending record discarded; 404 or 409 otherwise."""
    return await _review(request, DISCARDED)


def add_routes(app: web.Application) -> None:
    """Register the quarantine listing and review routes."""
    app.router.add_get(QUARANTINE_PATH, list_items, allow_head=False)
    app.router.add_post(ACCEPT_PATH, accept_item)
    app.router.add_post(DISCARD_PATH, discard_item)

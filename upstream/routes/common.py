"""Helpers every route module shares: the app keys and reading a JSON body.

Nothing here may trust the body: it is parsed strictly and size-capped by aiohttp.
"""

from aiohttp import web

from upstream.batches import JSON, loads_strict
from upstream.database import Database
from upstream.errors import ApiError, ReasonId, bad_request
from upstream.middlewares import SUBJECT

DATABASE = web.AppKey("database", Database)


def database(request: web.Request) -> Database:
    """The app's database, opened in its cleanup context."""
    return request.app[DATABASE]


def subject(request: web.Request) -> str | None:
    """Who the gateway says is calling, if it said."""
    return request.get(SUBJECT)


async def read_json_body(request: web.Request) -> object:
    """The body parsed as strict JSON, or a 415/400 explaining what to send."""
    if request.content_type != JSON:
        raise ApiError(
            415,
            ReasonId.UNSUPPORTED_MEDIA_TYPE,
            f"send the body as {JSON}, not {request.content_type}",
        )
    raw = await request.read()
    try:
        return loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise bad_request(f"the body is not valid JSON: {error}") from None

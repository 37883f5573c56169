"""Helpers the ingest route modules share: the stream name in the path and query parameters.

Nothing here may trust the path or the query string: each value is checked or refused.
"""

import re
from collections.abc import Collection

from aiohttp import web
from multidict import MultiMapping

from upstream.errors import bad_request

_STREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_DIGITS = re.compile(r"^[0-9]{1,9}$")


def stream_name(request: web.Request) -> str:
    """The ``{stream}`` of the path, or a 400 describing a valid name."""
    stream = request.match_info["stream"]
    # fullmatch: `$` alone would also accept a trailing newline.
    if not _STREAM_NAME.fullmatch(stream):
        raise bad_request(
            "stream names are 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter"
            " or digit"
        )
    return stream


def refuse_unknown_parameters(query: MultiMapping[str], allowed: Collection[str]) -> None:
    """Raise a 400 naming the first query parameter outside ``allowed``."""
    for name in query:
        if name not in allowed:
            raise bad_request(f"unknown query parameter '{name}'; allowed: {', '.join(allowed)}")


def parse_positive(query: MultiMapping[str], name: str, *, default: int, maximum: int) -> int:
    """An integer query parameter from 1 to ``maximum``, ``default`` when absent."""
    values = query.getall(name, [])
    if not values:
        return default
    if len(values) > 1:
        raise bad_request(f"query parameter '{name}' is given more than once")
    if not _DIGITS.fullmatch(values[0]) or not 1 <= int(values[0]) <= maximum:
        raise bad_request(f"query parameter '{name}' must be an integer from 1 to {maximum}")
    return int(values[0])

"""Path and query hygiene: decide on exactly the path the upstream will serve.

Works on the raw request target, never on aiohttp's request.path (which percent-decodes `%2e`
into `.` but leaves `..` segments in place). Must never let an ambiguous path through.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

from multidict import MultiDict

from gateway.pipeline import Denial, RequestContext

# Encoded '/', '\' and NUL would let one segment become several (or truncate) downstream.
_FORBIDDEN_ENCODED = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
_BAD_PERCENT = re.compile(r"%(?![0-9a-fA-F]{2})")
_DOUBLE_ENCODED = re.compile(r"%[0-9a-fA-F]{2}")
# RFC 3986 pchar minus the ones we decode: what a segment may hold when sent on.
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"
# A segment of only these characters needs no decoding and no re-encoding (the common case).
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9!$&'()*+,;=:@._~-]*")
_MAX_TARGET = 4096


def _bad_path(why: str) -> Denial:
    return Denial("request.bad_path", f"request path rejected: {why}")


def _decode_segment(raw: str) -> str:
    if _BAD_PERCENT.search(raw):
        raise _bad_path("malformed percent-encoding")
    if _FORBIDDEN_ENCODED.search(raw):
        raise _bad_path("encoded '/', '\\' or NUL")
    try:
        segment = unquote_to_bytes(raw).decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise _bad_path("percent-encoding is not UTF-8") from None
    if _DOUBLE_ENCODED.search(segment):
        # `%252e%252e` decodes to `%2e%2e`: a second decoder downstream would see `..`.
        raise _bad_path("double percent-encoding")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in segment):  # noqa: PLR2004 - C0 and DEL
        raise _bad_path("control character")
    return segment


def normalise_path(raw_path: str) -> tuple[str, tuple[str, ...]]:
    """Resolve a raw request path into (canonical path, decoded segments) or raise Denial.

    Empty and `.` segments are dropped, `..` pops one segment and may not climb above the
    root, a trailing slash is dropped; the canonical path re-encodes each decoded segment.
    """
    if not raw_path.startswith("/"):
        raise _bad_path("must start with '/'")
    if "\\" in raw_path:
        raise _bad_path("backslash")
    segments: list[str] = []
    encoded: list[str] = []
    for raw in raw_path.split("/"):
        plain = _PLAIN_SEGMENT.fullmatch(raw) is not None
        segment = raw if plain else _decode_segment(raw)
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise _bad_path("'..' climbs above the root")
            segments.pop()
            encoded.pop()
            continue
        segments.append(segment)
        encoded.append(raw if plain else quote(segment, safe=_SEGMENT_SAFE))
    return "/" + "/".join(encoded), tuple(segments)


def parse_query(query_string: str) -> MultiDict[str]:
    """Strictly decode a query string: malformed encoding is refused, not guessed at."""
    query: MultiDict[str] = MultiDict()
    if not query_string:
        return query
    for pair in query_string.split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        query.add(_decode_query_part(name), _decode_query_part(value))
    return query


def _decode_query_part(raw: str) -> str:
    if _BAD_PERCENT.search(raw):
        raise Denial("request.bad_query", "query string rejected: malformed percent-encoding")
    try:
        text = unquote_to_bytes(raw.replace("+", " ")).decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise Denial("request.bad_query", "query string rejected: not UTF-8") from None
    if "\x00" in text:
        raise Denial("request.bad_query", "query string rejected: NUL")
    return text


class NormalizeStage:
    """Sets ctx.path, ctx.segments, ctx.query from the raw request target."""

    name = "normalize"

    async def __call__(self, ctx: RequestContext) -> None:
        """Normalise the path and query, or refuse with request.bad_path / bad_query."""
        target = ctx.request.raw_path
        if len(target) > _MAX_TARGET:
            raise _bad_path(f"longer than {_MAX_TARGET} characters")
        raw_path, _, query_string = target.partition("?")
        raw_path = raw_path.partition("#")[0]
        ctx.path, ctx.segments = normalise_path(raw_path)
        ctx.query = parse_query(query_string)
        ctx.query_string = query_string

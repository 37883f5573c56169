"""Forwarding: a streaming reverse proxy to the upstream over one pooled client session.

Hop-by-hop headers (and any named in Connection) are dropped, client identity headers are
replaced by the gateway's own, and credentials (Authorization, Cookie) never go upstream.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from gateway.pipeline import Denial, RequestContext

if TYPE_CHECKING:
    from collections.abc import Callable

# RFC 9110 section 7.6.1 plus the legacy ones proxies still see.
HOP_BY_HOP = frozenset(
    istr(h)
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Proxy-Connection",
    )
)  # fmt: skip
# What the client may never assert to the upstream, nor pass through it.
STRIPPED_REQUEST = frozenset(
    istr(h)
    for h in (
        "Host", "Authorization", "Cookie", "Content-Length", "X-Request-Id", "Forwarded",
        "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP",
        # Overrides some frameworks honour: the upstream must serve what the policy decided on.
        "X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "X-Original-URL",
        "X-Rewrite-URL",
    )
)  # fmt: skip
IDENTITY_PREFIX = "x-gateway-"
STRIPPED_RESPONSE = frozenset(istr(h) for h in ("Content-Length", "Server", "Date"))
_SMALL_BODY = 256 * 1024


def connection_listed(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> set[str]:
    """Header names a Connection header declares hop-by-hop."""
    named: set[str] = set()
    for value in headers.getall("Connection", []):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def upstream_request_headers(ctx: RequestContext, secret: str) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop, credentials and spoofed identity; plus the gateway's."""
    incoming = ctx.request.headers
    dropped = connection_listed(incoming)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lowered = name.lower()
        if name in HOP_BY_HOP or name in STRIPPED_REQUEST or lowered in dropped:
            continue
        if lowered.startswith(IDENTITY_PREFIX):
            continue
        headers.add(name, value)
    if ctx.upstream_content_type is not None:
        headers["Content-Type"] = ctx.upstream_content_type  # the body was rewritten
    principal = ctx.principal
    headers["X-Gateway-Secret"] = secret
    headers["X-Request-Id"] = ctx.request_id
    headers["X-Forwarded-For"] = ctx.request.remote or ""
    headers["X-Forwarded-Proto"] = ctx.request.scheme
    if principal is not None:
        headers["X-Gateway-Subject"] = principal.sub
        headers["X-Gateway-Roles"] = ",".join(principal.roles)
    if ctx.route is not None:
        headers["X-Gateway-Route"] = ctx.route.name
    return headers


def client_response_headers(upstream: aiohttp.ClientResponse, request_id: str) -> CIMultiDict[str]:
    """Upstream headers minus hop-by-hop ones, with the request id."""
    dropped = connection_listed(upstream.headers)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.headers.items():
        if name in HOP_BY_HOP or name in STRIPPED_RESPONSE or name.lower() in dropped:
            continue
        headers.add(name, value)
    headers["X-Request-Id"] = request_id
    return headers


class ForwardStage:
    """Sends the request on and streams the answer back as ctx.response."""

    name = "forward"

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        base_url: str,
        secret: Callable[[], str],
        max_body_bytes: int,
        read_timeout_seconds: float,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._secret = secret
        self._max_body = max_body_bytes
        self._timeout = aiohttp.ClientTimeout(total=None, sock_read=read_timeout_seconds)

    async def __call__(self, ctx: RequestContext) -> None:
        """Proxy; upstream refusal to connect is 502, silence past the timeout 504."""
        if ctx.response is not None:  # answered by the gateway itself (stages/local.py)
            return
        url = self._base + ctx.path + (f"?{ctx.query_string}" if ctx.query_string else "")
        body = await self._body(ctx)
        started = time.perf_counter()
        try:
            async with self._session.request(
                ctx.request.method,
                url,
                headers=upstream_request_headers(ctx, self._secret()),
                data=body,
                allow_redirects=False,
                timeout=self._timeout,
            ) as upstream:
                await self._relay(ctx, upstream)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise Denial("upstream.timeout", "the upstream did not answer in time") from None
        except aiohttp.ClientError:
            raise Denial("upstream.unavailable", "the upstream is unavailable") from None
        finally:
            ctx.upstream_ms = (time.perf_counter() - started) * 1000.0

    async def _body(self, ctx: RequestContext) -> bytes | None:
        # Bodies are read once under the size limit (validation needs them whole anyway).
        if ctx.body is not None:
            return ctx.body
        if not ctx.request.can_read_body:
            return None
        route_limit = ctx.route.max_body_bytes if ctx.route is not None else None
        return await ctx.read_body(route_limit or self._max_body)

    @staticmethod
    async def _write(response: web.StreamResponse, chunk: bytes) -> None:
        try:
            await response.write(chunk)
        except ConnectionResetError:
            # The client left mid-stream: its doing, not the upstream's (aiohttp's reset error
            # is also a ClientError, which would otherwise read as upstream.unavailable).
            raise Denial("client.disconnected", "the client went away") from None

    async def _relay(self, ctx: RequestContext, upstream: aiohttp.ClientResponse) -> None:
        headers = client_response_headers(upstream, ctx.request_id)
        ctx.status = upstream.status
        length = upstream.content_length
        if length is not None and length <= _SMALL_BODY:
            # Small answers in one piece: cheaper than a prepared stream, same bytes.
            ctx.response = web.Response(
                status=upstream.status, body=await upstream.read(), headers=headers
            )
            return
        response = web.StreamResponse(status=upstream.status, headers=headers)
        ctx.response = response
        await response.prepare(ctx.request)
        try:
            async for chunk in upstream.content.iter_any():
                await self._write(response, chunk)
        except (aiohttp.ClientError, TimeoutError):
            # Headers are out: cut the connection so a truncated body cannot look complete.
            if ctx.request.transport is not None:
                ctx.request.transport.close()
            raise
        await response.write_eof()

"""The bench's baseline: a bare aiohttp reverse proxy to the upstream, with no pipeline at all.

It forwards with one pooled session and adds the upstream secret, as the gateway's forward stage
does, but never authenticates, authorizes, validates or audits. Never run it outside the bench.

    python bench/baseline_proxy.py --port P --upstream URL --secret-file F [--cert C --key K]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, istr

from gateway import keys, tls
from gateway.config import TlsConfig

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

# Hop-by-hop headers (RFC 9110 section 7.6.1) and the ones aiohttp sets itself.
_DROPPED_REQUEST = frozenset(
    istr(h) for h in ("Host", "Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length")
)
_DROPPED_RESPONSE = frozenset(
    istr(h) for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Date")
)
# The same cut-off as the gateway's forward stage, so both relay small answers the same way.
_SMALL_BODY = 256 * 1024
SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)


def build_app(upstream: str, secret: str) -> web.Application:
    """A catch-all app that relays every request to upstream."""
    app = web.Application()
    base = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app[SESSION] = session
            yield

    async def relay(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k not in _DROPPED_REQUEST
        )
        headers["X-Gateway-Secret"] = secret
        body = await request.read() if request.can_read_body else None
        async with request.app[SESSION].request(
            request.method,
            base + request.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as answer:
            out = CIMultiDict(
                (k, v) for k, v in answer.headers.items() if k not in _DROPPED_RESPONSE
            )
            length = answer.content_length
            if length is not None and length <= _SMALL_BODY:
                return web.Response(status=answer.status, body=await answer.read(), headers=out)
            response = web.StreamResponse(status=answer.status, headers=out)
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


async def serve(args: argparse.Namespace) -> None:
    """Listen until SIGTERM or SIGINT."""
    context = None
    if args.cert:
        # The gateway's own server context: same protocol floor and certificate, like for like.
        context = tls.server_context(TlsConfig(cert_file=args.cert, key_file=args.key))
    app = build_app(args.upstream, keys.read_secret(args.secret_file))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, "127.0.0.1", args.port, ssl_context=context).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8081")
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--cert", type=Path, help="serve TLS with this certificate")
    parser.add_argument("--key", type=Path, help="the certificate's private key")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()

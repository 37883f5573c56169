"""The HTTP server under the pipeline: aiohttp's runner, with protocol errors answered our way.

Requests the HTTP parser rejects (oversized or malformed headers, bad request lines) never reach
the pipeline. aiohttp would answer them in plain text quoting the offending bytes, and log those
bytes, which may hold a client's token. Here they get the JSON refusal and an audit event like
any other denial, and the log line names the error type only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.pipeline import new_request_id, refusal_response

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiohttp.web_request import BaseRequest

log = structlog.get_logger("gateway.server")


class _GatewayServer(web.Server):
    """aiohttp's Server, making our request handler; `on_protocol_error` is set by the runner."""

    on_protocol_error: Callable[[str, int, str, str | None], None] | None = None

    def __call__(self) -> RequestHandler:
        return _GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class _GatewayRequestHandler(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,  # noqa: ARG002 - aiohttp's text; may quote request bytes
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        request_id = new_request_id()
        reason_id = "request.malformed_http" if status < 500 else "internal.error"  # noqa: PLR2004
        log.warning("http.protocol_error", status=status, reason_id=reason_id,
                    error=type(exc).__name__ if exc else None, request_id=request_id)  # fmt: skip
        hook = getattr(self._manager, "on_protocol_error", None)
        if hook is not None:
            hook(request_id, status, reason_id, request.remote)
        text = "the HTTP request is malformed" if status < 500 else "internal error"  # noqa: PLR2004
        response = refusal_response(status, reason_id, text, request_id, {})
        response.force_close()
        return response


class GatewayRunner(web.AppRunner):
    """AppRunner whose server answers protocol errors in JSON and reports them to a hook."""

    def __init__(
        self,
        app: web.Application,
        *,
        on_protocol_error: Callable[[str, int, str, str | None], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._on_protocol_error = on_protocol_error

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application._make_handler; swap in our subclass
        # (Server has no __slots__, and the subclass only overrides __call__).
        server.__class__ = _GatewayServer
        server.on_protocol_error = self._on_protocol_error  # type: ignore[attr-defined]
        return server

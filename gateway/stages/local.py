"""Routes the gateway answers itself (`served_by = "gateway"` in config/routes.toml).

They pass authentication, route matching, the policy and validation like every route; only
the last step differs: a handler here answers instead of the upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.pipeline import Denial, RequestContext

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aiohttp import web


class LocalStage:
    """Answers gateway-served routes with their handler; other routes go on to forward."""

    name = "local"

    def __init__(
        self, handlers: dict[str, Callable[[RequestContext], Awaitable[web.StreamResponse]]]
    ) -> None:
        self._handlers = handlers

    async def __call__(self, ctx: RequestContext) -> None:
        """Set ctx.response for a gateway-served route; a route without a handler is a bug."""
        route = ctx.route
        if route is None or route.served_by != "gateway":
            return
        handler = self._handlers.get(route.name)
        if handler is None:
            raise Denial("internal.error", "no handler for this gateway-served route")
        ctx.response = await handler(ctx)
        ctx.status = ctx.response.status

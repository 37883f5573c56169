"""Route matching: the normalised path against the route table, once.

A path no route names ends here (404) without asking the policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.pipeline import Denial, RequestContext

if TYPE_CHECKING:
    from gateway.routes import RouteTable


class RouteStage:
    """Sets ctx.route and ctx.params."""

    name = "route"

    def __init__(self, table: RouteTable) -> None:
        self._table = table

    async def __call__(self, ctx: RequestContext) -> None:
        """Match or refuse with route.not_found / route.method_not_allowed."""
        found, allowed = self._table.match(ctx.request.method, ctx.path)
        if found is not None:
            ctx.route, ctx.params = found.route, found.params
            return
        if allowed:
            raise Denial(
                "route.method_not_allowed",
                f"method {ctx.request.method} is not allowed here",
                allow=sorted(allowed),
            )
        raise Denial("route.not_found", "no route matches this path")

"""``GET /healthz``: the gateway's readiness probe; it must reveal nothing but "ok"."""

from aiohttp import web

HEALTH_PATH = "/healthz"


async def healthz(_request: web.Request) -> web.Response:
    """Answer 200 once the app has started (the database opened and was migrated)."""
    return web.json_response({"status": "ok"})


def add_routes(app: web.Application) -> None:
    """Register the health route."""
    app.router.add_get(HEALTH_PATH, healthz, allow_head=False)

"""HTTP routes of the service, one module per resource family; see `add_routes`."""

from aiohttp import web

from upstream.routes import archive, health, ingest, rekey, resources


def add_routes(app: web.Application) -> None:
    """Register every route of the service on ``app``."""
    health.add_routes(app)
    resources.add_routes(app)
    ingest.add_routes(app)
    archive.add_routes(app)
    rekey.add_routes(app)

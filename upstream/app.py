"""Builds the aiohttp application: middlewares, routes and the database lifetime.

It must never open the database outside the cleanup context, so every test and every
server run closes (and unlocks) the DuckDB file on shutdown.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from upstream.archive.tables import Archiver
from upstream.config import UpstreamConfig
from upstream.database import Database
from upstream.middlewares import gateway_trust, json_errors, request_id_echo
from upstream.routes import add_routes
from upstream.routes.archive import ARCHIVER
from upstream.routes.common import DATABASE
from upstream.routes.health import HEALTH_PATH
from upstream.routes.rekey import CONFIG
from upstream.sealing import Sealer, load_sealer
from upstream.trust import TrustedSecrets

# Ingest batches may hold 10,000 records; aiohttp's 1 MiB default would cut them short.
MAX_BODY_BYTES = 16 * 1024 * 1024


def database_context(
    path: Path, sealer: Sealer
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that opens the migrated database and closes it on shutdown."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        database = await asyncio.to_thread(Database.open, path, sealer)
        app[DATABASE] = database
        yield
        await asyncio.to_thread(database.close)

    return context


def create_app(config: UpstreamConfig) -> web.Application:
    """The EMP service; raises SecretError now and MigrationError at startup."""
    secret = TrustedSecrets(config.trust.secret_file)
    sealer = load_sealer(config.encryption.data_keys, config.provider_settings)
    app = web.Application(
        middlewares=[
            request_id_echo(),
            json_errors(),
            gateway_trust(secret=secret, open_routes=frozenset({("GET", HEALTH_PATH)})),
        ],
        client_max_size=MAX_BODY_BYTES,
    )
    app.cleanup_ctx.append(database_context(config.database.path, sealer))
    app[CONFIG] = config  # POST /internal/rekey resolves the ring again
    app[ARCHIVER] = Archiver(config.retention)  # POST /internal/archive, asked by the gateway
    add_routes(app)
    return app

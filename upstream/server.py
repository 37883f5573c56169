"""Runs the service in the foreground until SIGINT or SIGTERM.

It must never report "listening" before the database is open and migrated.
"""

import asyncio
import signal
import sys

from aiohttp import web

from upstream.app import create_app
from upstream.config import UpstreamConfig


async def _wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def serve(config: UpstreamConfig) -> None:
    """Start, announce the address on stderr, and stop cleanly on a signal."""
    app = create_app(config)
    # No access log: the gateway already audits every request, and a second line per
    # request here would only cost throughput.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port)
        await site.start()
        address = f"http://{config.server.host}:{config.server.port}"
        print(f"upstream listening on {address}", file=sys.stderr, flush=True)  # noqa: T201
        await _wait_for_stop_signal()
    finally:
        await runner.cleanup()

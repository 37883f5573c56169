"""``POST /internal/archive``: the gateway's archival run asks for the ingest tables' turn.

Like every route but the health check it needs the gateway's secret; the gateway's route table
names no ``/internal/`` path, so a client can never reach it through the gateway. It takes no
window from the request: what is archived is decided by this service's own [retention].
"""

import re
from collections.abc import Callable

from aiohttp import web

from upstream.archive.tables import Archiver
from upstream.errors import bad_request, conflict
from upstream.routes.common import database, read_json_body

ARCHIVE_PATH = "/internal/archive"
ARCHIVER = web.AppKey("archiver", Archiver)
# Called at each step of each table (exported, verified, deleted, committed); tests stop the
# process there to show that an interrupted run loses nothing.
ARCHIVE_OBSERVER: web.AppKey[Callable[[str, str], None]] = web.AppKey("archive_observer")
_RUN_ID = re.compile(r"^[0-9a-f]{12}$")  # the gateway's run id, part of every file name


def _ignore(_table: str, _step: str) -> None:
    return None


async def run_archive(request: web.Request) -> web.Response:
    """Archive the ingest tables now; the answer lists each table's result."""
    body = await read_json_body(request)
    run_id = body.get("run_id") if isinstance(body, dict) else None
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise bad_request("run_id must be 12 lowercase hexadecimal characters")
    archiver = request.app[ARCHIVER]
    if archiver.busy:
        raise conflict("an archival run is in progress; try again when it has finished")
    observe = request.app.get(ARCHIVE_OBSERVER, _ignore)
    tables = await archiver.run(database(request), run_id, observe)
    return web.json_response({"run_id": run_id, "tables": tables})


def add_routes(app: web.Application) -> None:
    """Register the archive route."""
    app.router.add_post(ARCHIVE_PATH, run_archive)

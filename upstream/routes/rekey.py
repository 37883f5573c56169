"""``POST /internal/rekey``: seal every sensitive value under the data key ring's current key.

The gateway's `gateway secrets rotate emp_data_key` asks for it. With ``{"rotate": true}``
this service first adds a new key to its ring (a `keystore:` ring only) and makes it current;
with ``{"rotate": false}`` it resolves the ring again, for a ring rotated in its provider by
hand; ``"dry_run": true`` changes nothing and counts the rows a reseal would touch. Then it
reseals, a batch per transaction between other writes, and answers the counts
and the keys the ring holds. Like every route but the health check it needs the gateway's
secret, and the gateway's route table names no ``/internal/`` path.
"""

import asyncio

from aiohttp import web

from empsecrets.fieldcrypt import FieldCipher, resolve_ring, store_ring
from empsecrets.providers import SecretError
from upstream.config import UpstreamConfig
from upstream.errors import bad_request, conflict
from upstream.routes.common import database, read_json_body
from upstream.sealing import Sealer, count_stale

REKEY_PATH = "/internal/rekey"
CONFIG = web.AppKey("config", UpstreamConfig)
_LOCK = web.AppKey("rekey_lock", asyncio.Lock)


async def rekey(request: web.Request) -> web.Response:
    """Rotate (or reload) the ring, then reseal; one run at a time."""
    body = await read_json_body(request)
    rotate = body.get("rotate") if isinstance(body, dict) else None
    dry_run = body.get("dry_run", False) if isinstance(body, dict) else None
    if not isinstance(rotate, bool) or not isinstance(dry_run, bool):
        raise bad_request('send {"rotate": true} to add a key, or {"rotate": false} to reload')
    if dry_run:
        db = database(request)
        key_id = db.sealer.key_id
        stale = await db.read(lambda cursor: count_stale(cursor, key_id))
        keys = sorted(db.sealer.cipher.ring.keys)
        return web.json_response({"current_key": key_id, "keys": keys, "stale": stale})
    lock = request.app[_LOCK]
    if lock.locked():
        raise conflict("a re-encryption is in progress; try again when it has finished")
    async with lock:
        config = request.app[CONFIG]
        db = database(request)
        reference, settings = config.encryption.data_keys, config.provider_settings
        try:
            ring = await asyncio.to_thread(resolve_ring, reference, settings)
            previous = db.sealer.key_id
            if rotate:
                ring = ring.rotated()
                await asyncio.to_thread(store_ring, reference, settings, ring)
        except SecretError as error:
            raise conflict(f"the data key ring cannot be rotated: {error}") from None
        counts = await asyncio.to_thread(db.reseal_all, Sealer(FieldCipher(ring)))
    return web.json_response(
        {
            "previous_key": previous,
            "current_key": ring.current,
            "keys": sorted(ring.keys),
            "resealed": counts,
        }
    )


def add_routes(app: web.Application) -> None:
    """Register the re-encryption route."""
    app[_LOCK] = asyncio.Lock()
    app.router.add_post(REKEY_PATH, rekey)

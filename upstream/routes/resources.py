"""CRUD routes for departments, employees and tickets, generated from `upstream.schema`.

Handlers must never build SQL or check fields themselves: validation does the checks and
the store does the SQL, always on database threads.
"""

from aiohttp import web

from upstream.errors import ApiError, not_found
from upstream.routes.common import database, read_json_body, subject
from upstream.schema import MAX_ID, RESOURCES, ResourceSpec
from upstream.store.resources import ResourceStore
from upstream.validation import (
    full_values,
    parse_count,
    parse_filters,
    parse_limit,
    parse_row_id,
    partial_values,
)


class ResourceRoutes:
    """The six handlers of one resource."""

    def __init__(self, spec: ResourceSpec) -> None:
        self.spec = spec
        self.store = ResourceStore(spec)
        self.collection_path = f"/api/{spec.name}"
        self.item_path = f"/api/{spec.name}/{{id}}"

    def _row_id(self, request: web.Request) -> int:
        raw = request.match_info["id"]
        row_id = parse_row_id(raw)
        if row_id is None:
            raise self._missing(raw)
        return row_id

    def _missing(self, row_id: object) -> ApiError:
        return not_found(f"no {self.spec.singular} has id {row_id}")

    async def list_items(self, request: web.Request) -> web.Response:
        """``GET /api/{resource}``: a filtered page ordered by id."""
        filters = parse_filters(self.spec, request.query)
        limit = parse_limit(request.query)
        offset = parse_count(request.query, "offset", default=0, maximum=MAX_ID)
        db = database(request)
        sealer = db.sealer
        page = await db.read(
            lambda cursor: self.store.list_page(cursor, sealer, filters, limit, offset)
        )
        return web.json_response(
            {"items": page.items, "total": page.total, "limit": limit, "offset": offset}
        )

    async def get_item(self, request: web.Request) -> web.Response:
        """``GET /api/{resource}/{id}``."""
        row_id = self._row_id(request)
        db = database(request)
        sealer = db.sealer
        row = await db.read(lambda cursor: self.store.fetch(cursor, sealer, row_id))
        if row is None:
            raise self._missing(row_id)
        return web.json_response(row)

    async def create_item(self, request: web.Request) -> web.Response:
        """``POST /api/{resource}``: 201 with the row and its Location."""
        values = full_values(self.spec, await read_json_body(request))
        created_by = subject(request)
        db = database(request)
        sealer = db.sealer
        row = await db.write(lambda cursor: self.store.insert(cursor, sealer, values, created_by))
        location = f"{self.collection_path}/{row['id']}"
        return web.json_response(row, status=201, headers={"Location": location})

    async def replace_item(self, request: web.Request) -> web.Response:
        """``PUT /api/{resource}/{id}``: every writable field, defaults for those left out."""
        row_id = self._row_id(request)
        values = full_values(self.spec, await read_json_body(request))
        return await self._update(request, row_id, values)

    async def patch_item(self, request: web.Request) -> web.Response:
        """``PATCH /api/{resource}/{id}``: only the fields sent."""
        row_id = self._row_id(request)
        values = partial_values(self.spec, await read_json_body(request))
        return await self._update(request, row_id, values)

    async def _update(
        self, request: web.Request, row_id: int, values: dict[str, object]
    ) -> web.Response:
        db = database(request)
        sealer = db.sealer
        row = await db.write(lambda cursor: self.store.update(cursor, sealer, row_id, values))
        if row is None:
            raise self._missing(row_id)
        return web.json_response(row)

    async def delete_item(self, request: web.Request) -> web.Response:
        """``DELETE /api/{resource}/{id}``: 204, or 409 while something references it."""
        row_id = self._row_id(request)
        deleted = await database(request).write(lambda cursor: self.store.delete(cursor, row_id))
        if not deleted:
            raise self._missing(row_id)
        return web.Response(status=204)

    def add_to(self, router: web.UrlDispatcher) -> None:
        """Register this resource's routes."""
        router.add_get(self.collection_path, self.list_items, allow_head=False)
        router.add_post(self.collection_path, self.create_item)
        router.add_get(self.item_path, self.get_item, allow_head=False)
        router.add_put(self.item_path, self.replace_item)
        router.add_patch(self.item_path, self.patch_item)
        router.add_delete(self.item_path, self.delete_item)


def add_routes(app: web.Application) -> None:
    """Register CRUD routes for every resource in the schema."""
    for spec in RESOURCES:
        ResourceRoutes(spec).add_to(app.router)

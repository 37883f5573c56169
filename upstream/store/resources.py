"""SQL for departments, employees and tickets, derived once per spec.

Reference rules live here because DuckDB foreign keys cannot be used (see
migrations/0001_initial.sql); they are race-free only because every write runs on the
single writer thread, so these functions must never be called from a reader.
"""

from dataclasses import dataclass

import duckdb

from upstream.database import Cursor
from upstream.errors import conflict
from upstream.schema import RESOURCES_BY_NAME, ResourceSpec, referrers_of
from upstream.store.rows import row_to_dict

_NOW = "CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP)"

Row = dict[str, object]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing and the size of the whole filtered set."""

    items: list[Row]
    total: int


class ResourceStore:
    """Prepared SQL text for one resource; identifiers come only from its spec."""

    def __init__(self, spec: ResourceSpec) -> None:
        self.spec = spec
        table = spec.name
        columns = ", ".join(spec.column_names)
        writable = [column.name for column in spec.writable]
        inserted = [*writable, "created_by"] if spec.has_created_by else writable
        assignments = [f"{name} = ?" for name in writable]
        if spec.has_updated_at:
            assignments.append(f"updated_at = {_NOW}")
        insert_columns = ", ".join(inserted)
        placeholders = ", ".join("?" for _ in inserted)
        updates = ", ".join(assignments)
        # Every identifier below comes from the fixed spec, never from a request.
        self._select_one = f"SELECT {columns} FROM {table} WHERE id = ?"  # noqa: S608  # nosec B608
        self._insert = (
            f"INSERT INTO {table} ({insert_columns}) VALUES ({placeholders}) RETURNING {columns}"  # noqa: S608  # nosec B608
        )
        self._update = f"UPDATE {table} SET {updates} WHERE id = ? RETURNING {columns}"  # noqa: S608  # nosec B608
        self._delete = f"DELETE FROM {table} WHERE id = ? RETURNING id"  # noqa: S608  # nosec B608
        self._page = f"SELECT {columns}, count(*) OVER () FROM {table} WHERE {{where}} ORDER BY id LIMIT ? OFFSET ?"  # noqa: E501, S608  # nosec B608
        self._count = f"SELECT count(*) FROM {table} WHERE {{where}}"  # noqa: S608  # nosec B608

    def _row(self, row: tuple[object, ...] | None) -> Row | None:
        return None if row is None else row_to_dict(self.spec.column_names, row)

    def fetch(self, cursor: Cursor, row_id: int) -> Row | None:
        """One row by id."""
        return self._row(cursor.execute(self._select_one, [row_id]).fetchone())

    def list_page(
        self, cursor: Cursor, filters: dict[str, object], limit: int, offset: int
    ) -> Page:
        """A page ordered by id, with the filtered total counted in the same statement."""
        # Filter names were checked against spec.filters by upstream.validation.
        where = " AND ".join(f"{name} = ?" for name in filters) or "TRUE"
        params = [*filters.values()]
        rows = cursor.execute(self._page.format(where=where), [*params, limit, offset]).fetchall()
        if rows:
            items = [row_to_dict(self.spec.column_names, row[:-1]) for row in rows]
            return Page(items=items, total=int(rows[0][-1]))
        # Past the last page the window function has no row to report the total on.
        counted = cursor.execute(self._count.format(where=where), params).fetchone()
        return Page(items=[], total=int(counted[0]) if counted else 0)

    def insert(self, cursor: Cursor, values: dict[str, object], created_by: str | None) -> Row:
        """Create a row; the id comes from the table's sequence."""
        self._check_references(cursor, values)
        params = [values[column.name] for column in self.spec.writable]
        if self.spec.has_created_by:
            params.append(created_by)
        row = self._execute_unique(cursor, self._insert, params)
        if row is None:
            raise RuntimeError(f"INSERT INTO {self.spec.name} returned no row")
        return row

    def update(self, cursor: Cursor, row_id: int, values: dict[str, object]) -> Row | None:
        """Replace the writable columns present in ``values``, keeping the others."""
        current = self.fetch(cursor, row_id)
        if current is None:
            return None
        merged = {column.name: current[column.name] for column in self.spec.writable}
        merged.update(values)
        self._check_references(cursor, values)
        params = [*(merged[column.name] for column in self.spec.writable), row_id]
        return self._execute_unique(cursor, self._update, params)

    def delete(self, cursor: Cursor, row_id: int) -> bool:
        """Remove a row nothing references; False when it did not exist."""
        self._check_not_referenced(cursor, row_id)
        return cursor.execute(self._delete, [row_id]).fetchone() is not None

    def _execute_unique(self, cursor: Cursor, sql: str, params: list[object]) -> Row | None:
        try:
            return self._row(cursor.execute(sql, params).fetchone())
        except duckdb.ConstraintException as error:
            raise conflict(self._describe_violation(str(error))) from None

    def _describe_violation(self, message: str) -> str:
        for column in self.spec.columns:
            if column.unique and f'"{column.name}:' in message:
                return f"another {self.spec.singular} already has this {column.name}"
        return f"the {self.spec.singular} breaks a database constraint"

    def _check_references(self, cursor: Cursor, values: dict[str, object]) -> None:
        for column in self.spec.writable:
            target_id = values.get(column.name)
            if column.references is None or target_id is None:
                continue
            target = RESOURCES_BY_NAME[column.references]
            found = cursor.execute(
                f"SELECT 1 FROM {target.name} WHERE id = ?",  # noqa: S608  # nosec B608
                [target_id],
            ).fetchone()
            if found is None:
                raise conflict(f"field '{column.name}': no {target.singular} has id {target_id}")

    def _check_not_referenced(self, cursor: Cursor, row_id: int) -> None:
        for spec, column in referrers_of(self.spec.name):
            found = cursor.execute(
                f"SELECT id FROM {spec.name} WHERE {column.name} = ? LIMIT 1",  # noqa: S608  # nosec B608
                [row_id],
            ).fetchone()
            if found is not None:
                raise conflict(
                    f"{self.spec.singular} {row_id} is still referenced by"
                    f" {spec.singular} {found[0]} ({column.name})"
                )

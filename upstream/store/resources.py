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
from upstream.sealing import DIGESTS, SEALED_COLUMNS, Sealer
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
        # Every identifier below comes from the fixed spec, never from a request.
        self._sealed = bool(SEALED_COLUMNS.get(table))
        self._digests = DIGESTS.get(table, {})
        if self._sealed:
            # A sealed value is bound to its row id, so the id is drawn before the insert.
            inserted = ["id", *inserted]
        inserted += self._digests.values()
        assignments += [f"{digest} = ?" for digest in self._digests.values()]
        insert_columns = ", ".join(inserted)
        placeholders = ", ".join("?" for _ in inserted)
        updates = ", ".join(assignments)
        self._next_id = f"SELECT nextval('{table}_id_seq')"
        self._select_one = f"SELECT {columns} FROM {table} WHERE id = ?"  # noqa: S608  # nosec B608
        self._insert = (
            f"INSERT INTO {table} ({insert_columns}) VALUES ({placeholders}) RETURNING {columns}"  # noqa: S608  # nosec B608
        )
        self._update = f"UPDATE {table} SET {updates} WHERE id = ? RETURNING {columns}"  # noqa: S608  # nosec B608
        self._delete = f"DELETE FROM {table} WHERE id = ? RETURNING id"  # noqa: S608  # nosec B608
        self._page = f"SELECT {columns}, count(*) OVER () FROM {table} WHERE {{where}} ORDER BY id LIMIT ? OFFSET ?"  # noqa: E501, S608  # nosec B608
        self._count = f"SELECT count(*) FROM {table} WHERE {{where}}"  # noqa: S608  # nosec B608

    def _row(self, sealer: Sealer, row: tuple[object, ...] | None) -> Row | None:
        if row is None:
            return None
        return sealer.open_row(self.spec.name, row_to_dict(self.spec.column_names, row))

    def fetch(self, cursor: Cursor, sealer: Sealer, row_id: int) -> Row | None:
        """One row by id."""
        return self._row(sealer, cursor.execute(self._select_one, [row_id]).fetchone())

    def list_page(
        self, cursor: Cursor, sealer: Sealer, filters: dict[str, object], limit: int, offset: int
    ) -> Page:
        """A page ordered by id, with the filtered total counted in the same statement."""
        # Filter names were checked against spec.filters by upstream.validation; a sealed
        # column is matched through its blind index.
        conditions, params = [], []
        for name, value in filters.items():
            digest = self._digests.get(name)
            conditions.append(f"{digest or name} = ?")
            params.append(sealer.digest(self.spec.name, name, value) if digest else value)
        where = " AND ".join(conditions) or "TRUE"
        rows = cursor.execute(self._page.format(where=where), [*params, limit, offset]).fetchall()
        if rows:
            items = [
                sealer.open_row(self.spec.name, row_to_dict(self.spec.column_names, row[:-1]))
                for row in rows
            ]
            return Page(items=items, total=int(rows[0][-1]))
        # Past the last page the window function has no row to report the total on.
        counted = cursor.execute(self._count.format(where=where), params).fetchone()
        return Page(items=[], total=int(counted[0]) if counted else 0)

    def insert(
        self, cursor: Cursor, sealer: Sealer, values: dict[str, object], created_by: str | None
    ) -> Row:
        """Create a row; the id comes from the table's sequence."""
        self._check_references(cursor, values)
        params: list[object] = []
        row_id = 0  # a table without sealed columns takes its id from the column default
        if self._sealed:
            drawn = cursor.execute(self._next_id).fetchone()
            if drawn is None:
                raise RuntimeError(f"the sequence of {self.spec.name} gave no id")
            row_id = int(drawn[0])
            params.append(row_id)
        params += self._stored(sealer, row_id, values)
        if self.spec.has_created_by:
            params.insert(len(params) - len(self._digests), created_by)
        row = self._execute_unique(cursor, sealer, self._insert, params)
        if row is None:
            raise RuntimeError(f"INSERT INTO {self.spec.name} returned no row")
        return row

    def update(
        self, cursor: Cursor, sealer: Sealer, row_id: int, values: dict[str, object]
    ) -> Row | None:
        """Replace the writable columns present in ``values``, keeping the others."""
        current = self.fetch(cursor, sealer, row_id)
        if current is None:
            return None
        merged = {column.name: current[column.name] for column in self.spec.writable}
        merged.update(values)
        self._check_references(cursor, values)
        params = [*self._stored(sealer, row_id, merged), row_id]
        return self._execute_unique(cursor, sealer, self._update, params)

    def _stored(self, sealer: Sealer, row_id: int, values: dict[str, object]) -> list[object]:
        """The writable columns as stored (sealed where they must be), then the digests."""
        sealed = sealer.seal_values(self.spec.name, row_id, values)
        return [
            *(sealed[column.name] for column in self.spec.writable),
            *(sealer.digest(self.spec.name, name, values[name]) for name in self._digests),
        ]

    def delete(self, cursor: Cursor, row_id: int) -> bool:
        """Remove a row nothing references; False when it did not exist."""
        self._check_not_referenced(cursor, row_id)
        return cursor.execute(self._delete, [row_id]).fetchone() is not None

    def _execute_unique(
        self, cursor: Cursor, sealer: Sealer, sql: str, params: list[object]
    ) -> Row | None:
        try:
            return self._row(sealer, cursor.execute(sql, params).fetchone())
        except duckdb.ConstraintException as error:
            raise conflict(self._describe_violation(str(error))) from None

    def _describe_violation(self, message: str) -> str:
        for column in self.spec.columns:
            indexed = self._digests.get(column.name, column.name)
            if column.unique and f'"{indexed}:' in message:
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

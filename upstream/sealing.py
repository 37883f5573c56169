"""Which columns of the EMP database are sealed, and the pass that (re)seals them.

Sealed with AES-256-GCM (`empsecrets.fieldcrypt`), each value bound to its table, column and
row: employees' name, email and title; tickets' title and description; a quarantined
record and its review note. Everything else (ids, timestamps, status, priority, references,
ingest records) stays plain: filters, indexes and statistics run on it in SQL.

A value read from a sealed column that does not open is an error, never shown as it is:
plaintext there means someone wrote around the service. The only reader that accepts
plaintext is `reseal_batch`, which seals rows written before migration 0004.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import duckdb

from empsecrets import providers
from empsecrets.fieldcrypt import DataKeyError, FieldCipher, resolve_ring, sealed_key_id
from upstream.errors import SecretError, SetupError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from empsecrets.providers import ProviderSettings

Cursor = duckdb.DuckDBPyConnection

SEALED_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "employees": ("name", "email", "title"),
    "tickets": ("title", "description"),
}
DIGESTS: Final = {"employees": {"email": "email_digest"}}  # blind index of a sealed column
QUARANTINE_TABLE: Final = "ingest_quarantine"
# Every table and column that holds sealed values (the quarantine's are bound to other contexts).
ALL_SEALED: Final = {**SEALED_COLUMNS, QUARANTINE_TABLE: ("record", "review_note")}
RESEAL_BATCH_ROWS = 1_000


@dataclass(frozen=True)
class Sealer:
    """The EMP service's contexts around one cipher; swapped whole when the ring rotates."""

    cipher: FieldCipher

    @property
    def key_id(self) -> str:
        """The id of the key new values are sealed under."""
        return self.cipher.ring.current

    def seal_values(
        self, table: str, row_id: int, values: Mapping[str, object]
    ) -> dict[str, object]:
        """`values` with each sealed column's text sealed (None stays None)."""
        sealed = dict(values)
        for column in SEALED_COLUMNS.get(table, ()):
            value = sealed.get(column)
            if value is not None:
                sealed[column] = self.cipher.seal(str(value), f"{table}.{column}:{row_id}")
        return sealed

    def open_row(self, table: str, row: dict[str, object]) -> dict[str, object]:
        """A row read back, its sealed columns opened in place."""
        row_id = row["id"]
        for column in SEALED_COLUMNS.get(table, ()):
            value = row.get(column)
            if value is not None:
                row[column] = self.cipher.open(str(value), f"{table}.{column}:{row_id}")
        return row

    def digest(self, table: str, column: str, value: object) -> str:
        """The blind index of a value of a sealed column that is looked up by equality."""
        return self.cipher.digest(str(value), f"{table}.{column}")

    def seal_record(self, batch_id: object, index: int, record: str) -> str:
        """A quarantined record, bound to its batch and index (its id comes after insert)."""
        return self.cipher.seal(record, _record_context(batch_id, index))

    def open_record(self, batch_id: object, index: int, token: str) -> str:
        """A quarantined record's JSON text."""
        return self.cipher.open(token, _record_context(batch_id, index))

    def seal_note(self, row_id: int, note: str | None) -> str | None:
        """A review note, bound to its quarantine row."""
        return None if note is None else self.cipher.seal(note, _note_context(row_id))

    def open_note(self, row_id: int, token: object) -> str | None:
        """A review note as written."""
        return None if token is None else self.cipher.open(str(token), _note_context(row_id))

    def reopen(self, value: object, context: str) -> str:
        """A stored value as plaintext, for resealing: sealed values are opened, plain kept."""
        text = str(value)
        return self.cipher.open(text, context) if sealed_key_id(text) else text


def _record_context(batch_id: object, index: int) -> str:
    return f"{QUARANTINE_TABLE}.record:{batch_id}:{index}"


def _note_context(row_id: int) -> str:
    return f"{QUARANTINE_TABLE}.review_note:{row_id}"


def reseal_batch(cursor: Cursor, sealer: Sealer, limit: int = RESEAL_BATCH_ROWS) -> dict[str, int]:
    """Seal up to `limit` rows per table that are not under the current key; counts by table.

    Run it in one transaction on the writer thread, again and again until every count is 0.
    Plaintext (rows from before migration 0004) is sealed too, and missing digests filled.
    """
    pattern = f"enc1.{sealer.key_id}.%"
    counts = {
        table: _reseal_table(cursor, sealer, table, pattern, limit) for table in SEALED_COLUMNS
    }
    counts[QUARANTINE_TABLE] = _reseal_quarantine(cursor, sealer, pattern, limit)
    return counts


def _reseal_table(cursor: Cursor, sealer: Sealer, table: str, pattern: str, limit: int) -> int:
    columns = SEALED_COLUMNS[table]
    digests = DIGESTS.get(table, {})
    stale = [f"({column} IS NOT NULL AND {column} NOT LIKE ?)" for column in columns]
    stale += [f"{digest} IS NULL" for digest in digests.values()]
    # Identifiers come from the fixed maps above, never from a request.
    rows = cursor.execute(
        f"SELECT id, {', '.join(columns)} FROM {table} WHERE {' OR '.join(stale)} LIMIT ?",  # noqa: S608  # nosec B608
        [*(pattern for _ in columns), limit],
    ).fetchall()
    if not rows:
        return 0
    plain = [
        {
            column: None if value is None else sealer.reopen(value, f"{table}.{column}:{row[0]}")
            for column, value in zip(columns, row[1:], strict=True)
        }
        for row in rows
    ]
    ids = [int(row[0]) for row in rows]
    sealed = [
        sealer.seal_values(table, row_id, values) for row_id, values in zip(ids, plain, strict=True)
    ]
    _bulk_update(
        cursor, table, ids, {column: [values[column] for values in sealed] for column in columns}
    )
    for column, digest in digests.items():
        # Only where missing: rewriting an unchanged unique key can trip DuckDB's key checks.
        cursor.execute(
            f"UPDATE {table} SET {digest} = s.value FROM (SELECT unnest(?::BIGINT[]) AS id,"  # noqa: S608  # nosec B608
            f" unnest(?::VARCHAR[]) AS value) AS s"
            f" WHERE {table}.id = s.id AND {table}.{digest} IS NULL",
            [ids, [sealer.digest(table, column, values[column]) for values in plain]],
        )
    return len(rows)


def _reseal_quarantine(cursor: Cursor, sealer: Sealer, pattern: str, limit: int) -> int:
    rows = cursor.execute(
        f"SELECT id, batch_id, record_index, record, review_note FROM {QUARANTINE_TABLE}"  # noqa: S608  # nosec B608
        " WHERE record NOT LIKE ? OR (review_note IS NOT NULL AND review_note NOT LIKE ?) LIMIT ?",
        [pattern, pattern, limit],
    ).fetchall()
    if not rows:
        return 0
    ids, records, notes = [], [], []
    for row_id, batch_id, index, record, note in rows:
        ids.append(int(row_id))
        records.append(
            sealer.seal_record(
                batch_id, index, sealer.reopen(record, _record_context(batch_id, index))
            )
        )
        notes.append(
            None
            if note is None
            else sealer.seal_note(row_id, sealer.reopen(note, _note_context(row_id)))
        )
    _bulk_update(cursor, QUARANTINE_TABLE, ids, {"record": records, "review_note": notes})
    return len(rows)


def _bulk_update(
    cursor: Cursor, table: str, ids: list[int], columns: Mapping[str, Sequence[object]]
) -> None:
    names = list(columns)
    assignments = ", ".join(f"{name} = s.{name}" for name in names)
    unnested = ", ".join(f"unnest(?::VARCHAR[]) AS {name}" for name in names)
    cursor.execute(
        f"UPDATE {table} SET {assignments} FROM (SELECT unnest(?::BIGINT[]) AS id, {unnested})"  # noqa: S608  # nosec B608
        f" AS s WHERE {table}.id = s.id",
        [ids, *columns.values()],
    )


def load_sealer(reference: str, settings: ProviderSettings) -> Sealer:
    """The sealer for the ring a reference names; a SetupError when it cannot be had."""
    try:
        return Sealer(FieldCipher(resolve_ring(reference, settings)))
    except (providers.SecretError, DataKeyError) as error:
        raise SecretError(
            f"the data key ring {reference} cannot be used: {error}"
            " (`python -m upstream db init` makes one in the keystore)"
        ) from None


def count_stale(cursor: Cursor, key_id: str) -> dict[str, int]:
    """Rows per table holding a value not sealed under `key_id` (what a reseal would touch)."""
    return _rows_where_any(cursor, "({} IS NOT NULL AND {} NOT LIKE ?)", f"enc1.{key_id}.%")


def count_sealed(cursor: Cursor) -> int:
    """How many rows of this database hold a sealed value (under any key)."""
    return sum(_rows_where_any(cursor, "{} LIKE ?", "enc1.%").values())


def _rows_where_any(cursor: Cursor, condition: str, pattern: str) -> dict[str, int]:
    """Rows per table where any sealed column meets `condition` ({}: the column, ?: pattern)."""
    counts = {}
    for table, columns in ALL_SEALED.items():
        where = " OR ".join(condition.format(column, column) for column in columns)
        row = cursor.execute(
            f"SELECT count(*) FROM {table} WHERE {where}",  # noqa: S608  # nosec B608
            [pattern] * len(columns),
        ).fetchone()
        counts[table] = int(row[0]) if row else 0
    return counts


def compact_database(path: Path, fresh: Path) -> dict[str, int]:
    """Copy every table, sequence and index of `path` into `fresh`, check, and replace `path`.

    Row counts of every table must match before the new file takes the old one's place
    (fsynced, then an atomic rename); otherwise `fresh` is removed and `path` left as it was.
    """
    with duckdb.connect() as connection:
        connection.execute("ATTACH ? AS old (READ_ONLY)", [str(path)])
        connection.execute("ATTACH ? AS fresh", [str(fresh)])
        try:
            connection.execute("COPY FROM DATABASE old TO fresh")
            counts = _checked_copy(connection, path)
            connection.execute("DETACH fresh")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                connection.execute("DETACH fresh")
            fresh.unlink(missing_ok=True)
            raise
    with fresh.open("rb+") as handle:
        os.fsync(handle.fileno())
    fresh.replace(path)
    return counts


def _checked_copy(connection: duckdb.DuckDBPyConnection, path: Path) -> dict[str, int]:
    tables = connection.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = 'old' ORDER BY table_name"
    ).fetchall()
    counts = {name: _row_count(connection, "old", name) for (name,) in tables}
    copied = {name: _row_count(connection, "fresh", name) for name in counts}
    if copied != counts:
        raise SetupError(f"the compacted copy of {path} differs: {copied} != {counts}")
    return counts


def _row_count(connection: duckdb.DuckDBPyConnection, database: str, table: str) -> int:
    row = connection.execute(f'SELECT count(*) FROM {database}."{table}"').fetchone()  # noqa: S608  # nosec B608  # names from duckdb_tables()
    return int(row[0]) if row else 0

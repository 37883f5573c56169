"""The audit store's encrypted columns (detail, user_agent, raw, sealed_detail), value by value.

Each value is sealed with the data key ring (empsecrets/fieldcrypt.py) and bound to its column
and row (`audit_events.<column>:<event_id>`): a value copied to another row or column does not
open. The columns searched and counted on (subject, route, reason_id, remote_addr...) stay
plaintext. Never shows a value that does not open, and never writes a decrypted one back.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from empsecrets.fieldcrypt import (
    PREFIX,
    DataKeyError,
    FieldCipher,
    provision_ring,
    resolve_ring,
)
from empsecrets.providers import ProviderSettings, SecretError
from gateway import keys
from gateway.config import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import duckdb

    from gateway.audit import AuditWriter
    from gateway.config import GatewayConfig

log = structlog.get_logger("gateway.auditcrypt")

ENCRYPTED_COLUMNS = ("detail", "user_agent", "raw", "sealed_detail")
# The ingest summary the validation_hourly view counts, kept beside the sealed detail: a stream
# name and four counts (the same figures /metrics exports), never a record's value.
VALIDATION_TYPE = (
    "STRUCT(stream VARCHAR, received BIGINT, accepted BIGINT, quarantined BIGINT, rejected BIGINT)"
)
_COUNTS = ("received", "accepted", "quarantined", "rejected")
_TOKEN_START = PREFIX + "."
REENCRYPT_PATH = "/audit/reencrypt"


def context(column: str, event_id: object) -> str:
    """The associated data of one value: its column and its row."""
    return f"audit_events.{column}:{event_id}"


def provider_settings(config: GatewayConfig) -> ProviderSettings:
    """Where the data key ring's reference is resolved: [encryption]'s keystore, else [secrets]'."""
    shared = keys.provider_settings(config.secrets)
    encryption = config.encryption
    return replace(
        shared,
        keystore_file=encryption.keystore_file or shared.keystore_file,
        master_key_file=encryption.master_key_file or shared.master_key_file,
    )


def load_cipher(config: GatewayConfig) -> FieldCipher:
    """The cipher of the configured ring; a ring that cannot be read stops the start (exit 2)."""
    reference = config.encryption.data_keys
    try:
        return FieldCipher(resolve_ring(reference, provider_settings(config)))
    except (SecretError, DataKeyError) as exc:
        raise ConfigError(
            f"encryption.data_keys: the audit store's data key ring ({reference}) cannot be "
            f"read: {exc}; `gateway setup` makes it in the keystore (docs/security/encryption.md)"
        ) from None


def provision(config: GatewayConfig) -> bool:
    """Make the ring in the keystore unless it is there (`gateway setup`); True if made."""
    return provision_ring(config.encryption.data_keys, provider_settings(config))


def validation_counts(detail: Any) -> dict[str, Any] | None:
    """The plaintext `validation` column of a row: the ingest summary's stream and counts."""
    summary = detail.get("validation") if isinstance(detail, dict) else None
    if not isinstance(summary, dict):
        return None
    stream = summary.get("stream")
    row: dict[str, Any] = {"stream": stream if isinstance(stream, str) else None}
    for name in _COUNTS:
        count = summary.get(name)
        row[name] = count if isinstance(count, int) and not isinstance(count, bool) else None
    return row


def row_line(raw: str, cipher: FieldCipher | None, sealed_detail: str | None = None) -> str:
    """The NDJSON row read_json loads, from a chained event's JSON line (`raw`).

    The event's columns, its validation counts, and the sensitive columns sealed, with the
    store-only detail (JSON text) if any. A None cipher leaves them plaintext: only the bench's
    baseline does that (AuditWriter refuses it).
    """
    row: dict[str, Any] = json.loads(raw)
    event_id = row.get("event_id")
    detail = row.get("detail")
    row["validation"] = validation_counts(detail)
    if detail is not None:
        text = json.dumps(detail, separators=(",", ":"), ensure_ascii=False)
        row["detail"] = _seal(cipher, "detail", event_id, text)
    if row.get("user_agent") is not None:
        row["user_agent"] = _seal(cipher, "user_agent", event_id, str(row["user_agent"]))
    row["raw"] = _seal(cipher, "raw", event_id, raw)
    if sealed_detail is not None:
        row["sealed_detail"] = _seal(cipher, "sealed_detail", event_id, sealed_detail)
    return json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n"


def _seal(cipher: FieldCipher | None, column: str, event_id: object, value: str) -> str:
    return value if cipher is None else cipher.seal(value, context(column, event_id))


def decrypt(cipher: FieldCipher, column: str, event_id: object, value: str | None) -> str | None:
    """A stored value opened; DataKeyError for plaintext, a foreign key or a moved value."""
    if value is None:
        return None
    return cipher.open(value, context(column, event_id))


def decrypt_detail(cipher: FieldCipher, event_id: object, value: str | None) -> Any:
    """The `detail` column opened and parsed."""
    text = decrypt(cipher, "detail", event_id, value)
    return None if text is None else json.loads(text)


# --- re-encryption: rotation, and the migration of a store written before encryption --------

# A value is stale when it is not sealed under the key whose token prefix is $prefix (a NULL
# $prefix: every value, which is what a rotation's dry run counts).
_STALE = {
    name: f"({name} IS NOT NULL AND ($prefix IS NULL OR NOT starts_with({name}, $prefix)))"
    for name in ENCRYPTED_COLUMNS
}
_ANY_STALE = " OR ".join(_STALE.values())
_NEXT_STALE = (
    f"SELECT event_id, {', '.join(ENCRYPTED_COLUMNS)} FROM audit_events "  # noqa: S608 - fixed names
    f"WHERE event_id > $after AND ({_ANY_STALE}) ORDER BY event_id LIMIT $limit"
)
_PRESENT = (
    "SELECT column_name FROM duckdb_columns() WHERE table_name = 'audit_events' "
    "AND list_contains(?, column_name)"
)
_UPDATE = (
    "UPDATE audit_events SET "  # noqa: S608 - fixed names and types
    + "".join(f"{name} = u.{name}, " for name in ENCRYPTED_COLUMNS)
    + "validation = CASE WHEN u.plaintext_detail THEN u.validation "
    "ELSE audit_events.validation END "
    "FROM read_json(?, format = 'newline_delimited', columns = {'event_id': 'VARCHAR', "
    + "".join(f"'{name}': 'VARCHAR', " for name in ENCRYPTED_COLUMNS)
    + f"'plaintext_detail': 'BOOLEAN', 'validation': '{VALIDATION_TYPE}'}}) u "
    "WHERE audit_events.event_id = u.event_id"
)


@dataclass
class Reencryption:
    """What a re-encryption pass did (or, counted for a dry run, would do)."""

    key_id: str | None  # the key every value is sealed under afterwards (None: not made yet)
    rows: int = 0  # rows with at least one value re-sealed
    values: int = 0  # values re-sealed
    plaintext: int = 0  # of them, values stored before encryption (sealed for the first time)

    def public(self) -> dict[str, Any]:
        """For the audit event, the admin answer and the CLI's output."""
        return asdict(self)


def _prefix(key_id: str | None) -> str | None:
    return None if key_id is None else f"{_TOKEN_START}{key_id}."


def count_stale(connection: duckdb.DuckDBPyConnection, key_id: str | None) -> Reencryption:
    """What a pass to `key_id` would re-seal (None: every value, as after a rotation).

    Read-only, so it also counts a store from before encryption (which lacks some columns).
    """
    present = {row[0] for row in connection.execute(_PRESENT, [list(ENCRYPTED_COLUMNS)]).fetchall()}
    columns = [name for name in ENCRYPTED_COLUMNS if name in present]
    sql = (
        f"SELECT count(*) FILTER (WHERE {' OR '.join(_STALE[c] for c in columns)}), "  # noqa: S608 - fixed names
        + " + ".join(f"count(*) FILTER (WHERE {_STALE[c]})" for c in columns)
        + ", "
        + " + ".join(f"count({c}) FILTER (WHERE NOT starts_with({c}, $token))" for c in columns)
        + " FROM audit_events"
    )
    row = connection.execute(sql, {"prefix": _prefix(key_id), "token": _TOKEN_START}).fetchone()
    rows, values, plaintext = row if row is not None else (0, 0, 0)
    return Reencryption(key_id, rows=int(rows), values=int(values), plaintext=int(plaintext))


def reencrypt(
    connection: duckdb.DuckDBPyConnection,
    cipher: FieldCipher,
    *,
    spool: Path,
    batch_size: int = 2000,
) -> Reencryption:
    """Re-seal every value not under the ring's current key, plaintext included, in batches.

    Each batch is one transaction (spooled to `spool`, the store's directory, like the
    writer's), so an interrupted pass keeps what it did and the next goes on. Passes repeat
    until nothing is left: rows a running writer sealed under the old key meanwhile are taken
    by the next. A value that does not open stops the pass (DataKeyError naming the row): it is
    never re-sealed as if it were plaintext.
    """
    done = Reencryption(cipher.ring.current)
    while _reencrypt_pass(connection, cipher, spool, batch_size, done):
        pass
    return done


def _reencrypt_pass(
    connection: duckdb.DuckDBPyConnection,
    cipher: FieldCipher,
    spool: Path,
    batch_size: int,
    done: Reencryption,
) -> int:
    """One walk over the store in event_id order; the rows it re-sealed."""
    prefix, after, found = _prefix(cipher.ring.current), "", 0
    while True:
        params = {"after": after, "prefix": prefix, "limit": batch_size}
        rows = connection.execute(_NEXT_STALE, params).fetchall()
        if not rows:
            return found
        _update(connection, [_resealed(cipher, row, done) for row in rows], spool)
        found += len(rows)
        done.rows += len(rows)
        after = rows[-1][0]
        log.debug("audit.reencrypt_batch", rows=done.rows, values=done.values, key_id=done.key_id)


def _resealed(cipher: FieldCipher, row: tuple[Any, ...], done: Reencryption) -> str:
    """The update line of one row: each value under the current key."""
    event_id = row[0]
    update: dict[str, Any] = {"event_id": event_id, "plaintext_detail": False, "validation": None}
    for name, value in zip(ENCRYPTED_COLUMNS, row[1:], strict=True):
        if value is None or cipher.is_current(value):
            update[name] = value
            continue
        if value.startswith(_TOKEN_START):  # sealed, or made to look sealed: it must open
            try:
                plain = cipher.open(value, context(name, event_id))
            except DataKeyError as exc:
                raise DataKeyError(f"audit_events.{name} of event {event_id!r}: {exc}") from None
        else:  # stored before encryption was on
            plain = value
            done.plaintext += 1
            if name == "detail":
                update["plaintext_detail"] = True
                update["validation"] = validation_counts(_json_or_none(plain))
        update[name] = cipher.seal(plain, context(name, event_id))
        done.values += 1
    return json.dumps(update, separators=(",", ":")) + "\n"


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _update(connection: duckdb.DuckDBPyConnection, lines: list[str], spool: Path) -> None:
    """One batch, spooled (ciphertext only) and applied in one transaction."""
    apply_spooled(connection, lines, spool, prefix=".audit-reencrypt-", statement=_UPDATE)


def apply_spooled(
    connection: duckdb.DuckDBPyConnection,
    lines: list[str],
    spool: Path,
    *,
    prefix: str,
    statement: str,
    then: Sequence[tuple[str, list[Any]]] = (),
) -> None:
    """Spool `lines` beside the store, then run `statement` on the file and `then`, as one.

    `lines` are NDJSON rows, ciphertext in the sealed columns; `statement`'s one parameter is
    the file's name; `then` runs in the same transaction. The file is removed whatever
    happens (why a file: gateway/audit.py, above _INSERT).
    """
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".ndjson", dir=spool)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
        cursor = connection.cursor()
        try:
            cursor.begin()
            cursor.execute(statement, [name])
            for sql, params in then:
                cursor.execute(sql, params)
            cursor.commit()
        except Exception:
            cursor.rollback()
            raise
        finally:
            cursor.close()
    finally:
        Path(name).unlink()


def add_reencrypt_api(
    admin: web.Application,
    audit: Callable[[], AuditWriter | None],
    cipher: Callable[[], FieldCipher],
) -> None:
    """POST /audit/reencrypt on the admin port: the online part of a data key rotation.

    Re-reads the ring (the CLI has just stored it), seals new rows with its current key, and
    re-encrypts the store; `?dry_run=1` only counts. It takes nothing a caller could widen.
    """
    lock = asyncio.Lock()

    async def reencrypt_now(request: web.Request) -> web.Response:
        writer = audit()
        if writer is None or not writer.owns_store:
            return web.json_response({"error": "this process does not own the audit store"},
                                     status=503)  # fmt: skip
        if request.query.get("dry_run") == "1":
            planned = await writer.run(lambda cursor: count_stale(cursor, None))
            return web.json_response({"mode": "online", **planned.public()})
        if lock.locked():
            return web.json_response({"error": "a re-encryption is in progress"}, status=409)
        async with lock:
            try:
                fresh = await asyncio.to_thread(cipher)  # the ring the CLI has just stored
                done = await writer.reencrypt(fresh)
            except (ConfigError, DataKeyError) as exc:
                log.error("audit.reencrypt_failed", error=str(exc))  # noqa: TRY400 - no traceback
                return web.json_response({"error": str(exc)}, status=500)
        return web.json_response({"mode": "online", **done.public()})

    admin.router.add_post(REENCRYPT_PATH, reencrypt_now)

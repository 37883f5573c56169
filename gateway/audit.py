"""Audit events: one per request, as a JSON line at once and into DuckDB in batches.

The DuckDB writes run in a thread every flush interval (a write per request on the event loop
would stall it); close() drains the queue so a clean shutdown loses nothing. Never records a
credential: the event is built from the context's established facts, not from raw headers.
Never stores detail, user_agent, raw or sealed_detail in DuckDB unencrypted (gateway/auditcrypt.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple, TypeVar

import duckdb
import structlog

from gateway.auditchain import Chain, checkpoint_message, key_id
from gateway.auditcrypt import VALIDATION_TYPE, Reencryption, apply_spooled, reencrypt, row_line

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from empsecrets.fieldcrypt import FieldCipher
    from gateway.pipeline import RequestContext

T = TypeVar("T")

log = structlog.get_logger("gateway.audit")

# One definition for the table and for the batch reader: (column, DuckDB type).
COLUMN_TYPES = (
    ("event_id", "VARCHAR"), ("time", "TIMESTAMPTZ"), ("kind", "VARCHAR"),
    ("request_id", "VARCHAR"), ("subject", "VARCHAR"), ("roles", "VARCHAR[]"),
    ("issuer", "VARCHAR"), ("method", "VARCHAR"), ("path", "VARCHAR"), ("route", "VARCHAR"),
    ("decision", "VARCHAR"), ("reason_id", "VARCHAR"), ("status", "INTEGER"),
    ("latency_ms", "DOUBLE"), ("upstream_ms", "DOUBLE"), ("policy_revision", "VARCHAR"),
    ("reasons", "VARCHAR[]"), ("remote_addr", "VARCHAR"), ("user_agent", "VARCHAR"),
    ("detail", "VARCHAR"),  # encrypted JSON text, like user_agent and raw (auditcrypt.py)
    # The hash chain (gateway/auditchain.py); `raw` is the sealed canonical JSON.
    ("chain", "VARCHAR"), ("seq", "BIGINT"), ("prev_hash", "VARCHAR"), ("hash", "VARCHAR"),
    ("raw", "VARCHAR"),
    # The plaintext ingest counts of detail.validation, for the validation_hourly view.
    ("validation", VALIDATION_TYPE),
    # Detail for the store only (RequestContext.sealed_detail), encrypted, outside the chain.
    ("sealed_detail", "VARCHAR"),
)  # fmt: skip
COLUMNS = tuple(name for name, _ in COLUMN_TYPES)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS audit_events ("
    + ", ".join(f"{name} {kind}" for name, kind in COLUMN_TYPES)
    + ", PRIMARY KEY (event_id))"
)
# A store made before the chain existed gains its columns (its old rows stay unchained), one
# made before encryption the validation column (filled by the first re-encryption pass).
_MIGRATE = [
    f"ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS {name} {kind}"
    for name, kind in COLUMN_TYPES[COLUMNS.index("chain") :]
]
_DETAIL_TYPE = (
    "SELECT data_type FROM information_schema.columns "
    "WHERE table_name = 'audit_events' AND column_name = 'detail'"
)
# One row once every value of the store has been sealed: a store without it (made before
# encryption, or by the bench's plaintext writer) is sealed when a writer with a cipher opens it.
_ENCRYPTION_STATE = """
CREATE TABLE IF NOT EXISTS audit_encryption (
    format VARCHAR PRIMARY KEY, sealed_at TIMESTAMPTZ NOT NULL
)
"""
_CHECKPOINTS = """
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    chain VARCHAR NOT NULL, seq BIGINT NOT NULL, hash VARCHAR NOT NULL, signed_at VARCHAR NOT NULL,
    time TIMESTAMPTZ NOT NULL, key_id VARCHAR NOT NULL, signature VARCHAR NOT NULL,
    PRIMARY KEY (chain, seq)
)
"""
_INSERT_CHECKPOINT = (
    "INSERT OR IGNORE INTO audit_checkpoints "  # a reloaded hand-off file: once only
    "(chain, seq, hash, signed_at, time, key_id, signature) "
    "VALUES (?, ?, ?, ?, CAST(? AS TIMESTAMPTZ), ?, ?)"
)
# Measured here: 500 events via read_json of a spooled NDJSON file take ~21 ms; the same as one
# parameterised multi-row INSERT took ~280 ms (and executemany ~2 s), a third of a core under load.
_INSERT = (
    f"INSERT INTO audit_events ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} "  # noqa: S608 - fixed names
    "FROM read_json(?, format = 'newline_delimited', columns = {"
    + ", ".join(f"'{name}': '{kind}'" for name, kind in COLUMN_TYPES)
    + "})"
)


# The seed's "rejected records per hour": ingest outcomes per stream and hour, from the
# validate stage's summary (docs/validation.md). The detail is encrypted, so the view reads the
# plaintext copy of the summary's counts in `validation` (checked against the sealed event by
# `gateway audit verify`).
_HOURLY_VIEW = """
CREATE OR REPLACE VIEW validation_hourly AS
SELECT date_trunc('hour', time AT TIME ZONE 'UTC') AS hour,
       struct_extract(validation, 'stream') AS stream,
       count(*) AS batches,
       sum(struct_extract(validation, 'received')) AS received,
       sum(CASE WHEN decision = 'allow'
           THEN struct_extract(validation, 'accepted') ELSE 0 END) AS accepted,
       sum(CASE WHEN decision = 'allow'
           THEN struct_extract(validation, 'quarantined') ELSE 0 END) AS quarantined,
       sum(struct_extract(validation, 'rejected')) AS rejected,
       count(*) FILTER (WHERE decision = 'deny') AS refused_batches
FROM audit_events
WHERE validation IS NOT NULL
GROUP BY ALL
"""
HOURLY_QUERY = """
SELECT hour, stream, batches, received, accepted, quarantined, rejected, refused_batches
FROM validation_hourly
WHERE hour >= date_trunc('hour', now() AT TIME ZONE 'UTC') - to_hours(CAST(? AS INTEGER))
ORDER BY hour DESC, stream
"""


def request_event(ctx: RequestContext) -> dict[str, Any]:
    """The audit event of one request, shaped for a SIEM (flat, stable field names)."""
    principal = ctx.principal
    decision = ctx.decision
    allowed = not ctx.reason_id
    detail = dict(ctx.detail)
    if ctx.message and not allowed:
        detail["message"] = ctx.message
    if ctx.attempted is not None and principal is None:
        detail["attempted"] = ctx.attempted
    return {
        "event_id": ctx.request_id,
        "time": datetime.fromtimestamp(ctx.wall_time, UTC).isoformat(timespec="milliseconds"),
        "kind": ctx.event,
        "request_id": ctx.request_id,
        "subject": principal.sub if principal else None,
        "roles": list(principal.roles) if principal else [],
        "issuer": principal.issuer if principal else None,
        "method": ctx.request.method,
        "path": ctx.path or ctx.request.raw_path[:512],
        "route": ctx.route_name,
        "decision": "allow" if allowed else "deny",
        "reason_id": ctx.reason_id or None,
        "status": ctx.status,
        "latency_ms": round(ctx.elapsed_ms, 3),
        "upstream_ms": round(ctx.upstream_ms, 3) if ctx.upstream_ms is not None else None,
        "policy_revision": decision.revision if decision else None,
        "reasons": list(decision.reasons) if decision else [],
        "remote_addr": ctx.request.remote,
        "user_agent": ctx.request.headers.get("User-Agent", "")[:256],
        "detail": detail,
    }


def protocol_error_event(
    request_id: str, status: int, reason_id: str, remote: str | None
) -> dict[str, Any]:
    """The audit event of a request the HTTP parser refused before the pipeline saw it."""
    return {
        "event_id": request_id,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "kind": "request",
        "request_id": request_id,
        "subject": None,
        "roles": [],
        "issuer": None,
        "method": None,
        "path": None,
        "route": "-",
        "decision": "deny",
        "reason_id": reason_id,
        "status": status,
        "latency_ms": None,
        "upstream_ms": None,
        "policy_revision": None,
        "reasons": [],
        "remote_addr": remote,
        "user_agent": None,
        "detail": {"message": "rejected by the HTTP parser"},
    }


def system_event(kind: str, *, subject: str | None = None, **detail: Any) -> dict[str, Any]:
    """An audit event that is not a request: a CLI action, a key rotation, a reload.

    `kind` is dotted like a reason id (e.g. "auth.client_secret_rotated"); detail must hold no
    secret (ids and counts, never passwords, tokens or keys).
    """
    event_id = uuid.uuid4().hex
    return {
        "event_id": event_id,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "kind": kind,
        "request_id": None,
        "subject": subject,
        "roles": [],
        "issuer": None,
        "method": None,
        "path": None,
        "route": "-",
        "decision": None,
        "reason_id": None,
        "status": None,
        "latency_ms": None,
        "upstream_ms": None,
        "policy_revision": None,
        "reasons": [],
        "remote_addr": None,
        "user_agent": None,
        "detail": detail,
    }


def inbox_dir(db_path: Path) -> Path:
    """Where processes other than the gateway leave audit events for its writer to load."""
    return db_path.parent / "audit-inbox"


HANDOFF_PREFIX = "sealed-"  # inbox files of sealed rows from another worker (not to re-seal)


def _write_inbox_file(db_path: Path, name: str, lines: list[str]) -> None:
    """Write a whole file into the inbox: the writer only ever sees complete files."""
    inbox = inbox_dir(db_path)
    inbox.mkdir(parents=True, exist_ok=True)
    final = inbox / f"{name}.ndjson"
    tmp = final.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(final)


def record_offline(jsonl_path: str, db_path: Path | None, event: dict[str, Any]) -> None:
    """Audit from a process that does not own the audit database (the CLI).

    The JSON line is appended at once; the row waits in the inbox until the gateway's writer
    loads it (at its next flush, or at its next start when it is not running): nothing is lost.
    """
    line = json.dumps(event, separators=(",", ":"), default=str) + "\n"
    if jsonl_path == "-":
        sys.stdout.write(line)
    else:
        with _open_append(jsonl_path) as handle:
            handle.write(line)
    if db_path is None:
        return
    _write_inbox_file(db_path, str(event["event_id"]), [line])


class AuditWriter:
    """Writes audit events: chained, as JSON lines at once, as DuckDB rows in batches.

    Each event is sealed into this process's hash chain; the rows go to DuckDB off the loop,
    each batch closed by a signed checkpoint of the chain's head. The store's sensitive columns
    (gateway/auditcrypt.py) are encrypted with `cipher` in the flush's thread, before the batch
    is spooled; a writer that owns a store needs one (`plaintext=True`: the bench's baseline).
    """

    def __init__(
        self,
        *,
        jsonl_path: str,
        db_path: Path | None,
        flush_interval_seconds: float,
        batch_size: int,
        checkpoint_key: Ed25519PrivateKey | None = None,
        forward: Callable[[dict[str, Any]], None] | None = None,
        mask_text: Callable[[str], str] | None = None,
        handoff: bool = False,
        cipher: FieldCipher | None = None,
        plaintext: bool = False,
    ) -> None:
        if cipher is None and db_path is not None and not handoff and not plaintext:
            raise ValueError("the audit store is encrypted: pass the data key ring's cipher")
        self._cipher = cipher
        self._stream: IO[str] = sys.stdout if jsonl_path == "-" else _open_append(jsonl_path)
        self._owns_stream = jsonl_path != "-"
        self._db_path = db_path
        self._spool = db_path.parent if db_path is not None else Path()  # batch files go here
        self._interval = flush_interval_seconds
        self._batch_size = batch_size
        self._pending: list[_Row] = []  # rows not yet in DuckDB
        self._in_flight: list[_Row] = []  # the batch a flush is storing now
        self._db: duckdb.DuckDBPyConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._checkpoint_key = checkpoint_key
        self._forward = forward  # e.g. the SIEM shipper's submit
        # Text rules only (JWTs, Bearer credentials, name=value secrets...): client data echoed
        # in a detail (a failing value, a message) must not carry a credential into the trail.
        self._mask_text = mask_text
        # A worker that does not own the store (gateway/workers.py): its sealed batches go to
        # the owner's inbox, each closed by a signed checkpoint, instead of into DuckDB.
        self._handoff = handoff and db_path is not None
        # One flush at a time (the flusher, a query's flush, close): two would load the same
        # inbox file twice. Inbox event ids taken into _pending and not yet stored:
        self._flush_lock = asyncio.Lock()
        self._taken: set[str] = set()
        self.chain = Chain()
        self.written = 0

    @property
    def backlog(self) -> int:
        """Events written as JSON lines but not yet in DuckDB."""
        return len(self._pending)

    @property
    def owns_store(self) -> bool:
        """Whether this process holds the DuckDB file (queries run here)."""
        return self._db is not None

    @property
    def cipher(self) -> FieldCipher:
        """What opens the store's encrypted columns (for searches, verification, archives)."""
        if self._cipher is None:
            raise RuntimeError("this audit writer has no data key ring (it does not own a store)")
        return self._cipher

    def switch_cipher(self, cipher: FieldCipher) -> None:
        """Seal from the next flush on with a rotated ring (its older keys still open values)."""
        self._cipher = cipher

    async def reencrypt(self, cipher: FieldCipher) -> Reencryption:
        """Switch to `cipher`, then re-seal every stored value under its current key (a thread)."""
        self.switch_cipher(cipher)
        spool = self._spool
        return await self.run(lambda cursor: reencrypt(cursor, cipher, spool=spool))

    async def start(self) -> None:
        """Open the audit table (off the loop) and start the periodic flusher."""
        if self._db_path is not None and not self._handoff:
            self._db = await asyncio.to_thread(open_store, self._db_path, self._cipher)
        self._task = asyncio.create_task(self._flush_periodically(), name="audit-flusher")

    def emit(self, event: dict[str, Any], sealed_detail: dict[str, Any] | None = None) -> None:
        """Record one event: sealed in the chain, the JSON line now, the row at the next flush.

        `sealed_detail` goes to the store's row alone, encrypted: never to the JSON line, the
        chain or the SIEM (RequestContext.sealed_detail).
        """
        if self._mask_text is not None:
            _mask_event(event, self._mask_text)
            if sealed_detail:
                sealed_detail = _masked(sealed_detail, self._mask_text, 0)
        line = self.chain.seal(event) + "\n"
        self._stream.write(line)
        self._stream.flush()
        private = json.dumps(sealed_detail, separators=(",", ":")) if sealed_detail else None
        self._queue(event, line, private)

    def _queue(self, event: dict[str, Any], line: str, sealed_detail: str | None = None) -> None:
        if self._db is not None or self._handoff:
            # The exact sealed JSON the hash covers: the row's raw, and its columns (at flush).
            self._pending.append(_Row(line[:-1], sealed_detail))
            if len(self._pending) >= self._batch_size:
                self._wake.set()
        if self._forward is not None:
            self._forward(event)

    def emit_request(self, ctx: RequestContext) -> None:
        """The pipeline observer: one event per request."""
        self.emit(request_event(ctx), ctx.sealed_detail or None)

    async def flush(self) -> None:
        """Write what is pending to DuckDB, then a signed checkpoint of the head, in a thread."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        if self._handoff:
            await self._hand_off()
            return
        if self._db is None:
            return
        loaded: list[Path] = []
        checkpoints: list[list[Any]] = []
        if self._db_path is not None and inbox_dir(self._db_path).is_dir():
            inbox = await asyncio.to_thread(_read_inbox, self._db, self._db_path, self._taken)
            loaded, checkpoints = inbox.files, inbox.checkpoints
            self._taken |= inbox.event_ids  # pending now, not to be taken again
            self._pending.extend(inbox.sealed_rows)  # other workers' rows, sealed there
            for event in inbox.events:  # sealed here, on the loop, like every other event
                self._queue(event, self.chain.seal(event) + "\n")
        if not self._pending:
            for path in loaded:
                path.unlink(missing_ok=True)  # files whose events were all in already
            return
        batch, self._pending = self._pending, []
        own = self._checkpoint()
        checkpoints = [*checkpoints, own] if own is not None else checkpoints
        self._in_flight = batch
        try:
            await asyncio.to_thread(
                _insert, self._db, batch, self._spool, checkpoints, self._cipher
            )
        except Exception:
            # Keep the events for the next attempt rather than drop them.
            self._pending[:0] = batch
            log.exception("audit.flush_failed", pending=len(self._pending))
            raise
        finally:
            self._in_flight = []
        for path in loaded:
            path.unlink(missing_ok=True)  # only once their rows are in
        self._taken.clear()
        self.written += len(batch)

    async def _hand_off(self) -> None:
        """A worker without the store: leave the batch and its checkpoint in the owner's inbox."""
        if not self._pending or self._db_path is None:
            return
        batch, self._pending = self._pending, []
        checkpoint = self._checkpoint()
        name = f"{HANDOFF_PREFIX}{self.chain.chain_id.replace(':', '_')}-{self.chain.seq:012d}"
        # Plaintext rows, for the owner to encrypt as it stores them (deleted once loaded).
        lines = [_handoff_line(row) for row in batch]
        if checkpoint is not None:
            lines.append(json.dumps({"checkpoint": checkpoint}) + "\n")
        try:
            await asyncio.to_thread(_write_inbox_file, self._db_path, name, lines)
        except OSError:
            self._pending[:0] = batch  # kept for the next attempt, never dropped
            log.exception("audit.handoff_failed", pending=len(self._pending))
            raise
        self.written += len(batch)

    def unstored(self) -> list[tuple[dict[str, Any], str | None]]:
        """Events of this process not committed to the store yet, and their store-only detail.

        What a read without a flush adds to what the store answers (parsed JSON line, detail
        as JSON text).
        """
        return [
            (json.loads(row.raw), row.sealed_detail) for row in (*self._in_flight, *self._pending)
        ]

    async def search(
        self,
        work: Callable[[duckdb.DuckDBPyConnection], T],
        remote: Callable[[], Awaitable[T]],
        *,
        flush: bool = True,
    ) -> T:
        """Run a read here when this process owns the store, else ask the owner (`remote`)."""
        if self._db is not None:
            return await self.run(work, flush=flush)
        return await remote()

    def _checkpoint(self) -> list[Any] | None:
        """The signed checkpoint row of the chain's current head (None without a key)."""
        if self._checkpoint_key is None:
            return None
        chain, seq, head = self.chain.chain_id, self.chain.seq, self.chain.head
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        signature = self._checkpoint_key.sign(checkpoint_message(chain, seq, head, at)).hex()
        public = key_id(self._checkpoint_key.public_key())
        return [chain, seq, head, at, at, public, signature]

    async def query(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        """Rows of a read-only query, after flushing what is pending (its own cursor, a thread)."""
        if self._db is None:
            raise RuntimeError("the audit store is not open")
        await self.flush()
        return await asyncio.to_thread(_query, self._db, sql, params)

    async def run(self, work: Callable[[duckdb.DuckDBPyConnection], T], *, flush: bool = True) -> T:
        """Run `work` on a cursor of the audit store in a thread, after a flush unless told not."""
        if self._db is None:
            raise RuntimeError("the audit store is not open")
        if flush:
            await self.flush()
        db = self._db

        def on_cursor() -> T:
            cursor = db.cursor()
            try:
                return work(cursor)
            finally:
                cursor.close()

        return await asyncio.to_thread(on_cursor)

    async def close(self) -> None:
        """Stop the flusher and drain everything (SIGTERM path)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        if self._db is not None:
            await asyncio.to_thread(self._db.close)
        if self._owns_stream:
            self._stream.close()

    async def _flush_periodically(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
            self._wake.clear()
            with contextlib.suppress(Exception):  # logged in flush; retried next round
                await self.flush()


def _mask_event(event: dict[str, Any], mask: Callable[[str], str]) -> None:
    """Mask credential-shaped text in the fields that carry client data (detail, user agent)."""
    if isinstance(event.get("user_agent"), str):
        event["user_agent"] = mask(event["user_agent"])
    if event.get("detail"):
        event["detail"] = _masked(event["detail"], mask, 0)


def _masked(value: Any, mask: Callable[[str], str], depth: int) -> Any:
    if isinstance(value, str):
        return mask(value)
    if depth > 8:  # noqa: PLR2004 - the detail is flat in practice; a bound, not a limit
        return value
    if isinstance(value, dict):
        return {k: _masked(v, mask, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, mask, depth + 1) for v in value]
    return value


def _open_append(path: str) -> IO[str]:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return Path(path).open("a", encoding="utf-8", buffering=1)


def open_store(path: Path, cipher: FieldCipher | None) -> duckdb.DuckDBPyConnection:
    """Open (create, migrate) the audit store; with a cipher, seal what it holds in plaintext.

    A store not yet marked sealed (made before encryption, or by the bench's plaintext writer)
    has every value sealed, then is compacted into a fresh file: the pages the old file freed
    could still hold the plaintext. Only then is it marked, so a crash midway redoes both.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = _connect(path)
    if cipher is None or _marked_sealed(connection):
        return connection
    try:
        done = reencrypt(connection, cipher, spool=path.parent)
        connection.execute("CHECKPOINT")  # everything in the file, no WAL left beside it
    finally:
        connection.close()
    _compact(path)
    connection = _connect(path)
    connection.execute("INSERT INTO audit_encryption VALUES ('enc1', now())")
    if done.values:
        log.info("audit.store_encrypted", **done.public())
    return connection


def _connect(path: Path) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(str(path))
    try:
        _migrate(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def _migrate(connection: duckdb.DuckDBPyConnection) -> None:
    connection.execute(_SCHEMA)
    for statement in _MIGRATE:
        connection.execute(statement)
    detail_type = connection.execute(_DETAIL_TYPE).fetchone()
    if detail_type is not None and detail_type[0] == "JSON":  # a store from before encryption
        connection.execute("DROP VIEW IF EXISTS validation_hourly")  # it reads detail's JSON
        connection.execute("ALTER TABLE audit_events ALTER COLUMN detail TYPE VARCHAR")
    connection.execute(_CHECKPOINTS)
    connection.execute(_HOURLY_VIEW)
    connection.execute(_ENCRYPTION_STATE)


def _marked_sealed(connection: duckdb.DuckDBPyConnection) -> bool:
    return connection.execute("SELECT count(*) FROM audit_encryption").fetchone() != (0,)


def _compact(path: Path) -> None:
    """Copy the store into a fresh file and put it in the old one's place (same name)."""
    wal = path.with_name(path.name + ".wal")
    if wal.exists():  # never expected after a CHECKPOINT and close; never replaced under a WAL
        log.warning("audit.compact_skipped", reason="a WAL is left beside the store")
        return
    fresh = path.with_name(f".{path.name}.compact")
    for leftover in (fresh, fresh.with_name(fresh.name + ".wal")):
        leftover.unlink(missing_ok=True)  # an interrupted compaction's
    quoted = str(path).replace("'", "''")
    with duckdb.connect(str(fresh)) as target:
        target.execute(f"ATTACH '{quoted}' AS previous (READ_ONLY)")  # our own file's path
        row = target.execute("SELECT current_database()").fetchone()
        name = str(row[0]).replace('"', '""') if row else "memory"
        target.execute(f'COPY FROM DATABASE previous TO "{name}"')
        target.execute("DETACH previous")
        target.execute("CHECKPOINT")
    with fresh.open("rb") as handle:
        os.fsync(handle.fileno())
    fresh.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _query(
    connection: duckdb.DuckDBPyConnection, sql: str, params: list[Any]
) -> list[tuple[Any, ...]]:
    cursor = connection.cursor()  # a cursor per thread: the flusher uses the connection
    try:
        return cursor.execute(sql, params).fetchall()
    finally:
        cursor.close()


@dataclass
class _Inbox:
    """What the inbox holds that is not in the store yet."""

    files: list[Path] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # from the CLI: to be sealed
    sealed_rows: list[_Row] = field(default_factory=list)  # from other workers: as they are
    checkpoints: list[list[Any]] = field(default_factory=list)
    event_ids: set[str] = field(default_factory=set)  # of events and sealed rows


def _read_inbox(connection: duckdb.DuckDBPyConnection, db_path: Path, taken: set[str]) -> _Inbox:
    """The inbox files, and the events and rows in them neither stored nor `taken` yet.

    A crash between the insert and the unlink must not load an event twice, nor a failed
    insert (whose events wait in the writer's pending batch) make them pending twice.
    """
    inbox = _Inbox(files=sorted(inbox_dir(db_path).glob("*.ndjson")))
    events: dict[str, dict[str, Any]] = {}
    rows: dict[str, _Row] = {}
    for path in inbox.files:
        sealed = path.name.startswith(HANDOFF_PREFIX)
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if sealed and "checkpoint" in item:
                inbox.checkpoints.append(item["checkpoint"])
                continue
            event_id = str(item.get("event_id"))
            if event_id in events or event_id in rows or event_id in taken:
                continue
            if sealed:
                rows[event_id] = _handoff_row(item)
            else:
                events[event_id] = item
    # One query for the whole inbox (a worker's hand-off is a batch, not one event).
    stored = {
        row[0]
        for row in connection.execute(
            "SELECT event_id FROM audit_events WHERE event_id IN (SELECT unnest(?))",
            [[*events, *rows]],
        ).fetchall()
    }
    for event_id in stored:
        events.pop(event_id, None)
        rows.pop(event_id, None)
    inbox.events, inbox.sealed_rows = list(events.values()), list(rows.values())
    inbox.event_ids = set(events) | set(rows)
    return inbox


class _Row(NamedTuple):
    """A row waiting for DuckDB: the chained JSON line and the store-only detail (JSON text).

    Both are encrypted at flush; the line gives the row's columns and its raw.
    """

    raw: str
    sealed_detail: str | None = None


def _handoff_line(row: _Row) -> str:
    """A hand-off file's row: columns, the chained JSON in `raw`, any store-only detail.

    Plaintext until the owner loads the file (and deletes it); the owner encrypts the row.
    """
    extra = f',"sealed_detail":{row.sealed_detail}' if row.sealed_detail else ""
    return row.raw[:-1] + ',"raw":' + json.dumps(row.raw) + extra + "}\n"


def _handoff_row(item: dict[str, Any]) -> _Row:
    """A hand-off row read back; without a chained JSON, its columns (verify reports it)."""
    private = item.get("sealed_detail")
    sealed_detail = json.dumps(private, separators=(",", ":")) if private else None
    raw = item.get("raw")
    if isinstance(raw, str):
        return _Row(raw, sealed_detail)
    columns = {k: v for k, v in item.items() if k not in {"raw", "sealed_detail"}}
    return _Row(json.dumps(columns, separators=(",", ":")), sealed_detail)


def _insert(
    connection: duckdb.DuckDBPyConnection,
    rows: list[_Row],
    spool: Path,
    checkpoints: list[list[Any]] | None,
    cipher: FieldCipher | None,
) -> None:
    """Encrypt the batch, spool it as NDJSON beside the database; DuckDB reads it in one statement.

    The spool file holds only ciphertext in the sensitive columns. The checkpoints of the
    batch's chains go in the same transaction.
    """
    lines = [row_line(row.raw, cipher, row.sealed_detail) for row in rows]
    then = [(_INSERT_CHECKPOINT, checkpoint) for checkpoint in checkpoints or ()]
    apply_spooled(connection, lines, spool, prefix=".audit-batch-", statement=_INSERT, then=then)

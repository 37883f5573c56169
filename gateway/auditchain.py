"""The audit trail's hash chain: sealing each event, signing checkpoints, verifying a store.

Each writer process keeps one chain (its id names host, pid and a random part), so several
workers never contend for a head. Every event gets `chain`, `seq` (1, 2, ...), `prev_hash`
(the previous event's hash; 64 zeros for the first) and `hash`: SHA-256 over the event's
canonical JSON (sorted keys, no spaces, UTF-8) without `hash`. The row keeps that JSON in
`raw`, so a verifier recomputes the hash from exactly what was sealed and checks the queryable
columns against it. Checkpoints sign (chain, seq, hash, time) with an Ed25519 key: a verifier
holding the public key can tell a real head from a rewritten one. Archival (gateway/archive/)
removes a chain's oldest rows only together with a signed archive anchor (chain, seq, hash of
the last archived row): the kept rows must link to it, and rows deleted without one still show.
`raw`, `detail` and `user_agent` are stored encrypted: verification opens them (a value that
does not open, plaintext included, is a problem of its row, never read as it is).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from empsecrets import files
from empsecrets.fieldcrypt import DataKeyError
from gateway.auditcrypt import decrypt, validation_counts

if TYPE_CHECKING:
    from pathlib import Path

    import duckdb

    from empsecrets.fieldcrypt import FieldCipher

GENESIS = "0" * 64
SEAL_FIELDS = ("chain", "seq", "prev_hash", "hash")
# Columns checked against the sealed JSON (the rest are derived or too lossy to compare).
CHECKED_COLUMNS = (
    "event_id", "kind", "request_id", "subject", "roles", "issuer", "method", "path", "route",
    "decision", "reason_id", "status", "latency_ms", "upstream_ms", "policy_revision", "reasons",
    "remote_addr", "user_agent", "detail", "time",
)  # fmt: skip


def canonical(event: dict[str, Any]) -> str:
    """The event as canonical JSON: sorted keys, no spaces, non-ASCII kept."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest(event: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of the event without its `hash`."""
    sealed = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(canonical(sealed).encode("utf-8")).hexdigest()


@dataclass
class Chain:
    """One writer's chain head; seal() appends an event to it (not thread-safe: one owner)."""

    chain_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )
    seq: int = 0
    head: str = GENESIS

    def seal(self, event: dict[str, Any]) -> str:
        """Add chain, seq, prev_hash and hash to the event; its canonical JSON line."""
        self.seq += 1
        event["chain"], event["seq"], event["prev_hash"] = self.chain_id, self.seq, self.head
        event.pop("hash", None)
        body = canonical(event)
        event["hash"] = self.head = hashlib.sha256(body.encode("utf-8")).hexdigest()
        # The sealed body with the hash appended (a verifier drops `hash` and re-canonicalises,
        # so the line need not be canonical itself; this saves a second serialisation).
        return f'{body[:-1]},"hash":"{self.head}"}}'  # body has chain, seq, prev_hash at least


def checkpoint_message(chain: str, seq: int, head: str, at: str) -> bytes:
    """The bytes a checkpoint signs."""
    return f"emp-audit-checkpoint:v1:{chain}:{seq}:{head}:{at}".encode()


def anchor_message(chain: str, seq: int, head: str, at: str) -> bytes:
    """The bytes an archive anchor signs (its own prefix: a checkpoint is not an anchor)."""
    return f"emp-audit-anchor:v1:{chain}:{seq}:{head}:{at}".encode()


# Written by the archival job in the transaction that deletes the archived rows.
ANCHORS_TABLE = """
CREATE TABLE IF NOT EXISTS audit_archive_anchors (
    chain VARCHAR NOT NULL, seq BIGINT NOT NULL, hash VARCHAR NOT NULL, signed_at VARCHAR NOT NULL,
    key_id VARCHAR NOT NULL, signature VARCHAR NOT NULL, archive VARCHAR NOT NULL,
    PRIMARY KEY (chain, seq)
)
"""


def key_id(public: Ed25519PublicKey) -> str:
    """A short id of a checkpoint public key: the first 16 hex of SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def ensure_checkpoint_key(path: Path) -> bool:
    """Create the Ed25519 checkpoint key (PEM, 0600) if missing; whether it was created."""
    if path.exists():
        return False
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files.write_private(path, pem)
    return True


def load_checkpoint_key(path: Path) -> Ed25519PrivateKey:
    """The checkpoint signing key; a missing or foreign file raises ValueError naming it."""
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: audit checkpoint key not found; run `gateway setup`") from None
    return parse_checkpoint_key(pem, str(path))


def parse_checkpoint_key(pem: bytes, source: str) -> Ed25519PrivateKey:
    """The checkpoint signing key in PEM text; errors name source (a file or a reference).

    The gateway reads it through its secret reference (gateway.keys.checkpoint_key).
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):  # never the text: it is key material
        raise ValueError(f"{source}: the audit checkpoint key is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{source}: the audit checkpoint key must be an Ed25519 key")  # noqa: TRY004
    return key


@dataclass
class ChainReport:
    """What verification found in one chain."""

    chain: str
    events: int = 0
    first_seq: int = 0
    last_seq: int = 0
    checkpoints: int = 0
    archived_through: int = 0  # the newest archive anchor's seq (0: nothing archived)
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        """No broken link, no edited row, no bad checkpoint."""
        return not self.problems


def verify(
    connection: duckdb.DuckDBPyConnection, public: Ed25519PublicKey | None, cipher: FieldCipher
) -> list[ChainReport]:
    """Walk every chain in an audit store; each report names its first broken link (and more)."""
    # TIMESTAMPTZ reads back as microseconds (a datetime would need pytz in DuckDB).
    columns = ", ".join("epoch_us(time)" if c == "time" else c for c in CHECKED_COLUMNS)
    # The derived `validation` and the store-only `sealed_detail` (outside the chain, but it
    # must open); a scratch store restored from older archives may lack them.
    extra = ", ".join(c if _has_column(connection, c) else "NULL" for c in _EXTRA_COLUMNS)
    rows = connection.execute(
        f"SELECT chain, seq, prev_hash, hash, raw, {columns}, {extra} FROM audit_events "  # noqa: S608 - fixed names
        "WHERE chain IS NOT NULL ORDER BY chain, seq"
    ).fetchall()
    reports: dict[str, ChainReport] = {}
    previous = _anchors(connection, reports, public)  # an archived chain links to its anchor
    for row in rows:
        chain, seq, prev_hash, stored_hash, raw = row[:5]
        report = reports.setdefault(chain, ChainReport(chain))
        if seq <= report.archived_through:
            report.problems.append(f"seq {seq}: present though archived (re-inserted)")
            continue
        if not report.events:
            report.first_seq = seq
        report.events += 1
        report.last_seq = seq
        opened = _opened(report, cipher, seq, raw, row[5:])
        if opened is not None:
            _check_row(report, previous.get(chain), seq, prev_hash, stored_hash, *opened)
        previous[chain] = (seq, stored_hash)
    _check_checkpoints(connection, reports, public)
    return list(reports.values())


_EXTRA_COLUMNS = ("validation", "sealed_detail")
_ENCRYPTED_AT = {
    **{CHECKED_COLUMNS.index(name): name for name in ("user_agent", "detail")},
    len(CHECKED_COLUMNS) + _EXTRA_COLUMNS.index("sealed_detail"): "sealed_detail",
}


def _has_column(connection: duckdb.DuckDBPyConnection, name: str) -> bool:
    found = connection.execute(
        "SELECT count(*) FROM duckdb_columns() WHERE table_name = 'audit_events' "
        "AND column_name = ?",
        [name],
    ).fetchone()
    return bool(found and found[0])


def _opened(
    report: ChainReport, cipher: FieldCipher, seq: int, raw: str | None, values: tuple[Any, ...]
) -> tuple[str | None, tuple[Any, ...]] | None:
    """The row's raw and columns, encrypted ones opened; None (and a problem) if one does not.

    Tampered, moved from another row, plaintext, or under a key the ring does not hold.
    """
    event_id, opened = values[0], list(values)
    try:
        raw = decrypt(cipher, "raw", event_id, raw)
        for index, name in _ENCRYPTED_AT.items():
            opened[index] = decrypt(cipher, name, event_id, opened[index])
    except DataKeyError as exc:
        report.problems.append(f"seq {seq}: an encrypted column does not open ({exc})")
        return None
    return raw, tuple(opened[:-1])  # sealed_detail opened; the chain does not cover it


def _check_row(  # noqa: PLR0917 - one row's fields, read in the order they are stored
    report: ChainReport,
    before: tuple[int, str] | None,
    seq: int,
    prev_hash: str,
    stored_hash: str,
    raw: str | None,
    values: tuple[Any, ...],
) -> None:
    expected_seq, expected_prev = (before[0] + 1, before[1]) if before else (1, GENESIS)
    if before is not None and seq == before[0]:
        report.problems.append(f"seq {seq}: appears more than once (a row was inserted)")
        return
    if seq != expected_seq:
        missing = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}-{seq - 1}"
        report.problems.append(f"seq {missing}: missing (rows were deleted)")
    elif prev_hash != expected_prev:
        report.problems.append(f"seq {seq}: prev_hash does not match seq {seq - 1}'s hash")
    if raw is None:
        report.problems.append(f"seq {seq}: the sealed JSON (raw) is missing")
        return
    try:
        sealed = json.loads(raw)
    except ValueError:
        report.problems.append(f"seq {seq}: the sealed JSON (raw) is not JSON")
        return
    if digest(sealed) != stored_hash or sealed.get("hash") != stored_hash:
        report.problems.append(f"seq {seq}: hash does not match the sealed event (edited)")
        return
    if (sealed.get("chain"), sealed.get("seq"), sealed.get("prev_hash")) != (
        report.chain, seq, prev_hash,
    ):  # fmt: skip
        report.problems.append(f"seq {seq}: chain fields differ from the sealed event (moved)")
        return
    # The columns, then `validation`: the plaintext counts must be the sealed detail's.
    expected = [
        *(sealed.get(name) for name in CHECKED_COLUMNS),
        validation_counts(sealed.get("detail")),
    ]
    for name, value, want in zip((*CHECKED_COLUMNS, "validation"), values, expected, strict=True):
        if not _same(name, value, want):
            report.problems.append(f"seq {seq}: column {name} differs from the sealed event")
            return


def _same(name: str, column: Any, sealed: Any) -> bool:
    """Whether a column's value is the sealed event's (DuckDB types read back loosely)."""
    if name == "time":
        try:
            moment = datetime.fromisoformat(str(sealed))
        except ValueError:
            return False
        return bool(column == round(moment.timestamp() * 1_000_000))
    if isinstance(column, str) and isinstance(sealed, dict | list):
        try:
            return bool(json.loads(column) == sealed)
        except ValueError:
            return False
    if isinstance(column, float) and isinstance(sealed, int | float):
        return math.isclose(column, sealed, rel_tol=0, abs_tol=1e-9)
    return bool(column == sealed)


def _anchors(
    connection: duckdb.DuckDBPyConnection,
    reports: dict[str, ChainReport],
    public: Ed25519PublicKey | None,
) -> dict[str, tuple[int, str]]:
    """Each chain's newest validly signed archive anchor: (seq, hash) its kept rows link to."""
    found = connection.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'audit_archive_anchors'"
    ).fetchone()
    if not found or not found[0]:
        return {}
    rows = connection.execute(
        "SELECT chain, seq, hash, signed_at, signature FROM audit_archive_anchors "
        "ORDER BY chain, seq"
    ).fetchall()
    newest: dict[str, tuple[int, str]] = {}
    for chain, seq, head, at, signature in rows:
        report = reports.setdefault(chain, ChainReport(chain))
        if public is not None:
            try:
                public.verify(bytes.fromhex(signature), anchor_message(chain, seq, head, at))
            except (InvalidSignature, ValueError):
                # A forged anchor must not excuse deleted rows: they then show as missing.
                report.problems.append(f"archive anchor at seq {seq}: bad signature")
                continue
        newest[chain] = (seq, head)
        report.archived_through = seq
    return newest


def _check_checkpoints(
    connection: duckdb.DuckDBPyConnection,
    reports: dict[str, ChainReport],
    public: Ed25519PublicKey | None,
) -> None:
    rows = connection.execute(
        "SELECT c.chain, c.seq, c.hash, CAST(c.time AS VARCHAR), c.signed_at, c.signature, e.hash "
        "FROM audit_checkpoints c LEFT JOIN audit_events e ON e.chain = c.chain AND e.seq = c.seq "
        "ORDER BY c.chain, c.seq"
    ).fetchall()
    for chain, seq, head, _time, at, signature, row_hash in rows:
        report = reports.setdefault(chain, ChainReport(chain))
        report.checkpoints += 1
        if public is not None:
            try:
                public.verify(bytes.fromhex(signature), checkpoint_message(chain, seq, head, at))
            except (InvalidSignature, ValueError):
                report.problems.append(f"checkpoint at seq {seq}: bad signature")
                continue
        if row_hash is None:
            report.problems.append(f"checkpoint at seq {seq}: its event is missing (deleted)")
        elif row_hash != head:
            report.problems.append(f"checkpoint at seq {seq}: the event's hash differs (rewritten)")

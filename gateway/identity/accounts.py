"""Accounts of the built-in identity provider (users, service clients) in one DuckDB file.

Stores only hashes and sealed secrets; never hashes anything itself (see passwords.py). One
process may write the file; within it, one lock serialises the worker threads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar, cast

import duckdb

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from types import TracebackType

Status = Literal["active", "disabled"]
MfaState = Literal["none", "pending", "enabled"]
STATUSES: tuple[Status, ...] = ("active", "disabled")
MFA_STATES: tuple[MfaState, ...] = ("none", "pending", "enabled")
SCHEMA_VERSION = "1"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS identity_meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)",
    """CREATE TABLE IF NOT EXISTS users (
        username_key VARCHAR PRIMARY KEY,  -- lower(username): lookups are case-insensitive
        username VARCHAR NOT NULL,
        password_hash VARCHAR NOT NULL,
        hash_scheme VARCHAR NOT NULL,
        roles VARCHAR[] NOT NULL,
        status VARCHAR NOT NULL,
        mfa_state VARCHAR NOT NULL,
        mfa_secret_sealed VARCHAR,
        recovery_hashes VARCHAR[] NOT NULL,
        created_at TIMESTAMP NOT NULL,  -- UTC; TIMESTAMPTZ would need pytz to read back
        updated_at TIMESTAMP NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS clients (
        client_id VARCHAR PRIMARY KEY,
        secret_hash VARCHAR NOT NULL,
        roles VARCHAR[] NOT NULL,
        status VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL,
        rotated_at TIMESTAMP NOT NULL)""",
)
_USER_COLUMNS = (
    "username, password_hash, hash_scheme, roles, status, mfa_state, mfa_secret_sealed, "
    "recovery_hashes, created_at, updated_at"
)
_CLIENT_COLUMNS = "client_id, secret_hash, roles, status, created_at, rotated_at"


class AccountExists(ValueError):  # noqa: N818 - reads as the condition, like FileExistsError
    """A user or client with that name already exists."""


class AccountNotFound(ValueError):  # noqa: N818 - reads as the condition, like FileNotFoundError
    """No user or client with that name."""


class StoreLocked(RuntimeError):  # noqa: N818 - the name the CLI catches
    """Another process holds the account store's write lock (longer than we waited)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"{path}: the account store is locked by another process (a running gateway holds "
            "it only for milliseconds per login; something is holding it open: find it with "
            f"`fuser {path}`)"
        )


@dataclass(frozen=True)
class User:
    """A person's account; hashes and sealed secrets are left out of repr and public()."""

    username: str
    password_hash: str = field(repr=False)
    hash_scheme: str
    roles: tuple[str, ...]
    status: Status
    mfa_state: MfaState
    mfa_secret_sealed: str | None = field(repr=False)
    recovery_hashes: tuple[str, ...] = field(repr=False)
    created_at: datetime
    updated_at: datetime

    def public(self) -> dict[str, Any]:
        """What listings and audit events may show: no hash, no secret."""
        return {
            "username": self.username,
            "roles": list(self.roles),
            "status": self.status,
            "mfa_state": self.mfa_state,
            "recovery_codes_left": len(self.recovery_hashes),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class Client:
    """A service client (an ingest process); its secret exists here only as an argon2id hash."""

    client_id: str
    secret_hash: str = field(repr=False)
    roles: tuple[str, ...]
    status: Status
    created_at: datetime
    rotated_at: datetime

    def public(self) -> dict[str, Any]:
        """What listings and audit events may show: no hash."""
        return {
            "client_id": self.client_id,
            "roles": list(self.roles),
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "rotated_at": self.rotated_at.isoformat(),
        }


@dataclass(frozen=True)
class NewUser:
    """One row for add_users: a user as the import creates it."""

    username: str
    password_hash: str = field(repr=False)
    hash_scheme: str
    roles: tuple[str, ...]


class AccountStore:
    """Users and clients in DuckDB; every method is safe to call from worker threads."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, path: Path) -> None:
        self.path = path
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, migrate: bool = True) -> AccountStore:
        """Open (creating the file 0600 and the tables if missing); StoreLocked if held.

        migrate=False skips the schema check: for the gateway's per-operation opens, after
        its start-up open has checked the schema once.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _create_private(path)
        try:
            connection = duckdb.connect(str(path))
        except duckdb.IOException as exc:
            if "Could not set lock" in str(exc):
                raise StoreLocked(path) from None
            raise
        store = cls(connection, path)
        if not migrate:
            return store
        try:
            store._migrate()
        except BaseException:
            connection.close()
            raise
        return store

    @classmethod
    def open_waiting(
        cls, path: Path, *, wait_seconds: float = 5.0, migrate: bool = True
    ) -> AccountStore:
        """Open, waiting while another process holds the file (for milliseconds, normally)."""
        deadline = time.monotonic() + wait_seconds
        delay = 0.005
        while True:
            try:
                return cls.open(path, migrate=migrate)
            except StoreLocked:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def close(self) -> None:
        """Release the file (and its write lock)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def checkpoint(self) -> None:
        """Merge the write-ahead log into the database file (and remove the log)."""
        with self._lock:
            self._db.execute("CHECKPOINT")

    # Users

    def add_user(
        self, username: str, password_hash: str, hash_scheme: str, roles: Sequence[str]
    ) -> None:
        """Create an active user without MFA; AccountExists if the name is taken (any case)."""
        self.add_users([NewUser(username, password_hash, hash_scheme, tuple(roles))])

    def add_users(self, users: Sequence[NewUser]) -> None:
        """Create several users in one transaction: all of them, or none (AccountExists)."""
        keys = [user.username.lower() for user in users]
        if len(set(keys)) != len(keys):
            raise AccountExists("the same username appears twice (usernames ignore case)")
        now = _now()
        rows = [
            [key, u.username, u.password_hash, u.hash_scheme, list(u.roles), "active", "none",
             None, [], now, now]
            for key, u in zip(keys, users, strict=True)
        ]  # fmt: skip
        with self._transaction() as db:
            taken = db.execute(
                "SELECT username FROM users WHERE list_contains(?, username_key) ORDER BY 1",
                [keys],
            ).fetchall()
            if taken:
                names = ", ".join(row[0] for row in taken)
                raise AccountExists(f"user already exists: {names}")
            db.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def get_user(self, username: str) -> User | None:
        """The user of that name, in any case; None if there is none."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE username_key = ?",  # noqa: S608 - fixed names
                [username.lower()],
            ).fetchone()
        return None if row is None else _user(row)

    def list_users(self) -> list[User]:
        """Every user, by username."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_USER_COLUMNS} FROM users ORDER BY username_key"  # noqa: S608 - fixed names
            ).fetchall()
        return [_user(row) for row in rows]

    def set_roles(self, username: str, roles: Sequence[str]) -> None:
        """Replace the user's roles."""
        self._update_user(username, "roles = ?", [list(roles)])

    def set_status(self, username: str, status: Status) -> None:
        """Enable or disable the user."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}")
        self._update_user(username, "status = ?", [status])

    def update_password_hash(self, username: str, password_hash: str, hash_scheme: str) -> None:
        """Store a new password hash (a change, or the upgrade after a legacy login)."""
        assignments = "password_hash = ?, hash_scheme = ?"
        self._update_user(username, assignments, [password_hash, hash_scheme])

    def set_mfa(
        self,
        username: str,
        state: MfaState,
        sealed_secret: str | None,
        recovery_hashes: Sequence[str],
    ) -> None:
        """Set the second factor: "none" clears it; "pending" and "enabled" need a secret."""
        if state not in MFA_STATES:
            raise ValueError(f"mfa_state must be one of {list(MFA_STATES)}")
        if (state == "none") != (sealed_secret is None):
            raise ValueError('mfa: a sealed secret goes with "pending"/"enabled", never "none"')
        self._update_user(
            username,
            "mfa_state = ?, mfa_secret_sealed = ?, recovery_hashes = ?",
            [state, sealed_secret, list(recovery_hashes)],
        )

    def consume_recovery_hash(self, username: str, code_hash: str) -> bool:
        """Remove one recovery code's hash; False if absent (each code works exactly once)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT recovery_hashes FROM users WHERE username_key = ?", [username.lower()]
            ).fetchone()
            if row is None:
                raise AccountNotFound(f"no user {username!r}")
            hashes: list[str] = row[0]
            if code_hash not in hashes:
                return False
            hashes.remove(code_hash)
            db.execute(
                "UPDATE users SET recovery_hashes = ?, updated_at = ? WHERE username_key = ?",
                [hashes, _now(), username.lower()],
            )
            return True

    # Clients

    def add_client(self, client_id: str, secret_hash: str, roles: Sequence[str]) -> None:
        """Create an active client; AccountExists if the id is taken."""
        now = _now()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM clients WHERE client_id = ?", [client_id]).fetchone():
                raise AccountExists(f"client already exists: {client_id}")
            db.execute(
                "INSERT INTO clients VALUES (?, ?, ?, 'active', ?, ?)",
                [client_id, secret_hash, list(roles), now, now],
            )

    def get_client(self, client_id: str) -> Client | None:
        """The client with that id (exact case); None if there is none."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE client_id = ?",  # noqa: S608 - fixed names
                [client_id],
            ).fetchone()
        return None if row is None else _client(row)

    def list_clients(self) -> list[Client]:
        """Every client, by id."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_CLIENT_COLUMNS} FROM clients ORDER BY client_id"  # noqa: S608 - fixed names
            ).fetchall()
        return [_client(row) for row in rows]

    def set_client_secret(self, client_id: str, secret_hash: str) -> None:
        """Replace the client's secret hash (a rotation); the old secret stops working at once."""
        self._update_client(client_id, "secret_hash = ?, rotated_at = ?", [secret_hash, _now()])

    def set_client_status(self, client_id: str, status: Status) -> None:
        """Enable or disable the client."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}")
        self._update_client(client_id, "status = ?", [status])

    # Internals

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Every write goes through here: under the lock, in one transaction, WAL kept 0600."""
        with self._lock:
            _keep_wal_private(self.path)
            self._db.execute("BEGIN TRANSACTION")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _update_user(self, username: str, assignments: str, values: list[Any]) -> None:
        with self._transaction() as db:
            row = db.execute(
                f"UPDATE users SET {assignments}, updated_at = ? "  # noqa: S608 - this class's own assignments
                "WHERE username_key = ? RETURNING 1",
                [*values, _now(), username.lower()],
            ).fetchone()
        if row is None:
            raise AccountNotFound(f"no user {username!r}")

    def _update_client(self, client_id: str, assignments: str, values: list[Any]) -> None:
        with self._transaction() as db:
            row = db.execute(
                f"UPDATE clients SET {assignments} WHERE client_id = ? RETURNING 1",  # noqa: S608 - this class's own assignments
                [*values, client_id],
            ).fetchone()
        if row is None:
            raise AccountNotFound(f"no client {client_id!r}")

    def _migrate(self) -> None:
        with self._transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            row = db.execute(
                "SELECT value FROM identity_meta WHERE key = 'schema_version'"
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO identity_meta VALUES ('schema_version', ?)", [SCHEMA_VERSION]
                )
            elif row[0] != SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: schema_version {row[0]} is not {SCHEMA_VERSION}, the one this "
                    "gateway knows; use the gateway version that wrote it"
                )


def _create_private(path: Path) -> None:
    """Create an empty store readable by the owner only, from its first byte.

    DuckDB creates files with the process umask and refuses a pre-made empty file, so the file
    is made in a 0700 directory beside it, set to 0600, then linked into place (link, unlike
    rename, never replaces a store another process created meanwhile).
    """
    workdir = Path(tempfile.mkdtemp(prefix=".identity-new-", dir=path.parent))
    try:
        fresh = workdir / path.name
        duckdb.connect(str(fresh)).close()
        fresh.chmod(0o600)
        with contextlib.suppress(FileExistsError):
            os.link(fresh, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _keep_wal_private(path: Path) -> None:
    """Make the write-ahead log 0600 before DuckDB writes to it.

    It holds the same hashes as the store, but DuckDB creates it with the umask (0644 here) and
    deletes it at every checkpoint; DuckDB appends to an existing empty log as to a new one.
    """
    descriptor = os.open(path.with_name(path.name + ".wal"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _user(row: tuple[Any, ...]) -> User:
    return User(
        username=row[0],
        password_hash=row[1],
        hash_scheme=row[2],
        roles=tuple(row[3]),
        status=cast("Status", row[4]),
        mfa_state=cast("MfaState", row[5]),
        mfa_secret_sealed=row[6],
        recovery_hashes=tuple(row[7]),
        created_at=row[8].replace(tzinfo=UTC),
        updated_at=row[9].replace(tzinfo=UTC),
    )


def _client(row: tuple[Any, ...]) -> Client:
    return Client(
        client_id=row[0],
        secret_hash=row[1],
        roles=tuple(row[2]),
        status=cast("Status", row[3]),
        created_at=row[4].replace(tzinfo=UTC),
        rotated_at=row[5].replace(tzinfo=UTC),
    )


T = TypeVar("T")


class SharedAccounts:
    """The account store as the running gateway uses it: opened per operation, then released.

    DuckDB lets one process write a file at a time. Holding the store open for the gateway's
    life would lock the CLI out (`gateway users add` while serving); opening it per operation
    costs ~25-40 ms here (connect + close dominate) next to a ~30 ms argon2 check, and both
    sides wait for each other briefly.
    Call from a worker thread (asyncio.to_thread): it blocks.
    """

    def __init__(self, path: Path, *, wait_seconds: float = 5.0) -> None:
        self.path = path
        self._wait = wait_seconds

    def run(self, operation: Callable[[AccountStore], T]) -> T:
        """Open the store, run operation on it, release the file."""
        # The gateway checked the schema at start (build_identity): not again per login.
        with AccountStore.open_waiting(self.path, wait_seconds=self._wait, migrate=False) as store:
            return operation(store)

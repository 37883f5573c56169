"""Account operations for the CLI (and the admin API): validate, hash, store, describe.

Each takes an open AccountStore and a Passwords and returns JSON-safe dicts. Only a new client
secret is ever returned, once, by the call that made it; no password or hash leaves here.
"""

from __future__ import annotations

import csv
import os
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from gateway.identity.accounts import AccountExists, AccountNotFound, NewUser, Status
from gateway.identity.passwords import (
    LEGACY_DIGESTS,
    PLAIN_SCHEME,
    validate_client_id,
    validate_role,
    validate_username,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

    from gateway.identity.accounts import AccountStore, Client, User
    from gateway.identity.passwords import Passwords

log = structlog.get_logger("gateway.identity.manage")

IMPORT_COLUMNS = frozenset({"username", "roles", "password", "password_hash", "hash_scheme"})
_HEX = re.compile(r"[0-9a-fA-F]+")
_DIGEST_LENGTHS = {name: new().digest_size * 2 for name, new in LEGACY_DIGESTS.items()}
_CHUNK = 1 << 20


def add_user(
    store: AccountStore, passwords: Passwords, username: str, password: str, roles: Sequence[str]
) -> dict[str, Any]:
    """Create a user with a new password (checked against the rules); the user's public view."""
    validate_username(username)
    checked = _checked_roles(roles)
    passwords.validate_new_password(username, password)
    if store.get_user(username) is not None:  # before the costly hash; add_user re-checks
        raise AccountExists(f"user already exists: {username}")
    store.add_user(username, passwords.hash(password), PLAIN_SCHEME, checked)
    return _user(store, username).public()


def set_roles(store: AccountStore, username: str, roles: Sequence[str]) -> dict[str, Any]:
    """Replace a user's roles; the user's public view."""
    store.set_roles(username, _checked_roles(roles))
    return _user(store, username).public()


def set_user_status(store: AccountStore, username: str, status: Status) -> dict[str, Any]:
    """Disable a user (logins, refreshes and browser sessions stop) or enable them again."""
    store.set_status(username, status)
    return _user(store, username).public()


def disable_user(store: AccountStore, username: str) -> dict[str, Any]:
    """Stop a user logging in (refreshes and sessions re-read the account and stop too)."""
    return set_user_status(store, username, "disabled")


def enable_user(store: AccountStore, username: str) -> dict[str, Any]:
    """Let a disabled user log in again."""
    return set_user_status(store, username, "active")


def set_password_hash(store: AccountStore, username: str, password_hash: str) -> dict[str, Any]:
    """Replace a user's password with an argon2id hash made by new_password_hash."""
    store.update_password_hash(username, password_hash, PLAIN_SCHEME)
    return _user(store, username).public()


def new_password_hash(passwords: Passwords, username: str, password: str) -> str:
    """Check a new password against the rules and hash it (slow: do it before opening the store)."""
    validate_username(username)
    passwords.validate_new_password(username, password)
    return passwords.hash(password)


def reset_mfa(store: AccountStore, username: str) -> dict[str, Any]:
    """Turn a user's MFA off (lost device and recovery codes): the next login enrols again."""
    store.set_mfa(username, "none", None, ())
    return _user(store, username).public()


def set_client_status(store: AccountStore, client_id: str, status: Status) -> dict[str, Any]:
    """Disable or re-enable a client: a disabled client gets no token (its tokens expire)."""
    store.set_client_status(client_id, status)
    return _client(store, client_id).public()


def list_users(store: AccountStore) -> list[dict[str, Any]]:
    """Every user's public view."""
    return [user.public() for user in store.list_users()]


def add_client(
    store: AccountStore, passwords: Passwords, client_id: str, roles: Sequence[str]
) -> tuple[dict[str, Any], str]:
    """Create a client: (its public view, its secret). The secret is not kept: show it once."""
    validate_client_id(client_id)
    checked = _checked_roles(roles)
    secret = secrets.token_urlsafe(32)
    store.add_client(client_id, passwords.hash(secret), checked)
    return _client(store, client_id).public(), secret


def rotate_client_secret(
    store: AccountStore, passwords: Passwords, client_id: str
) -> tuple[dict[str, Any], str]:
    """Replace a client's secret: (its public view, the new secret); the old one stops working."""
    secret = secrets.token_urlsafe(32)
    store.set_client_secret(client_id, passwords.hash(secret))
    return _client(store, client_id).public(), secret


def list_clients(store: AccountStore) -> list[dict[str, Any]]:
    """Every client's public view."""
    return [client.public() for client in store.list_clients()]


def verify_client(
    store: AccountStore, passwords: Passwords, client_id: str, secret: str
) -> Client | None:
    """The active client whose secret this is, else None, in the same time either way."""
    client = store.get_client(client_id)
    if client is None or client.status != "active":
        passwords.verify_dummy(secret)
        return None
    ok, _ = passwords.check(PLAIN_SCHEME, client.secret_hash, secret)
    return client if ok else None


def import_users(
    store: AccountStore, passwords: Passwords, csv_path: Path, *, purge_source: bool = True
) -> dict[str, Any]:
    """Import legacy users from CSV, all or none; then (by default) destroy the file.

    Columns: username, roles (";"-separated) and per row either password (plaintext) or
    password_hash + hash_scheme (md5, sha1, sha256: unsalted hex, kept as argon2id+<scheme>).
    Any bad row refuses the whole file with a ValueError naming its line, never its password.
    Legacy passwords below today's rules are imported all the same and counted as "weak".
    """
    return commit_import(
        store, prepare_import(passwords, csv_path), csv_path, purge_source=purge_source
    )


@dataclass(frozen=True)
class PreparedImport:
    """Rows read and hashed, ready to store: the slow part, done without the store's lock."""

    users: tuple[NewUser, ...]
    lines: tuple[int, ...]  # each user's line in the CSV, for error messages
    weak: int


def prepare_import(passwords: Passwords, csv_path: Path) -> PreparedImport:
    """Read and check the CSV and hash every password (~30 ms each) before opening the store."""
    rows = _read_import(csv_path)
    weak = sum(
        row.password is not None and not _meets_rules(passwords, row.username, row.password)
        for row in rows
    )
    users = tuple(_hashed(passwords, row) for row in rows)
    return PreparedImport(users, tuple(row.line for row in rows), weak)


def commit_import(
    store: AccountStore, prepared: PreparedImport, csv_path: Path, *, purge_source: bool
) -> dict[str, Any]:
    """Store prepared users in one transaction, then (by default) destroy the source file."""
    for line, user in zip(prepared.lines, prepared.users, strict=True):
        if store.get_user(user.username) is not None:
            raise ValueError(f"{csv_path}: line {line}: user already exists: {user.username}")
    store.add_users(list(prepared.users))
    # Nothing but argon2id hashes reached DuckDB; the checkpoint folds its log into the file.
    store.checkpoint()
    schemes = Counter(user.hash_scheme for user in prepared.users)
    report: dict[str, Any] = {
        "imported": len(prepared.users),
        "usernames": [user.username for user in prepared.users],
        "schemes": dict(schemes),
        "weak": prepared.weak,
        "source_purged": False,
    }
    if purge_source:
        try:
            _destroy(csv_path)
        except OSError as exc:
            log.warning("identity.import_purge_failed", path=str(csv_path), error=exc.strerror)
            report["purge_error"] = f"{csv_path}: {exc.strerror}; destroy it by hand"
        else:
            report["source_purged"] = True
    log.info(
        "identity.users_imported", count=len(prepared.users), source_purged=report["source_purged"]
    )
    return report


@dataclass(frozen=True)
class _ImportRow:
    """One validated CSV row: a plaintext password or a legacy digest, never both."""

    line: int
    username: str
    roles: tuple[str, ...]
    password: str | None = field(repr=False)
    legacy_scheme: str
    legacy_hex: str = field(repr=False)


def _hashed(passwords: Passwords, row: _ImportRow) -> NewUser:
    """The row as stored: argon2id of the password, or argon2id of the legacy digest."""
    if row.password is not None:
        return NewUser(row.username, passwords.hash(row.password), PLAIN_SCHEME, row.roles)
    scheme = f"{PLAIN_SCHEME}+{row.legacy_scheme}"
    return NewUser(row.username, passwords.hash(row.legacy_hex), scheme, row.roles)


def _read_import(csv_path: Path) -> list[_ImportRow]:
    """Parse and validate every row before anything is hashed or stored."""
    rows: list[_ImportRow] = []
    first_lines: dict[str, int] = {}
    with csv_path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        line = 1
        try:
            _check_header(reader.fieldnames)
            for fields in reader:
                line = reader.line_num
                rows.append(_parse_row(line, fields, first_lines))
        except (ValueError, csv.Error) as exc:
            # Our own messages only: a decode or csv error could quote the file's bytes.
            raise ValueError(f"{csv_path}: line {line}: {_own_message(exc)}") from None
    if not rows:
        raise ValueError(f"{csv_path}: no rows to import")
    return rows


def _own_message(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, csv.Error):
        return "not valid CSV"
    return str(exc)


def _check_header(names: Sequence[str] | None) -> None:
    header = set(names or ())
    unknown = sorted(header - IMPORT_COLUMNS)
    if unknown:
        raise ValueError(
            f"unknown column {unknown[0]!r} (known: {', '.join(sorted(IMPORT_COLUMNS))})"
        )
    if not {"username", "roles"} <= header or not header & {"password", "password_hash"}:
        raise ValueError("need columns username, roles and password or password_hash + hash_scheme")


def _parse_row(
    line: int, fields: dict[str | Any, str | Any], first_lines: dict[str, int]
) -> _ImportRow:
    """One row checked; first_lines (lower-cased username: line) catches repeats."""
    if None in fields:
        raise ValueError("more fields than the header has columns")
    username = (fields.get("username") or "").strip()
    validate_username(username)
    first = first_lines.setdefault(username.lower(), line)
    if first != line:
        raise ValueError(f"username repeats line {first} (usernames ignore case)")
    roles = _checked_roles([r.strip() for r in (fields.get("roles") or "").split(";") if r.strip()])
    password = fields.get("password") or None
    digest = (fields.get("password_hash") or "").strip().lower()
    scheme = (fields.get("hash_scheme") or "").strip().lower()
    if (password is None) == (not digest):
        raise ValueError("give exactly one of password and password_hash")
    if password is None:
        _check_digest(scheme, digest)
    return _ImportRow(line, username, roles, password, scheme, digest)


def _check_digest(scheme: str, digest: str) -> None:
    if scheme not in LEGACY_DIGESTS:
        raise ValueError(f"hash_scheme must be one of {', '.join(LEGACY_DIGESTS)}")
    length = _DIGEST_LENGTHS[scheme]
    if len(digest) != length or not _HEX.fullmatch(digest):
        raise ValueError(f"password_hash is not a {length}-character hex {scheme} digest")


def _meets_rules(passwords: Passwords, username: str, password: str) -> bool:
    try:
        passwords.validate_new_password(username, password)
    except ValueError:
        return False
    return True


def _destroy(path: Path) -> None:
    """Overwrite a file with zeros, sync, unlink, and sync the directory entry away.

    On copy-on-write file systems and SSDs old blocks may survive on the medium; this removes
    the plaintext from every file a process can open, which is what we can promise.
    """
    remaining = path.stat().st_size
    with path.open("r+b") as handle:
        while remaining > 0:
            chunk = min(_CHUNK, remaining)
            handle.write(bytes(chunk))
            remaining -= chunk
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _checked_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """Roles validated and de-duplicated, in the order given."""
    checked: list[str] = []
    for role in roles:
        validate_role(role)
        if role not in checked:
            checked.append(role)
    return tuple(checked)


def _user(store: AccountStore, username: str) -> User:
    user = store.get_user(username)
    if user is None:
        raise AccountNotFound(f"no user {username!r}")
    return user


def _client(store: AccountStore, client_id: str) -> Client:
    client = store.get_client(client_id)
    if client is None:
        raise AccountNotFound(f"no client {client_id!r}")
    return client

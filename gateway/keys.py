"""Token signing with the issuer's key, and the upstream shared secret generated into var/.

The signing keys themselves (generation, rotation, publication) live in gateway/keyring.py.

Private material is written 0600 and never logged; only public keys leave this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

import jwt
import structlog

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

SIGNING_KEYS_FILE = "signing.jwks.json"
log = structlog.get_logger("gateway.keys")
_BOOKKEEPING = frozenset({"created_at", "retired_at"})  # key-ring fields that are not JWK members


def write_private(path: Path, data: str | bytes) -> None:
    """Create or replace a file readable by the owner only (0600 from creation, not after).

    The bytes reach the disk (fsync) before the rename makes them appear, whole, under `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


@contextlib.contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an flock on `lock_file` (created 0600) so that one process at a time goes on."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def mint_token(
    private_key: dict[str, Any],
    *,
    issuer: str,
    audience: str,
    subject: str,
    roles: list[str],
    ttl_seconds: int,
    extra_claims: dict[str, Any] | None = None,
) -> str:
    """Sign an access token with the dev issuer's key."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "roles": roles,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
        "amr": ["dev"],
    }
    claims.update(extra_claims or {})
    signing = jwt.PyJWK({k: v for k, v in private_key.items() if k not in _BOOKKEEPING})
    return jwt.encode(
        claims, signing.key, algorithm=private_key["alg"], headers={"kid": private_key["kid"]}
    )


def ensure_upstream_secret(path: Path, *, force: bool = False) -> bool:
    """Generate the secret the gateway presents to the upstream; True if generated."""
    if path.exists() and not force:
        return False
    write_private(path, secrets.token_urlsafe(32) + "\n")
    return True


def read_secret(path: Path) -> str:
    """A secret file's content; missing or empty is a refusal to start (fail closed)."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: secret file missing; run `gateway keys init`") from None
    if not value:
        raise ValueError(f"{path}: secret file is empty; run `gateway keys init --force`")
    return value


class SecretFile:
    """A one-line secret file, re-read when it changes (a rotation).

    The caller asks for `current()` per use; the file is looked at once per `check_seconds`.

    A file that turns missing, empty or unreadable keeps the last good value (and says so in
    the log): a botched edit must not take the gateway down, and the old value is still one
    the other side knows.
    """

    def __init__(
        self,
        path: Path,
        *,
        on_new: Callable[[str], str] = lambda value: value,
        check_seconds: float = 1.0,
    ) -> None:
        self.path = path
        self._on_new = on_new  # e.g. register the value with the log mask
        self._check = check_seconds
        self._stat = _identity(path)
        self._value = on_new(read_secret(path))  # missing or empty at start: refuse to start
        self._next_check = time.monotonic() + check_seconds

    def __repr__(self) -> str:
        return f"SecretFile({str(self.path)!r})"  # never the value

    def current(self) -> str:
        """The secret as the file holds it now (at most check_seconds old)."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._check
            self._reload()
        return self._value

    def _reload(self) -> None:
        try:
            identity = _identity(self.path)
        except OSError:
            log.warning("secret_file.unreadable", path=str(self.path))
            return
        if identity == self._stat:
            return
        try:
            value = read_secret(self.path)
        except (OSError, ValueError):
            log.warning("secret_file.unreadable", path=str(self.path))
            return
        self._value = self._on_new(value)
        self._stat = identity
        log.info("secret_file.reloaded", path=str(self.path))


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

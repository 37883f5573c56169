"""Password hashing (argon2id), legacy onion-hash checks, and the rules for names and passwords.

Synchronous and CPU-bound: the gateway calls it with asyncio.to_thread. Never logs, returns
or raises with a password or a stored hash in it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import unicodedata
from typing import TYPE_CHECKING

import argon2
import structlog
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

if TYPE_CHECKING:
    from gateway.config import PasswordConfig

log = structlog.get_logger("gateway.identity.passwords")

PLAIN_SCHEME = "argon2id"
# Legacy unsalted digests wrapped in argon2id: stored = argon2id(hexdigest(HASH(password))).
# Importing them needs no plaintext; the next successful login re-hashes to PLAIN_SCHEME.
LEGACY_DIGESTS = {"md5": hashlib.md5, "sha1": hashlib.sha1, "sha256": hashlib.sha256}
WRAPPED_SCHEMES = {f"{PLAIN_SCHEME}+{name}": name for name in LEGACY_DIGESTS}
# argon2 pre-hashes any length, but a megabyte password per login is still a cheap DoS lever.
MAX_PASSWORD_LENGTH = 1024

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_ROLE = re.compile(r"[a-z][a-z0-9_]{0,63}")


class Passwords:
    """argon2id hashing and checking with the configured parameters.

    The dummy hash for unknown accounts is made once, here, with the same parameters, so that
    verify_dummy costs what a real check costs (no username enumeration by timing).
    """

    def __init__(self, config: PasswordConfig) -> None:
        self.min_length = config.min_length
        self._hasher = argon2.PasswordHasher(
            time_cost=config.time_cost,
            memory_cost=config.memory_kib,
            parallelism=config.parallelism,
            type=argon2.Type.ID,
        )
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    def hash(self, password: str) -> str:
        """The argon2id hash of password (scheme "argon2id")."""
        return self._hasher.hash(password)

    def check(self, scheme: str, stored: str, password: str) -> tuple[bool, bool]:
        """(ok, needs_upgrade) for password against a stored hash; never raises on bad input.

        needs_upgrade: the caller should store hash(password) with scheme "argon2id", because
        the scheme is a wrapped legacy one or the argon2 parameters have changed.
        """
        legacy = WRAPPED_SCHEMES.get(scheme)
        if scheme != PLAIN_SCHEME and legacy is None:
            log.warning("identity.unknown_hash_scheme", scheme=scheme[:32])
            self.verify_dummy(password)
            return False, False
        if not stored.startswith("$argon2id$"):
            log.warning("identity.corrupt_password_hash", scheme=scheme)
            self.verify_dummy(password)
            return False, False
        candidate = password if legacy is None else legacy_digest(legacy, password)
        try:
            self._hasher.verify(stored, candidate)
        except VerifyMismatchError:
            return False, False
        except (VerificationError, InvalidHashError):
            log.warning("identity.corrupt_password_hash", scheme=scheme)
            return False, False
        return True, legacy is not None or self._hasher.check_needs_rehash(stored)

    def verify_dummy(self, password: str) -> None:
        """Spend one real verify on a fixed hash: an unknown account costs what a known one does."""
        try:
            self._hasher.verify(self._dummy_hash, password)
        except VerificationError:
            return

    def validate_new_password(self, username: str, password: str) -> None:
        """Refuse a new password that breaks the rules; the message never contains it."""
        if len(password) < self.min_length:
            raise ValueError(f"password: must be at least {self.min_length} characters")
        if len(password) > MAX_PASSWORD_LENGTH:
            raise ValueError(f"password: must be at most {MAX_PASSWORD_LENGTH} characters")
        if password.casefold() == username.casefold():
            raise ValueError("password: must not be the username")
        if any(unicodedata.category(char) == "Cc" for char in password):
            raise ValueError("password: must not contain control characters (NUL, newline, ...)")


def legacy_digest(algorithm: str, password: str) -> str:
    """The unsalted hex digest a legacy system stored (md5, sha1 or sha256 of UTF-8 bytes)."""
    digest = LEGACY_DIGESTS[algorithm](password.encode("utf-8"), usedforsecurity=False)
    return digest.hexdigest()


def validate_username(name: str) -> None:
    """Refuse a username outside 1-64 characters of [A-Za-z0-9._@-] starting alphanumeric."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            "username: use 1-64 characters of letters, digits and . _ @ -, "
            "starting with a letter or digit"
        )


def validate_client_id(client_id: str) -> None:
    """Refuse a client id outside the username rules (1-64 of [A-Za-z0-9._@-])."""
    if not _NAME.fullmatch(client_id):
        raise ValueError(
            "client_id: use 1-64 characters of letters, digits and . _ @ -, "
            "starting with a letter or digit"
        )


def validate_role(name: str) -> None:
    """Refuse a role name that is not [a-z][a-z0-9_]{0,63} (the policy's role vocabulary)."""
    if not _ROLE.fullmatch(name):
        raise ValueError(f"role {name[:70]!r}: use a lower-case letter, then up to 63 of a-z 0-9 _")

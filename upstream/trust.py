"""Loads the secret the gateway presents in ``X-Gateway-Secret`` (and a rotation's others).

It must never put the secret, or any part of it, into a message or log line.

A rotation (`gateway secrets rotate upstream_secret`) works with three files:

- ``upstream.secret``: the current secret, the one the gateway sends;
- ``upstream.secret.next``: a new secret being introduced, accepted before the gateway sends it;
- ``upstream.secret.previous``: JSON ``{"secret": ..., "accept_until": epoch seconds}``, the
  secret just replaced, accepted until then (gateways that have not switched yet, in-flight
  requests).

The set is re-read when any of the files changes, looked at once a second.
"""

import hmac
import json
import logging
import threading
import time
from pathlib import Path

from upstream.errors import SecretError

MIN_SECRET_LENGTH = 16


def read_secret(path: Path) -> bytes:
    """The stripped one-line secret, or SecretError saying how to create it."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise SecretError(
            f"secret file {path} does not exist; create it with `gateway keys init`"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise SecretError(f"secret file {path} cannot be read: {type(error).__name__}") from None
    if not text:
        raise SecretError(f"secret file {path} is empty; create it with `gateway keys init`")
    if len(text) < MIN_SECRET_LENGTH or not text.isascii():
        raise SecretError(
            f"secret file {path} must hold at least {MIN_SECRET_LENGTH} ASCII characters"
        )
    return text.encode("ascii")


logger = logging.getLogger(__name__)
NEXT_SUFFIX = ".next"
PREVIOUS_SUFFIX = ".previous"


class TrustedSecrets:
    """The secrets a caller may present: current, next, and previous until its deadline."""

    def __init__(self, path: Path, *, check_seconds: float = 1.0) -> None:
        self._path = path
        self._check = check_seconds
        self._lock = threading.Lock()
        self._identity = self._files_identity()
        self._secrets, self._previous_until = self._load()  # SecretError: refuse to start
        self._next_check = time.monotonic() + check_seconds

    def accepts(self, presented: bytes) -> bool:
        """Whether `presented` is a trusted secret, compared in constant time with each one."""
        self._maybe_reload()
        secrets, previous_until = self._secrets, self._previous_until
        if previous_until is not None and time.time() >= previous_until:
            secrets = secrets[:-1]  # the previous secret is always last
        matched = False
        for secret in secrets:  # no early exit: the time spent does not say which one matched
            matched |= hmac.compare_digest(presented, secret)
        return matched

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        with self._lock:
            self._next_check = now + self._check
            identity = self._files_identity()
            if identity == self._identity:
                return
            try:
                self._secrets, self._previous_until = self._load()
            except SecretError as error:
                # Keep the last good set: a botched edit must not lock the gateway out.
                logger.warning("trusted secrets not reloaded: %s", error)
                return
            self._identity = identity
            logger.info("trusted secrets reloaded (%d accepted)", len(self._secrets))

    def _files_identity(self) -> tuple[tuple[int, int, int] | None, ...]:
        return tuple(_identity(p) for p in self._paths())

    def _paths(self) -> tuple[Path, Path, Path]:
        base = str(self._path)
        return self._path, Path(base + NEXT_SUFFIX), Path(base + PREVIOUS_SUFFIX)

    def _load(self) -> tuple[tuple[bytes, ...], float | None]:
        current, next_path, previous_path = self._paths()
        secrets = [read_secret(current)]
        if next_path.exists():
            secrets.append(read_secret(next_path))
        previous_until = None
        if previous_path.exists():
            previous, previous_until = _read_previous(previous_path)
            secrets.append(previous)
        return tuple(secrets), previous_until


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _read_previous(path: Path) -> tuple[bytes, float]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        secret, until = document["secret"], document["accept_until"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SecretError(f"secret file {path} cannot be read: {type(error).__name__}") from None
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH or not secret.isascii():
        raise SecretError(f"secret file {path}: secret must be {MIN_SECRET_LENGTH}+ ASCII chars")
    if not isinstance(until, (int, float)) or isinstance(until, bool):
        raise SecretError(f"secret file {path}: accept_until must be epoch seconds")
    return secret.encode("ascii"), float(until)

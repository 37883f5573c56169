"""State every gateway worker must share (revoked token ids, refresh families, MFA replay guards).

One small interface, an in-memory store for one process and a Redis store for many. A backend
failure raises StateStoreError so that callers fail closed; no store ever evicts a live entry.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
from typing import Literal, Protocol

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

REDIS_SCHEMES = ("redis://", "rediss://")
MEMORY_URL = "memory://"
# A security check waits on Redis: a dead or black-holed server must turn into a refusal in about
# a second, not hang the request (redis-py's default is 10 retries with back-off).
REDIS_TIMEOUT_SECONDS = 1.0


class StateStoreError(RuntimeError):
    """The state backend failed; the caller must deny (fail closed)."""


class StateStore(Protocol):
    """String values under string keys, each with a time to live."""

    async def get(self, key: str) -> str | None:
        """The live value of key, or None."""

    async def set(self, key: str, value: str, ttl_seconds: float) -> None:
        """Store value under key for ttl_seconds, replacing any value."""

    async def set_if_absent(self, key: str, value: str, ttl_seconds: float) -> bool:
        """Atomically store value unless key holds a live value; True if it was stored."""

    async def delete(self, key: str) -> bool:
        """Remove key; True if it held a live value."""

    async def ping(self) -> bool:
        """Whether the backend answers (a readiness probe; never raises)."""

    async def close(self) -> None:
        """Release the backend's resources."""


def state_backend(url: str) -> Literal["memory", "redis"]:
    """Which backend a state URL names: "memory://" or "redis://..."/"rediss://..."."""
    if url == MEMORY_URL:
        return "memory"
    if url.startswith(REDIS_SCHEMES):
        return "redis"
    # Only the scheme is named: the URL may carry a Redis password.
    scheme = url.partition("://")[0] if "://" in url else "(none)"
    raise ValueError(
        f"identity.state_url: unsupported scheme {scheme!r}; "
        "use 'memory://' for one process or 'redis://host:port/db' ('rediss://' for TLS)"
    )


def open_redis_pool(url: str, *, decode_responses: bool) -> redis.asyncio.ConnectionPool:
    """A Redis connection pool with short timeouts and one immediate retry.

    The single retry reconnects a pooled connection that died with a Redis restart; more
    retries would only delay the refusal while Redis is down.
    """
    return redis.asyncio.ConnectionPool.from_url(
        url,
        decode_responses=decode_responses,
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 1),
    )


def account_key(account: str) -> str:
    """An account as it appears in shared-state keys: sha256 of the casefolded name, 32 hex chars.

    Keys stay bounded whatever the name's length, and Redis never holds a username.
    """
    return hashlib.sha256(account.casefold().encode("utf-8")).hexdigest()[:32]


def _check_ttl(ttl_seconds: float) -> None:
    if not ttl_seconds > 0:  # also refuses NaN
        raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds!r}")


class MemoryStateStore:
    """The state of one process, expiring by time.monotonic and bounded to max_keys.

    When full, expired keys are purged; if every key is still live the write is refused with
    StateStoreError, because evicting a revoked jti or a used refresh token would re-enable it.
    """

    def __init__(self, *, max_keys: int = 1_000_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self._entries: dict[str, tuple[str, float]] = {}
        # (deadline, key) for every write; stale rows (key rewritten or deleted) are skipped when
        # popped, so the purge costs O(log n) per expired key rather than a scan of the dict.
        self._deadlines: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> str | None:
        """The live value of key, or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, deadline = entry
        if deadline <= time.monotonic():
            del self._entries[key]
            return None
        return value

    async def set(self, key: str, value: str, ttl_seconds: float) -> None:
        """Store value under key for ttl_seconds, replacing any value."""
        _check_ttl(ttl_seconds)
        self._store(key, value, ttl_seconds)

    async def set_if_absent(self, key: str, value: str, ttl_seconds: float) -> bool:
        """Store value unless key holds a live value (atomic: no await between test and set)."""
        _check_ttl(ttl_seconds)
        if await self.get(key) is not None:
            return False
        self._store(key, value, ttl_seconds)
        return True

    async def delete(self, key: str) -> bool:
        """Remove key; True if it held a live value."""
        live = await self.get(key) is not None
        self._entries.pop(key, None)
        return live

    async def ping(self) -> bool:
        """Always ready: the store is this process's memory."""
        return True

    async def close(self) -> None:
        """Drop every entry."""
        self._entries.clear()
        self._deadlines.clear()

    def _store(self, key: str, value: str, ttl_seconds: float) -> None:
        now = time.monotonic()
        self._purge_expired(now)
        if key not in self._entries and len(self._entries) >= self.max_keys:
            raise StateStoreError(
                f"memory state store is full ({self.max_keys} live keys); "
                "raise the limit or use a Redis state_url"
            )
        deadline = now + ttl_seconds
        self._entries[key] = (value, deadline)
        heapq.heappush(self._deadlines, (deadline, key))
        if len(self._deadlines) > 2 * self.max_keys:
            self._compact()

    def _purge_expired(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, key = heapq.heappop(self._deadlines)
            entry = self._entries.get(key)
            if entry is not None and entry[1] == deadline:
                del self._entries[key]

    def _compact(self) -> None:
        # Rewrites of long-lived keys leave stale heap rows behind; rebuild from the live entries.
        self._deadlines = [(deadline, key) for key, (_, deadline) in self._entries.items()]
        heapq.heapify(self._deadlines)


class RedisStateStore:
    """State shared by every worker and host through Redis (SET with PX and NX).

    Keys carry key_prefix so the gateway's entries are easy to tell apart in a shared server.
    Every Redis or socket error becomes StateStoreError.
    """

    def __init__(self, url: str, *, key_prefix: str = "emp:") -> None:
        if state_backend(url) != "redis":
            raise ValueError("RedisStateStore needs a 'redis://' or 'rediss://' URL")
        self.key_prefix = key_prefix
        self._pool = open_redis_pool(url, decode_responses=True)
        self._client = redis.asyncio.Redis(connection_pool=self._pool)

    async def get(self, key: str) -> str | None:
        """The live value of key, or None."""
        try:
            value = await self._client.get(self.key_prefix + key)
        except (redis.RedisError, OSError) as exc:
            raise StateStoreError(f"redis GET failed: {type(exc).__name__}") from exc
        if isinstance(value, bytes):  # not with decode_responses=True; typed so by redis-py
            return value.decode("utf-8")
        return value

    async def set(self, key: str, value: str, ttl_seconds: float) -> None:
        """Store value under key for ttl_seconds, replacing any value."""
        _check_ttl(ttl_seconds)
        try:
            await self._client.set(self.key_prefix + key, value, px=_milliseconds(ttl_seconds))
        except (redis.RedisError, OSError) as exc:
            raise StateStoreError(f"redis SET failed: {type(exc).__name__}") from exc

    async def set_if_absent(self, key: str, value: str, ttl_seconds: float) -> bool:
        """SET NX PX: atomic on the server, so exactly one of many concurrent callers wins."""
        _check_ttl(ttl_seconds)
        try:
            stored = await self._client.set(
                self.key_prefix + key, value, px=_milliseconds(ttl_seconds), nx=True
            )
        except (redis.RedisError, OSError) as exc:
            raise StateStoreError(f"redis SET NX failed: {type(exc).__name__}") from exc
        return bool(stored)

    async def delete(self, key: str) -> bool:
        """Remove key; True if it held a live value."""
        try:
            removed: int = await self._client.delete(self.key_prefix + key)
        except (redis.RedisError, OSError) as exc:
            raise StateStoreError(f"redis DEL failed: {type(exc).__name__}") from exc
        return removed > 0

    async def ping(self) -> bool:
        """Whether Redis answers PING."""
        try:
            return bool(await self._client.ping())
        except (redis.RedisError, OSError):
            return False

    async def close(self) -> None:
        """Close the client and every pooled connection."""
        await self._client.aclose()
        await self._pool.aclose()


def _milliseconds(ttl_seconds: float) -> int:
    # Rounded up: a TTL must never shrink to 0 (Redis rejects PX 0) or expire early.
    return max(1, math.ceil(ttl_seconds * 1000))


def open_state_store(url: str) -> StateStore:
    """The state store a state URL names ("memory://", "redis://...", "rediss://...")."""
    if state_backend(url) == "memory":
        return MemoryStateStore()
    return RedisStateStore(url)

"""Brute-force protection for the login and token endpoints, checked before any password.

Three kinds of moving-window limits (the `limits` library, in memory or in Redis):

- per IP, on every attempt: one address flooding many usernames is refused (auth.rate_limited);
- per (account, IP), on failures: a brute force from one IP exhausts this pair long before the
  account-wide limit, so the real user logging in from another IP still can (auth.locked_out);
- per account, on failures, set high (e.g. 100/hour): it stops a distributed attack that spreads
  guesses over many IPs, at the price of locking the account for everyone meanwhile.

Each list of limits is a progressive back-off ("5/minute", "20/hour", "100/day"): every exhausted
tier means a longer wait, and Throttled.retry_after says how long. Account names enter storage keys
only as a truncated sha256 of their casefolded form, so keys stay bounded and Redis never holds a
username. A storage failure raises GuardUnavailable: the caller refuses (503), never lets a login
through unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import TYPE_CHECKING, Any

import limits
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from gateway.identity.state import account_key, open_redis_pool, state_backend

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import redis.asyncio

# Namespaces of the three kinds of counters inside the limiter's keys.
_IP = "login-ip"
_PAIR = "login-pair"
_ACCOUNT = "login-account"


class Throttled(Exception):  # noqa: N818 - the word callers and the reason ids use
    """The attempt is refused before any password check; retry after retry_after seconds."""

    def __init__(self, reason_id: str, retry_after: int) -> None:
        super().__init__(f"{reason_id}: retry after {retry_after}s")
        self.reason_id = reason_id
        self.retry_after = retry_after


class GuardUnavailable(Exception):  # noqa: N818 - names the state, like Throttled
    """The limit storage failed; the caller must refuse the attempt (503, fail closed)."""


def _parse_tiers(setting: str, tiers: Sequence[str]) -> tuple[limits.RateLimitItem, ...]:
    if isinstance(tiers, str) or not tiers:
        raise ValueError(f"identity.login_limits.{setting}: give a list such as ['5/minute']")
    items = []
    for tier in tiers:
        try:
            items.append(limits.parse(tier))
        except ValueError as exc:
            raise ValueError(
                f"identity.login_limits.{setting}: {tier!r} is not a limit like '5/minute'"
            ) from exc
    return tuple(items)


@contextlib.contextmanager
def _fail_closed() -> Iterator[None]:
    try:
        yield
    except (StorageError, OSError) as exc:
        # The limiter wraps Redis errors in StorageError; the cause names the failure.
        raise GuardUnavailable(f"login limit storage failed: {exc}") from exc


class LoginGuard:
    """Per-IP, per-(account, IP) and per-account login limits with progressive back-off."""

    def __init__(
        self,
        *,
        storage_url: str,
        per_ip: Sequence[str],
        per_user_ip_failures: Sequence[str],
        per_user_failures: Sequence[str],
    ) -> None:
        self._per_ip = _parse_tiers("per_ip", per_ip)
        self._per_pair = _parse_tiers("per_user_ip_failures", per_user_ip_failures)
        self._per_account = _parse_tiers("per_user_failures", per_user_failures)
        self._pool: redis.asyncio.ConnectionPool | None = None
        self._storage: MemoryStorage | RedisStorage
        if state_backend(storage_url) == "memory":
            self._storage = MemoryStorage()
        else:
            self._pool = open_redis_pool(storage_url, decode_responses=False)
            # Our own pool: short timeouts and one retry, closed by close().
            options: dict[str, Any] = {"connection_pool": self._pool}
            self._storage = RedisStorage(
                "async+" + storage_url,
                wrap_exceptions=True,
                implementation="redispy",
                key_prefix="emp:limits",
                **options,
            )
        self._limiter = MovingWindowRateLimiter(self._storage)

    async def check(self, account: str, ip: str) -> None:
        """Count the attempt against the IP, then refuse it if any limit is exhausted.

        Raises Throttled (auth.rate_limited for the IP, auth.locked_out for the account) or
        GuardUnavailable. Failure limits are only tested here; failed() counts them.
        """
        with _fail_closed():
            await self._check(account_key(account), ip)

    async def failed(self, account: str, ip: str) -> bool:
        """Count a wrong password, secret or code; True if this failure began a lockout."""
        key = account_key(account)
        counts: list[tuple[limits.RateLimitItem, tuple[str, ...]]]
        counts = [(item, (_PAIR, key, ip)) for item in self._per_pair]
        counts += [(item, (_ACCOUNT, key)) for item in self._per_account]
        with _fail_closed():
            began = await asyncio.gather(*(self._count_failure(*count) for count in counts))
        return any(began)

    async def succeeded(self, account: str, ip: str) -> None:
        """Forget the (account, IP) failures; the per-IP and per-account counts stay."""
        key = account_key(account)
        with _fail_closed():
            for item in self._per_pair:
                await self._limiter.clear(item, _PAIR, key, ip)

    async def close(self) -> None:
        """Release the storage: the Redis pool, or the memory storage's expiry task."""
        if self._pool is not None:
            await self._pool.aclose()
        elif isinstance(self._storage, MemoryStorage) and self._storage.timer is not None:
            self._storage.timer.cancel()

    async def _check(self, key: str, ip: str) -> None:
        # Every tier counts every attempt, refused or not: an address that keeps hammering while
        # refused fills the longer tiers and so earns the longer wait.
        hits = await asyncio.gather(*(self._limiter.hit(item, _IP, ip) for item in self._per_ip))
        if not all(hits):
            # At least 1 s even if a slot freed between the hit and the read of the windows.
            wait = await self._wait(self._per_ip, (_IP, ip))
            raise Throttled("auth.rate_limited", max(wait, 1))
        waits = await asyncio.gather(
            self._wait(self._per_pair, (_PAIR, key, ip)),
            self._wait(self._per_account, (_ACCOUNT, key)),
        )
        if max(waits):
            raise Throttled("auth.locked_out", max(waits))

    async def _count_failure(self, item: limits.RateLimitItem, identifiers: Sequence[str]) -> bool:
        # Every tier counts every failure: the long tiers are what makes the back-off grow.
        # A failure refused by a full tier did not begin that tier's lockout.
        if not await self._limiter.hit(item, *identifiers):
            return False
        window = await self._limiter.get_window_stats(item, *identifiers)
        return window.remaining <= 0

    async def _wait(self, tiers: Sequence[limits.RateLimitItem], identifiers: Sequence[str]) -> int:
        """Whole seconds until every exhausted tier has room again; 0 if none is exhausted."""
        windows = await asyncio.gather(
            *(self._limiter.get_window_stats(item, *identifiers) for item in tiers)
        )
        now = time.time()
        wait = 0
        for window in windows:
            # The moving window frees a slot when its oldest entry ages out, at reset_time.
            if window.remaining <= 0:
                wait = max(wait, math.ceil(window.reset_time - now), 1)
        return wait

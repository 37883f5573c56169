"""The shared state store: one behaviour table run against memory and a real redis-server."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio
from support.redis_server import RedisServer, redis_server, redis_server_process

from gateway.identity.state import (
    MemoryStateStore,
    RedisStateStore,
    StateStore,
    StateStoreError,
    open_state_store,
)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real redis-server for the module's table tests."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client on the shared server, to look at what the store wrote."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """Each backend in turn, empty at the start of the test."""
    if request.param == "memory":
        backend: StateStore = MemoryStateStore()
    else:
        url = request.getfixturevalue("redis_url")
        cleaner = redis.asyncio.Redis.from_url(url)
        await cleaner.flushdb()
        await cleaner.aclose()
        backend = RedisStateStore(url)
    yield backend
    await backend.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, which the test may stop, pause or restart."""
    with redis_server_process(tmp_path / "redis") as server:
        yield server


async def test_get_returns_what_set_stored(store: StateStore) -> None:
    """A value set under a key is read back unchanged; an unknown key reads None."""
    await store.set("revoked-jti:abc", "1", 60)
    assert await store.get("revoked-jti:abc") == "1"
    assert await store.get("revoked-jti:unknown") is None


async def test_set_replaces_the_value(store: StateStore) -> None:
    """A second set under the same key replaces the first value."""
    await store.set("session:s1", '{"v": 1}', 60)
    await store.set("session:s1", '{"v": 2}', 60)
    assert await store.get("session:s1") == '{"v": 2}'


async def test_entry_expires_after_its_ttl(store: StateStore) -> None:
    """An entry with a 0.2 s TTL is there at once and gone after 0.35 s."""
    await store.set("short", "x", 0.2)
    assert await store.get("short") == "x"
    await asyncio.sleep(0.35)
    assert await store.get("short") is None


async def test_set_if_absent_stores_only_the_first_value(store: StateStore) -> None:
    """set_if_absent is True for a new key, False for a live one, and keeps the first value."""
    assert await store.set_if_absent("mfa-guard:alice:42", "first", 60) is True
    assert await store.set_if_absent("mfa-guard:alice:42", "second", 60) is False
    assert await store.get("mfa-guard:alice:42") == "first"


async def test_set_if_absent_succeeds_again_once_the_key_expired(store: StateStore) -> None:
    """An expired key counts as absent: set_if_absent stores the new value."""
    assert await store.set_if_absent("guard", "old", 0.2) is True
    await asyncio.sleep(0.35)
    assert await store.set_if_absent("guard", "new", 60) is True
    assert await store.get("guard") == "new"


async def test_set_if_absent_has_exactly_one_winner_among_50_concurrent_callers(
    store: StateStore,
) -> None:
    """50 concurrent set_if_absent calls on one key: exactly one is True, and its value stays."""
    results = await asyncio.gather(
        *(store.set_if_absent("refresh-used:d1", f"caller-{n}", 60) for n in range(50))
    )
    winners = [n for n, won in enumerate(results) if won]
    assert len(winners) == 1
    assert await store.get("refresh-used:d1") == f"caller-{winners[0]}"


async def test_delete_removes_a_live_key_and_reports_it(store: StateStore) -> None:
    """delete is True for a live key (which is then gone) and False for an unknown one."""
    await store.set("session:s2", "v", 60)
    assert await store.delete("session:s2") is True
    assert await store.get("session:s2") is None
    assert await store.delete("session:s2") is False


async def test_ping_answers_true_while_the_backend_runs(store: StateStore) -> None:
    """ping is True for a working backend."""
    assert await store.ping() is True


@pytest.mark.parametrize("ttl", [0, -1, math.nan], ids=["zero", "negative", "nan"])
async def test_ttl_must_be_positive(store: StateStore, ttl: float) -> None:
    """A TTL that is not > 0 is a ValueError for set and set_if_absent, and nothing is stored."""
    with pytest.raises(ValueError, match="ttl_seconds must be > 0"):
        await store.set("k", "v", ttl)
    with pytest.raises(ValueError, match="ttl_seconds must be > 0"):
        await store.set_if_absent("k", "v", ttl)
    assert await store.get("k") is None


async def test_memory_store_refuses_a_new_key_when_full_of_live_keys() -> None:
    """A full memory store raises StateStoreError rather than evict a live security entry."""
    store = MemoryStateStore(max_keys=3)
    for n in range(3):
        await store.set(f"revoked-jti:{n}", "1", 60)
    with pytest.raises(StateStoreError, match="full"):
        await store.set("revoked-jti:3", "1", 60)
    with pytest.raises(StateStoreError, match="full"):
        await store.set_if_absent("revoked-jti:3", "1", 60)
    for n in range(3):
        assert await store.get(f"revoked-jti:{n}") == "1"


async def test_memory_store_still_rewrites_an_existing_key_when_full() -> None:
    """A full memory store still accepts a new value for a key it already holds."""
    store = MemoryStateStore(max_keys=2)
    await store.set("a", "1", 60)
    await store.set("b", "1", 60)
    await store.set("a", "2", 60)
    assert await store.get("a") == "2"


async def test_memory_store_purges_expired_keys_to_make_room() -> None:
    """When full, expired keys are purged first, so a new key fits once old ones expired."""
    store = MemoryStateStore(max_keys=3)
    await store.set("live", "1", 60)
    await store.set("old-1", "1", 0.05)
    await store.set("old-2", "1", 0.05)
    await asyncio.sleep(0.1)
    await store.set("new-1", "1", 60)
    await store.set("new-2", "1", 60)
    assert len(store) == 3
    assert await store.get("live") == "1"
    assert await store.get("new-2") == "1"


async def test_memory_store_heap_stays_bounded_under_rewrites() -> None:
    """Rewriting one long-lived key many times does not grow the expiry index without bound."""
    store = MemoryStateStore(max_keys=10)
    for n in range(1000):
        await store.set("session:s", str(n), 3600)
    assert len(store) == 1
    assert len(store._deadlines) <= 2 * store.max_keys
    assert await store.get("session:s") == "999"


async def test_redis_store_prefixes_keys_and_sets_a_millisecond_ttl(
    redis_url: str, raw_redis: redis.asyncio.Redis
) -> None:
    """The Redis store writes under "emp:" with a PX expiry no longer than asked."""
    store = RedisStateStore(redis_url)
    try:
        await store.set("revoked-jti:xyz", "1", 5.5)
        assert await raw_redis.get("emp:revoked-jti:xyz") == "1"
        assert await raw_redis.get("revoked-jti:xyz") is None
        assert 0 < await raw_redis.pttl("emp:revoked-jti:xyz") <= 5500
    finally:
        await store.close()


async def test_redis_down_raises_state_store_error(own_redis: RedisServer) -> None:
    """With Redis stopped every call raises StateStoreError (ping says False); a restart heals."""
    store = RedisStateStore(own_redis.url)
    try:
        await store.set("k", "v", 60)
        own_redis.stop()
        with pytest.raises(StateStoreError):
            await store.get("k")
        with pytest.raises(StateStoreError):
            await store.set("k", "v", 60)
        with pytest.raises(StateStoreError):
            await store.set_if_absent("k2", "v", 60)
        with pytest.raises(StateStoreError):
            await store.delete("k")
        assert await store.ping() is False
        own_redis.start()
        assert await store.ping() is True
        assert await store.set_if_absent("k", "after-restart", 60) is True
    finally:
        await store.close()


async def test_hung_redis_fails_within_the_socket_timeout(own_redis: RedisServer) -> None:
    """A Redis that accepts but never answers turns into StateStoreError in seconds, not a hang."""
    store = RedisStateStore(own_redis.url)
    try:
        await store.set("k", "v", 60)
        own_redis.pause()
        started = time.monotonic()
        with pytest.raises(StateStoreError):
            await store.get("k")
        assert time.monotonic() - started < 4.0  # 1 s socket timeout, one retry
    finally:
        own_redis.resume()
        await store.close()


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://", MemoryStateStore),
        ("redis://127.0.0.1:6379/0", RedisStateStore),
        ("rediss://cache.internal:6380/1", RedisStateStore),
    ],
    ids=["memory", "redis", "rediss"],
)
async def test_open_state_store_picks_the_backend_by_scheme(url: str, kind: type) -> None:
    """open_state_store returns the backend the URL's scheme names (without connecting)."""
    store = open_state_store(url)
    assert isinstance(store, kind)
    await store.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://user:hunter2@cache:6379/0",
        "memcached://hunter2@cache",
        "hunter2",
        "memory:",
        "",
    ],
    ids=["http", "memcached", "no-scheme", "memory-typo", "empty"],
)
def test_open_state_store_rejects_other_urls_without_echoing_them(url: str) -> None:
    """Any other URL is a ValueError naming identity.state_url, never echoing a password."""
    with pytest.raises(ValueError, match=r"identity\.state_url") as caught:
        open_state_store(url)
    assert "hunter2" not in str(caught.value)

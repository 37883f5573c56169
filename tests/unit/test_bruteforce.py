"""Login brute-force limits: per IP, per (account, IP), per account, in memory and on real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis.asyncio
from support.redis_server import RedisServer, redis_server, redis_server_process

from gateway.config import LoginLimitConfig
from gateway.identity.bruteforce import GuardUnavailable, LoginGuard, Throttled
from gateway.identity.state import account_key

ATTACKER_IP = "203.0.113.66"
USER_IP = "198.51.100.7"

MakeGuard = Callable[..., LoginGuard]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real redis-server for the module."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
async def storage_url(request: pytest.FixtureRequest) -> str:
    """Each storage in turn; the Redis database is emptied first."""
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url")
    client = redis.asyncio.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
    return url


@pytest.fixture
async def make_guard(storage_url: str) -> AsyncIterator[MakeGuard]:
    """Build LoginGuards on the test's storage (defaults: the shipped limits); close them all."""
    guards: list[LoginGuard] = []
    defaults = LoginLimitConfig()

    def make(
        per_ip: Sequence[str] = defaults.per_ip,
        per_user_ip_failures: Sequence[str] = defaults.per_user_ip_failures,
        per_user_failures: Sequence[str] = defaults.per_user_failures,
    ) -> LoginGuard:
        guard = LoginGuard(
            storage_url=storage_url,
            per_ip=per_ip,
            per_user_ip_failures=per_user_ip_failures,
            per_user_failures=per_user_failures,
        )
        guards.append(guard)
        return guard

    yield make
    for guard in guards:
        await guard.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, which the test stops."""
    with redis_server_process(tmp_path / "redis") as server:
        yield server


async def attempt(guard: LoginGuard, account: str, ip: str) -> Throttled | None:
    """One login with a wrong password: the refusal, or None if it reached the password check."""
    try:
        await guard.check(account, ip)
    except Throttled as refusal:
        return refusal
    await guard.failed(account, ip)
    return None


async def test_brute_force_from_one_ip_is_stopped_but_the_user_elsewhere_gets_in(
    make_guard: MakeGuard,
) -> None:
    """2,000 guesses from one IP: at most 5 reach the password; the user's own IP still passes."""
    guard = make_guard()
    first_tier = int(LoginLimitConfig().per_user_ip_failures[0].split("/")[0])
    reached = 0
    refusals: list[Throttled] = []
    for _ in range(2000):
        refusal = await attempt(guard, "alice", ATTACKER_IP)
        if refusal is None:
            reached += 1
        else:
            refusals.append(refusal)
    assert reached <= first_tier
    assert len(refusals) == 2000 - reached
    assert refusals[0].reason_id == "auth.locked_out"
    assert {r.reason_id for r in refusals} <= {"auth.locked_out", "auth.rate_limited"}
    assert min(r.retry_after for r in refusals) >= 1
    await guard.check("alice", USER_IP)  # the real user, from home: not refused


async def test_flood_across_usernames_from_one_ip_is_rate_limited(make_guard: MakeGuard) -> None:
    """One IP trying 50 usernames is refused with auth.rate_limited after its 10 attempts."""
    guard = make_guard(per_ip=["10/minute"])
    refusals = [await attempt(guard, f"user{n}", ATTACKER_IP) for n in range(50)]
    assert refusals[:10] == [None] * 10
    assert all(r is not None and r.reason_id == "auth.rate_limited" for r in refusals[10:])
    last = refusals[-1]
    assert last is not None
    assert 1 <= last.retry_after <= 60
    await guard.check("user0", USER_IP)  # another address is not affected


async def test_distributed_attack_hits_the_account_wide_limit(make_guard: MakeGuard) -> None:
    """Guesses spread over many IPs lock the account after 20 failures, from every IP."""
    guard = make_guard(per_user_ip_failures=["5/minute"], per_user_failures=["20/hour"])
    reached = 0
    lockouts_begun = 0
    reasons: set[str] = set()
    for n in range(100):
        ip = f"10.0.{n // 250}.{n % 250}"
        for _ in range(3):  # below the per-(account, IP) limit on purpose
            try:
                await guard.check("alice", ip)
            except Throttled as refusal:
                reasons.add(refusal.reason_id)
                continue
            reached += 1
            lockouts_begun += await guard.failed("alice", ip)
    assert reached == 20
    assert lockouts_begun == 1
    assert reasons == {"auth.locked_out"}
    with pytest.raises(Throttled) as caught:
        await guard.check("alice", USER_IP)
    assert caught.value.reason_id == "auth.locked_out"
    assert 60 < caught.value.retry_after <= 3600
    await guard.check("bob", USER_IP)  # other accounts are not affected


async def test_succeeded_clears_the_account_ip_failures(make_guard: MakeGuard) -> None:
    """After a success, the pair's earlier failures no longer count toward its limit."""
    guard = make_guard(per_user_ip_failures=["3/minute"])
    for _ in range(2):
        await guard.failed("alice", USER_IP)
    await guard.succeeded("alice", USER_IP)
    for _ in range(2):
        await guard.failed("alice", USER_IP)
    await guard.check("alice", USER_IP)  # 2 failures since the success: under 3
    await guard.failed("alice", USER_IP)
    with pytest.raises(Throttled, match=r"auth\.locked_out"):
        await guard.check("alice", USER_IP)


async def test_succeeded_keeps_the_account_and_ip_counts(make_guard: MakeGuard) -> None:
    """A success does not reset the account-wide failures nor the per-IP attempts."""
    guard = make_guard(
        per_ip=["5/minute"], per_user_ip_failures=["3/minute"], per_user_failures=["4/hour"]
    )
    for _ in range(2):
        await attempt(guard, "alice", USER_IP)
    await guard.succeeded("alice", USER_IP)
    for _ in range(2):
        await attempt(guard, "alice", USER_IP)
    with pytest.raises(Throttled) as locked:
        await guard.check("alice", USER_IP)
    assert locked.value.reason_id == "auth.locked_out"  # 4 account failures, success or not
    with pytest.raises(Throttled) as limited:
        await guard.check("bob", USER_IP)
    assert limited.value.reason_id == "auth.rate_limited"  # the 6th attempt of this IP


async def test_back_off_grows_with_each_exhausted_tier(make_guard: MakeGuard) -> None:
    """After "3/minute" the wait is at most 60 s; once "6/hour" is full too it is longer."""
    guard = make_guard(per_user_ip_failures=["3/minute", "6/hour"])
    began = [await guard.failed("alice", ATTACKER_IP) for _ in range(3)]
    assert began == [False, False, True]
    with pytest.raises(Throttled) as minute:
        await guard.check("alice", ATTACKER_IP)
    assert 1 <= minute.value.retry_after <= 60
    # Three more failures, as from concurrent requests that all passed check() before any failed.
    began = [await guard.failed("alice", ATTACKER_IP) for _ in range(3)]
    assert began == [False, False, True]
    with pytest.raises(Throttled) as hour:
        await guard.check("alice", ATTACKER_IP)
    assert 60 < hour.value.retry_after <= 3600
    assert hour.value.retry_after > minute.value.retry_after


async def test_per_ip_back_off_grows_when_the_address_keeps_hammering(
    make_guard: MakeGuard,
) -> None:
    """Attempts refused by the minute tier still count in the hour tier, so the wait grows."""
    guard = make_guard(per_ip=["3/minute", "10/hour"])
    refusals = [await attempt(guard, f"user{n}", ATTACKER_IP) for n in range(12)]
    first, last = refusals[3], refusals[-1]
    assert refusals[:3] == [None] * 3
    assert first is not None
    assert 1 <= first.retry_after <= 60
    assert last is not None
    assert last.retry_after > 60


async def test_account_names_are_casefolded(make_guard: MakeGuard) -> None:
    """ "Alice" and "ALICE" share alice's failure counters."""
    guard = make_guard(per_user_ip_failures=["3/minute"])
    for name in ("Alice", "ALICE", "alice"):
        await guard.failed(name, ATTACKER_IP)
    with pytest.raises(Throttled, match=r"auth\.locked_out"):
        await guard.check("aLiCe", ATTACKER_IP)


async def test_redis_stopped_mid_way_raises_guard_unavailable(
    own_redis: RedisServer,
) -> None:
    """With Redis stopped, check, failed and succeeded raise GuardUnavailable: fail closed."""
    guard = LoginGuard(
        storage_url=own_redis.url,
        per_ip=["30/minute"],
        per_user_ip_failures=["5/minute"],
        per_user_failures=["100/hour"],
    )
    try:
        await guard.check("alice", USER_IP)
        await guard.failed("alice", USER_IP)
        own_redis.stop()
        with pytest.raises(GuardUnavailable):
            await guard.check("alice", USER_IP)
        with pytest.raises(GuardUnavailable):
            await guard.failed("alice", USER_IP)
        with pytest.raises(GuardUnavailable):
            await guard.succeeded("alice", USER_IP)
        own_redis.start()
        await guard.check("alice", USER_IP)  # back once Redis is
    finally:
        await guard.close()


async def test_usernames_never_appear_in_redis_keys(redis_url: str) -> None:
    """Every key is under emp:limits and holds the account only as its 32-hex-char hash."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    guard = LoginGuard(
        storage_url=redis_url,
        per_ip=["30/minute"],
        per_user_ip_failures=["5/minute", "20/hour"],
        per_user_failures=["100/hour"],
    )
    names = ["alice", "Bob.Secret-Name", "carol@example.org"]
    try:
        for name in names:
            await attempt(guard, name, ATTACKER_IP)
        keys = [key async for key in client.scan_iter(match="*")]
    finally:
        await guard.close()
        await client.aclose()
    assert keys
    assert all(key.startswith("emp:limits") for key in keys)
    for name in names:
        assert not [key for key in keys if name.casefold() in key.casefold()]
        assert [key for key in keys if account_key(name) in key]
    assert len(account_key("x" * 10_000)) == 32


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"per_ip": ["5 a minute"]}, "per_ip"),
        ({"per_user_ip_failures": []}, "per_user_ip_failures"),
        ({"per_user_failures": "100/hour"}, "per_user_failures"),
    ],
    ids=["unparseable", "empty", "bare-string"],
)
def test_bad_limits_are_refused_naming_the_setting(settings: dict[str, object], named: str) -> None:
    """A limit that does not parse, an empty list or a bare string is a ValueError naming it."""
    limits: dict[str, object] = {
        "per_ip": ["30/minute"],
        "per_user_ip_failures": ["5/minute"],
        "per_user_failures": ["100/hour"],
        **settings,
    }
    with pytest.raises(ValueError, match=rf"identity\.login_limits\.{named}"):
        LoginGuard(storage_url="memory://", **limits)  # type: ignore[arg-type]


def test_unknown_storage_url_is_refused_without_echoing_it() -> None:
    """A storage URL of another scheme is a ValueError that does not repeat the password."""
    with pytest.raises(ValueError, match="unsupported scheme") as caught:
        LoginGuard(
            storage_url="memcached://user:hunter2@cache",
            per_ip=["30/minute"],
            per_user_ip_failures=["5/minute"],
            per_user_failures=["100/hour"],
        )
    assert "hunter2" not in str(caught.value)

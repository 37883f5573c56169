"""The built-in identity provider's figures, against a running gateway over verifying TLS.

- password-grant logins (real argon2id, the default t=2, 19 MiB, p=1): one after another, then
  at fixed rates (open loop). Target P95 <= 150 ms (the seed's: P95 < 300 ms);
- bearer-token authentication at 50 req/s with a token from the password grant (built-in
  issuer, so the revocation check runs on every request): the same token every time (warm
  verified-token cache, the design's P95 <= 5 ms), then a distinct token per request ("cold
  verify": a signature check on each);
- the refresh_token grant (no argon2: a state lookup and one account read); its access tokens
  are the cold-verify pool.

Latency is the client's: from handing the request to aiohttp to the last body byte. The client
runs in this process on the same 2 cores as the gateway and the upstream.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from loadgen import fire_on_schedule, percentile

from gateway.config import PasswordConfig
from gateway.identity.accounts import SharedAccounts
from gateway.identity.passwords import Passwords

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable

    from stack import Stack

USER = "bench-reader"
PASSWORD = "a bench password, long enough"  # noqa: S105 - a throwaway account in a temp dir
ROLES = ["reader"]

LOGIN_P95_TARGET_MS = 150.0
LOGIN_SEED_P95_TARGET_MS = 300.0
BEARER_P95_TARGET_MS = 5.0
ERROR_RATE_TARGET = 0.02

# A login queued behind argon2 hashes can take a while; an answer later than this is an error.
_LOGIN_TIMEOUT = aiohttp.ClientTimeout(total=10.0)
_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5.0)


@dataclass(frozen=True)
class IdentitySettings:
    """How many of each: the defaults keep the phase under ~2.5 minutes."""

    logins: int = 200
    login_rates: tuple[float, ...] = (10.0, 20.0)
    bearer_rate: float = 50.0
    bearer_seconds: float = 30.0
    # Each cold request spends one token, so this many refresh grants fill the pool (the
    # verified-token cache holds 10,000 for 60 s: a token used twice would be a hit).
    cold_seconds: float = 10.0
    argon2_calls: int = 20

    @classmethod
    def quick(cls) -> IdentitySettings:
        return cls(logins=40, bearer_seconds=5.0, cold_seconds=5.0, argon2_calls=5)

    @property
    def cold_tokens(self) -> int:
        return round(self.bearer_rate * self.cold_seconds)


@dataclass(frozen=True)
class Figures:
    """Latencies and outcomes of one measured series."""

    request: str
    mode: str
    requests: int
    statuses: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    lag_p99_ms: float | None = None  # open loop only: the client's lag behind its schedule
    target_ms: float | None = None

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if not status.startswith("2"))

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan

    def verdict(self) -> str:
        if self.target_ms is None:
            return ""
        met = self.p95_ms <= self.target_ms and self.error_rate < ERROR_RATE_TARGET
        return f"P95 <= {self.target_ms:g} ms: {'met' if met else 'MISSED'}"

    def line(self) -> str:
        """One summary line."""
        return (
            f"{self.request} {self.mode}: {self.requests} requests, errors {self.error_rate:.2%}, "
            f"P50/P95/P99 {self.p50_ms:.1f}/{self.p95_ms:.1f}/{self.p99_ms:.1f} ms"
            + (f" ({self.verdict()})" if self.target_ms is not None else "")
        )


@dataclass
class _Series:
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    async def one(self, call: Callable[[int], Awaitable[str]], i: int) -> None:
        started = time.perf_counter()
        try:
            outcome = await call(i)
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
            outcome = type(exc).__name__
        self.latencies.append((time.perf_counter() - started) * 1000.0)
        self.statuses[outcome] = self.statuses.get(outcome, 0) + 1

    def figures(self, request: str, mode: str, target_ms: float | None) -> Figures:
        ordered = sorted(self.latencies)
        lags = sorted(self.lags)
        return Figures(
            request=request,
            mode=mode,
            requests=len(ordered),
            statuses=dict(self.statuses),
            p50_ms=percentile(ordered, 50),
            p95_ms=percentile(ordered, 95),
            p99_ms=percentile(ordered, 99),
            max_ms=ordered[-1] if ordered else math.nan,
            lag_p99_ms=percentile(lags, 99) if lags else None,
            target_ms=target_ms,
        )


async def sequential(
    call: Callable[[int], Awaitable[str]], n: int, request: str, target_ms: float | None = None
) -> Figures:
    """n calls, each after the previous one's answer."""
    series = _Series()
    for i in range(n):
        await series.one(call, i)
    return series.figures(request, "sequential", target_ms)


async def fixed_rate(
    call: Callable[[int], Awaitable[str]],
    n: int,
    rate: float,
    request: str,
    *,
    target_ms: float | None = None,
    mode: str | None = None,
) -> Figures:
    """n calls started 1/rate s apart, never waiting for answers (open loop)."""
    series = _Series()
    series.lags.extend(await fire_on_schedule(n, rate, lambda i: series.one(call, i)))
    return series.figures(request, mode or f"{rate:g}/s open loop", target_ms)


def argon2_in_process(calls: int) -> Figures:
    """argon2id verify alone, with the default parameters, in this process: login's floor."""
    passwords = Passwords(PasswordConfig())
    stored = passwords.hash(PASSWORD)
    series = _Series()
    for _ in range(calls):
        started = time.perf_counter()
        ok, _ = passwords.check("argon2id", stored, PASSWORD)
        series.latencies.append((time.perf_counter() - started) * 1000.0)
        key = "200" if ok else "mismatch"
        series.statuses[key] = series.statuses.get(key, 0) + 1
    return series.figures("argon2id verify (in process)", "sequential", None)


async def _outcome(response: aiohttp.ClientResponse) -> str:
    """ "200", or the status and the gateway's reason id ("500 internal.error") for a refusal."""
    body = await response.read()
    if 200 <= response.status < 300:
        return str(response.status)
    try:
        reason = json.loads(body).get("reason_id", "?")
    except (ValueError, AttributeError):
        reason = "?"
    return f"{response.status} {reason}"


def account_read_in_process(db_path: Path, calls: int) -> Figures:
    """One user read as the gateway does it: the store opened per operation.

    On a copy of the bench's store, so the running gateway is never locked out. Login and the
    refresh grant each pay this once, next to (login) one argon2 check.
    """
    copy = db_path.with_name("identity-copy.duckdb")
    for suffix in ("", ".wal"):
        source = Path(f"{db_path}{suffix}")
        if source.exists():
            shutil.copyfile(source, f"{copy}{suffix}")
    accounts = SharedAccounts(copy)
    series = _Series()
    for _ in range(calls):
        started = time.perf_counter()
        user = accounts.run(lambda store: store.get_user(USER))
        series.latencies.append((time.perf_counter() - started) * 1000.0)
        key = "200" if user is not None else "missing"
        series.statuses[key] = series.statuses.get(key, 0) + 1
    return series.figures("account read (in process)", "open per operation", None)


class _Client:
    """The calls the figures time, on one aiohttp session that verifies the bench CA."""

    def __init__(self, session: aiohttp.ClientSession, stack: Stack, api_path: str) -> None:
        self.session = session
        self.token_url = stack.gateway_url("/oauth/token")
        self.api_url = stack.gateway_url(api_path)

    async def login(self, _i: int = 0) -> str:
        form = {"grant_type": "password", "username": USER, "password": PASSWORD}
        async with self.session.post(self.token_url, data=form, timeout=_LOGIN_TIMEOUT) as r:
            return await _outcome(r)

    async def login_tokens(self) -> dict[str, str]:
        """One password grant's tokens (raises unless 200: no figure means anything then)."""
        form = {"grant_type": "password", "username": USER, "password": PASSWORD}
        async with self.session.post(self.token_url, data=form, timeout=_LOGIN_TIMEOUT) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(
                    f"POST /oauth/token (password grant) answered {r.status}: {body}"
                )
            return {"access_token": body["access_token"], "refresh_token": body["refresh_token"]}

    def refresh_chain(self, refresh_token: str, pool: list[str]) -> Callable[[int], Awaitable[str]]:
        """Each call spends the current refresh token, keeps the next and the access token."""
        current = [refresh_token]

        async def call(_i: int) -> str:
            form = {"grant_type": "refresh_token", "refresh_token": current[0]}
            async with self.session.post(self.token_url, data=form, timeout=_REQUEST_TIMEOUT) as r:
                if r.status != 200:
                    return await _outcome(r)
                body = await r.json()
                current[0] = body["refresh_token"]
                pool.append(body["access_token"])
                return "200"

        return call

    def get_with(self, tokens: list[str]) -> Callable[[int], Awaitable[str]]:
        """GET api_path with tokens[i % len(tokens)]."""

        async def call(i: int) -> str:
            headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
            async with self.session.get(
                self.api_url, headers=headers, timeout=_REQUEST_TIMEOUT
            ) as r:
                return await _outcome(r)

        return call


async def _measure(
    stack: Stack, api_path: str, settings: IdentitySettings, ssl_context: ssl.SSLContext
) -> list[Figures]:
    connector = aiohttp.TCPConnector(ssl=ssl_context)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        client = _Client(session, stack, api_path)
        # Warm-up, not counted: the TLS handshake, the first login and the first verification.
        tokens = await client.login_tokens()
        if await client.get_with([tokens["access_token"]])(0) != "200":
            raise RuntimeError(f"GET {api_path} with a password-grant token is not 200")

        results = []
        label = "POST /oauth/token password"
        print(f"  {label}: {settings.logins} sequential ...", flush=True)
        results.append(await sequential(client.login, settings.logins, label, LOGIN_P95_TARGET_MS))
        for rate in settings.login_rates:
            print(f"  {label}: {settings.logins} at {rate:g}/s ...", flush=True)
            results.append(
                await fixed_rate(
                    client.login, settings.logins, rate, label, target_ms=LOGIN_P95_TARGET_MS
                )
            )

        pool: list[str] = []
        label = "POST /oauth/token refresh"
        print(f"  {label}: {settings.cold_tokens} sequential (one chain) ...", flush=True)
        chain = client.refresh_chain(tokens["refresh_token"], pool)
        results.append(await sequential(chain, settings.cold_tokens, label))

        label = f"GET {api_path} bearer"
        n = round(settings.bearer_rate * settings.bearer_seconds)
        mode = f"{settings.bearer_rate:g}/s x {settings.bearer_seconds:g} s, warm"
        print(f"  {label}: {mode} ...", flush=True)
        warm = client.get_with([tokens["access_token"]])
        results.append(
            await fixed_rate(
                warm, n, settings.bearer_rate, label, target_ms=BEARER_P95_TARGET_MS, mode=mode
            )
        )
        if pool:
            n = min(settings.cold_tokens, len(pool))
            seconds = n / settings.bearer_rate
            reuse = "" if n == settings.cold_tokens else " (pool short: refreshes failed)"
            mode = f"{settings.bearer_rate:g}/s x {seconds:g} s, cold verify{reuse}"
            print(f"  {label}: {mode}, {n} distinct tokens ...", flush=True)
            cold = client.get_with(pool[:n])
            results.append(await fixed_rate(cold, n, settings.bearer_rate, label, mode=mode))
        return results


def print_table(figures: list[Figures]) -> None:
    print(
        f"\n{'request':<32}{'mode':<30}{'n':>5}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'errors':>8}  target"
    )
    for f in figures:
        print(
            f"{f.request:<32}{f.mode:<30}{f.requests:>5}{f.p50_ms:>9.2f}{f.p95_ms:>9.2f}"
            f"{f.p99_ms:>9.2f}{f.max_ms:>9.2f}{f.errors:>8}  {f.verdict()}"
        )
    lagging = [f for f in figures if f.lag_p99_ms is not None]
    if lagging:
        lags = ", ".join(f"{f.mode} {f.lag_p99_ms:.1f}" for f in lagging)
        print(f"generator lag P99 ms (client health, open loop): {lags}")
    odd = [f for f in figures if f.errors]
    for f in odd:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(f.statuses.items()))
        print(f"  {f.request} {f.mode}: {statuses}")


def identity_phase(
    stack: Stack, api_path: str, settings: IdentitySettings, ssl_context: ssl.SSLContext
) -> list[str]:
    """Every identity figure, printed as a table; their summary lines."""
    print(
        f"\n== Identity provider: logins (argon2id t=2, 19 MiB, p=1), refresh grant, bearer "
        f"tokens from the built-in issuer on GET {api_path} (aiohttp, verifying TLS) =="
    )
    figures = [
        argon2_in_process(settings.argon2_calls),
        account_read_in_process(stack.root / "identity.duckdb", settings.argon2_calls),
    ]
    figures += asyncio.run(_measure(stack, api_path, settings, ssl_context))
    print_table(figures)
    logins = [f for f in figures if f.request.endswith("password")]
    login_ok = all(f.p95_ms <= LOGIN_P95_TARGET_MS and not f.errors for f in logins)
    seed_ok = all(f.p95_ms < LOGIN_SEED_P95_TARGET_MS and not f.errors for f in logins)
    print(
        f"login target P95 <= {LOGIN_P95_TARGET_MS:g} ms (every mode): "
        f"{'met' if login_ok else 'MISSED'}; seed P95 < {LOGIN_SEED_P95_TARGET_MS:g} ms: "
        f"{'met' if seed_ok else 'MISSED'}"
    )
    return [f"identity: {f.line()}" for f in figures]

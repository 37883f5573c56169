"""Signing keys of trusted issuers: async JWKS fetch with cache, and kid lookup.

An unknown kid triggers at most one refetch per cooldown, so a flood of forged kids cannot turn
the gateway into a JWKS-fetching amplifier. Never accepts a symmetric or unsigned key.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, Protocol

import jwt
import structlog

if TYPE_CHECKING:
    import aiohttp

log = structlog.get_logger("gateway.jwks")

# Asymmetric signature algorithms only; 'oct' keys (HS*) would let anyone who can read the JWKS
# mint tokens.
_ASYMMETRIC_KTY = {"RSA", "EC", "OKP"}


class KeySource(Protocol):
    """Where an issuer's verification keys come from."""

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for kid (None: the issuer's only key, if it has exactly one)."""

    @property
    def ready(self) -> bool:
        """Whether any key is known."""


def parse_jwks(document: Any, allowed_algorithms: frozenset[str]) -> dict[str, jwt.PyJWK]:
    """Usable signing keys by kid; keys that are symmetric, not for signing or odd are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("JWKS document has no 'keys' list")  # noqa: TRY004 - a bad document, not a bad call
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in _ASYMMETRIC_KTY:
            continue
        if entry.get("use", "sig") != "sig" or "d" in entry:
            continue  # an encryption key, or a private key published by mistake
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            log.warning("jwks.key_skipped", kid=entry.get("kid"), reason="unparseable")
            continue
        if key.algorithm_name not in allowed_algorithms:
            log.warning("jwks.key_skipped", kid=entry.get("kid"), alg=key.algorithm_name)
            continue
        keys[str(entry.get("kid", ""))] = key
    return keys


def _pick(keys: dict[str, jwt.PyJWK], kid: str | None) -> jwt.PyJWK | None:
    if kid is None:
        return next(iter(keys.values())) if len(keys) == 1 else None
    return keys.get(kid)


class StaticKeySource:
    """Keys known at start (the dev issuer's own public keys)."""

    def __init__(self, keys: dict[str, jwt.PyJWK]) -> None:
        self._keys = keys

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """Look the kid up; there is nothing to refetch."""
        return _pick(self._keys, kid)

    @property
    def ready(self) -> bool:
        """Ready when at least one key was loaded."""
        return bool(self._keys)


class JwksFetcher:
    """An issuer's JWKS fetched over HTTP(S), cached, refetched on expiry or on an unknown kid."""

    def __init__(
        self,
        *,
        uri: str,
        session: aiohttp.ClientSession,
        allowed_algorithms: frozenset[str],
        cache_seconds: float,
        cooldown_seconds: float,
        timeout_seconds: float,
    ) -> None:
        self.uri = uri
        self._session = session
        self._allowed = allowed_algorithms
        self._cache_seconds = cache_seconds
        self._cooldown = cooldown_seconds
        self._timeout = timeout_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._last_attempt = -float("inf")
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        """Ready once a fetch has produced keys."""
        return bool(self._keys)

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for kid, fetching when the cache is stale or the kid is new (rate-limited)."""
        stale = time.monotonic() - self._fetched_at > self._cache_seconds
        found = _pick(self._keys, kid)
        if found is not None and not stale:
            return found
        await self.refresh()
        return _pick(self._keys, kid)

    async def refresh(self, *, force: bool = False) -> None:
        """Fetch the JWKS unless another fetch happened within the cooldown."""
        async with self._lock:
            now = time.monotonic()
            if not force and now - self._last_attempt < self._cooldown:
                return
            self._last_attempt = now
            try:
                keys = await self._fetch()
            except Exception as exc:  # noqa: BLE001 - any fetch failure keeps the cached keys
                # Fail closed for unknown kids, keep serving known ones: an IdP outage must not
                # log everyone out, and must not let anything new in.
                log.warning("jwks.fetch_failed", uri=self.uri, error=type(exc).__name__)
                return
            self._keys, self._fetched_at = keys, now
            log.info("jwks.fetched", uri=self.uri, kids=sorted(keys))

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        import aiohttp  # noqa: PLC0415 - only for the timeout type; the session is injected

        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with self._session.get(self.uri, timeout=timeout) as response:
            response.raise_for_status()
            body = await response.read()
        if len(body) > 1_000_000:  # noqa: PLR2004 - a JWKS is a few KB; refuse a giant one
            raise ValueError("JWKS document too large")
        return parse_jwks(json.loads(body), self._allowed)

"""Authentication: bearer JWT -> Principal, verified against the issuer's own keys.

The algorithm comes from the key (kty/crv/alg), never from the token header; `alg: none`,
symmetric algorithms and a header/key mismatch are refused. Never logs a token.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import jwt

from gateway.oidc import claim_path, map_roles
from gateway.pipeline import Denial, Principal, RequestContext

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gateway.jwks import KeySource

_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]
_MAX_NAME = 256
# PyJWT's exceptions, most specific first, mapped onto the reason catalogue.
_JWT_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "authn.expired"),
    (jwt.ImmatureSignatureError, "authn.not_yet_valid"),
    (jwt.InvalidAudienceError, "authn.wrong_audience"),
    (jwt.InvalidIssuerError, "authn.wrong_issuer"),
    (jwt.MissingRequiredClaimError, "authn.missing_claim"),
    (jwt.InvalidSignatureError, "authn.bad_signature"),
    (jwt.InvalidAlgorithmError, "authn.alg_not_allowed"),
)
_MESSAGES = {
    "authn.missing_token": "a bearer token is required",
    "authn.malformed": "the bearer token is malformed",
    "authn.bad_signature": "the token signature does not verify",
    "authn.expired": "the token has expired",
    "authn.not_yet_valid": "the token is not valid yet",
    "authn.wrong_issuer": "the token's issuer is not trusted",
    "authn.wrong_audience": "the token is not meant for this API",
    "authn.unknown_kid": "the token's signing key is unknown",
    "authn.alg_not_allowed": "the token's algorithm is not allowed",
    "authn.missing_claim": "the token lacks a required claim",
    "authn.revoked": "the token has been revoked",
}


def refuse(reason_id: str) -> Denial:
    """A 401 with the catalogue's message for reason_id."""
    return Denial(reason_id, _MESSAGES[reason_id])


@dataclass(frozen=True)
class TrustedIssuer:
    """An issuer the gateway accepts tokens from, where its keys come from, how roles map."""

    issuer: str
    audiences: tuple[str, ...]
    roles_claim: str
    keys: KeySource
    role_map: tuple[str, ...] = ()  # "external=role"; when set, only mapped values are roles


# Asked after every successful verification (cached or not): a revoked token stops at once.
Revocation = Callable[[Principal], Awaitable[bool]]


class Authenticator(Protocol):
    """Turns a credential of its kind into a Principal; None means "not mine"."""

    async def authenticate(self, ctx: RequestContext) -> Principal | None:
        """The principal, None when no credential of this kind is present, or raise Denial."""


class BearerTokenAuthenticator:
    """RFC 6750 bearer tokens: JWTs from the trusted issuers."""

    def __init__(
        self,
        *,
        issuers: Sequence[TrustedIssuer],
        allowed_algorithms: Sequence[str],
        leeway_seconds: int,
        max_token_bytes: int,
        cache_size: int,
        cache_seconds: int,
        revoked: Revocation | None = None,
    ) -> None:
        self._issuers = {i.issuer: i for i in issuers}
        self._revoked = revoked
        self._allowed = frozenset(allowed_algorithms)
        self._leeway = leeway_seconds
        self._max_bytes = max_token_bytes
        # Verified tokens by their exact text: a repeat costs a dict lookup, not a signature check.
        # Bounded in size and age so a removed key stops working within cache_seconds.
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_seconds = cache_seconds

    async def authenticate(self, ctx: RequestContext) -> Principal | None:
        """Verify the Authorization: Bearer token, if there is one."""
        headers = ctx.request.headers.getall("Authorization", [])
        if not headers:
            return None
        if len(headers) > 1:
            raise refuse("authn.malformed")  # which one counts would be a guess; refuse both
        header = headers[0]
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return None  # another scheme is another authenticator's business
        return await self.verify_bearer_token(token.strip())

    async def verify_bearer_token(self, token: str) -> Principal:
        """Check signature, claims and revocation; raise Denial with the precise reason."""
        principal = await self._verified(token)
        if self._revoked is not None and await self._revoked(principal):
            raise refuse("authn.revoked")
        return principal

    async def _verified(self, token: str) -> Principal:
        if not token or len(token) > self._max_bytes:
            raise refuse("authn.malformed")
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None:
            principal, verified_at = cached
            if now - verified_at <= self._cache_seconds:
                if principal.expires_at + self._leeway < now:
                    raise refuse("authn.expired")
                return principal
            del self._cache[token]
        principal = await self._verify(token)
        self._remember(token, principal, now)
        return principal

    async def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise refuse("authn.malformed") from None
        if not isinstance(unverified, dict):
            raise refuse("authn.malformed")
        if "crit" in header:
            # RFC 7515 section 4.1.11: extensions we do not implement must make the token invalid.
            raise refuse("authn.malformed")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise refuse("authn.alg_not_allowed")  # 'none', HS256 and friends end here
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            raise refuse("authn.missing_claim")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise refuse("authn.wrong_issuer")
        kid = header.get("kid")
        key = await issuer.keys.key(kid if isinstance(kid, str) else None)
        if key is None:
            raise refuse("authn.unknown_kid")
        if key.algorithm_name != alg:
            # The key decides the algorithm: an RSA key cannot verify a token that says ES256.
            raise refuse("authn.alg_not_allowed")
        claims = self._decode(token, key, issuer)
        return _principal(claims, issuer)

    def _decode(self, token: str, key: jwt.PyJWK, issuer: TrustedIssuer) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[key.algorithm_name],
                audience=list(issuer.audiences),
                issuer=issuer.issuer,
                leeway=self._leeway,
                options={"require": _REQUIRED_CLAIMS, "verify_iat": True},
            )
        except jwt.PyJWTError as exc:
            for error_type, reason_id in _JWT_ERRORS:
                if isinstance(exc, error_type):
                    raise refuse(reason_id) from None
            raise refuse("authn.malformed") from None
        return claims

    def _remember(self, token: str, principal: Principal, now: float) -> None:
        self._cache[token] = (principal, now)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def _is_name(value: Any) -> bool:
    # Subjects and roles travel on as header values and policy strings: no control characters
    # (CR/LF would split a header, NUL would truncate in C), and a sane length.
    return (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_NAME
        and not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)  # noqa: PLR2004 - C0, DEL
    )


def _is_role(value: Any) -> bool:
    # Roles reach the upstream comma-joined in X-Gateway-Roles: a comma would make two.
    return _is_name(value) and "," not in value


def _principal(claims: dict[str, Any], issuer: TrustedIssuer) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise refuse("authn.missing_claim")
    if issuer.role_map:
        try:
            roles: Any = map_roles(claims, issuer.roles_claim, issuer.role_map)
        except ValueError:
            raise refuse("authn.malformed") from None
    else:
        roles = claim_path(claims, issuer.roles_claim) or []
    if not _is_name(sub) or not isinstance(roles, list) or not all(_is_role(r) for r in roles):
        raise refuse("authn.malformed")
    amr = claims.get("amr", [])
    exp = claims.get("exp")
    return Principal(
        sub=sub,
        roles=tuple(roles),
        issuer=issuer.issuer,
        claims=claims,
        amr=tuple(a for a in amr if isinstance(a, str)) if isinstance(amr, list) else (),
        expires_at=float(exp) if isinstance(exp, (int, float)) else 0.0,
    )


class AuthnStage:
    """Asks each authenticator in turn; denies authn.missing_token when none applied."""

    name = "authn"

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self._authenticators = tuple(authenticators)

    async def __call__(self, ctx: RequestContext) -> None:
        """Set ctx.principal or refuse."""
        for authenticator in self._authenticators:
            principal = await authenticator.authenticate(ctx)
            if principal is not None:
                ctx.principal = principal
                return
        raise refuse("authn.missing_token")

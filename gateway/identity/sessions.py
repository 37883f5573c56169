"""Browser sessions: the encrypted session cookie, and CSRF protection for cookie requests.

The cookie holds only the session id, sealed with AES-GCM (HttpOnly, Secure, SameSite=Strict,
`__Host-` prefix); the session itself (subject, roles, amr, CSRF token) lives in the shared
state store, so logout ends it everywhere at once. A state-changing request that authenticates
by cookie must carry the session's CSRF token (X-CSRF-Token header or csrf_token form field),
compared in constant time; a missing token fails. Origin and Sec-Fetch-Site, when the browser
sends them, must say same-origin. A bearer token is never subject to CSRF (a browser does not
attach it by itself), so the Authorization header wins over the cookie.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gateway.pipeline import Denial, Principal

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from aiohttp import web

    from gateway.identity.mfa import SecretBox
    from gateway.identity.tokens import Grant, Session, TokenService
    from gateway.pipeline import RequestContext

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
_COOKIE_CONTEXT = "session-cookie"
_MAX_COOKIE = 512


def origin_of(url: str) -> str:
    """scheme://host[:port] of a URL, lower-cased, as browsers send it in Origin."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class SessionCookies:
    """Seal, open, set and clear the session cookie."""

    def __init__(self, *, box: SecretBox, name: str, max_age_seconds: int) -> None:
        self._box = box
        self.name = name
        self._max_age = max_age_seconds

    def seal(self, session: Session) -> str:
        """The cookie value for a session: its id and expiry, encrypted and authenticated."""
        payload = json.dumps({"sid": session.sid, "exp": int(session.expires_at)})
        return self._box.seal(payload.encode(), context=_COOKIE_CONTEXT)

    def session_id(self, value: str) -> str | None:
        """The session id in a cookie value; None when it is forged, garbled or expired."""
        if len(value) > _MAX_COOKIE:
            return None
        try:
            payload = json.loads(self._box.open(value, context=_COOKIE_CONTEXT))
        except (ValueError, TypeError):
            return None
        if not isinstance(payload, dict) or payload.get("exp", 0) < time.time():
            return None
        sid = payload.get("sid")
        return sid if isinstance(sid, str) else None

    def set(self, response: web.StreamResponse, session: Session) -> None:
        """Attach the session cookie with every protective attribute."""
        response.set_cookie(
            self.name,
            self.seal(session),
            max_age=self._max_age,
            path="/",
            secure=True,
            httponly=True,
            samesite="Strict",
        )

    def clear(self, response: web.StreamResponse) -> None:
        """Tell the browser to drop the cookie."""
        response.del_cookie(self.name, path="/", secure=True, httponly=True, samesite="Strict")


def check_same_origin(ctx: RequestContext, allowed_origins: Iterable[str]) -> None:
    """Refuse a request the browser says came from another site (when the browser says)."""
    headers = ctx.request.headers
    origin = headers.get("Origin")
    site = headers.get("Sec-Fetch-Site")
    if origin == "null" and site is not None and site.lower() == "same-origin":
        # Our pages say Referrer-Policy: no-referrer, so the browser sends "Origin: null" on
        # their own form posts and fetches (Fetch, "serializing a request origin"). Then
        # Sec-Fetch-Site, which no page script can set, says where the request came from.
        origin = None
    if origin is not None and origin.lower() not in allowed_origins:
        raise Denial("csrf.cross_origin", "the request comes from another origin")
    if site is not None and site.lower() not in {"same-origin", "none"}:
        raise Denial("csrf.cross_origin", "the request comes from another site")


def check_csrf_token(expected: str, presented: str | None) -> None:
    """Constant-time comparison of the CSRF token; missing and wrong have their own reasons."""
    if not presented:
        raise Denial(
            "csrf.missing", "a CSRF token is required (X-CSRF-Token header or csrf_token field)"
        )
    if not hmac.compare_digest(expected.encode(), presented.encode()):
        raise Denial("csrf.mismatch", "the CSRF token does not match this session")


class SessionCookieAuthenticator:
    """The session cookie -> the same Principal a bearer token of the session would give."""

    def __init__(
        self,
        *,
        cookies: SessionCookies,
        tokens: TokenService,
        allowed_origins: Iterable[str],
        revalidate: Callable[[Grant], Awaitable[Grant | None]] | None = None,
        revalidate_seconds: float = 60.0,
    ) -> None:
        self._cookies = cookies
        self._tokens = tokens
        self._origins = frozenset(o.lower() for o in allowed_origins)
        # A session outlives many access tokens: every revalidate_seconds its grant is compared
        # with the accounts, so a disabled user or changed roles take effect within a minute.
        self._revalidate = revalidate
        self._revalidate_seconds = revalidate_seconds

    async def authenticate(self, ctx: RequestContext) -> Principal | None:
        """The session's principal; CSRF-checked for state-changing methods."""
        value = ctx.request.cookies.get(self._cookies.name)
        if value is None:
            return None
        sid = self._cookies.session_id(value)
        if sid is None:
            raise Denial("authn.malformed", "the session cookie is not valid")
        session = await self._tokens.session(sid)
        if session is None:
            raise Denial("authn.revoked", "the session has ended; sign in again")
        if (
            self._revalidate is not None
            and time.time() - session.checked_at > self._revalidate_seconds
        ):
            grant = await self._revalidate(session.grant)
            if grant is None:
                await self._tokens.end_session(sid)
                raise Denial("authn.revoked", "the account can no longer sign in")
            session = await self._tokens.update_session(session, grant)
        if ctx.request.method not in SAFE_METHODS:
            check_same_origin(ctx, self._origins)
            check_csrf_token(session.csrf, await _presented_csrf(ctx))
        grant = session.grant
        claims = {"sid": sid, "scope": grant.scope, "session": "cookie"}
        return Principal(
            sub=grant.subject,
            roles=grant.roles,
            issuer=self._tokens.issuer,
            claims=claims,
            amr=grant.amr,
            expires_at=session.expires_at,
        )


async def _presented_csrf(ctx: RequestContext) -> str | None:
    header = ctx.request.headers.get(CSRF_HEADER)
    if header is not None:
        return header
    if ctx.request.content_type == "application/x-www-form-urlencoded":
        from gateway.identity.forms import parse_form  # noqa: PLC0415 - only for form posts

        form = parse_form(await ctx.read_body(16_384))
        return form.get(CSRF_FIELD)
    return None

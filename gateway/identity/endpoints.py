"""The identity endpoints the gateway serves itself, as one pipeline.

    GET /.well-known/jwks.json, openid-configuration, oauth-authorization-server
    POST /oauth/token              password, client_credentials, refresh_token (RFC 6749)
    GET|POST /auth/login           the browser form; sets the session cookie
    POST /auth/logout              ends the session (cookie or bearer), revokes the token
    GET /auth/session              who am I (and the CSRF token of a cookie session)
    POST /auth/mfa/enroll, /auth/mfa/confirm   TOTP enrolment for the signed-in user

Each is a terminal stage after normalize -> route (-> authn). Refusals go through the runner
like every other request (one audit event, same reason ids); the token endpoint renders them
in RFC 6749's error shape and the login form as an HTML page.
"""

from __future__ import annotations

import base64
import binascii
import html
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import structlog
from aiohttp import web

from gateway.identity import mfa
from gateway.identity.bruteforce import GuardUnavailable
from gateway.identity.forms import parse_form
from gateway.identity.provider import totp_context
from gateway.identity.sessions import (
    CSRF_FIELD,
    check_csrf_token,
    check_same_origin,
)
from gateway.identity.state import StateStoreError
from gateway.identity.tokens import RefreshError
from gateway.pipeline import Denial, Principal, RequestContext, denial_response
from gateway.routes import Route, compile_path

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from gateway.identity.provider import IdentityProvider
    from gateway.identity.sessions import SessionCookies
    from gateway.identity.tokens import Grant, Session
    from gateway.pipeline import Stage

log = structlog.get_logger("gateway.identity")

FORM = "application/x-www-form-urlencoded"
_MAX_FORM = 16_384
_LOGIN_COOKIE = "__Host-emp_login"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# The login page has no script and no inline style: nothing for an injection to ride on.
_PAGE_HEADERS = {
    **_NO_STORE,
    "Content-Security-Policy": (
        "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_OAUTH_ERRORS = {
    "auth.invalid_request": "invalid_request",
    "auth.unsupported_grant_type": "unsupported_grant_type",
    "auth.invalid_scope": "invalid_scope",
    "auth.invalid_client": "invalid_client",
    "auth.invalid_grant": "invalid_grant",
    "auth.refresh_reused": "invalid_grant",
    "auth.mfa_required": "mfa_required",
    "auth.mfa_failed": "invalid_grant",
    "auth.rate_limited": "slow_down",
    "auth.locked_out": "slow_down",
    "auth.unavailable": "temporarily_unavailable",
    "request.too_large": "invalid_request",
    "internal.error": "server_error",
}
_SCOPES = frozenset({"emp"})


def _route(name: str, methods: str, path: str, action: str) -> Route:
    return Route(
        name=name,
        methods=frozenset(methods.split()),
        path=path,
        resource="identity",
        action=action,
        pattern=compile_path(path),
        content_types=(FORM, "application/json"),
    )


# (route, needs an authenticated principal)
ROUTES: tuple[tuple[Route, bool], ...] = (
    (_route("identity.jwks", "GET", "/.well-known/jwks.json", "read"), False),
    (_route("identity.discovery", "GET", "/.well-known/openid-configuration", "read"), False),
    (_route("identity.as_metadata", "GET", "/.well-known/oauth-authorization-server", "read"),
     False),
    (_route("identity.token", "POST", "/oauth/token", "login"), False),
    (_route("identity.login", "GET POST", "/auth/login", "login"), False),
    (_route("identity.logout", "POST", "/auth/logout", "logout"), True),
    (_route("identity.session", "GET", "/auth/session", "read"), True),
    (_route("identity.mfa_enroll", "POST", "/auth/mfa/enroll", "enroll"), True),
    (_route("identity.mfa_confirm", "POST", "/auth/mfa/confirm", "enroll"), True),
)  # fmt: skip
AUTHENTICATED = frozenset(route.name for route, needs in ROUTES if needs)


def render_denial(ctx: RequestContext, denial: Denial) -> web.Response:
    """RFC 6749 errors for the token endpoint, HTML for the login form, JSON elsewhere."""
    if ctx.route_name == "identity.token":
        return _oauth_error(ctx, denial)
    if ctx.route_name == "identity.login" and _wants_html(ctx.request):
        return _login_page(
            status=denial.status,
            error=f"{denial.message} ({denial.reason_id}, request {ctx.request_id})",
            csrf=None,
            retry_after=denial.detail.get("retry_after"),
        )
    return denial_response(ctx, denial)


def _oauth_error(ctx: RequestContext, denial: Denial) -> web.Response:
    body: dict[str, Any] = {
        "error": _OAUTH_ERRORS.get(denial.reason_id, "invalid_request"),
        "error_description": denial.message,
        "reason_id": denial.reason_id,
        "request_id": ctx.request_id,
    }
    headers = {**_NO_STORE, "X-Request-Id": ctx.request_id}
    if denial.reason_id == "auth.invalid_client":
        headers["WWW-Authenticate"] = 'Basic realm="emp"'  # RFC 6749 section 5.2
    if "retry_after" in denial.detail:
        headers["Retry-After"] = str(denial.detail["retry_after"])
    if denial.detail.get("mfa_required"):
        body["mfa_required"] = True
    return web.json_response(body, status=denial.status, headers=headers)


class IdentityEndpoints:
    """Terminal stage: dispatch to the endpoint of ctx.route; converts backend outages to 503."""

    name = "identity"

    def __init__(
        self,
        *,
        provider: IdentityProvider | None,
        cookies: SessionCookies | None,
        jwks: Callable[[], dict[str, Any]],
        issuer: str,
        algorithm: Callable[[], str],
        allowed_origins: frozenset[str],
    ) -> None:
        self._idp = provider
        self._cookies = cookies
        self._jwks = jwks
        self._issuer = issuer.rstrip("/")
        self._algorithm = algorithm
        self._origins = allowed_origins
        self._handlers: dict[str, Callable[[RequestContext], Awaitable[web.StreamResponse]]] = {
            "identity.jwks": self.jwks,
            "identity.discovery": self.discovery,
            "identity.as_metadata": self.discovery,
            "identity.token": self.token,
            "identity.login": self.login,
            "identity.logout": self.logout,
            "identity.session": self.session_info,
            "identity.mfa_enroll": self.mfa_enroll,
            "identity.mfa_confirm": self.mfa_confirm,
        }

    async def __call__(self, ctx: RequestContext) -> None:
        """Answer the request of ctx.route."""
        handler = self._handlers[ctx.route_name]
        if self._idp is None and ctx.route_name not in {
            "identity.jwks", "identity.discovery", "identity.as_metadata"
        }:  # fmt: skip
            raise Denial("route.not_found", "the built-in identity provider is disabled")
        try:
            ctx.response = await handler(ctx)
        except (StateStoreError, GuardUnavailable):
            # Fail closed: without the shared state nobody is signed in, out, or counted.
            log.exception("identity.backend_unavailable", request_id=ctx.request_id)
            raise Denial("auth.unavailable", "sign-in is unavailable; try again later") from None

    @property
    def idp(self) -> IdentityProvider:
        """The provider (the dispatcher refused the request already when there is none)."""
        assert self._idp is not None  # noqa: S101 - checked in __call__
        return self._idp

    # -- metadata ------------------------------------------------------------------------

    async def jwks(self, ctx: RequestContext) -> web.StreamResponse:
        """The issuer's public keys (retired keys stay until their tokens have expired)."""
        return web.json_response(
            self._jwks(),
            headers={"Cache-Control": "public, max-age=300", "X-Request-Id": ctx.request_id},
        )

    async def discovery(self, ctx: RequestContext) -> web.StreamResponse:
        """OIDC discovery / RFC 8414 metadata of the built-in issuer."""
        base = self._issuer
        document = {
            "issuer": base,
            "jwks_uri": f"{base}/.well-known/jwks.json",
            "token_endpoint": f"{base}/oauth/token",
            "end_session_endpoint": f"{base}/auth/logout",
            "grant_types_supported": ["password", "client_credentials", "refresh_token"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "response_types_supported": ["none"],
            "subject_types_supported": ["public"],
            # The algorithm of the key that signs now (a configured change waits for a rotation).
            "id_token_signing_alg_values_supported": [self._algorithm()],
            "scopes_supported": sorted(_SCOPES),
            "claims_supported": [
                "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "roles", "scope", "amr",
                "sid", "client_id",
            ],
        }  # fmt: skip
        return web.json_response(
            document,
            headers={"Cache-Control": "public, max-age=300", "X-Request-Id": ctx.request_id},
        )

    # -- the token endpoint --------------------------------------------------------------

    async def token(self, ctx: RequestContext) -> web.StreamResponse:
        """POST /oauth/token: one of three grants, answered per RFC 6749 section 5."""
        ctx.event = "auth.token"
        form = await _form(ctx)
        grant_type = form.get("grant_type", "")
        ctx.detail["grant_type"] = grant_type if grant_type in _GRANTS else "<other>"
        if grant_type == "password":
            body = await self._password_grant(ctx, form)
        elif grant_type == "client_credentials":
            body = await self._client_grant(ctx, form)
        elif grant_type == "refresh_token":
            body = await self._refresh_grant(ctx, form)
        elif not grant_type:
            raise Denial("auth.invalid_request", "grant_type is required")
        else:
            raise Denial("auth.unsupported_grant_type", "grant_type is not supported")
        return web.json_response(body, headers={**_NO_STORE, "X-Request-Id": ctx.request_id})

    async def _password_grant(self, ctx: RequestContext, form: dict[str, str]) -> dict[str, Any]:
        username, password = form.get("username"), form.get("password")
        if not username or password is None:
            raise Denial("auth.invalid_request", "username and password are required")
        _check_scope(form.get("scope"))
        grant = await self.idp.login(ctx, username, password, form.get("otp"))
        session = await self.idp.tokens.start_session(grant)
        return await self._issued(ctx, grant, session)

    async def _client_grant(self, ctx: RequestContext, form: dict[str, str]) -> dict[str, Any]:
        client_id, secret = _client_credentials(ctx.request, form)
        _check_scope(form.get("scope"))
        grant = await self.idp.client(ctx, client_id, secret)
        return await self._issued(ctx, grant, None)  # no refresh token (RFC 6749 4.4.3)

    async def _refresh_grant(self, ctx: RequestContext, form: dict[str, str]) -> dict[str, Any]:
        ctx.event = "auth.refresh"
        token = form.get("refresh_token")
        if not token:
            raise Denial("auth.invalid_request", "refresh_token is required")
        try:
            session = await self.idp.tokens.use_refresh_token(token)
        except RefreshError as error:
            if error.reason_id == "auth.refresh_reused":
                ctx.event = "auth.refresh_reuse"
                ctx.detail["revoked_session"] = error.sid
            raise Denial(error.reason_id, error.message) from None
        grant = await self.idp.current_grant(session.grant)
        ctx.attempted = session.grant.subject
        if grant is None:
            await self.idp.tokens.end_session(session.sid)
            raise Denial("auth.invalid_grant", "the account can no longer sign in")
        session = await self.idp.tokens.update_session(session, grant)
        return await self._issued(ctx, grant, session)

    async def _issued(
        self, ctx: RequestContext, grant: Grant, session: Session | None
    ) -> dict[str, Any]:
        body = await self.idp.tokens.token_response(grant, session)
        ctx.attempted = grant.subject
        ctx.principal = _principal_of(grant, self.idp.tokens.issuer, session)
        ctx.detail.update(
            issued_to=grant.subject, roles=list(grant.roles), amr=list(grant.amr),
            scope=grant.scope, session=session.sid if session else None,
        )  # fmt: skip
        return body

    # -- the browser ---------------------------------------------------------------------

    async def login(self, ctx: RequestContext) -> web.StreamResponse:
        """GET: the form (with a fresh login CSRF cookie). POST: check it, sign in, set cookie."""
        assert self._cookies is not None  # noqa: S101 - built whenever the provider is
        if ctx.request.method == "GET":
            ctx.event = "auth.login_page"
            csrf = secrets.token_urlsafe(32)
            page = _login_page(status=200, error=None, csrf=csrf)
            _set_login_cookie(page, csrf)
            return page
        form = await _form(ctx)
        # Login CSRF: the form's token must equal the cookie set with the form (double submit;
        # SameSite=Strict keeps another site from sending the cookie), and the origin must match.
        check_same_origin(ctx, self._origins)
        check_csrf_token(ctx.request.cookies.get(_LOGIN_COOKIE, ""), form.get(CSRF_FIELD))
        username, password = form.get("username", ""), form.get("password", "")
        if not username:
            raise Denial("auth.invalid_request", "username and password are required")
        grant = await self.idp.login(ctx, username, password, form.get("code") or None)
        session = await self.idp.tokens.start_session(grant)
        ctx.principal = _principal_of(grant, self.idp.tokens.issuer, session)
        ctx.detail.update(session=session.sid, amr=list(grant.amr))
        if _wants_html(ctx.request):
            response: web.StreamResponse = web.Response(
                status=303, headers={**_NO_STORE, "Location": "/auth/session"}
            )
        else:
            response = web.json_response(
                _session_document(grant, session.expires_at, session.csrf), headers=_NO_STORE
            )
        self._cookies.set(response, session)
        response.del_cookie(_LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return response

    async def logout(self, ctx: RequestContext) -> web.StreamResponse:
        """End the session, revoke its refresh family, denylist the presented access token."""
        ctx.event = "auth.logout"
        principal = ctx.principal
        assert principal is not None  # noqa: S101 - the authn stage ran
        sid = principal.claims.get("sid")
        if isinstance(sid, str):
            await self.idp.tokens.end_session(sid)
        jti = principal.claims.get("jti")
        if isinstance(jti, str) and principal.claims.get("session") != "cookie":
            # Any issuer's token with a jti: the gateway refuses it from now on, even though
            # the external IdP would still call it valid until it expires.
            await self.idp.tokens.revoke_access_token(jti, principal.expires_at)
        ctx.detail.update(session=sid, revoked_jti=jti)
        response = web.json_response({"status": "signed_out"}, headers=_NO_STORE)
        if self._cookies is not None:
            self._cookies.clear(response)
        return response

    async def session_info(self, ctx: RequestContext) -> web.StreamResponse:
        """Who the caller is; a cookie session also gets its CSRF token here."""
        principal = ctx.principal
        assert principal is not None  # noqa: S101 - the authn stage ran
        body: dict[str, Any] = {
            "sub": principal.sub,
            "roles": list(principal.roles),
            "amr": list(principal.amr),
            "issuer": principal.issuer,
            "scope": principal.claims.get("scope", ""),
            "expires_at": int(principal.expires_at),
        }
        sid = principal.claims.get("sid")
        if principal.claims.get("session") == "cookie" and isinstance(sid, str):
            session = await self.idp.tokens.session(sid)
            if session is not None:
                body["csrf_token"] = session.csrf
        return web.json_response(body, headers=_NO_STORE)

    # -- MFA enrolment -------------------------------------------------------------------

    async def mfa_enroll(self, ctx: RequestContext) -> web.StreamResponse:
        """Start TOTP enrolment: a new secret (stored sealed, pending), its URI and QR code."""
        ctx.event = "auth.mfa_enroll"
        user = await self._own_account(ctx)
        if user.mfa_state == "enabled":
            raise Denial("auth.mfa_state", "MFA is already enabled for this account")
        secret = mfa.new_totp_secret()
        sealed = self.idp.totp_box.seal(secret.encode(), context=totp_context(user.username))
        await self.idp.account_op(lambda store: store.set_mfa(user.username, "pending", sealed, ()))
        uri = mfa.provisioning_uri(secret, user.username, self.idp.config.mfa.issuer_name)
        body = {"secret": secret, "otpauth_uri": uri, "qr_svg": mfa.qr_svg(uri)}
        return web.json_response(body, headers=_NO_STORE)

    async def mfa_confirm(self, ctx: RequestContext) -> web.StreamResponse:
        """Finish enrolment with a first code: MFA on, one-time recovery codes shown once."""
        ctx.event = "auth.mfa_confirm"
        user = await self._own_account(ctx)
        if user.mfa_state != "pending" or user.mfa_secret_sealed is None:
            raise Denial("auth.mfa_state", "no MFA enrolment is in progress; POST /auth/mfa/enroll")
        code = (await _fields(ctx)).get("code", "")
        secret = self.idp.totp_box.open(user.mfa_secret_sealed, context=totp_context(user.username))
        if not await self.idp.totp.verify(user.username, secret.decode(), code):
            ctx.event = "auth.mfa_failure"
            raise Denial("auth.mfa_failed", "the one-time code is wrong or was already used")
        codes = mfa.new_recovery_codes()
        hashes = tuple(mfa.recovery_code_hash(c) for c in codes)
        sealed = user.mfa_secret_sealed
        await self.idp.account_op(
            lambda store: store.set_mfa(user.username, "enabled", sealed, hashes)
        )
        ctx.detail["mfa"] = "enabled"
        body = {
            "status": "enabled",
            "recovery_codes": codes,
            "note": "each recovery code works once; they are shown only now",
        }
        return web.json_response(body, headers=_NO_STORE)

    async def _own_account(self, ctx: RequestContext) -> Any:
        principal = ctx.principal
        assert principal is not None  # noqa: S101 - the authn stage ran
        if principal.issuer != self.idp.tokens.issuer or principal.claims.get("client_id"):
            raise Denial("auth.mfa_state", "only people signed in here can enrol MFA")
        user = await self.idp.account_op(lambda store: store.get_user(principal.sub))
        if user is None or user.status != "active":
            raise Denial("authn.revoked", "the account can no longer sign in")
        return user


_GRANTS = frozenset({"password", "client_credentials", "refresh_token"})


async def _form(ctx: RequestContext) -> dict[str, str]:
    if ctx.request.content_type != FORM:
        raise Denial("auth.invalid_request", f"the body must be {FORM}")
    return parse_form(await ctx.read_body(_MAX_FORM))


async def _fields(ctx: RequestContext) -> dict[str, str]:
    """A small form or JSON object of string fields (the MFA endpoints take either)."""
    if ctx.request.content_type == FORM:
        return parse_form(await ctx.read_body(_MAX_FORM))
    import json  # noqa: PLC0415

    body = await ctx.read_body(_MAX_FORM)
    try:
        document = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        raise Denial("auth.invalid_request", "the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise Denial("auth.invalid_request", "the body must be a JSON object")
    return {k: v for k, v in document.items() if isinstance(v, str)}


def _check_scope(scope: str | None) -> None:
    if scope is not None and not set(scope.split()) <= _SCOPES:
        raise Denial("auth.invalid_scope", f"scope must be within {sorted(_SCOPES)}")


def _client_credentials(request: web.BaseRequest, form: dict[str, str]) -> tuple[str, str]:
    """client_secret_basic or client_secret_post, never both (RFC 6749 section 2.3.1)."""
    header = request.headers.get("Authorization")
    in_form = "client_secret" in form
    if header is not None:
        if in_form:
            raise Denial("auth.invalid_request", "use one client authentication method")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            raise Denial("auth.invalid_client", "client authentication failed")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Denial("auth.invalid_client", "client authentication failed") from None
        client_id, sep, secret = decoded.partition(":")
        if not sep:
            raise Denial("auth.invalid_client", "client authentication failed")
        return unquote_plus(client_id), unquote_plus(secret)
    form_id, form_secret = form.get("client_id"), form.get("client_secret")
    if not form_id or not form_secret:
        raise Denial("auth.invalid_client", "client authentication failed")
    return form_id, form_secret


def _principal_of(grant: Grant, issuer: str, session: Session | None) -> Principal:
    """Who just signed in: the audit event's subject and roles."""
    return Principal(
        sub=grant.subject,
        roles=grant.roles,
        issuer=issuer,
        claims={"sid": session.sid} if session else {},
        amr=grant.amr,
        expires_at=session.expires_at if session else 0.0,
    )


def _session_document(grant: Grant, expires_at: float, csrf: str) -> dict[str, Any]:
    return {
        "sub": grant.subject,
        "roles": list(grant.roles),
        "amr": list(grant.amr),
        "scope": grant.scope,
        "expires_at": int(expires_at),
        "csrf_token": csrf,
    }


def _wants_html(request: web.BaseRequest) -> bool:
    accept = request.headers.get("Accept", "")
    return "text/html" in accept or (request.content_type == FORM and "json" not in accept)


def _set_login_cookie(response: web.StreamResponse, value: str) -> None:
    response.set_cookie(
        _LOGIN_COOKIE, value, max_age=600, path="/", secure=True, httponly=True, samesite="Strict"
    )


def _login_page(
    *, status: int, error: str | None, csrf: str | None, retry_after: int | None = None
) -> web.Response:
    token = csrf or secrets.token_urlsafe(32)
    message = f'<p role="alert">{html.escape(error)}</p>' if error else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in - EMP</title></head>
<body><main><h1>Sign in</h1>{message}
<form method="post" action="/auth/login">
<input type="hidden" name="{CSRF_FIELD}" value="{html.escape(token)}">
<p><label>Username <input name="username" autocomplete="username" required></label></p>
<p><label>Password <input name="password" type="password" autocomplete="current-password"
required></label></p>
<p><label>One-time code (if MFA is on) <input name="code" inputmode="numeric"
autocomplete="one-time-code"></label></p>
<p><button type="submit">Sign in</button></p>
</form></main></body></html>
"""
    headers = dict(_PAGE_HEADERS)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    response = web.Response(
        status=status, text=body, content_type="text/html", charset="utf-8", headers=headers
    )
    if csrf is None:
        _set_login_cookie(response, token)  # a page without one gets a fresh pair
    return response


def identity_stages(
    *, normalize: Stage, route: Stage, authn: Stage, endpoints: IdentityEndpoints
) -> list[Stage]:
    """Normalize -> route -> authn (only where the route needs it) -> the endpoint."""
    return [normalize, route, _OnlyFor(AUTHENTICATED, authn), endpoints]


class _OnlyFor:
    """Run a stage only for some routes (authn for the endpoints that need a principal)."""

    def __init__(self, routes: frozenset[str], stage: Stage) -> None:
        self._routes = routes
        self._stage = stage
        self.name = stage.name

    async def __call__(self, ctx: RequestContext) -> None:
        if ctx.route_name in self._routes:
            await self._stage(ctx)

"""Tokens of the built-in issuer: short-lived signed access tokens, rotating refresh tokens.

A login starts a *session* (one refresh-token family) kept in the shared state store. Each
refresh token is an opaque random string, stored only as its SHA-256, usable once: using it
returns a new one of the same family. A refresh token used a second time means it was copied:
the whole family (the session) is revoked, so both the thief's and the user's copies die
(OAuth 2.0 Security BCP, section 4.14.2). Logout ends the session and denylists the access
token's jti until it expires. The state store is shared between workers (memory or Redis).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from gateway import keys

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.identity.state import StateStore

_REFRESH_PREFIX = "ert1_"  # makes a leaked refresh token easy to recognise in a secret scanner


@dataclass(frozen=True)
class Grant:
    """What a login established: who, with which roles, how (amr), for which client."""

    subject: str
    roles: tuple[str, ...]
    amr: tuple[str, ...]
    scope: str = ""
    client_id: str | None = None
    kind: str = "user"  # "user" (a person) or "client" (an ingest process)

    def to_json(self) -> str:
        """The grant as stored in the state store."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Grant:
        """A grant back from the state store."""
        raw = json.loads(text)
        return cls(
            subject=raw["subject"],
            roles=tuple(raw["roles"]),
            amr=tuple(raw["amr"]),
            scope=raw.get("scope", ""),
            client_id=raw.get("client_id"),
            kind=raw.get("kind", "user"),
        )


@dataclass(frozen=True)
class Session:
    """A live login: its id (the refresh family), grant, CSRF token and absolute expiry."""

    sid: str
    grant: Grant
    csrf: str
    expires_at: float
    checked_at: float = 0.0  # when the grant was last compared with the account store


class RefreshError(Exception):
    """A refresh token that cannot be used; reason_id says why (reuse has its own)."""

    def __init__(self, reason_id: str, message: str, *, sid: str | None = None) -> None:
        super().__init__(message)
        self.reason_id = reason_id
        self.message = message
        self.sid = sid


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenService:
    """Issues and revokes the built-in issuer's tokens and sessions."""

    def __init__(
        self,
        *,
        signing_key: Callable[[], dict[str, Any]],
        state: StateStore,
        issuer: str,
        audience: str,
        access_ttl_seconds: int,
        refresh_ttl_seconds: int,
        session_ttl_seconds: int,
    ) -> None:
        self._signing_key = signing_key  # the key ring's active key, read at every issue
        self.state = state
        self.issuer = issuer
        self.audience = audience
        self.access_ttl = access_ttl_seconds
        self.refresh_ttl = refresh_ttl_seconds
        self.session_ttl = session_ttl_seconds

    # -- sessions ------------------------------------------------------------------------

    async def start_session(self, grant: Grant) -> Session:
        """A new session (refresh family) for a successful login."""
        now = time.time()
        session = Session(
            sid=secrets.token_urlsafe(18),
            grant=grant,
            csrf=secrets.token_urlsafe(32),
            expires_at=now + self.session_ttl,
            checked_at=now,
        )
        await self._store_session(session)
        return session

    async def update_session(self, session: Session, grant: Grant) -> Session:
        """The session with the grant as the accounts say now (roles changed, say)."""
        updated = Session(session.sid, grant, session.csrf, session.expires_at, time.time())
        await self._store_session(updated)
        return updated

    async def _store_session(self, session: Session) -> None:
        record = {
            "grant": session.grant.to_json(),
            "csrf": session.csrf,
            "exp": session.expires_at,
            "checked": session.checked_at,
        }
        remaining = session.expires_at - time.time()
        if remaining > 0:
            await self.state.set(f"session:{session.sid}", json.dumps(record), remaining)

    async def session(self, sid: str) -> Session | None:
        """The live session with this id, or None when it ended, expired or never was."""
        text = await self.state.get(f"session:{sid}")
        if text is None:
            return None
        record = json.loads(text)
        grant = Grant.from_json(record["grant"])
        return Session(sid, grant, record["csrf"], record["exp"], record.get("checked", 0.0))

    async def end_session(self, sid: str) -> bool:
        """Revoke the session and with it every refresh token of its family."""
        return await self.state.delete(f"session:{sid}")

    # -- access tokens -------------------------------------------------------------------

    def access_token(self, grant: Grant, *, sid: str | None) -> tuple[str, dict[str, Any]]:
        """A signed access token for the grant, and its claims (jti, exp for revocation)."""
        now = int(time.time())
        extra: dict[str, Any] = {
            "amr": list(grant.amr),
            "scope": grant.scope,
            "jti": secrets.token_hex(16),
            "iat": now,
            "nbf": now,
            "exp": now + self.access_ttl,
        }
        if sid is not None:
            extra["sid"] = sid
        if grant.client_id is not None:
            extra["client_id"] = grant.client_id
        token = keys.mint_token(
            self._signing_key(),
            issuer=self.issuer,
            audience=self.audience,
            subject=grant.subject,
            roles=list(grant.roles),
            ttl_seconds=self.access_ttl,
            extra_claims=extra,
        )
        return token, extra

    async def revoke_access_token(self, jti: str, expires_at: float) -> None:
        """Denylist a token id until the token would have expired anyway."""
        remaining = expires_at - time.time()
        if remaining > 0:
            await self.state.set(f"revoked-jti:{jti}", "1", remaining + 60.0)

    async def is_revoked(self, jti: str | None, sid: str | None) -> bool:
        """Whether an access token was revoked (its jti) or its session has ended (its sid)."""
        if jti is not None and await self.state.get(f"revoked-jti:{jti}") is not None:
            return True
        return sid is not None and await self.state.get(f"session:{sid}") is None

    # -- token responses -----------------------------------------------------------------

    async def token_response(self, grant: Grant, session: Session | None) -> dict[str, Any]:
        """RFC 6749 section 5.1: the access token, and a refresh token when there is a session."""
        token, _claims = self.access_token(grant, sid=session.sid if session else None)
        body: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.access_ttl,
        }
        if grant.scope:
            body["scope"] = grant.scope
        if session is not None:
            body["refresh_token"] = await self._new_refresh_token(session)
        return body

    async def _new_refresh_token(self, session: Session) -> str:
        token = _REFRESH_PREFIX + secrets.token_urlsafe(32)
        ttl = min(self.refresh_ttl, session.expires_at - time.time())
        record = json.dumps({"sid": session.sid})
        await self.state.set(f"refresh:{_digest(token)}", record, max(ttl, 1.0))
        return token

    async def use_refresh_token(self, token: str) -> Session:
        """Spend a refresh token: its live session, or RefreshError (reuse revokes the family)."""
        if not token.startswith(_REFRESH_PREFIX) or len(token) > 128:  # noqa: PLR2004 - far above 48
            raise RefreshError("auth.invalid_grant", "the refresh token is not valid")
        digest = _digest(token)
        record = await self.state.get(f"refresh:{digest}")
        if record is None:
            raise RefreshError("auth.invalid_grant", "the refresh token is not valid")
        sid = json.loads(record)["sid"]
        first_use = await self.state.set_if_absent(
            f"refresh-used:{digest}", "1", float(self.refresh_ttl)
        )
        if not first_use:
            await self.end_session(sid)
            raise RefreshError("auth.refresh_reused", "the refresh token was already used", sid=sid)
        session = await self.session(sid)
        if session is None:
            raise RefreshError("auth.invalid_grant", "the session has ended", sid=sid)
        return session

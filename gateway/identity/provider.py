"""The login logic shared by the token endpoint and the browser form: who may have a token.

Every path through here costs one argon2 verification (a dummy one for an unknown user), is
checked against the brute-force limits before any password is looked at, and leaves its
outcome in the request context for the one audit event the pipeline writes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import structlog

from gateway.identity import mfa
from gateway.identity.accounts import StoreLocked
from gateway.identity.bruteforce import Throttled
from gateway.identity.passwords import validate_username
from gateway.identity.tokens import Grant
from gateway.pipeline import Denial

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.config import IdentityConfig
    from gateway.identity.accounts import AccountStore, SharedAccounts, User
    from gateway.identity.bruteforce import LoginGuard
    from gateway.identity.mfa import SecretBox, TotpVerifier
    from gateway.identity.passwords import Passwords
    from gateway.identity.tokens import TokenService
    from gateway.pipeline import RequestContext

log = structlog.get_logger("gateway.identity")
T = TypeVar("T")

# RFC 8176 authentication method references.
AMR_PASSWORD = ("pwd",)
AMR_PASSWORD_OTP = ("pwd", "otp", "mfa")
AMR_PASSWORD_RECOVERY = ("pwd", "mfa")
AMR_CLIENT = ("client_secret",)
MFA_ENROLL_SCOPE = "mfa_enroll"
_ATTEMPTED_MAX = 64


@dataclass
class IdentityProvider:
    """Accounts, password checks, MFA and token issuance, wired from config at start-up."""

    config: IdentityConfig
    accounts: SharedAccounts
    passwords: Passwords
    tokens: TokenService
    guard: LoginGuard
    totp: TotpVerifier
    totp_box: SecretBox
    session_box: SecretBox

    async def account_op(self, operation: Callable[[AccountStore], T]) -> T:
        """Run an account-store operation in a worker thread (the store opens per operation).

        A store held elsewhere for longer than the wait is an outage, not a bug: 503.
        """
        try:
            return await asyncio.to_thread(self.accounts.run, operation)
        except StoreLocked:
            log.exception("identity.store_locked")
            raise Denial("auth.unavailable", "sign-in is unavailable; try again later") from None

    async def login(
        self, ctx: RequestContext, username: str, password: str, code: str | None
    ) -> Grant:
        """A person's password (and second factor): the grant, or Denial."""
        ctx.event = "auth.login"
        ctx.attempted = username[:_ATTEMPTED_MAX] if _is_plausible(username) else "<invalid>"
        ip = ctx.request.remote or "-"
        await self._check_guard(ctx, username, ip)
        user = None
        if _is_plausible(username):
            user = await self.account_op(lambda store: store.get_user(username))
        if user is None:
            await asyncio.to_thread(self.passwords.verify_dummy, password)
            await self._failed(ctx, username, ip, "auth.invalid_grant")
        assert user is not None  # noqa: S101 - _failed always raises; this informs mypy
        ok, upgrade = await asyncio.to_thread(
            self.passwords.check, user.hash_scheme, user.password_hash, password
        )
        if not ok or user.status != "active":
            await self._failed(ctx, username, ip, "auth.invalid_grant")
        if upgrade:
            await self._upgrade_hash(user.username, password)
        grant = await self._second_factor(ctx, user, code, ip)
        await self.guard.succeeded(username, ip)
        return grant

    async def _second_factor(
        self, ctx: RequestContext, user: User, code: str | None, ip: str
    ) -> Grant:
        roles = user.roles
        if user.mfa_state == "enabled":
            if not code:
                raise Denial("auth.mfa_required", "a one-time code is required", mfa_required=True)
            amr = await self._verify_code(ctx, user, code, ip)
            return Grant(subject=user.username, roles=roles, amr=amr, scope="emp")
        if self.config.mfa.enforced and set(roles) & set(self.config.mfa.enforced_roles):
            # MFA is required for this user's roles but not set up yet: a token that can only
            # enrol (no roles, so the policy grants nothing) and says so in its scope.
            ctx.detail["mfa"] = "enrolment_required"
            return Grant(subject=user.username, roles=(), amr=AMR_PASSWORD, scope=MFA_ENROLL_SCOPE)
        return Grant(subject=user.username, roles=roles, amr=AMR_PASSWORD, scope="emp")

    async def _verify_code(
        self, ctx: RequestContext, user: User, code: str, ip: str
    ) -> tuple[str, ...]:
        recovery = mfa.normalise_recovery_code(code)
        if recovery is not None:
            digest = mfa.recovery_code_hash(recovery)
            if await self.account_op(
                lambda store: store.consume_recovery_hash(user.username, digest)
            ):
                ctx.detail["mfa"] = "recovery_code"
                return AMR_PASSWORD_RECOVERY
        elif user.mfa_secret_sealed is not None:
            secret = self.totp_box.open(user.mfa_secret_sealed, context=totp_context(user.username))
            if await self.totp.verify(user.username, secret.decode(), code):
                return AMR_PASSWORD_OTP
        ctx.event = "auth.mfa_failure"
        await self._failed(ctx, user.username, ip, "auth.mfa_failed")
        raise AssertionError  # unreachable: _failed raises

    async def client(self, ctx: RequestContext, client_id: str, secret: str) -> Grant:
        """An ingest process's client credentials: the grant, or Denial(auth.invalid_client)."""
        from gateway.identity.manage import verify_client  # noqa: PLC0415 - avoids a cycle

        ctx.event = "auth.client_login"
        ctx.attempted = client_id[:_ATTEMPTED_MAX] if _is_plausible(client_id) else "<invalid>"
        ip = ctx.request.remote or "-"
        await self._check_guard(ctx, f"client:{client_id}", ip)
        found = None
        if _is_plausible(client_id):
            found = await self.account_op(
                lambda store: verify_client(store, self.passwords, client_id, secret)
            )
        if found is None or found.status != "active":
            await self._failed(ctx, f"client:{client_id}", ip, "auth.invalid_client")
        assert found is not None  # noqa: S101 - _failed always raises
        await self.guard.succeeded(f"client:{client_id}", ip)
        return Grant(
            subject=found.client_id, roles=found.roles, amr=AMR_CLIENT, scope="emp",
            client_id=found.client_id, kind="client",
        )  # fmt: skip

    async def current_grant(self, grant: Grant) -> Grant | None:
        """The grant re-read from the accounts at refresh: None when the user is gone/disabled."""
        user = await self.account_op(lambda store: store.get_user(grant.subject))
        if user is None or user.status != "active":
            return None
        if grant.scope == MFA_ENROLL_SCOPE and user.mfa_state != "enabled":
            return grant  # still only allowed to enrol
        if grant.scope == MFA_ENROLL_SCOPE:
            return None  # enrolled since: log in again with the second factor
        return Grant(grant.subject, user.roles, grant.amr, grant.scope, grant.client_id, grant.kind)

    async def _check_guard(self, ctx: RequestContext, account: str, ip: str) -> None:
        try:
            await self.guard.check(account, ip)
        except Throttled as throttled:
            if throttled.reason_id == "auth.locked_out":
                ctx.event = "auth.lockout"
            raise Denial(
                throttled.reason_id,
                "too many attempts; try again later",
                retry_after=throttled.retry_after,
            ) from None

    async def _failed(self, ctx: RequestContext, account: str, ip: str, reason_id: str) -> None:
        locked = await self.guard.failed(account, ip)
        if locked:
            ctx.event = "auth.lockout"
            ctx.detail["lockout"] = True
        messages = {
            "auth.invalid_grant": "the username or password is wrong",
            "auth.invalid_client": "client authentication failed",
            "auth.mfa_failed": "the one-time code is wrong or was already used",
        }
        raise Denial(reason_id, messages[reason_id])

    async def _upgrade_hash(self, username: str, password: str) -> None:
        new_hash = await asyncio.to_thread(self.passwords.hash, password)
        await self.account_op(
            lambda store: store.update_password_hash(username, new_hash, "argon2id")
        )
        log.info("identity.password_rehashed", username=username)


def totp_context(username: str) -> str:
    """The AAD binding a sealed TOTP secret to its user (a row copied elsewhere won't open)."""
    return "totp:" + username.casefold()


def _is_plausible(name: str) -> bool:
    try:
        validate_username(name)
    except ValueError:
        return False
    return True

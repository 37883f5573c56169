"""Identity in operation: MFA enforced for admins, a route that needs MFA by policy, account
changes while the gateway runs, and the whole flow on a real Redis as the shared state."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack

import pyotp
import pytest
from support.identity import (
    PASSWORDS,
    browser_login,
    claims_of,
    cookies_from,
    copy_policies,
    start_identity_gateway,
)
from support.redis_server import redis_server_process

from gateway.identity.accounts import AccountStore
from gateway.testing import read_audit_events


async def api(gateway, session, method, path, token=None, **kwargs):
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with session.request(method, gateway.url(path), headers=headers, **kwargs) as r:
        return r.status, (await r.json() if r.status != 204 else {})


@pytest.fixture(scope="module")
def mfa_gateway(stack, tmp_path_factory):
    """MFA enforced for admins, and deleting a department needs MFA by policy."""
    root = tmp_path_factory.mktemp("mfa")
    policies = copy_policies(root / "policies")
    data = json.loads((policies / "data.json").read_text())
    data["mfa"]["required"] = {"departments": ["delete"]}
    (policies / "data.json").write_text(json.dumps(data))
    with ExitStack() as processes:
        gateway = start_identity_gateway(
            processes, root / "gw", upstream_port=stack.upstream_port,
            upstream_secret=stack.secret, identity="mfa.enforced = true\nsessions.revalidate_seconds = 0.5",
            policy_dir=policies,
        )  # fmt: skip
        yield gateway


async def test_admin_mfa_flow_completes_when_enforced(mfa_gateway):
    """root (admin) must enrol first; with a code the admin token works, also on MFA routes."""
    gw = mfa_gateway
    async with gw.session() as session:
        status, limited = await gw.login(session, "root")
        assert status == 200
        claims = claims_of(limited["access_token"])
        assert (claims["roles"], claims["scope"]) == ([], "mfa_enroll")
        status, refused = await api(gw, session, "GET", "/api/departments", limited["access_token"])
        assert (status, refused["reason_id"]) == (403, "authz.denied")

        status, enrol = await api(gw, session, "POST", "/auth/mfa/enroll", limited["access_token"])
        assert status == 200
        totp = pyotp.TOTP(enrol["secret"])
        first = totp.now()
        status, _ = await api(
            gw, session, "POST", "/auth/mfa/confirm", limited["access_token"], json={"code": first}
        )
        assert status == 200
        while totp.now() == first:  # noqa: ASYNC110 - waiting for the clock
            await asyncio.sleep(0.25)
        status, full = await gw.login(session, "root", otp=totp.now())
        assert status == 200, full
        claims = claims_of(full["access_token"])
        assert claims["roles"] == ["admin"]
        assert "mfa" in claims["amr"]
        token = full["access_token"]
        status, created = await api(
            gw, session, "POST", "/api/departments", token, json={"name": "MFA-Dept"}
        )
        assert status == 201, created
        status, _ = await api(gw, session, "DELETE", f"/api/departments/{created['id']}", token)
        assert status == 204


async def test_policy_requires_mfa_for_a_route(mfa_gateway):
    """An admin token without MFA may read departments but not delete one: mfa.required."""
    gw = mfa_gateway
    password_only = gw.mint("someone", ("admin",))  # amr ["dev"]: no second factor
    async with gw.session() as session:
        status, _ = await api(gw, session, "GET", "/api/departments", password_only)
        assert status == 200
        status, refused = await api(gw, session, "DELETE", "/api/departments/1", password_only)
    assert (status, refused["reason_id"]) == (403, "authz.denied")
    [event] = read_audit_events(gw.audit_file, refused["request_id"])
    assert event["reasons"] == ["mfa.required"]


async def test_accounts_change_while_the_gateway_runs(mfa_gateway):
    """`users add` and `users disable` work against a running gateway and take effect at once."""
    gw = mfa_gateway
    added = gw.cli("users", "add", "carol", "--role", "reader", "--password-stdin",
                   stdin="carol's long password\n")  # fmt: skip
    assert added.returncode == 0, added.stderr
    async with gw.session() as session:
        form = {"grant_type": "password", "username": "carol", "password": "carol's long password"}
        status, tokens, _ = await gw.token(session, form)
        assert status == 200, tokens
        disabled = gw.cli("users", "disable", "carol")
        assert disabled.returncode == 0, disabled.stderr
        status, refused, _ = await gw.token(session, form)
        assert (status, refused["reason_id"]) == (400, "auth.invalid_grant")
        refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        status, dead, _ = await gw.token(session, refresh)
        assert (status, dead["reason_id"]) == (400, "auth.invalid_grant")
    listed = gw.cli("users", "list", "--json")
    assert {"username": "carol", "status": "disabled"}.items() <= next(
        u for u in json.loads(listed.stdout) if u["username"] == "carol"
    ).items()
    kinds = [e["kind"] for e in read_audit_events(gw.audit_file)]
    assert "account.user_added" in kinds
    assert "account.user_disabled" in kinds


async def test_a_browser_session_follows_account_changes(mfa_gateway):
    """New roles reach a live cookie session, and disabling the user ends it."""
    gw = mfa_gateway
    added = gw.cli("users", "add", "dave", "--role", "reader", "--password-stdin",
                   stdin="dave's long password\n")  # fmt: skip
    assert added.returncode == 0, added.stderr
    async with gw.session() as session:
        status, body, response = await browser_login(gw, session, "dave", "dave's long password")
        assert status == 200, body
        cookie = {"Cookie": f"__Host-emp_session={cookies_from(response)['__Host-emp_session']}"}
        assert gw.cli("users", "set-roles", "dave", "--role", "reader", "--role",
                      "ingest_process").returncode == 0  # fmt: skip
        await asyncio.sleep(0.6)
        status, who = await api(gw, session, "GET", "/auth/session", headers=cookie)
        assert (status, who["roles"]) == (200, ["reader", "ingest_process"])
        assert gw.cli("users", "disable", "dave").returncode == 0
        await asyncio.sleep(0.6)
        status, refused = await api(gw, session, "GET", "/api/tickets", headers=cookie)
        assert (status, refused["reason_id"]) == (401, "authn.revoked")


@pytest.fixture(scope="module")
def redis_gateway(stack, tmp_path_factory):
    """The identity state (sessions, denylist, replay guards, login limits) in a real Redis."""
    root = tmp_path_factory.mktemp("redis-idp")
    with redis_server_process(root / "redis") as server, ExitStack() as processes:
        gateway = start_identity_gateway(
            processes, root / "gw", upstream_port=stack.upstream_port,
            upstream_secret=stack.secret, identity=f'state_url = "{server.url}"',
        )  # fmt: skip
        yield gateway, server


async def test_redis_state_refresh_reuse_logout_and_brute_force(redis_gateway):
    """On Redis: rotation and reuse detection, logout revocation and the brute-force limit."""
    gw, _server = redis_gateway
    async with gw.session() as session:
        _, first = await gw.login(session, "alice")
        refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
        status, second, _ = await gw.token(session, refresh)
        assert status == 200
        status, reused, _ = await gw.token(session, refresh)
        assert reused["reason_id"] == "auth.refresh_reused"
        status, dead = await api(gw, session, "GET", "/api/tickets", second["access_token"])
        assert (status, dead["reason_id"]) == (401, "authn.revoked")

        _, fresh = await gw.login(session, "bob")
        status, _ = await api(gw, session, "POST", "/auth/logout", fresh["access_token"])
        assert status == 200
        status, revoked = await api(gw, session, "GET", "/api/tickets", fresh["access_token"])
        assert (status, revoked["reason_id"]) == (401, "authn.revoked")

    async with gw.session(local_ip="127.0.0.20") as attacker:
        form = {"grant_type": "password", "username": "root", "password": "nope"}
        statuses = [(await gw.token(attacker, form))[0] for _ in range(40)]
    assert statuses.count(400) <= 5
    assert statuses[-1] == 429


async def test_redis_outage_fails_closed(redis_gateway):
    """With Redis down nobody signs in and built-in tokens are refused: 503, never a pass."""
    gw, server = redis_gateway
    async with gw.session(local_ip="127.0.0.21") as session:
        _, tokens = await gw.login(session, "alice")
        server.stop()
        try:
            status, body = await gw.login(session, "alice")
            assert (status, body["reason_id"]) == (503, "auth.unavailable")
            status, body = await api(gw, session, "GET", "/api/tickets", tokens["access_token"])
            assert (status, body["reason_id"]) == (503, "auth.unavailable")
        finally:
            server.start()
        deadline = time.monotonic() + 5
        while True:
            status, body = await gw.login(session, "alice")
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert status == 200, body
    assert PASSWORDS["alice"] not in gw.audit_file.read_text()


async def test_password_change_mfa_reset_and_client_disable_from_the_cli(mfa_gateway):
    """set-password, reset-mfa and clients disable act on a running gateway at once."""
    gw = mfa_gateway
    assert gw.cli("users", "add", "gina", "--role", "reader", "--password-stdin",
                  stdin="gina's first password\n").returncode == 0  # fmt: skip
    changed = gw.cli("users", "set-password", "gina", "--password-stdin",
                     stdin="gina's second password\n")  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    weak = gw.cli("users", "set-password", "gina", "--password-stdin", stdin="short\n")
    assert weak.returncode == 2
    assert "short" not in weak.stderr.replace("too short", "")
    async with gw.session() as session:
        old = {"grant_type": "password", "username": "gina", "password": "gina's first password"}
        assert (await gw.token(session, old))[0] == 400
        new = {**old, "password": "gina's second password"}
        status, tokens, _ = await gw.token(session, new)
        assert status == 200

        status, enrol = await api(gw, session, "POST", "/auth/mfa/enroll", tokens["access_token"])
        code = pyotp.TOTP(enrol["secret"]).now()
        status, _ = await api(gw, session, "POST", "/auth/mfa/confirm", tokens["access_token"],
                              json={"code": code})  # fmt: skip
        assert status == 200
        assert (await gw.token(session, new))[1]["reason_id"] == "auth.mfa_required"
        assert gw.cli("users", "reset-mfa", "gina").returncode == 0
        assert (await gw.token(session, new))[0] == 200

        secret = gw.client_secrets["ingest-1"]
        form = {"grant_type": "client_credentials", "client_id": "ingest-1",
                "client_secret": secret}  # fmt: skip
        assert (await gw.token(session, form))[0] == 200
        assert gw.cli("clients", "disable", "ingest-1").returncode == 0
        status, refused, _ = await gw.token(session, form)
        assert (status, refused["reason_id"]) == (401, "auth.invalid_client")
        assert gw.cli("clients", "enable", "ingest-1").returncode == 0
        assert (await gw.token(session, form))[0] == 200
    kinds = {e["kind"] for e in read_audit_events(gw.audit_file)}
    assert {"account.password_changed", "account.mfa_reset", "account.client_disabled"} <= kinds


async def test_a_store_held_elsewhere_is_a_503_not_a_crash(mfa_gateway):
    """If something holds the account store past the wait, logins fail closed with 503."""
    gw = mfa_gateway
    with AccountStore.open(gw.root / "identity.duckdb"):
        async with gw.session(local_ip="127.0.0.30") as session:
            status, body = await gw.login(session, "alice")
    assert (status, body["reason_id"], body["error"]) == (
        503, "auth.unavailable", "temporarily_unavailable"
    )  # fmt: skip

"""The built-in identity provider end to end: OAuth2 grants, refresh rotation and reuse,
logout and revocation, the browser login with its cookie and CSRF, MFA enrolment and use,
brute-force limits and key rotation — over real TLS against a running gateway."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack

import jwt
import pyotp
import pytest
from support.identity import (
    PASSWORDS,
    basic,
    browser_login,
    claims_of,
    cookies_from,
    start_identity_gateway,
)

from gateway.testing import read_audit_events, wait_for_audit_events


@pytest.fixture(scope="module")
def idp(stack, tmp_path_factory):
    """One gateway with alice (reader), root (admin), bob (reader) and client ingest-1."""
    with ExitStack() as processes:
        yield start_identity_gateway(
            processes,
            tmp_path_factory.mktemp("idp"),
            upstream_port=stack.upstream_port,
            upstream_secret=stack.secret,
            # Many tests sign in from 127.0.0.1: keep the per-address limit out of their way
            # (the brute-force test meets the per-account-and-address limit first anyway).
            identity='login_limits.per_ip = ["300/minute", "3000/hour"]',
        )


def events(gateway, request_id):
    return wait_for_audit_events(gateway.audit_file, request_id)


async def api(gateway, session, method, path, token=None, **kwargs):
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with session.request(method, gateway.url(path), headers=headers, **kwargs) as r:
        return r.status, await r.json()


async def test_discovery_names_the_endpoints_and_the_active_key(idp):
    """The OIDC discovery document points at this issuer's JWKS and token endpoint."""
    async with idp.session() as session:
        async with session.get(idp.url("/.well-known/openid-configuration")) as r:
            assert r.status == 200
            document = await r.json()
        async with session.get(idp.url("/.well-known/jwks.json")) as r:
            jwks = await r.json()
    assert document["issuer"] == "https://localhost:8443"
    assert document["token_endpoint"].endswith("/oauth/token")
    assert set(document["grant_types_supported"]) == {
        "password", "client_credentials", "refresh_token"
    }  # fmt: skip
    assert all("d" not in key for key in jwks["keys"])
    assert len(jwks["keys"]) >= 1


async def test_password_grant_issues_a_short_lived_token_with_every_claim(idp):
    """alice's password gives a 15-minute token with sub, roles, scope, jti, amr, sid."""
    async with idp.session() as session:
        status, body = await idp.login(session, "alice")
        assert status == 200, body
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 900
        assert body["refresh_token"].startswith("ert1_")
        claims = claims_of(body["access_token"])
        for name in ("sub", "roles", "scope", "iss", "aud", "exp", "iat", "jti", "amr", "sid"):
            assert name in claims, name
        assert claims["sub"] == "alice"
        assert claims["roles"] == ["reader"]
        assert claims["amr"] == ["pwd"]
        assert claims["exp"] - claims["iat"] == 900
        status, _ = await api(idp, session, "GET", "/api/tickets", body["access_token"])
        assert status == 200
        status, refused = await api(idp, session, "DELETE", "/api/tickets/1", body["access_token"])
        assert (status, refused["reason_id"]) == (403, "authz.denied")


@pytest.mark.parametrize(
    ("username", "password"),
    [("alice", "wrong password entirely"), ("nobody", "whatever it is"), ("ALICE", "nope nope")],
    ids=["wrong_password", "unknown_user", "case_variant_wrong_password"],
)
async def test_a_failed_login_reveals_nothing_and_is_audited(idp, username, password):
    """Unknown users and wrong passwords get the same RFC 6749 error; the audit names the try."""
    form = {"grant_type": "password", "username": username, "password": password}
    async with idp.session(local_ip="127.0.0.5") as session:
        status, body, response = await idp.token(session, form)
    assert status == 400
    assert body["error"] == "invalid_grant"
    assert body["reason_id"] == "auth.invalid_grant"
    assert body["error_description"] == "the username or password is wrong"
    assert response.headers["Cache-Control"] == "no-store"
    [event] = events(idp, body["request_id"])
    assert event["kind"] == "auth.login"
    assert event["reason_id"] == "auth.invalid_grant"
    assert event["detail"]["attempted"] == username
    assert password not in json.dumps(event)


@pytest.mark.parametrize(
    ("form", "reason_id", "error"),
    [
        ({}, "auth.invalid_request", "invalid_request"),
        ({"grant_type": "implicit"}, "auth.unsupported_grant_type", "unsupported_grant_type"),
        ({"grant_type": "password", "username": "alice"}, "auth.invalid_request",
         "invalid_request"),
        ({"grant_type": "password", "username": "alice", "password": "x", "scope": "admin"},
         "auth.invalid_scope", "invalid_scope"),
        ({"grant_type": "refresh_token", "refresh_token": "ert1_forged"}, "auth.invalid_grant",
         "invalid_grant"),
        ({"grant_type": "client_credentials"}, "auth.invalid_client", "invalid_client"),
    ],
    ids=["no_grant", "unsupported", "no_password", "bad_scope", "forged_refresh", "no_client"],
)  # fmt: skip
async def test_malformed_token_requests_get_rfc6749_errors(idp, form, reason_id, error):
    """Each malformed request names its OAuth error and our reason id."""
    async with idp.session(local_ip="127.0.0.6") as session:
        status, body, _ = await idp.token(session, form)
    assert body["error"] == error
    assert body["reason_id"] == reason_id
    assert status == (401 if error == "invalid_client" else 400)
    assert len(events(idp, body["request_id"])) == 1


async def test_token_endpoint_refuses_json_and_repeated_parameters(idp):
    """RFC 6749 wants a form, each parameter once: anything else is invalid_request."""
    async with idp.session() as session:
        async with session.post(idp.url("/oauth/token"), json={"grant_type": "password"}) as r:
            assert (r.status, (await r.json())["reason_id"]) == (400, "auth.invalid_request")
        body = "grant_type=password&username=alice&username=root&password=x"
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        async with session.post(idp.url("/oauth/token"), data=body, headers=headers) as r:
            answer = await r.json()
    assert (r.status, answer["reason_id"]) == (400, "auth.invalid_request")
    assert "repeated" in answer["error_description"]


async def test_refresh_rotates_and_a_reused_refresh_token_revokes_the_family(idp):
    """A refresh token works once; replaying it kills every token of that login."""
    async with idp.session() as session:
        _, first = await idp.login(session, "bob")
        refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
        status, second, _ = await idp.token(session, refresh)
        assert status == 200
        assert second["refresh_token"] != first["refresh_token"]
        assert claims_of(second["access_token"])["sid"] == claims_of(first["access_token"])["sid"]
        status, _ = await api(idp, session, "GET", "/api/tickets", second["access_token"])
        assert status == 200

        status, reused, _ = await idp.token(session, refresh)  # the thief (or the victim) again
        assert (status, reused["reason_id"], reused["error"]) == (
            400, "auth.refresh_reused", "invalid_grant"
        )  # fmt: skip
        [event] = events(idp, reused["request_id"])
        assert event["kind"] == "auth.refresh_reuse"

        newest = {"grant_type": "refresh_token", "refresh_token": second["refresh_token"]}
        status, dead, _ = await idp.token(session, newest)
        assert (status, dead["reason_id"]) == (400, "auth.invalid_grant")
        status, revoked = await api(idp, session, "GET", "/api/tickets", second["access_token"])
        assert (status, revoked["reason_id"]) == (401, "authn.revoked")


async def test_client_credentials_for_an_ingest_process(idp):
    """The client's secret, by Basic or in the form, gives a token with its roles, no refresh."""
    secret = idp.client_secrets["ingest-1"]
    async with idp.session() as session:
        status, body, _ = await idp.token(
            session, {"grant_type": "client_credentials"},
            headers={"Authorization": basic("ingest-1", secret)},
        )  # fmt: skip
        assert status == 200, body
        assert "refresh_token" not in body
        claims = claims_of(body["access_token"])
        assert (claims["sub"], claims["roles"], claims["client_id"]) == (
            "ingest-1", ["ingest_process"], "ingest-1"
        )  # fmt: skip
        form = {"grant_type": "client_credentials", "client_id": "ingest-1",
                "client_secret": secret}  # fmt: skip
        status, _, _ = await idp.token(session, form)
        assert status == 200
        status, reader = await api(idp, session, "GET", "/api/tickets", body["access_token"])
        assert (status, reader["reason_id"]) == (403, "authz.denied")

        wrong = {**form, "client_secret": secret[:-1] + ("A" if secret[-1] != "A" else "B")}
        status, refused, response = await idp.token(session, wrong)
        assert (status, refused["error"]) == (401, "invalid_client")
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        both = await idp.token(session, form, headers={"Authorization": basic("ingest-1", secret)})
        assert both[1]["reason_id"] == "auth.invalid_request"


async def test_logout_revokes_the_access_token_and_the_refresh_family(idp):
    """After logout the same access token is 401 authn.revoked and the refresh token is dead."""
    async with idp.session() as session:
        _, tokens = await idp.login(session, "alice")
        access = tokens["access_token"]
        status, body = await api(idp, session, "POST", "/auth/logout", access)
        assert (status, body["status"]) == (200, "signed_out")
        [event] = events(idp, (await _request_id_of_last(idp, "auth.logout")))
        assert event["subject"] == "alice"
        status, refused = await api(idp, session, "GET", "/api/tickets", access)
        assert (status, refused["reason_id"]) == (401, "authn.revoked")
        refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        status, dead, _ = await idp.token(session, refresh)
        assert (status, dead["reason_id"]) == (400, "auth.invalid_grant")


async def _request_id_of_last(gateway, kind):
    await asyncio.sleep(0.05)
    found = [e for e in read_audit_events(gateway.audit_file) if e["kind"] == kind]
    return found[-1]["request_id"]


async def test_browser_login_sets_a_hardened_cookie_that_acts_as_the_user(idp):
    """The session cookie is HttpOnly, Secure, SameSite=Strict, encrypted, and works for reads."""
    async with idp.session() as session:
        status, body, response = await browser_login(idp, session)
        assert status == 200, body
        [header] = [h for h in response.headers.getall("Set-Cookie") if "emp_session" in h]
        for attribute in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
            assert attribute.lower() in header.lower(), attribute
        value = cookies_from(response)["__Host-emp_session"]
        assert "alice" not in value  # sealed, not a readable token
        cookie = {"Cookie": f"__Host-emp_session={value}"}
        status, who = await api(idp, session, "GET", "/auth/session", headers=dict(cookie))
        assert (status, who["sub"], who["csrf_token"]) == (200, "alice", body["csrf_token"])
        status, _ = await api(idp, session, "GET", "/api/tickets", headers=dict(cookie))
        assert status == 200
        tampered = value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB")
        status, refused = await api(
            idp, session, "GET", "/api/tickets",
            headers={"Cookie": f"__Host-emp_session={tampered}"},
        )  # fmt: skip
        assert (status, refused["reason_id"]) == (401, "authn.malformed")


@pytest.mark.parametrize(
    ("headers", "reason_id"),
    [
        ({}, "csrf.missing"),
        ({"X-CSRF-Token": "not-the-token"}, "csrf.mismatch"),
        ({"X-CSRF-Token": "<token>", "Origin": "https://evil.example"}, "csrf.cross_origin"),
        ({"X-CSRF-Token": "<token>", "Sec-Fetch-Site": "cross-site"}, "csrf.cross_origin"),
    ],
    ids=["missing", "wrong", "foreign_origin", "cross_site_fetch"],
)
async def test_a_cookie_post_without_the_right_csrf_token_is_refused(idp, headers, reason_id):
    """Every state-changing cookie request needs the session's token from the same origin."""
    async with idp.session() as session:
        _, body, response = await browser_login(idp, session)
        cookie = f"__Host-emp_session={cookies_from(response)['__Host-emp_session']}"
        sent = {k: (body["csrf_token"] if v == "<token>" else v) for k, v in headers.items()}
        status, refused = await api(
            idp, session, "POST", "/auth/logout", headers={"Cookie": cookie, **sent}
        )
        assert (status, refused["reason_id"]) == (403, reason_id)
        assert len(events(idp, refused["request_id"])) == 1
        # The session is still alive: the refused logout did nothing.
        status, _ = await api(idp, session, "GET", "/auth/session", headers={"Cookie": cookie})
        assert status == 200


async def test_cookie_logout_with_the_token_ends_the_session(idp):
    """With the CSRF token the logout works, clears the cookie, and the old cookie is dead."""
    async with idp.session() as session:
        _, body, response = await browser_login(idp, session)
        cookie = f"__Host-emp_session={cookies_from(response)['__Host-emp_session']}"
        headers = {"Cookie": cookie, "X-CSRF-Token": body["csrf_token"]}
        async with session.post(idp.url("/auth/logout"), headers=headers) as r:
            assert r.status == 200
            assert cookies_from(r).get("__Host-emp_session", "") == ""
        status, refused = await api(idp, session, "GET", "/api/tickets", headers={"Cookie": cookie})
        assert (status, refused["reason_id"]) == (401, "authn.revoked")


async def test_login_form_needs_its_csrf_pair(idp):
    """A login POST without the form's cookie/field pair is refused before any password check."""
    async with idp.session() as session:
        form = {"username": "alice", "password": PASSWORDS["alice"], "csrf_token": "x" * 43}
        async with session.post(
            idp.url("/auth/login"), data=form, headers={"Accept": "text/html"}
        ) as r:
            text = await r.text()
        assert r.status == 403
        assert "csrf.mismatch" in text
        assert r.headers["Content-Type"].startswith("text/html")


async def test_mfa_enrolment_then_login_with_codes_replay_and_recovery(idp):
    """bob enrols TOTP; then a login needs a code, a code works once, a recovery code once."""
    async with idp.session(local_ip="127.0.0.7") as session:
        _, tokens = await idp.login(session, "bob")
        access = tokens["access_token"]
        status, enrol = await api(idp, session, "POST", "/auth/mfa/enroll", access)
        assert status == 200
        assert enrol["otpauth_uri"].startswith("otpauth://totp/")
        assert enrol["qr_svg"].lstrip().startswith("<svg")
        totp = pyotp.TOTP(enrol["secret"])
        status, wrong = await api(
            idp, session, "POST", "/auth/mfa/confirm", access, json={"code": "000000"}
        )
        if totp.now() != "000000":
            assert (status, wrong["reason_id"]) == (400, "auth.mfa_failed")
        code = totp.now()
        status, confirmed = await api(
            idp, session, "POST", "/auth/mfa/confirm", access, json={"code": code}
        )
        assert status == 200, confirmed
        recovery = confirmed["recovery_codes"]
        assert len(set(recovery)) == 10

        status, needs = await idp.login(session, "bob")
        assert (status, needs["error"], needs["reason_id"]) == (401, "mfa_required",
                                                                 "auth.mfa_required")  # fmt: skip
        status, replay = await idp.login(session, "bob", otp=code)  # used to confirm already
        assert (status, replay["reason_id"]) == (400, "auth.mfa_failed")
        await _next_period(totp, code)
        fresh = totp.now()
        status, good = await idp.login(session, "bob", otp=fresh)
        assert status == 200, good
        assert set(claims_of(good["access_token"])["amr"]) == {"pwd", "otp", "mfa"}
        status, again = await idp.login(session, "bob", otp=fresh)
        assert (status, again["reason_id"]) == (400, "auth.mfa_failed")

        status, rescued = await idp.login(session, "bob", otp=recovery[0].upper())
        assert status == 200
        assert "mfa" in claims_of(rescued["access_token"])["amr"]
        status, spent = await idp.login(session, "bob", otp=recovery[0])
        assert (status, spent["reason_id"]) == (400, "auth.mfa_failed")
    kinds = [e["kind"] for e in read_audit_events(idp.audit_file) if e["subject"] == "bob"
             or e["detail"].get("attempted") == "bob"]  # fmt: skip
    assert "auth.mfa_failure" in kinds
    assert "auth.mfa_confirm" in kinds


async def _next_period(totp, used):
    while totp.now() == used:  # noqa: ASYNC110 - waiting for the clock, not for an event
        await asyncio.sleep(0.25)


async def test_brute_force_is_blocked_while_the_user_signs_in_from_elsewhere(idp):
    """Hundreds of guesses from one address end in 429 + Retry-After; alice, elsewhere, is fine."""
    form = {"grant_type": "password", "username": "alice", "password": "guess"}
    statuses = []
    async with idp.session(local_ip="127.0.0.9") as attacker:
        for i in range(300):
            status, body, response = await idp.token(attacker, {**form, "password": f"guess{i}"})
            statuses.append(status)
            if status == 429:
                assert int(response.headers["Retry-After"]) >= 1
                assert body["reason_id"] in {"auth.locked_out", "auth.rate_limited"}
                assert body["error"] == "slow_down"
        status, _ = await idp.login(attacker, "alice")  # even the right password, from there
        assert status == 429
    assert statuses.count(400) <= 5  # the first tier of the (account, address) limit
    assert statuses.count(429) >= 290
    async with idp.session(local_ip="127.0.0.10") as user:
        status, body = await idp.login(user, "alice")
    assert status == 200, body
    lockouts = [e for e in read_audit_events(idp.audit_file) if e["kind"] == "auth.lockout"]
    assert lockouts
    assert lockouts[0]["remote_addr"] == "127.0.0.9"
    metrics_url = f"http://127.0.0.1:{idp.admin_port}/metrics"
    async with idp.session() as session, session.get(metrics_url) as r:
        metrics = await r.text()
    assert 'gateway_auth_events_total{event="auth.login",outcome="failure"}' in metrics
    assert _sample(metrics, "gateway_login_lockouts_total") >= 1
    assert _sample(metrics, "gateway_signing_key_age_seconds") >= 0


async def test_key_rotation_keeps_tokens_in_flight_valid(idp):
    """After `keys rotate` old tokens still pass, new ones carry the new kid, both verify."""
    async with idp.session(local_ip="127.0.0.11") as session:
        _, before = await idp.login(session, "alice")
        old_kid = _kid(before["access_token"])
        planned = idp.cli("keys", "rotate", "--dry-run")
        assert planned.returncode == 0, planned.stderr
        ring = (idp.root / "keys" / "signing.jwks.json").read_bytes()
        assert (idp.root / "keys" / "signing.jwks.json").read_bytes() == ring
        rotated = idp.cli("keys", "rotate")
        assert rotated.returncode == 0, rotated.stderr
        new_kid = json.loads(rotated.stdout[: rotated.stdout.rindex("}") + 1])["active_kid"]
        assert new_kid != old_kid
        status, _ = await api(idp, session, "GET", "/api/tickets", before["access_token"])
        assert status == 200
        deadline = time.monotonic() + 6
        while True:
            _, after = await idp.login(session, "alice")
            if _kid(after["access_token"]) == new_kid or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert _kid(after["access_token"]) == new_kid
        for token in (before["access_token"], after["access_token"]):
            status, _ = await api(idp, session, "GET", "/api/tickets", token)
            assert status == 200
        async with session.get(idp.url("/.well-known/jwks.json")) as r:
            published = {key["kid"] for key in (await r.json())["keys"]}
        assert {old_kid, new_kid} <= published
    kinds = [e["kind"] for e in read_audit_events(idp.audit_file)]
    assert "keys.rotated" in kinds
    assert "keys.rotation_planned" in kinds
    assert "keys.reloaded" in kinds  # the running gateway noticed and said so


def _sample(metrics: str, name: str) -> float:
    [line] = [line for line in metrics.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


def _kid(token):
    return jwt.get_unverified_header(token)["kid"]

"""Authentication through the real gateway: every bad token is a 401 with its own reason id,
leaves one audit event with that reason id, and good tokens from each algorithm pass."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
import uuid

import aiohttp
import jwt
import pytest
from jwcrypto import jwk
from multidict import CIMultiDict
from support.stack import REPO, Stack, claims


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _alg_none(stack: Stack) -> str:
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims())}."


def _forged_with_other_key(stack: Stack) -> str:
    """Right kid and alg, signed by a key the IdP never published."""
    kid = stack.idp.key("RS256")["kid"]
    impostor = jwk.JWK.generate(kty="RSA", size=2048).export(private_key=True, as_dict=True)
    impostor.update(kid=kid, alg="RS256")
    return stack.idp.sign(claims(), key=impostor)


def _tampered_payload(stack: Stack) -> str:
    """A valid token whose payload was swapped for one claiming the admin role."""
    header, _payload, signature = stack.idp.sign(claims()).split(".")
    return f"{header}.{_b64(claims(roles=['admin']))}.{signature}"


def _hs256_with_public_key(stack: Stack) -> str:
    """The classic confusion attack: HMAC keyed with the RSA public key."""
    public_pem = jwk.JWK(**stack.idp.key("RS256")).export_to_pem()
    header = {"alg": "HS256", "kid": stack.idp.key("RS256")["kid"]}
    signing_input = f"{_b64(header)}.{_b64(claims(roles=['admin']))}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def _header_alg_mismatch(stack: Stack) -> str:
    """An EdDSA key's kid in a header that claims ES256, signed with an ES256 key."""
    ec_key = stack.idp.key("ES256")
    token = stack.idp.sign(claims(), key=ec_key)
    _header, payload, signature = token.split(".")
    forged_header = {"alg": "ES256", "kid": stack.idp.key("EdDSA")["kid"], "typ": "JWT"}
    return f"{_b64(forged_header)}.{payload}.{signature}"


def _embedded_jwk(stack: Stack) -> str:
    """A token carrying its own key in the header (CVE-2018-0114 style): the header key is ignored."""
    attacker = jwk.JWK.generate(kty="RSA", size=2048)
    private = attacker.export(private_key=True, as_dict=True)
    private.update(kid="attacker", alg="RS256")
    return stack.idp.sign(
        claims(roles=["admin"]), key=private, headers={"jwk": attacker.export_public(as_dict=True)}
    )


BAD_TOKENS = [
    ("garbage", lambda s: "not-a-jwt", "authn.malformed"),
    ("two_segments", lambda s: "abc.def", "authn.malformed"),
    ("alg_none", _alg_none, "authn.alg_not_allowed"),
    ("hs256_public_key_confusion", _hs256_with_public_key, "authn.alg_not_allowed"),
    ("header_alg_disagrees_with_key", _header_alg_mismatch, "authn.alg_not_allowed"),
    ("signed_by_another_key", _forged_with_other_key, "authn.bad_signature"),
    ("payload_tampered", _tampered_payload, "authn.bad_signature"),
    ("expired", lambda s: s.idp.sign(claims(exp=int(time.time()) - 600)), "authn.expired"),
    (
        "not_yet_valid",
        lambda s: s.idp.sign(claims(nbf=int(time.time()) + 600)),
        "authn.not_yet_valid",
    ),
    (
        "issued_in_future",
        lambda s: s.idp.sign(claims(iat=int(time.time()) + 600)),
        "authn.not_yet_valid",
    ),
    ("wrong_audience", lambda s: s.idp.sign(claims(aud="other-api")), "authn.wrong_audience"),
    (
        "untrusted_issuer",
        lambda s: s.idp.sign(claims(iss="https://evil.test")),
        "authn.wrong_issuer",
    ),
    ("no_issuer", lambda s: s.idp.sign(claims(iss=None)), "authn.missing_claim"),
    ("no_expiry", lambda s: s.idp.sign(claims(exp=None)), "authn.missing_claim"),
    ("no_issued_at", lambda s: s.idp.sign(claims(iat=None)), "authn.missing_claim"),
    ("no_audience", lambda s: s.idp.sign(claims(aud=None)), "authn.missing_claim"),
    ("no_subject", lambda s: s.idp.sign(claims(sub=None)), "authn.missing_claim"),
    (
        "unknown_kid",
        lambda s: s.idp.sign(claims(), headers={"kid": "no-such-key"}),
        "authn.unknown_kid",
    ),
    ("roles_not_a_list", lambda s: s.idp.sign(claims(roles="admin")), "authn.malformed"),
    (
        "crlf_in_subject",
        lambda s: s.idp.sign(claims(sub="alice\r\nX-Gateway-Roles: admin")),
        "authn.malformed",
    ),
    ("nul_in_role", lambda s: s.idp.sign(claims(roles=["admin\x00junk"])), "authn.malformed"),
    ("empty_role", lambda s: s.idp.sign(claims(roles=[""])), "authn.malformed"),
    ("comma_in_role", lambda s: s.idp.sign(claims(roles=["reader,admin"])), "authn.malformed"),
    ("oversized", lambda s: s.idp.sign(claims(pad="x" * 10_000)), "authn.malformed"),
    (
        "unknown_crit_extension",
        lambda s: s.idp.sign(claims(), headers={"crit": ["urn:x"], "urn:x": 1}),
        "authn.malformed",
    ),
    ("embedded_jwk_ignored", _embedded_jwk, "authn.unknown_kid"),
    (
        "alg_none_mixed_case",
        lambda s: f"{_b64({'alg': 'nOnE'})}.{_b64(claims())}.",
        "authn.alg_not_allowed",
    ),
]


@pytest.mark.parametrize(
    ("make_token", "reason_id"),
    [(m, r) for _, m, r in BAD_TOKENS],
    ids=[i for i, _, _ in BAD_TOKENS],
)
async def test_bad_token_is_401_with_its_reason_and_one_audit_event(
    stack, client, make_token, reason_id
):
    """Each kind of bad token gets 401, its own reason id, RFC 6750 header, one audit event."""
    token = make_token(stack)
    async with client.get(
        stack.url("/api/tickets"), headers={"Authorization": f"Bearer {token}"}
    ) as r:
        body = await r.json()
        assert r.status == 401
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert body["reason_id"] == reason_id
    assert set(body) >= {"error", "reason_id", "request_id"}
    events = stack.audit_for(body["request_id"])
    assert len(events) == 1
    assert events[0]["reason_id"] == reason_id
    assert events[0]["decision"] == "deny"
    assert token not in json.dumps(events[0])


@pytest.mark.parametrize(
    "header",
    [None, "Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer "],
    ids=["no_header", "basic_scheme", "bearer_without_token", "bearer_blank"],
)
async def test_missing_bearer_token_is_401(stack, client, header):
    """No bearer credential at all is authn.missing_token (or malformed when the scheme is empty)."""
    headers = {"Authorization": header} if header is not None else {}
    async with client.get(stack.url("/api/tickets"), headers=headers) as r:
        body = await r.json()
        assert r.status == 401
        challenge = r.headers["WWW-Authenticate"]
    expected = (
        "authn.malformed" if header and header.startswith("Bearer") else "authn.missing_token"
    )
    if expected == "authn.missing_token":
        # RFC 6750 section 3.1: without credentials, the challenge carries no error code.
        assert challenge == 'Bearer realm="emp"'
    assert body["reason_id"] == expected
    assert [e["reason_id"] for e in stack.audit_for(body["request_id"])] == [expected]


async def test_two_authorization_headers_are_refused(stack, client):
    """Two Authorization headers are ambiguous, even when one holds a valid token."""
    good = stack.mint()
    headers = CIMultiDict([("Authorization", f"Bearer {good}"), ("Authorization", "Bearer junk")])
    async with client.get(stack.url("/api/tickets"), headers=headers) as r:
        assert r.status == 401
        assert (await r.json())["reason_id"] == "authn.malformed"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_external_issuer_tokens_of_each_algorithm_are_accepted(stack, client, alg):
    """Tokens from the trusted external IdP verify with RS256, ES256 and EdDSA keys."""
    token = stack.idp.sign(claims(sub=f"user-{alg}"), alg=alg)
    async with client.get(
        stack.url("/api/tickets"), headers={"Authorization": f"Bearer {token}"}
    ) as r:
        assert r.status == 200, await r.text()
        request_id = r.headers["X-Request-Id"]
    (event,) = stack.audit_for(request_id)
    assert event["subject"] == f"user-{alg}"
    assert event["issuer"] == "https://idp.test"
    assert event["decision"] == "allow"


async def test_issuer_token_is_accepted_and_its_jwks_is_public(stack, client):
    """A token minted by the dev issuer passes; its JWKS is served without a token and has no private part."""
    async with client.get(
        stack.url("/api/tickets"), headers={"Authorization": f"Bearer {stack.mint()}"}
    ) as r:
        assert r.status == 200
    async with client.get(stack.url("/.well-known/jwks.json")) as r:
        assert r.status == 200
        document = await r.json()
    assert document["keys"]
    assert all("d" not in key for key in document["keys"])


async def test_rotated_key_is_fetched_on_unknown_kid_once_per_cooldown(stack, client):
    """A new kid triggers one JWKS refetch; a flood of unknown kids does not trigger more."""

    async def fetches() -> int:
        async with client.get(f"http://127.0.0.1:{stack.jwks_port}/count") as r:
            return (await r.json())["n"]

    new_key = stack.idp.add_key("ES256")
    await asyncio.sleep(2.1)  # let any earlier refetch's cooldown (2 s in the test config) pass
    before = await fetches()
    token = stack.idp.sign(claims(sub="rotated"), key=new_key)
    async with client.get(
        stack.url("/api/tickets"), headers={"Authorization": f"Bearer {token}"}
    ) as r:
        assert r.status == 200, await r.text()
    assert await fetches() == before + 1
    flood_started = time.monotonic()
    for _ in range(20):
        forged = stack.idp.sign(claims(), headers={"kid": uuid.uuid4().hex})
        async with client.get(
            stack.url("/api/tickets"), headers={"Authorization": f"Bearer {forged}"}
        ) as r:
            assert (await r.json())["reason_id"] == "authn.unknown_kid"
    # At most one refetch per 2 s cooldown window (a loaded machine may take more than one window).
    windows = int((time.monotonic() - flood_started) // 2.0)
    assert before + 1 <= await fetches() <= before + 1 + windows


async def test_token_mint_command_prints_a_token_the_gateway_accepts(stack, client):
    """`gateway token mint` output works as a bearer token with the roles asked for."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(stack.config_file),
            "token",
            "mint",
            "--sub",
            "minted",
            "--role",
            "admin",
            "--role",
            "reader",
            "--ttl",
            "120",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    token = out.stdout.strip()
    decoded = jwt.decode(token, options={"verify_signature": False})
    assert decoded["roles"] == ["admin", "reader"]
    assert decoded["exp"] - decoded["iat"] == 120
    async with client.post(
        stack.url("/api/departments"),
        json={"name": f"d-{uuid.uuid4().hex[:8]}"},
        headers={"Authorization": f"Bearer {token}"},
    ) as r:
        assert r.status == 201, await r.text()


async def test_http_port_redirects_to_https(stack):
    """Plain HTTP only redirects (308) to the HTTPS origin from config, never to the Host header."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{stack.http_port}/api/tickets?limit=1",
            headers={"Host": "evil.example"},
            allow_redirects=False,
        ) as r,
    ):
        assert r.status == 308
        assert r.headers["Location"] == f"https://localhost:{stack.https_port}/api/tickets?limit=1"

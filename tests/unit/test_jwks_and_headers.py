"""JWKS parsing refuses keys that must never verify tokens; forwarding strips what must not pass."""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request
from jwcrypto import jwk
from multidict import CIMultiDict

from gateway.jwks import parse_jwks
from gateway.pipeline import Principal, RequestContext
from gateway.stages.forward import upstream_request_headers

ALLOWED = frozenset({"RS256", "ES256", "EdDSA"})


def public(kind: dict, **extra) -> dict:
    entry = jwk.JWK.generate(**kind).export_public(as_dict=True)
    entry.update(extra)
    return entry


def test_only_asymmetric_signing_keys_are_kept():
    """oct keys, encryption keys, private keys and disallowed algorithms are skipped."""
    ec = {"kty": "EC", "crv": "P-256"}
    private_rsa = jwk.JWK.generate(kty="RSA", size=2048).export_private(as_dict=True)
    document = {
        "keys": [
            public(ec, kid="good"),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},
            public(ec, kid="enc", use="enc"),
            {**private_rsa, "kid": "leaked-private"},
            public({"kty": "EC", "crv": "P-384"}, kid="es384"),
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        ]
    }
    keys = parse_jwks(document, ALLOWED)
    assert sorted(keys) == ["good"]
    assert keys["good"].algorithm_name == "ES256"


def test_upstream_headers_drop_hop_by_hop_credentials_and_spoofed_identity():
    """Hop-by-hop (and Connection-named) headers, credentials and X-Gateway-* never go upstream."""
    headers = CIMultiDict(
        {
            "Connection": "keep-alive, X-Internal-Trace",
            "X-Internal-Trace": "1",
            "Keep-Alive": "300",
            "TE": "trailers",
            "Upgrade": "websocket",
            "Proxy-Authorization": "Basic x",
            "Authorization": "Bearer secret-token",
            "Cookie": "session=abc",
            "X-Gateway-Subject": "mallory",
            "X-Gateway-Roles": "admin",
            "X-Request-Id": "forged",
            "X-Forwarded-For": "10.0.0.1",
            "Accept": "application/json",
        }
    )
    request = make_mocked_request("GET", "/api/tickets", headers=headers)
    ctx = RequestContext.start(request)
    ctx.principal = Principal(sub="alice", roles=("reader",), issuer="i", claims={})
    sent = upstream_request_headers(ctx, "the-secret")
    for gone in (
        "Connection",
        "X-Internal-Trace",
        "Keep-Alive",
        "TE",
        "Upgrade",
        "Proxy-Authorization",
        "Authorization",
        "Cookie",
    ):
        assert gone not in sent, gone
    assert sent["X-Gateway-Subject"] == "alice"
    assert sent["X-Gateway-Roles"] == "reader"
    assert sent["X-Request-Id"] == ctx.request_id
    assert sent["X-Gateway-Secret"] == "the-secret"
    assert sent.getall("X-Gateway-Subject") == ["alice"]
    assert sent["Accept"] == "application/json"
    assert sent["X-Forwarded-For"] != "10.0.0.1"


def test_method_and_url_override_headers_are_not_forwarded():
    """Overrides that would make the upstream serve another method or path than the policy saw."""
    headers = CIMultiDict(
        {
            "X-HTTP-Method-Override": "DELETE",
            "X-Original-URL": "/api/admin",
            "X-Rewrite-URL": "/api/admin",
            "X-Method-Override": "PUT",
        }
    )
    ctx = RequestContext.start(make_mocked_request("GET", "/api/tickets", headers=headers))
    sent = upstream_request_headers(ctx, "s")
    for gone in headers:
        assert gone not in sent

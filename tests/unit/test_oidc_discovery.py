"""OIDC discovery against a real provider (npm's oidc-provider on loopback), verification of the
tokens it issues through the discovered JWKS, and the claim-to-role mapping table."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from support.oidc import EMP_API, OidcProvider, discovery_document, oidc_provider

from gateway.jwks import JwksFetcher
from gateway.oidc import (
    MAX_DOCUMENT_BYTES,
    DiscoveryError,
    OidcMetadata,
    discover,
    is_safe_url,
    map_roles,
)
from gateway.pipeline import Denial, Principal
from gateway.stages.authn import BearerTokenAuthenticator, TrustedIssuer
from gateway.testing import free_port

ALGORITHMS = ("RS256", "ES256", "EdDSA")


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """One real provider for the module, always stopped."""
    with oidc_provider(tmp_path_factory.mktemp("oidc")) as running_provider:
        yield running_provider


@pytest.fixture
async def session() -> Any:
    """A client session with default TLS settings, closed after the test."""
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def _discovered(session: aiohttp.ClientSession, provider: OidcProvider) -> OidcMetadata:
    return await discover(session, provider.issuer, timeout_seconds=5)


async def _authenticator(
    session: aiohttp.ClientSession,
    provider: OidcProvider,
    roles_claim: str = "groups",
    role_map: tuple[str, ...] = (),
) -> BearerTokenAuthenticator:
    """What the gateway builds for a discovered issuer: a JwksFetcher on the discovered URI."""
    metadata = await _discovered(session, provider)
    fetcher = JwksFetcher(
        uri=metadata.jwks_uri,
        session=session,
        allowed_algorithms=frozenset(ALGORITHMS),
        cache_seconds=300,
        cooldown_seconds=0,
        timeout_seconds=5,
    )
    await fetcher.refresh(force=True)
    issuer = TrustedIssuer(metadata.issuer, ("emp-api",), roles_claim, fetcher, role_map)
    return BearerTokenAuthenticator(
        issuers=[issuer],
        allowed_algorithms=ALGORITHMS,
        leeway_seconds=5,
        max_token_bytes=8192,
        cache_size=100,
        cache_seconds=60,
    )


async def _refusal(authenticator: BearerTokenAuthenticator, token: str) -> str:
    with pytest.raises(Denial) as refused:
        await authenticator.verify_bearer_token(token)
    return refused.value.reason_id


def _flip_signature_byte(token: str) -> str:
    header, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01  # mid-signature: no base64 padding bits to hide the change
    return f"{header}.{payload}.{base64.urlsafe_b64encode(bytes(raw)).rstrip(b'=').decode()}"


# --- discovery against the real provider ------------------------------------------------------


async def test_discovery_yields_the_providers_jwks_uri(session, provider):
    """Discovery returns the provider's own issuer, its jwks_uri, and the whole document."""
    metadata = await _discovered(session, provider)
    expected = discovery_document(provider.port)
    assert metadata.issuer == provider.issuer
    assert metadata.jwks_uri == expected["jwks_uri"]
    assert metadata.jwks_uri.startswith(f"{provider.issuer}/")
    assert metadata.document["token_endpoint"] == expected["token_endpoint"]


async def test_discovered_jwks_holds_the_key_that_signed_the_token(session, provider):
    """The JWKS found through discovery contains the kid in the header of an issued token."""
    metadata = await _discovered(session, provider)
    async with session.get(metadata.jwks_uri) as response:
        kids = {key["kid"] for key in (await response.json())["keys"]}
    header = jwt.get_unverified_header(provider.token("emp-admin-client"))
    assert header["alg"] == "ES256"
    assert header["kid"] in kids


WRONG_ISSUERS: list[tuple[str, Callable[[OidcProvider], str], str]] = [
    ("trailing_slash", lambda p: f"{p.issuer}/", "names issuer"),
    ("trailing_path", lambda p: f"{p.issuer}/tenant-a", "HTTP 404"),
    ("same_server_other_name", lambda p: f"http://localhost:{p.port}", "names issuer"),
    ("different_port", lambda p: f"http://127.0.0.1:{free_port()}", "unreachable"),
    ("plain_http_to_a_remote_host", lambda p: "http://idp.example.com", "must be https"),
]


@pytest.mark.parametrize(
    ("configured", "fault"),
    [(c, f) for _, c, f in WRONG_ISSUERS],
    ids=[i for i, _, _ in WRONG_ISSUERS],
)
async def test_wrong_configured_issuer_is_refused(session, provider, configured, fault):
    """Discovery for any issuer but the provider's exact own name raises DiscoveryError."""
    with pytest.raises(DiscoveryError, match=fault):
        await discover(session, configured(provider), timeout_seconds=5)


# --- verifying the provider's tokens through the discovered JWKS ----------------------------


async def test_provider_token_verifies_through_the_discovered_jwks(session, provider):
    """A client_credentials token verifies: subject is the client, roles are its groups."""
    authenticator = await _authenticator(session, provider)
    principal = await authenticator.verify_bearer_token(provider.token("emp-admin-client"))
    assert isinstance(principal, Principal)
    assert principal.sub == "emp-admin-client"
    assert principal.issuer == provider.issuer
    assert principal.roles == ("emp-admins",)
    assert principal.claims["aud"] == "emp-api"


async def test_nested_roles_claim_is_read_by_its_dotted_path(session, provider):
    """roles_claim "realm_access.roles" reads the provider's Keycloak-style nested claim."""
    authenticator = await _authenticator(session, provider, roles_claim="realm_access.roles")
    principal = await authenticator.verify_bearer_token(provider.token("emp-reader-client"))
    assert principal.roles == ("emp-readers",)


@pytest.mark.parametrize(
    ("client_id", "roles"),
    [
        ("emp-admin-client", ("admin",)),
        ("emp-reader-client", ("reader",)),
        ("emp-stranger-client", ()),
    ],
    ids=["admins_group", "readers_group", "unmapped_group"],
)
async def test_role_map_turns_provider_groups_into_gateway_roles(
    session, provider, client_id, roles
):
    """With a role map, the principal holds only mapped roles, never the provider's group names."""
    role_map = ("emp-admins=admin", "emp-readers=reader")
    authenticator = await _authenticator(session, provider, role_map=role_map)
    principal = await authenticator.verify_bearer_token(provider.token(client_id))
    assert principal.roles == roles


async def test_tampered_signature_is_bad_signature(session, provider):
    """One flipped byte in the provider's signature is refused as authn.bad_signature."""
    authenticator = await _authenticator(session, provider)
    token = _flip_signature_byte(provider.token("emp-admin-client"))
    assert await _refusal(authenticator, token) == "authn.bad_signature"


async def test_token_for_another_api_is_wrong_audience(session, provider):
    """A validly signed token whose aud is another API is refused as authn.wrong_audience."""
    authenticator = await _authenticator(session, provider)
    token = provider.token("other-api-client")
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == "other-api"
    assert await _refusal(authenticator, token) == "authn.wrong_audience"


async def test_token_for_emp_api_resource_names_emp_api(session, provider):
    """Asking for the emp-api resource explicitly gives the same audience as the default."""
    authenticator = await _authenticator(session, provider)
    principal = await authenticator.verify_bearer_token(
        provider.token("emp-reader-client", EMP_API)
    )
    assert principal.claims["aud"] == "emp-api"


# --- discovery documents a real provider would never serve ------------------------------------


def _document(issuer: str, **fields: Any) -> bytes:
    return json.dumps({"issuer": issuer, "jwks_uri": "https://idp.example/jwks", **fields}).encode()


BAD_DOCUMENTS: list[tuple[str, Callable[[str], bytes], str]] = [
    ("not_json", lambda iss: b"<html>hello</html>", "not JSON"),
    ("json_array", lambda iss: b"[]", "not a JSON object"),
    ("other_issuer", lambda iss: _document("https://idp.example"), "names issuer"),
    (
        "no_issuer",
        lambda iss: json.dumps({"jwks_uri": "https://idp.example/j"}).encode(),
        "names issuer",
    ),
    ("no_jwks_uri", lambda iss: json.dumps({"issuer": iss}).encode(), "no jwks_uri"),
    ("jwks_uri_not_a_string", lambda iss: _document(iss, jwks_uri=["https://a"]), "no jwks_uri"),
    (
        "jwks_uri_plain_http_remote",
        lambda iss: _document(iss, jwks_uri="http://idp.example/jwks"),
        "must be https",
    ),
    (
        "jwks_uri_loopback_lookalike",
        lambda iss: _document(iss, jwks_uri="http://localhost.evil.example/j"),
        "must be https",
    ),
    (
        "jwks_uri_userinfo_trick",
        lambda iss: _document(iss, jwks_uri="http://127.0.0.1@evil.example/j"),
        "must be https",
    ),
    ("over_1mb", lambda iss: _document(iss, pad="x" * MAX_DOCUMENT_BYTES), "is over"),
]
GOOD_DOCUMENTS: list[tuple[str, Callable[[str], bytes], str]] = [
    ("https_jwks_uri", _document, "https://idp.example/jwks"),
    (
        "loopback_jwks_uri",
        lambda iss: _document(iss, jwks_uri="http://[::1]:8/jwks"),
        "http://[::1]:8/jwks",
    ),
]


@pytest.fixture
async def document_server(aiohttp_server) -> str:
    """Serves BAD_DOCUMENTS and GOOD_DOCUMENTS: issuer http://127.0.0.1:PORT/CASE per row."""
    bodies = {name: make for name, make, _ in BAD_DOCUMENTS + GOOD_DOCUMENTS}

    async def serve(request: web.Request) -> web.StreamResponse:
        case = request.match_info["case"]
        issuer = f"http://127.0.0.1:{request.url.port}/{case}"
        if case == "redirect":
            raise web.HTTPFound(f"http://127.0.0.1:{request.url.port}/https_jwks_uri{request.path}")
        if case == "over_1mb_chunked":
            # No Content-Length: the size limit must hold while the body streams in.
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(20):
                await response.write(b" " * 65_536)
            return response
        return web.Response(body=bodies[case](issuer), content_type="application/json")

    app = web.Application()
    app.router.add_get("/{case}/.well-known/openid-configuration", serve)
    server = await aiohttp_server(app, host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}"


@pytest.mark.parametrize(
    ("case", "fault"),
    [(n, f) for n, _, f in BAD_DOCUMENTS]
    + [("over_1mb_chunked", "is over"), ("redirect", "HTTP 302")],
    ids=[n for n, _, _ in BAD_DOCUMENTS] + ["over_1mb_chunked", "redirect_not_followed"],
)
async def test_unusable_discovery_document_is_refused(session, document_server, case, fault):
    """A document that is not JSON, too big, redirected, or lacks a safe jwks_uri is refused."""
    with pytest.raises(DiscoveryError, match=fault):
        await discover(session, f"{document_server}/{case}", timeout_seconds=5)


@pytest.mark.parametrize(
    ("case", "jwks_uri"),
    [(n, u) for n, _, u in GOOD_DOCUMENTS],
    ids=[n for n, _, _ in GOOD_DOCUMENTS],
)
async def test_document_with_safe_jwks_uri_is_accepted(session, document_server, case, jwks_uri):
    """An https jwks_uri, or a loopback http one, is taken as the document gives it."""
    metadata = await discover(session, f"{document_server}/{case}", timeout_seconds=5)
    assert metadata.jwks_uri == jwks_uri


SAFE_URLS = [
    ("https", "https://idp.example/", True),
    ("loopback_v4", "http://127.0.0.1:8080/x", True),
    ("loopback_name", "http://localhost/x", True),
    ("loopback_v6", "http://[::1]:9/x", True),
    ("remote_http", "http://idp.example/", False),
    ("lookalike_name", "http://localhost.evil.example/", False),
    ("lookalike_v4_prefix", "http://127.0.0.1.evil.example/", False),
    ("userinfo_trick", "http://127.0.0.1@evil.example/", False),
    ("other_scheme", "file:///etc/passwd", False),
    ("no_host", "https:///path", False),
    ("port_out_of_range", "http://127.0.0.1:70000/", False),
]


@pytest.mark.parametrize(
    ("url", "safe"), [(u, s) for _, u, s in SAFE_URLS], ids=[i for i, _, _ in SAFE_URLS]
)
def test_is_safe_url(url, safe):
    """Only https, or plain http whose parsed host is loopback, counts as safe."""
    assert is_safe_url(url) is safe


# --- map_roles: a pure function --------------------------------------------------------------

ADMIN_READER = ["emp-admins=admin", "emp-readers=reader"]
MAP_ROLES = [
    ("list_without_map_passes_values", {"groups": ["a", "b"]}, "groups", [], ["a", "b"]),
    ("single_string", {"role": "admin"}, "role", [], ["admin"]),
    (
        "space_separated_scope",
        {"scope": "api:read  api:write"},
        "scope",
        [],
        ["api:read", "api:write"],
    ),
    ("empty_string_is_no_roles", {"scope": ""}, "scope", ADMIN_READER, []),
    ("absent_claim_is_no_roles", {}, "groups", ADMIN_READER, []),
    ("mapped_list", {"groups": ["emp-admins"]}, "groups", ADMIN_READER, ["admin"]),
    (
        "mapped_space_separated",
        {"scope": "emp-readers emp-admins"},
        "scope",
        ADMIN_READER,
        ["reader", "admin"],
    ),
    (
        "unmapped_never_passes_through",
        {"groups": ["sales", "emp-readers"]},
        "groups",
        ADMIN_READER,
        ["reader"],
    ),
    ("gateway_role_name_from_idp_is_not_a_role", {"groups": ["admin"]}, "groups", ADMIN_READER, []),
    ("mapping_is_case_sensitive", {"groups": ["EMP-ADMINS"]}, "groups", ADMIN_READER, []),
    (
        "one_value_to_several_roles",
        {"groups": ["ops"]},
        "groups",
        ["ops=admin", "ops=reader"],
        ["admin", "reader"],
    ),
    (
        "deduplicated_in_first_order",
        {"groups": ["emp-readers", "emp-admins", "emp-readers"]},
        "groups",
        [*ADMIN_READER, "ops=admin"],
        ["reader", "admin"],
    ),
    (
        "two_values_one_role",
        {"groups": ["ops", "emp-admins"]},
        "groups",
        ["ops=admin", "emp-admins=admin"],
        ["admin"],
    ),
    (
        "dotted_path",
        {"realm_access": {"roles": ["emp-admins"]}},
        "realm_access.roles",
        ADMIN_READER,
        ["admin"],
    ),
    (
        "dotted_path_through_non_object",
        {"realm_access": "emp-admins"},
        "realm_access.roles",
        ADMIN_READER,
        [],
    ),
    (
        "ldap_dn_value",
        {"groups": ["cn=admins,ou=groups"]},
        "groups",
        ["cn=admins,ou=groups=admin"],
        ["admin"],
    ),
    (
        "spaces_around_entry",
        {"groups": ["emp-admins"]},
        "groups",
        ["emp-admins = admin"],
        ["admin"],
    ),
]


@pytest.mark.parametrize(
    ("claims", "roles_claim", "role_map", "roles"),
    [row[1:] for row in MAP_ROLES],
    ids=[row[0] for row in MAP_ROLES],
)
def test_map_roles(claims, roles_claim, role_map, roles):
    """map_roles gives exactly the expected roles for each claim shape and role map."""
    assert map_roles(claims, roles_claim, role_map) == roles


MALFORMED_CLAIMS = [
    ("number", {"groups": 7}),
    ("object", {"groups": {"emp-admins": True}}),
    ("list_with_a_number", {"groups": ["emp-admins", 7]}),
    ("boolean", {"groups": True}),
]


@pytest.mark.parametrize(
    "claims", [c for _, c in MALFORMED_CLAIMS], ids=[i for i, _ in MALFORMED_CLAIMS]
)
@pytest.mark.parametrize("role_map", [[], ADMIN_READER], ids=["no_map", "map"])
def test_malformed_roles_claim_raises(claims, role_map):
    """A roles claim that is neither a string nor a list of strings is an error, not no roles."""
    with pytest.raises(ValueError, match="groups"):
        map_roles(claims, "groups", role_map)


@pytest.mark.parametrize("entry", ["admin", "=admin", "emp-admins=", " = "])
def test_bad_role_map_entry_raises(entry):
    """A role_map entry that is not external=role is refused (config also checks at start)."""
    with pytest.raises(ValueError, match="external=role"):
        map_roles({"groups": ["x"]}, "groups", [entry])


def test_map_roles_returns_a_fresh_list():
    """Changing the result does not change what the next call returns."""
    claims = {"groups": ["emp-admins"]}
    first = map_roles(claims, "groups", [])
    first.append("admin")
    assert map_roles(claims, "groups", []) == ["emp-admins"]
    assert claims == {"groups": ["emp-admins"]}

"""The gateway trusting a real external OpenID Provider (npm's oidc-provider on loopback): keys
found by OIDC discovery, the provider's groups mapped onto gateway roles by config."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import aiohttp
import pytest
from support.oidc import OidcProvider, oidc_provider
from support.stack import (
    GATEWAY,
    REPO,
    PrivateGateway,
    Stack,
    start_gateway,
    write_gateway_config,
)

from gateway.testing import free_port, read_audit_events


def _issuer_block(provider: OidcProvider) -> str:
    # No jwks_uri: the gateway must find it through discovery.
    return f"""
[[authn.issuers]]
issuer = "{provider.issuer}"
audiences = ["emp-api"]
roles_claim = "groups"
role_map = ["emp-admins=admin", "emp-readers=reader"]
"""


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """One real provider for the module, always stopped."""
    with oidc_provider(tmp_path_factory.mktemp("oidc")) as running_provider:
        yield running_provider


@pytest.fixture(scope="module")
def gateway(
    stack: Stack, provider: OidcProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrivateGateway]:
    """A gateway of this module's own that trusts the provider, in front of the stack's upstream."""
    root = tmp_path_factory.mktemp("gw-external-idp")
    https, http, admin = free_port(), free_port(), free_port()
    config = write_gateway_config(
        root,
        https=https,
        http=http,
        admin=admin,
        upstream_url=f"http://127.0.0.1:{stack.upstream_port}",
        jwks_url="http://127.0.0.1:9/jwks.json",
        extra=_issuer_block(provider),
    )
    subprocess.run(
        [*GATEWAY, "--config", str(config), "setup"], check=True, cwd=REPO, capture_output=True
    )
    # The stack's upstream only answers callers that know its secret.
    (root / "secrets" / "upstream.secret").write_text(stack.secret)
    with ExitStack() as processes:
        private = PrivateGateway(root, https, admin, config)
        private.process = start_gateway(processes, root, config, https)
        yield private


@pytest.fixture
async def client(gateway: PrivateGateway) -> Any:
    """An HTTPS client that trusts the private gateway's dev CA."""
    connector = aiohttp.TCPConnector(ssl=gateway.ssl_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def _call(
    client: aiohttp.ClientSession, gateway: PrivateGateway, method: str, token: str
) -> tuple[int, Any, str]:
    body = {"name": f"dept-{uuid.uuid4().hex[:12]}"} if method == "POST" else None
    async with client.request(
        method,
        gateway.url("/api/departments"),
        headers={"Authorization": f"Bearer {token}"},
        json=body,
    ) as response:
        payload = await response.json() if response.content_type == "application/json" else None
        return response.status, payload, response.headers["X-Request-Id"]


def _audit_event(gateway: PrivateGateway, request_id: str) -> dict[str, Any]:
    # The line is written as the response goes out: allow it a moment to land.
    deadline = time.monotonic() + 2.0
    events = read_audit_events(gateway.audit_file, request_id)
    while not events and time.monotonic() < deadline:
        time.sleep(0.02)
        events = read_audit_events(gateway.audit_file, request_id)
    assert len(events) == 1, events
    return events[0]


# client, method, status, reason id (None: allowed), the roles the gateway gave it
CASES = [
    ("admin_lists", "emp-admin-client", "GET", 200, None, ["admin"]),
    ("admin_creates", "emp-admin-client", "POST", 201, None, ["admin"]),
    ("reader_lists", "emp-reader-client", "GET", 200, None, ["reader"]),
    ("reader_cannot_create", "emp-reader-client", "POST", 403, "authz.denied", ["reader"]),
    ("unmapped_group_gets_no_role", "emp-stranger-client", "GET", 403, "authz.denied", []),
    (
        "other_api_token_is_wrong_audience",
        "other-api-client",
        "GET",
        401,
        "authn.wrong_audience",
        [],
    ),
]


@pytest.mark.parametrize(
    ("client_id", "method", "status", "reason_id", "roles"),
    [row[1:] for row in CASES],
    ids=[row[0] for row in CASES],
)
async def test_provider_token_through_the_gateway(
    gateway, provider, client, client_id, method, status, reason_id, roles
):
    """Each provider client gets its expected status, reason id and mapped roles, audited once."""
    got_status, payload, request_id = await _call(
        client, gateway, method, provider.token(client_id)
    )
    assert got_status == status, payload
    event = _audit_event(gateway, request_id)
    assert event["reason_id"] == reason_id
    assert event["roles"] == roles  # mapped names only: "emp-admins" itself never appears
    if reason_id is None:
        assert event["subject"] == client_id
        assert event["issuer"] == provider.issuer
        return
    # Every refusal is the gateway's JSON, naming its reason and the request.
    assert payload["reason_id"] == reason_id
    assert payload["request_id"] == request_id


async def test_unmapped_group_is_denied_for_having_no_known_role(gateway, provider, client):
    """A provider group the role map does not name is dropped, so the policy sees no known role."""
    status, payload, request_id = await _call(
        client, gateway, "GET", provider.token("emp-stranger-client")
    )
    assert (status, payload["reason_id"]) == (403, "authz.denied")
    event = _audit_event(gateway, request_id)
    assert event["subject"] == "emp-stranger-client"
    assert "rbac.no_known_role" in event["reasons"]


async def test_admin_created_department_is_readable_by_reader(gateway, provider, client):
    """What the admin client created through the gateway, the reader client reads back."""
    status, created, _ = await _call(client, gateway, "POST", provider.token("emp-admin-client"))
    assert status == 201, created
    async with client.get(
        gateway.url(f"/api/departments/{created['id']}"),
        headers={"Authorization": f"Bearer {provider.token('emp-reader-client')}"},
    ) as response:
        assert response.status == 200
        assert (await response.json())["name"] == created["name"]


def test_gateway_refuses_to_start_when_discovery_names_another_issuer(provider, tmp_path):
    """Configured as localhost while the provider calls itself 127.0.0.1: start fails, exit 2."""
    config = write_gateway_config(
        tmp_path,
        https=free_port(),
        http=free_port(),
        admin=free_port(),
        upstream_url="http://127.0.0.1:9",
        jwks_url="http://127.0.0.1:9/jwks.json",
        extra=_issuer_block(provider).replace("127.0.0.1", "localhost"),
    )
    subprocess.run(
        [*GATEWAY, "--config", str(config), "setup"], check=True, cwd=REPO, capture_output=True
    )
    result = subprocess.run(
        [*GATEWAY, "--config", str(config), "serve"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"names issuer '{provider.issuer}'" in result.stderr

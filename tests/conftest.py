"""Shared fixtures: the real stack (upstream, a test IdP's JWKS, the gateway) on free loopback
ports, private gateways for tests that need their own, and a slow upstream. Helpers live in
tests/support/stack.py."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.stack import (
    GATEWAY,
    PYTHON,
    REPO,
    PrivateGateway,
    Stack,
    TestIdp,
    prepare,
    start_gateway,
    start_upstream,
    write_gateway_config,
)

from gateway.testing import free_port, running


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole request path, started once for the session and always stopped."""
    root = tmp_path_factory.mktemp("stack")
    ports = [free_port() for _ in range(5)]
    https, http, admin, upstream_port, jwks_port = ports
    idp = TestIdp(root / "idp-jwks.json")
    for alg in ("RS256", "ES256", "EdDSA"):
        idp.add_key(alg)
    config = write_gateway_config(
        root,
        https=https,
        http=http,
        admin=admin,
        upstream_url=f"http://127.0.0.1:{upstream_port}",
        jwks_url=f"http://127.0.0.1:{jwks_port}/jwks.json",
    )
    prepare(root, config)
    result = Stack(root, https, http, admin, upstream_port, jwks_port, config, idp)
    with ExitStack() as processes:
        jwks_cmd = [
            PYTHON,
            str(REPO / "tests/fixtures/jwks_server.py"),
            str(jwks_port),
            str(idp.jwks_file),
        ]
        result.processes["jwks"] = processes.enter_context(
            running(jwks_cmd, port=jwks_port, log_file=root / "jwks.log")
        )
        result.processes["upstream"] = start_upstream(processes, root, upstream_port)
        result.processes["gateway"] = start_gateway(processes, root, config, https)
        yield result


@pytest.fixture
async def client(stack: Stack) -> Any:
    """An HTTPS client that trusts the stack's dev CA and sends no cookies."""
    connector = aiohttp.TCPConnector(ssl=stack.ssl_context())
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Any]:
    """Build (and, unless told not to, start) private gateways; all are stopped afterwards."""
    with ExitStack() as processes:

        def build(
            upstream_url: str,
            *,
            policy_dir: Path | None = None,
            extra: str = "",
            policy: str = "",
            server: str = "",
            secrets: str = "",
            start: bool = True,
        ) -> PrivateGateway:
            root = tmp_path / f"gw-{len(list(tmp_path.glob('gw-*')))}"
            root.mkdir()
            https, http, admin = free_port(), free_port(), free_port()
            config = write_gateway_config(
                root,
                https=https,
                http=http,
                admin=admin,
                upstream_url=upstream_url,
                jwks_url="http://127.0.0.1:9/jwks.json",
                policy_dir=policy_dir,
                extra=extra,
                policy=policy,
                server=server,
                secrets=secrets,
            )
            subprocess.run(
                [*GATEWAY, "--config", str(config), "setup"],
                check=True,
                cwd=REPO,
                capture_output=True,
            )
            gateway = PrivateGateway(root, https, admin, config)
            if start:
                gateway.process = start_gateway(processes, root, config, https)
            return gateway

        yield build


@pytest.fixture
def slow_upstream(tmp_path: Path) -> Iterator[str]:
    """An upstream that takes two seconds to answer anything but /healthz."""
    port = free_port()
    command = [PYTHON, str(REPO / "tests/fixtures/slow_upstream.py"), str(port), "2.0"]
    with running(command, port=port, log_file=tmp_path / "slow.log"):
        yield f"http://127.0.0.1:{port}"

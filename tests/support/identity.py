"""A gateway with accounts: users and clients created with the CLI before it starts."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from gateway.config import PasswordConfig
from gateway.testing import free_port
from support.stack import GATEWAY, REPO, PrivateGateway, start_gateway, write_gateway_config

FAST_PASSWORDS = PasswordConfig(time_cost=1, memory_kib=64, parallelism=1, min_length=12)
PASSWORDS = {
    "alice": "correct horse battery staple",
    "root": "an admin's long passphrase",
    "bob": "bob's long enough password",
}
ROLES = {"alice": ["reader"], "root": ["admin"], "bob": ["reader"]}


@dataclass
class IdentityGateway(PrivateGateway):
    """A private gateway plus the secrets of the clients made for it."""

    client_secrets: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*GATEWAY, "--config", str(self.config_file), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            input=stdin,
            check=False,
        )

    def session(self, *, local_ip: str | None = None) -> aiohttp.ClientSession:
        """No cookie jar: tests carry cookies by hand, to see every attribute."""
        connector = aiohttp.TCPConnector(
            ssl=self.ssl_context(), local_addr=(local_ip, 0) if local_ip else None
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def token(
        self, session: aiohttp.ClientSession, form: dict[str, str], **kwargs: Any
    ) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        async with session.post(self.url("/oauth/token"), data=form, **kwargs) as response:
            return response.status, await response.json(), response

    async def login(
        self, session: aiohttp.ClientSession, user: str, otp: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        form = {"grant_type": "password", "username": user, "password": PASSWORDS[user]}
        if otp is not None:
            form["otp"] = otp
        status, body, _ = await self.token(session, form)
        return status, body


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def start_identity_gateway(
    processes: ExitStack,
    root: Path,
    *,
    upstream_port: int,
    upstream_secret: str,
    identity: str = "",
    extra: str = "",
    policy_dir: Path | None = None,
    policy: str = "",
    server: str = "",
    decision_log: str = "",
    streams_file: Path | None = None,
    clients: dict[str, list[str]] | None = None,
    serve_args: tuple[str, ...] = (),
) -> IdentityGateway:
    """Set up, create alice/root/bob and the clients with the CLI, then start the gateway."""
    root.mkdir(parents=True, exist_ok=True)
    https, http, admin = free_port(), free_port(), free_port()
    config = write_gateway_config(
        root, https=https, http=http, admin=admin,
        upstream_url=f"http://127.0.0.1:{upstream_port}",
        jwks_url="http://127.0.0.1:9/jwks.json", identity=identity, extra=extra,
        policy_dir=policy_dir, policy=policy, server=server, decision_log=decision_log,
        streams_file=streams_file,
    )  # fmt: skip
    gateway = IdentityGateway(root, https, admin, config)
    subprocess.run(
        [*GATEWAY, "--config", str(config), "setup"], check=True, cwd=REPO, capture_output=True
    )
    (root / "secrets" / "upstream.secret").write_text(upstream_secret + "\n")
    for user, password in PASSWORDS.items():
        args = ["users", "add", user, "--password-stdin"]
        for role in ROLES[user]:
            args += ["--role", role]
        result = gateway.cli(*args, stdin=password + "\n")
        assert result.returncode == 0, result.stderr
    for client_id, roles in (clients or {"ingest-1": ["ingest_process"]}).items():
        args = ["clients", "add", client_id]
        for role in roles:
            args += ["--role", role]
        result = gateway.cli(*args)
        assert result.returncode == 0, result.stderr
        gateway.client_secrets[client_id] = secret_from(result.stdout)
    gateway.process = start_gateway(processes, root, config, https, *serve_args)
    return gateway


def secret_from(stdout: str) -> str:
    found = re.search(r"^client_secret: (\S+)$", stdout, re.MULTILINE)
    assert found, f"no client secret in the CLI output: {stdout!r}"
    return found.group(1)


def copy_policies(target: Path) -> Path:
    """A copy of the repository's policies/ that a test may edit."""
    shutil.copytree(REPO / "policies", target)
    return target


def cookies_from(response: Any) -> dict[str, str]:
    """The cookies a response sets, by name."""
    jar: dict[str, str] = {}
    for header in response.headers.getall("Set-Cookie", []):
        parsed = SimpleCookie()
        parsed.load(header)
        for name, morsel in parsed.items():
            jar[name] = morsel.value
    return jar


async def browser_login(idp, session, user="alice", password=None, **extra):
    """GET the form, POST it back with its CSRF pair; (status, JSON body, response)."""
    async with session.get(idp.url("/auth/login"), headers={"Accept": "text/html"}) as page:
        assert page.status == 200
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        login_cookie = cookies_from(page)["__Host-emp_login"]
    form = {"username": user, "password": password or PASSWORDS[user],
            "csrf_token": login_cookie, **extra}  # fmt: skip
    async with session.post(
        idp.url("/auth/login"), data=form, allow_redirects=False,
        headers={"Cookie": f"__Host-emp_login={login_cookie}", "Accept": "application/json",
                 "Origin": "https://localhost:8443", "Sec-Fetch-Site": "same-origin"},
    ) as r:  # fmt: skip
        return r.status, await r.json(), r

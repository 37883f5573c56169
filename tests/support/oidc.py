"""Test support: a real OpenID Provider (npm's oidc-provider, tests/fixtures/oidc_provider) on a
free loopback port, and client_credentials tokens from it."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.testing import free_port, running

PROVIDER_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "oidc_provider"
# The clients server.mjs registers: id -> secret. Their groups and resources are listed there.
CLIENT_SECRETS = {
    "emp-admin-client": "emp-admin-secret",
    "emp-reader-client": "emp-reader-secret",
    "emp-stranger-client": "emp-stranger-secret",
    "other-api-client": "other-api-secret",
}
EMP_API = "urn:emp-api"  # the resource indicator whose tokens carry aud "emp-api"


@dataclass(frozen=True)
class OidcProvider:
    """A running provider: where it listens and the issuer it names itself."""

    port: int
    log_file: Path

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, client_id: str, resource: str | None = None) -> str:
        """An access token for one of server.mjs's clients (its own resource by default)."""
        return client_credentials_token(self.port, client_id, CLIENT_SECRETS[client_id], resource)


def install_provider() -> None:
    """Install the provider's npm packages unless they are already there and current."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("the OIDC provider tests need Node.js 20+ and npm on PATH")
    result = subprocess.run(
        ["bash", str(PROVIDER_DIR / "install.sh")], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"install.sh failed ({result.returncode}): {result.stderr[-2000:]}")


@contextmanager
def oidc_provider(log_dir: Path) -> Iterator[OidcProvider]:
    """Start `node server.mjs PORT` on a free port, wait until it listens, always stop it."""
    install_provider()
    port = free_port()
    log_file = log_dir / f"oidc-provider-{port}.log"
    command = ["node", "server.mjs", str(port)]
    with running(command, port=port, log_file=log_file, cwd=PROVIDER_DIR):
        yield OidcProvider(port, log_file)


def discovery_document(port: int) -> dict:
    """The provider's /.well-known/openid-configuration, fetched without the gateway's code."""
    url = f"http://127.0.0.1:{port}/.well-known/openid-configuration"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def client_credentials_token(
    port: int, client_id: str, client_secret: str, resource: str | None = None
) -> str:
    """POST the client_credentials grant (RFC 6749 4.4, RFC 8707 resource) and return the token."""
    token_endpoint = discovery_document(port)["token_endpoint"]
    form = {"grant_type": "client_credentials"}
    if resource is not None:
        form["resource"] = resource
    basic = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
    request = urllib.request.Request(  # noqa: S310 - the URL comes from the loopback provider
        token_endpoint,
        data=urllib.parse.urlencode(form).encode(),
        headers={"Authorization": f"Basic {basic}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - same
        body = json.loads(response.read())
    token: str = body["access_token"]
    if token.count(".") != 2:
        raise AssertionError(f"the provider issued an opaque token, not a JWT: {body}")
    return token

"""Test support: a real stack (upstream, a test identity provider's JWKS, the gateway) on free
loopback ports, with certificates, keys and databases made fresh in a temp directory.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from jwcrypto import jwk

from gateway.testing import data_keys_config, mint_dev_token, read_audit_events, running

REPO = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable
GATEWAY = [PYTHON, "-m", "gateway"]
IDP_ISSUER = "https://idp.test"
AUDIENCE = "emp-api"


@dataclass
class TestIdp:
    """An external identity provider: its signing keys (RSA, EC, Ed25519) and its JWKS file."""

    jwks_file: Path
    private: dict[str, dict[str, Any]] = field(default_factory=dict)  # by alg

    def add_key(self, alg: str) -> dict[str, Any]:
        kind = {
            "RS256": {"kty": "RSA", "size": 2048},
            "ES256": {"kty": "EC", "crv": "P-256"},
            "EdDSA": {"kty": "OKP", "crv": "Ed25519"},
        }[alg]
        key = jwk.JWK.generate(**kind)
        private = key.export(private_key=True, as_dict=True)
        private.update(kid=f"{alg.lower()}-{key.thumbprint()[:12]}", alg=alg, use="sig")
        self.private[private["kid"]] = private
        self.publish()
        return private

    def publish(self) -> None:
        public = []
        for private in self.private.values():
            entry = jwk.JWK(**private).export_public(as_dict=True)
            entry.update(kid=private["kid"], alg=private["alg"], use="sig")
            public.append(entry)
        self.jwks_file.write_text(json.dumps({"keys": public}))

    def key(self, alg: str) -> dict[str, Any]:
        return next(k for k in self.private.values() if k["alg"] == alg)

    def sign(
        self,
        claims: dict[str, Any],
        *,
        alg: str = "RS256",
        headers: dict[str, Any] | None = None,
        key: dict[str, Any] | None = None,
    ) -> str:
        private = key or self.key(alg)
        signing = jwt.PyJWK(private)
        return jwt.encode(
            claims,
            signing.key,
            algorithm=private["alg"],
            headers={"kid": private["kid"], **(headers or {})},
        )


def claims(sub: str = "alice", roles: list[str] | None = None, **overrides: Any) -> dict[str, Any]:
    """Valid claims for the test IdP; override or set a value to None to drop it."""
    now = int(time.time())
    base = {
        "iss": IDP_ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "roles": roles or ["reader"],
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@dataclass
class Stack:
    """A running gateway + upstream + test IdP, and what tests need to talk to them."""

    root: Path
    https_port: int
    http_port: int
    admin_port: int
    upstream_port: int
    jwks_port: int
    config_file: Path
    idp: TestIdp
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def ca_file(self) -> Path:
        return self.root / "certs" / "ca.pem"

    @property
    def audit_file(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def secret(self) -> str:
        return (self.root / "secrets" / "upstream.secret").read_text().strip()

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.https_port}{path}"

    def mint(self, sub: str = "alice", roles: tuple[str, ...] = ("reader",), ttl: int = 300) -> str:
        """A token from the gateway's dev issuer (the same code `gateway token mint` runs)."""
        return mint_dev_token(self.root / "keys", sub, roles, ttl)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def audit_for(self, request_id: str, *, wait: float = 2.0) -> list[dict[str, Any]]:
        """The audit events of one request (the line is written as the response goes out)."""
        deadline = time.monotonic() + wait
        events = read_audit_events(self.audit_file, request_id)
        while not events and time.monotonic() < deadline:
            time.sleep(0.02)
            events = read_audit_events(self.audit_file, request_id)
        return events


def write_gateway_config(
    root: Path,
    *,
    https: int,
    http: int,
    admin: int,
    upstream_url: str,
    jwks_url: str,
    policy_dir: Path | None = None,
    extra: str = "",
    identity: str = "",
    policy: str = "",
    server: str = "",
    decision_log: str = "",
    streams_file: Path | None = None,
    secrets: str = "",
) -> Path:
    """A gateway.toml whose every path points into root (policies and routes from the repo).

    The keystore too: without it `keystore:` references and `secrets check` would read the
    checkout's own var/secrets/keystore.json. `secrets` adds keys to [secrets].
    """
    text = f"""
[server]
host = "127.0.0.1"
https_port = {https}
http_port = {http}
admin_port = {admin}
run_dir = "{root}/run"
{server}
[tls]
cert_file = "{root}/certs/server.pem"
key_file = "{root}/certs/server-key.pem"
ca_file = "{root}/certs/ca.pem"
ca_key_file = "{root}/certs/ca-key.pem"
[upstream]
url = "{upstream_url}"
secret_file = "{root}/secrets/upstream.secret"
read_timeout_seconds = 3.0
[authn]
leeway_seconds = 5
jwks_refetch_cooldown_seconds = 2
[[authn.issuers]]
issuer = "{IDP_ISSUER}"
jwks_uri = "{jwks_url}"
audiences = ["{AUDIENCE}"]
[issuer]
key_dir = "{root}/keys"
[identity]
db_path = "{root}/identity.duckdb"
mfa.secret_key_file = "{root}/secrets/totp.key"
sessions.key_file = "{root}/secrets/session.key"
{identity}
[policy]
dir = "{policy_dir or REPO / "policies"}"
{policy}
[audit]
jsonl_path = "{root}/audit.jsonl"
db_path = "{root}/audit.duckdb"
checkpoint_key_file = "{root}/secrets/audit-checkpoint.key"
{data_keys_config(root / "data-keys")}[decision_log]
path = "{root}/decisions.jsonl"
{decision_log}
[routes]
file = "{REPO}/config/routes.toml"
schema_dir = "{REPO}/config/schemas"
[validation]
streams_file = "{streams_file or REPO / "config/streams.toml"}"
model_dir = "{root}/models"
model_key_file = "{root}/secrets/model.key"
model_check_seconds = 0.5
[secrets]
keystore_file = "{root}/secrets/keystore.json"
master_key_file = "{root}/secrets/keystore.master"
{secrets}
[logging]
level = "info"
{extra}
"""
    path = root / "gateway.toml"
    path.write_text(text)
    return path


def prepare(root: Path, config: Path) -> None:
    """`gateway setup` and `upstream db init` into root, as `make run` does into var/."""
    subprocess.run(
        [*GATEWAY, "--config", str(config), "setup"], check=True, cwd=REPO, capture_output=True
    )
    subprocess.run(
        [PYTHON, "-m", "upstream", "db", "init", "--db", str(root / "emp.duckdb")],
        check=True,
        cwd=REPO,
        capture_output=True,
    )


def start_upstream(stack: ExitStack, root: Path, port: int) -> subprocess.Popen[bytes]:
    command = [
        PYTHON,
        "-m",
        "upstream",
        "serve",
        "--port",
        str(port),
        "--db",
        str(root / "emp.duckdb"),
        "--secret-file",
        str(root / "secrets" / "upstream.secret"),
    ]
    return stack.enter_context(
        running(command, port=port, log_file=root / "upstream.log", cwd=REPO)
    )


def start_gateway(
    stack: ExitStack, root: Path, config: Path, port: int, *serve_args: str
) -> subprocess.Popen[bytes]:
    command = [*GATEWAY, "--config", str(config), "serve", *serve_args]
    return stack.enter_context(running(command, port=port, log_file=root / "gateway.log", cwd=REPO))


@dataclass
class PrivateGateway:
    """A gateway of one test's own (its own root, ports and audit trail)."""

    root: Path
    https_port: int
    admin_port: int
    config_file: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def audit_file(self) -> Path:
        return self.root / "audit.jsonl"

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.https_port}{path}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.root / "certs" / "ca.pem"))

    def mint(self, sub: str = "alice", roles: tuple[str, ...] = ("reader",)) -> str:
        return mint_dev_token(self.root / "keys", sub, roles)

    def audit(self) -> list[dict[str, Any]]:
        return read_audit_events(self.audit_file)

"""The bench's stack: upstream, gateway and baseline proxies in a fresh temp directory.

Processes start through gateway.testing.running, so each one is always stopped. Never touches
var/: a developer's running stack keeps its ports, keys and databases.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import keys
from gateway.testing import free_port, mint_dev_token, running

if TYPE_CHECKING:
    from contextlib import ExitStack

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Only what differs from the defaults in gateway/config.py: ports and every path inside root.
# No [[authn.issuers]]: the dev issuer (enabled by default) is the only one the bench needs.
# The login limits are raised far out of the way: the identity benchmark signs in hundreds of
# times from 127.0.0.1, and the defaults (30/minute per address) would answer 429. The argon2
# parameters stay the defaults (t=2, 19 MiB, p=1): they are what the login figure is about.
_GATEWAY_TOML = """\
[server]
https_port = {https}
http_port = 0
admin_port = {admin}
[tls]
cert_file = "{root}/certs/server.pem"
key_file = "{root}/certs/server-key.pem"
ca_file = "{root}/certs/ca.pem"
ca_key_file = "{root}/certs/ca-key.pem"
[upstream]
url = "{upstream_url}"
secret_file = "{root}/secrets/upstream.secret"
[issuer]
key_dir = "{root}/keys"
[identity]
db_path = "{root}/identity.duckdb"
mfa.secret_key_file = "{root}/secrets/totp.key"
sessions.key_file = "{root}/secrets/session.key"
login_limits.per_ip = ["100000/minute"]
login_limits.per_user_ip_failures = ["100000/minute"]
login_limits.per_user_failures = ["100000/minute"]
[policy]
dir = "{repo}/policies"
[audit]
jsonl_path = "{root}/audit.jsonl"
db_path = "{root}/audit.duckdb"
[encryption]
keystore_file = "{root}/data-keys/keystore.json"
master_key_file = "{root}/data-keys/keystore.master"
[decision_log]
path = "{root}/decisions.jsonl"
[routes]
file = "{repo}/config/routes.toml"
schema_dir = "{repo}/config/schemas"
"""


@dataclass(frozen=True)
class Ports:
    """Every port the bench listens on, picked free at start."""

    upstream: int
    gateway: int
    admin: int
    baseline_tls: int
    baseline_plain: int

    @classmethod
    def pick(cls) -> Ports:
        """Free loopback ports, one per listener."""
        return cls(free_port(), free_port(), free_port(), free_port(), free_port())


@dataclass(frozen=True)
class Stack:
    """A prepared bench directory and the ports its processes use."""

    root: Path
    ports: Ports

    @property
    def ca_file(self) -> Path:
        return self.root / "certs" / "ca.pem"

    @property
    def secret_file(self) -> Path:
        return self.root / "secrets" / "upstream.secret"

    @property
    def secret(self) -> str:
        return keys.read_secret(self.secret_file)

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.upstream}"

    def gateway_url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.ports.gateway}{path}"

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts the bench's dev CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def mint(self, roles: list[str], ttl_seconds: int = 3600) -> str:
        """A token from the gateway's dev issuer."""
        return mint_dev_token(self.root / "keys", "bench", roles, ttl_seconds)


def prepare(root: Path) -> Stack:
    """Write the gateway config, then run `gateway setup` and `upstream db init` into root."""
    ports = Ports.pick()
    config = _GATEWAY_TOML.format(
        root=root,
        repo=REPO,
        https=ports.gateway,
        admin=ports.admin,
        upstream_url=f"http://127.0.0.1:{ports.upstream}",
    )
    (root / "gateway.toml").write_text(config)
    _run([PYTHON, "-m", "gateway", "--config", str(root / "gateway.toml"), "setup"])
    _run([PYTHON, "-m", "upstream", "db", "init", "--db", str(root / "emp.duckdb")])
    return Stack(root, ports)


EXIT_STORE_LOCKED = 3  # gateway.identity.cli: the running gateway holds the account store


def add_user(stack: Stack, username: str, password: str, roles: list[str]) -> None:
    """A user of the built-in identity provider, made with the CLI before the gateway starts.

    A running gateway may hold the account store's lock: the CLI then exits 3.
    """
    command = [PYTHON, "-m", "gateway", "--config", str(stack.root / "gateway.toml"),
               "users", "add", username, "--password-stdin"]  # fmt: skip
    for role in roles:
        command += ["--role", role]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, input=password + "\n", check=False
    )
    if result.returncode == EXIT_STORE_LOCKED:
        raise RuntimeError(f"users add {username}: the account store is locked (gateway running?)")
    if result.returncode != 0:
        raise RuntimeError(f"users add {username} failed:\n{result.stdout}{result.stderr}")


def _run(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:4])} failed:\n{result.stdout}{result.stderr}")


def start_upstream(processes: ExitStack, stack: Stack) -> None:
    """The EMP service on plain HTTP."""
    command = [
        PYTHON,
        "-m",
        "upstream",
        "serve",
        "--port",
        str(stack.ports.upstream),
        "--db",
        str(stack.root / "emp.duckdb"),
        "--secret-file",
        str(stack.secret_file),
    ]
    _start(processes, stack, command, stack.ports.upstream, "upstream")


def start_stub_upstream(processes: ExitStack, stack: Stack) -> None:
    """The stub upstream on the stack's upstream port (a constant answer, no database)."""
    command = [PYTHON, str(REPO / "bench" / "stub_upstream.py"), "--port",
               str(stack.ports.upstream), "--secret-file", str(stack.secret_file)]  # fmt: skip
    _start(processes, stack, command, stack.ports.upstream, "stub-upstream")


def start_gateway(processes: ExitStack, stack: Stack) -> int:
    """The gateway with its whole pipeline, on HTTPS. Its process id."""
    command = [PYTHON, "-m", "gateway", "--config", str(stack.root / "gateway.toml"), "serve"]
    return _start(processes, stack, command, stack.ports.gateway, "gateway")


def start_baseline(processes: ExitStack, stack: Stack, *, with_tls: bool) -> int:
    """The bare pass-through proxy; with_tls uses the gateway's certificate. Its port."""
    port = stack.ports.baseline_tls if with_tls else stack.ports.baseline_plain
    command = [
        PYTHON,
        str(REPO / "bench" / "baseline_proxy.py"),
        "--port",
        str(port),
        "--upstream",
        stack.upstream_url,
        "--secret-file",
        str(stack.secret_file),
    ]
    if with_tls:
        certs = stack.root / "certs"
        command += ["--cert", str(certs / "server.pem"), "--key", str(certs / "server-key.pem")]
    _start(processes, stack, command, port, "baseline-tls" if with_tls else "baseline-plain")
    return port


def _start(processes: ExitStack, stack: Stack, command: list[str], port: int, name: str) -> int:
    log_file = stack.root / f"{name}.log"
    return processes.enter_context(running(command, port=port, log_file=log_file, cwd=REPO)).pid


def create_ticket(stack: Stack) -> int:
    """A ticket created through the gateway with an admin token; its id."""
    request = urllib.request.Request(  # noqa: S310 - a https URL built from our own port
        stack.gateway_url("/api/tickets"),
        data=json.dumps({"title": "bench"}).encode(),
        headers={
            "Authorization": f"Bearer {stack.mint(['admin'])}",
            "Content-Type": "application/json",
        },
        method="POST",
    )
    with urllib.request.urlopen(request, context=stack.ssl_context(), timeout=10) as answer:  # noqa: S310 - same
        ticket_id: int = json.load(answer)["id"]
    return ticket_id

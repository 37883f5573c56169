"""Helpers for tests of the gateway: free ports, processes that start and always stop, audit reads.

Shipped with the package (like structlog.testing) so that any test suite, ours or a
deployment's, can drive a real gateway. Never imported by the gateway itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

    from empsecrets.fieldcrypt import DataKeyRing, FieldCipher


# Under pytest-xdist, each worker process hands out ports from its own slice of a range below
# the kernel's ephemeral ports (32768+): a port another worker, or an outgoing connection, has
# just been given is never handed out here too (bind(0) in two processes can return the same
# port once the first probe socket is closed).
_SLICE_START, _SLICE_SIZE, _SLICES = 20_000, 3_000, 4
_next_in_slice: dict[int, int] = {}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not (worker.startswith("gw") and worker[2:].isdigit()):
        return _bind_probe(0)
    index = int(worker[2:]) % _SLICES
    first = _SLICE_START + index * _SLICE_SIZE
    offset = _next_in_slice.get(index, 0)
    for step in range(_SLICE_SIZE):
        port = first + (offset + step) % _SLICE_SIZE
        try:
            _bind_probe(port)
        except OSError:
            continue  # in use, or in TIME_WAIT
        _next_in_slice[index] = (offset + step + 1) % _SLICE_SIZE  # never the same one twice
        return port
    raise RuntimeError(f"no free port in {first}..{first + _SLICE_SIZE - 1}")


def _bind_probe(port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        bound: int = sock.getsockname()[1]
        return bound


def wait_for_port(
    port: int, *, timeout: float = 20.0, process: subprocess.Popen[Any] | None = None
) -> None:
    """Block until something accepts on 127.0.0.1:port; fail early if process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def running(
    command: Sequence[str],
    *,
    port: int,
    log_file: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a process, wait until it listens on port, and always stop it (SIGTERM, then KILL)."""
    with log_file.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - the caller's own command line, no shell
            list(command), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            cwd=cwd,
        )  # fmt: skip
        try:
            wait_for_port(port, process=process)
            yield process
        finally:
            stop(process)


def stop(process: subprocess.Popen[Any], timeout: float = 15.0) -> int:
    """SIGTERM and wait (a clean shutdown drains the audit queue); SIGKILL past timeout."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def read_audit_events(path: Path, request_id: str | None = None) -> list[dict[str, Any]]:
    """The audit events in a JSON-lines file, optionally only those of one request."""
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if request_id is None:
        return events
    return [e for e in events if e.get("request_id") == request_id]


def wait_for_audit_events(
    path: Path, request_id: str, *, wait: float = 2.0
) -> list[dict[str, Any]]:
    """The audit events of one request, waiting up to `wait` s for its line to be written."""
    deadline = time.monotonic() + wait
    while not (found := read_audit_events(path, request_id)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


async def raw_request(
    port: int, request_line: str, headers: dict[str, str], *, body: bytes = b"", ssl: Any = None
) -> tuple[int, dict[str, str], bytes]:
    """Send exactly this request line (no client-side path clean-up) and read the answer.

    HTTP clients normalise `..` and percent-encoding before sending, which would hide the very
    attacks the gateway must stop; this writes the bytes as given.
    """
    import asyncio  # noqa: PLC0415 - test helper, kept out of the module's import cost

    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl, server_hostname="localhost" if ssl else None
    )
    lines = [request_line, "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    return int(status_line.split()[1]), parsed, payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def mint_dev_token(
    key_dir: Path, sub: str = "alice", roles: Sequence[str] = ("reader",), ttl: int = 300
) -> str:
    """A token from the dev issuer's newest key, with the dev issuer's default iss and aud."""
    from gateway import keyring, keys  # noqa: PLC0415 - keep this module light for helpers
    from gateway.config import BuiltinIssuerConfig  # noqa: PLC0415

    dev = BuiltinIssuerConfig()
    private = keyring.load_keyring(key_dir)[0]
    return keys.mint_token(
        private, issuer=dev.issuer, audience=dev.audience, subject=sub, roles=list(roles),
        ttl_seconds=ttl,
    )  # fmt: skip


def data_keys_config(directory: Path) -> str:
    """An [encryption] table: the audit store's data keys in a keystore of their own in directory.

    A test's keys stay beside its files, never in the checkout's var/; `gateway setup` (or
    provision_data_keys) makes the ring there.
    """
    return (
        "[encryption]\n"
        f'keystore_file = "{directory}/keystore.json"\n'
        f'master_key_file = "{directory}/keystore.master"\n'
    )


def provision_data_keys(directory: Path, ring: DataKeyRing | None = None) -> FieldCipher:
    """Make the ring data_keys_config(directory) names, as `gateway setup` does; its cipher.

    With `ring` (the one a test's store was written with), that ring is stored there instead.
    """
    from empsecrets.fieldcrypt import FieldCipher, provision_ring, resolve_ring  # noqa: PLC0415
    from empsecrets.providers import Keystore, ProviderSettings  # noqa: PLC0415
    from gateway.config import EncryptionConfig  # noqa: PLC0415

    reference = EncryptionConfig().data_keys
    settings = ProviderSettings(
        keystore_file=directory / "keystore.json",
        master_key_file=directory / "keystore.master",
    )
    if ring is not None:
        keystore = Keystore.create(settings.keystore_file, settings.master_key_file)
        keystore.put(reference.removeprefix("keystore:"), ring.dumps())
    provision_ring(reference, settings)
    return FieldCipher(resolve_ring(reference, settings))

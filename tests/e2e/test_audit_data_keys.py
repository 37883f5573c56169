"""The running gateway's audit store is encrypted: a data key rotation while it runs is done by
the gateway itself (online), and a data key ring that cannot be read refuses the start."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import aiohttp
import duckdb
from support.stack import GATEWAY, REPO, PrivateGateway

from empsecrets.fieldcrypt import sealed_key_id
from gateway.auditcrypt import ENCRYPTED_COLUMNS
from gateway.testing import provision_data_keys, stop

PLANTED_AGENT = "planted-agent/7e51c0"


async def refused_requests(gateway: PrivateGateway, count: int) -> None:
    """Requests without a token (401, audited), each with the planted User-Agent."""
    connector = aiohttp.TCPConnector(ssl=gateway.ssl_context())
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            headers = {"User-Agent": PLANTED_AGENT}
            async with session.get(gateway.url("/api/tickets"), headers=headers) as response:
                return response.status

        assert set(await asyncio.gather(*(one() for _ in range(count)))) == {401}


def cli(gateway: PrivateGateway, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [*GATEWAY, "--config", str(gateway.config_file), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip


def stored_key_ids(gateway: PrivateGateway) -> set[str | None]:
    columns = ", ".join(ENCRYPTED_COLUMNS)
    with duckdb.connect(str(gateway.root / "audit.duckdb"), read_only=True) as connection:
        rows = connection.execute(f"SELECT {columns} FROM audit_events").fetchall()  # noqa: S608
    return {sealed_key_id(value) for row in rows for value in row if value is not None}


async def test_a_rotation_while_the_gateway_runs_is_done_by_the_gateway(make_gateway):
    """`secrets rotate gateway_data_key` asks the running gateway (the store is locked): it
    seals new rows with the new key and re-encrypts the old ones; after a stop, every value is
    under the new key, nothing planted is in the store's files, and the chain verifies."""
    gateway = make_gateway("http://127.0.0.1:9")
    old = provision_data_keys(gateway.root / "data-keys").ring
    await refused_requests(gateway, 20)
    planned = cli(gateway, "secrets", "rotate", "gateway_data_key", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["mode"] == "online"
    rotated = cli(gateway, "secrets", "rotate", "gateway_data_key")
    assert rotated.returncode == 0, rotated.stderr
    summary = json.loads(rotated.stdout)
    assert summary["mode"] == "online"
    assert summary["rows"] >= 20
    await refused_requests(gateway, 5)  # sealed under the new key from the start
    assert gateway.process is not None
    assert stop(gateway.process) == 0
    ring = provision_data_keys(gateway.root / "data-keys").ring
    assert ring.current == summary["new_key_id"] != old.current
    assert set(ring.keys) == {old.current, ring.current}  # the old key stays, for archives
    assert stored_key_ids(gateway) == {ring.current}
    for path in gateway.root.glob("audit.duckdb*"):
        assert PLANTED_AGENT.encode() not in path.read_bytes(), path.name
    verified = cli(gateway, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    kinds = [json.loads(line)["kind"] for line in gateway.audit_file.read_text().splitlines()]
    assert kinds.count("secrets.rotated") == 1


def test_a_ring_that_cannot_be_read_refuses_the_start(make_gateway):
    """`gateway serve` with encryption.data_keys naming nothing: exit 2, the setting named."""
    gateway = make_gateway("http://127.0.0.1:9", start=False)
    env = {**os.environ, "GATEWAY__ENCRYPTION__DATA_KEYS": "keystore:missing"}
    started = cli(gateway, "serve", env=env)
    assert started.returncode == 2, started.stdout + started.stderr
    assert "encryption.data_keys" in started.stderr
    assert not (gateway.root / "audit.duckdb").exists()

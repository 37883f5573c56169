"""`gateway secrets rotate upstream_secret` against a real gateway and EMP service under load:
no request fails, the old secret is accepted until the overlap ends and refused after, every
rotation and dry run is audited, and no value reaches the output or the audit trail."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import ExitStack

import aiohttp
import pytest
from support.stack import GATEWAY, PYTHON, REPO, start_gateway, start_upstream

from gateway.testing import free_port


def _direct(port: int, secret: str) -> int:
    """Status of a call straight to the EMP service with this secret (401: not trusted)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/tickets",
        headers={"X-Gateway-Secret": secret, "X-Gateway-Subject": "test", "X-Gateway-Roles": ""},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _rotate(gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, "--config", str(gateway.config_file), "secrets", "rotate", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture
def deployment(make_gateway):
    """A private gateway and EMP service sharing one secrets directory, as `make run` sets up."""
    port = free_port()
    gateway = make_gateway(f"http://127.0.0.1:{port}", start=False)
    subprocess.run([PYTHON, "-m", "upstream", "db", "init", "--db", str(gateway.root / "emp.duckdb")],
                   check=True, cwd=REPO, capture_output=True)  # fmt: skip
    with ExitStack() as processes:
        start_upstream(processes, gateway.root, port)
        gateway.process = start_gateway(
            processes, gateway.root, gateway.config_file, gateway.https_port
        )
        yield gateway, port


async def _load(gateway, token: str, stop: asyncio.Event) -> list[int]:
    """Requests back to back through the gateway until told to stop; their statuses."""
    statuses: list[int] = []
    connector = aiohttp.TCPConnector(ssl=gateway.ssl_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        while not stop.is_set():
            async with session.get(
                gateway.url("/api/tickets"), headers={"Authorization": f"Bearer {token}"}
            ) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


async def test_rotation_under_load_loses_no_request_and_ends_the_old_secret(deployment):
    gateway, port = deployment
    secret_file = gateway.root / "secrets" / "upstream.secret"
    old = secret_file.read_text().strip()
    token = gateway.mint("rotation-load", ("reader",))
    stop = asyncio.Event()
    load = asyncio.create_task(_load(gateway, token, stop))
    await asyncio.sleep(0.5)
    result = await asyncio.to_thread(_rotate, gateway, "upstream_secret", "--overlap-seconds", "4")
    rotated_at = time.monotonic()
    await asyncio.sleep(2.0)  # every gateway has switched within a second
    stop.set()
    statuses = await load
    assert result.returncode == 0, result.stderr
    new = secret_file.read_text().strip()
    assert new != old
    assert len(statuses) > 20
    assert set(statuses) == {200}, f"{statuses.count(200)} of {len(statuses)} were 200"
    # Both accepted during the overlap; the old one refused once it is over.
    assert _direct(port, new) == 200
    assert _direct(port, old) == 200
    await asyncio.sleep(max(0.0, 4.0 + 1.5 - (time.monotonic() - rotated_at)))
    assert _direct(port, old) == 401
    assert _direct(port, new) == 200
    assert _direct(port, "x" * 43) == 401
    # The gateway sends the new one: a request after the overlap still passes.
    connector = aiohttp.TCPConnector(ssl=gateway.ssl_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = {"Authorization": f"Bearer {token}"}
        async with session.get(gateway.url("/api/tickets"), headers=headers) as response:
            assert response.status == 200
    # Audited once, with files and times and no value; nothing secret printed.
    summary = json.loads(result.stdout)
    assert summary["name"] == "upstream_secret"
    assert summary["overlap_seconds"] == 4
    assert not (gateway.root / "secrets" / "upstream.secret.next").exists()
    events = [e for e in gateway.audit() if e["kind"].startswith("secrets.")]
    assert [e["kind"] for e in events] == ["secrets.rotated"]
    assert events[0]["detail"]["upstream_reachable"] is True
    trail = (gateway.root / "audit.jsonl").read_text() + result.stdout + result.stderr
    for value in (old, new):
        assert value not in trail
        assert value not in (gateway.root / "gateway.log").read_text()


def test_a_dry_run_changes_nothing_and_is_audited(deployment):
    gateway, _port = deployment
    secret_file = gateway.root / "secrets" / "upstream.secret"
    before = secret_file.read_bytes()
    result = _rotate(gateway, "upstream_secret", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dry_run"] is True
    assert secret_file.read_bytes() == before
    assert sorted(p.name for p in secret_file.parent.glob("upstream.secret*")) == [
        "upstream.secret"
    ]
    deadline = time.monotonic() + 5
    while not [e for e in gateway.audit() if e["kind"] == "secrets.rotation_planned"]:
        assert time.monotonic() < deadline, "no secrets.rotation_planned event"
        time.sleep(0.1)


def test_a_service_that_never_accepts_the_new_secret_switches_nothing(deployment, tmp_path):
    """The EMP service reads another file: the new secret is never accepted, so the gateway
    keeps the old one, `.next` is removed, the failure is audited and the exit status is 1."""
    gateway, port = deployment
    config = gateway.config_file.read_text()
    elsewhere = tmp_path / "elsewhere.secret"
    secret_file = gateway.root / "secrets" / "upstream.secret"
    elsewhere.write_bytes(secret_file.read_bytes())
    elsewhere.chmod(0o600)
    gateway.config_file.write_text(config.replace(str(secret_file), str(elsewhere)))
    before = elsewhere.read_bytes()
    result = _rotate(gateway, "upstream_secret", "--wait-seconds", "2")
    assert result.returncode == 1
    assert "did not accept the new secret" in result.stderr
    assert elsewhere.read_bytes() == before
    assert not (tmp_path / "elsewhere.secret.next").exists()
    assert not (tmp_path / "elsewhere.secret.previous").exists()
    assert _direct(port, before.decode().strip()) == 200


def test_secrets_rotated_elsewhere_are_named_not_half_rotated(deployment):
    gateway, _port = deployment
    unknown = _rotate(gateway, "no_such_secret")
    assert unknown.returncode == 2
    assert "secrets check" in unknown.stderr
    cert = _rotate(gateway, "tls_certificate")
    assert cert.returncode == 2
    assert "renew the certificate" in cert.stderr

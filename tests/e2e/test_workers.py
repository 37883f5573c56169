"""`gateway serve --workers 2`: two processes behind one port with Redis state. Both serve;
/metrics on the admin port adds up both (Prometheus multiprocess mode, checked by promtool);
the audit store gets every event of both chains, intact; an audit search works whichever
worker takes it; a worker that dies is replaced; memory:// state refuses to start."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import duckdb
import pytest
from support.identity import start_identity_gateway
from support.prometheus_server import promtool
from support.redis_server import redis_server_process
from support.stack import GATEWAY, REPO

from gateway.testing import stop

REQUESTS = 60


@pytest.fixture(scope="module")
def workers(stack, tmp_path_factory):
    """A gateway of two workers (Redis state) in front of the stack's EMP service."""
    root = tmp_path_factory.mktemp("workers")
    with redis_server_process(root / "redis") as server, ExitStack() as processes:
        gateway = start_identity_gateway(
            processes, root / "gw", upstream_port=stack.upstream_port,
            upstream_secret=stack.secret, identity=f'state_url = "{server.url}"',
            serve_args=("--workers", "2"),
        )  # fmt: skip
        _wait_ready(gateway.admin_port)
        yield gateway


def _admin(port: int, path: str) -> str:
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _wait_ready(admin_port: int) -> None:
    """Worker 0's admin port answers (the API port answered before the fixture returned)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if json.loads(_admin(admin_port, "/healthz"))["status"] == "ok":
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "worker 0's admin port never answered"
        time.sleep(0.3)


def _worker_pids(supervisor_pid: int) -> list[int]:
    children = subprocess.run(
        ["pgrep", "-P", str(supervisor_pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    return sorted(int(pid) for pid in children)


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _requests(gateway, token: str, count: int) -> list[int]:
    """Each request on a new connection, so the kernel picks a worker each time."""
    statuses = []
    for _ in range(count):
        async with (
            gateway.session() as session,
            session.get(
                gateway.url("/api/tickets"), headers={"Authorization": f"Bearer {token}"}
            ) as response,
        ):
            await response.read()
            statuses.append(response.status)
    return statuses


async def test_both_workers_serve_and_metrics_add_up(workers):
    gateway = workers
    assert len(_worker_pids(gateway.process.pid)) == 2
    before = _value(_admin(gateway.admin_port, "/metrics"), "gateway_requests_total",
                    route="tickets.list", decision="allow")  # fmt: skip
    async with gateway.session() as session:
        _, tokens = await gateway.login(session, "alice")
    statuses = await _requests(gateway, tokens["access_token"], REQUESTS)
    assert statuses == [200] * REQUESTS
    await asyncio.sleep(1.5)  # the watched gauges are written every second
    text = _admin(gateway.admin_port, "/metrics")
    after = _value(text, "gateway_requests_total", route="tickets.list", decision="allow")
    assert after - before == REQUESTS  # both workers' counts, added up
    assert _value(text, "gateway_tls_enabled") == 1  # livemin over two live workers
    assert 'pid="' not in text  # gauges are aggregated, not listed per process
    # Both workers took requests: each seals its own chain.
    chains = {json.loads(line)["chain"] for line in gateway.audit_file.read_text().splitlines()
              if json.loads(line).get("route") == "tickets.list"}  # fmt: skip
    assert len(chains) == 2, chains
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_an_audit_search_works_on_either_worker(workers):
    """Worker 0 holds the store; a search the kernel gives worker 1 is asked of worker 0."""
    gateway = workers
    async with gateway.session() as session:
        _, tokens = await gateway.login(session, "root")
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    for _ in range(16):
        async with (
            gateway.session() as session,
            session.get(gateway.url("/admin/audit?limit=5"), headers=headers) as response,
        ):
            body = await response.json()
            assert response.status == 200, body
            assert body["count"] == 5
    events = [json.loads(line) for line in gateway.audit_file.read_text().splitlines()]
    search_chains = {e["chain"] for e in events if e.get("route") == "audit.search"}
    assert len(search_chains) == 2, "both workers answered searches"


async def test_a_worker_that_dies_is_replaced(workers):
    """SIGKILL one worker: the supervisor starts another, and requests keep being answered."""
    gateway = workers
    first = _worker_pids(gateway.process.pid)
    await asyncio.sleep(1.5)  # past the flush interval: everything sealed so far is handed off
    os.kill(first[-1], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        now = _worker_pids(gateway.process.pid)
        if len(now) == 2 and first[-1] not in now:
            break
        assert time.monotonic() < deadline, now
        await asyncio.sleep(0.2)
    assert gateway.process.poll() is None
    async with gateway.session() as session:
        _, tokens = await gateway.login(session, "alice")
    assert await _requests(gateway, tokens["access_token"], 10) == [200] * 10


def test_memory_state_refuses_several_workers(make_gateway):
    gateway = make_gateway("http://127.0.0.1:9", start=False)
    result = subprocess.run(
        [*GATEWAY, "--config", str(gateway.config_file), "serve", "--workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "identity.state_url = redis" in result.stderr


def test_stopped_workers_leave_every_event_in_the_store_intact(workers):
    """SIGTERM to the supervisor: both workers drain; the store holds every JSON-line event of
    both chains (worker 1's handed to worker 0), and `gateway audit verify` says intact."""
    gateway = workers
    stop(gateway.process)
    assert gateway.process.returncode == 0
    lines = [json.loads(line) for line in gateway.audit_file.read_text().splitlines()]
    with duckdb.connect(str(gateway.root / "audit.duckdb"), read_only=True) as db:
        stored = {row[0] for row in db.execute("SELECT event_id FROM audit_events").fetchall()}
        chains = db.execute("SELECT count(DISTINCT chain) FROM audit_checkpoints").fetchone()[0]
    missing = {e["event_id"] for e in lines} - stored
    assert missing == set(), f"{len(missing)} events never reached the store"
    assert chains >= 2  # worker 0's and worker 1's (and its replacement's, if it got requests)
    verify = subprocess.run(
        [*GATEWAY, "--config", str(gateway.config_file), "audit", "verify"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert re.search(r"\bintact\b", verify.stdout)


def test_workers_stop_when_the_supervisor_is_killed(tmp_path):
    """SIGKILL to the supervisor: its workers notice within seconds, drain and exit."""
    with redis_server_process(tmp_path / "redis") as server, ExitStack() as processes:
        gateway = start_identity_gateway(
            processes, tmp_path / "gw", upstream_port=9, upstream_secret="x" * 43,
            identity=f'state_url = "{server.url}"', serve_args=("--workers", "2"),
        )  # fmt: skip
        workers = _worker_pids(gateway.process.pid)
        assert len(workers) == 2
        gateway.process.kill()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "orphaned workers kept running"
            time.sleep(0.2)
        assert "workers.orphaned" in (gateway.root / "gateway.log").read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = (
        Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() else "X"
    )
    return state != "Z"  # a zombie has exited; its parent (pytest) has not reaped it

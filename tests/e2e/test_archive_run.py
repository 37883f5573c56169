"""Retention against a real gateway and EMP service: `gateway archive run` archives every table,
verifies, deletes, audits; the chain stays intact; a run killed half-way loses nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import duckdb
import pytest
from support.archive import archived, committed_archives, days_ago, write_chain
from support.stack import GATEWAY, PYTHON, REPO, PrivateGateway, start_gateway

from gateway.auditchain import load_checkpoint_key
from gateway.config import load_config
from gateway.policy.decisionlog import read_log, rotate_file, segments
from gateway.testing import free_port, provision_data_keys, running, stop

RECORDS = "CAST(batch_id AS VARCHAR), record_index, CAST(record AS VARCHAR)"


@dataclass
class Deployment:
    gateway: PrivateGateway
    upstream_port: int
    upstream_config: Path
    archive: Path
    processes: ExitStack

    @property
    def emp(self) -> Path:
        return self.gateway.root / "emp.duckdb"

    def start_upstream(self, command: list[str] | None = None) -> subprocess.Popen[bytes]:
        """The EMP service (or the command given) on the deployment's port, always stopped."""
        if command is None:
            command = [PYTHON, "-m", "upstream", "serve", "--config", str(self.upstream_config),
                       "--port", str(self.upstream_port)]  # fmt: skip
        return self.processes.enter_context(
            running(
                command, port=self.upstream_port, log_file=self.gateway.root / "up.log", cwd=REPO
            )
        )

    def start_gateway(self) -> None:
        gw = self.gateway
        gw.process = start_gateway(self.processes, gw.root, gw.config_file, gw.https_port)

    def archive_run(self) -> tuple[int, dict]:
        done = subprocess.run(
            [*GATEWAY, "--config", str(self.gateway.config_file), "archive", "run"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.stdout, done.stderr
        return done.returncode, json.loads(done.stdout)


def tables(report: dict) -> dict[str, dict]:
    return {table["table"]: table for table in report["tables"]}


def seed_emp(path: Path) -> None:
    """30 records a year old, 5 from yesterday; 2 reviewed quarantine rows, one pending."""
    with duckdb.connect(str(path)) as connection:
        for n in range(35):
            connection.execute(
                "INSERT INTO ingest_records (stream, batch_id, batch_seq, record_index, record, "
                "received_at) VALUES ('s', uuid(), nextval('ingest_batches_seq'), 0, ?, "
                "CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP) - to_days(CAST(? AS INTEGER)))",
                [json.dumps({"n": n}), 365 if n < 30 else 1],
            )
        for status in ("accepted", "discarded", "pending"):
            connection.execute(
                "INSERT INTO ingest_quarantine (stream, batch_id, record_index, record, flags, "
                "received_at, status, reviewed_at) VALUES ('s', uuid(), 0, '{}', '[]', "
                "now() - INTERVAL 90 DAY, ?, CASE WHEN ? = 'pending' THEN NULL "
                "ELSE now() - INTERVAL 60 DAY END)",
                [status, status],
            )


def emp_rows(path: Path) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as connection:
        return connection.execute(f"SELECT {RECORDS} FROM ingest_records").fetchall()  # noqa: S608


@pytest.fixture
def deployment(make_gateway, tmp_path):
    """A gateway and EMP service (not started) whose stores hold a year-old past."""
    port = free_port()
    archive = tmp_path / "archive"
    retention = f'[retention]\narchive_dir = "{archive}"\nenabled = false\n'
    gateway = make_gateway(f"http://127.0.0.1:{port}", extra=retention, start=False)
    root = gateway.root
    subprocess.run([PYTHON, "-m", "upstream", "db", "init", "--db", str(root / "emp.duckdb")],
                   check=True, cwd=REPO, capture_output=True)  # fmt: skip
    upstream_config = root / "upstream.toml"
    upstream_config.write_text(
        f'[database]\npath = "{root / "emp.duckdb"}"\n'
        f'[trust]\nsecret_file = "{root / "secrets" / "upstream.secret"}"\n'
        f'[retention]\narchive_dir = "{archive}"\n'
    )
    seed_emp(root / "emp.duckdb")
    key_file = load_config(gateway.config_file, env={}).audit.checkpoint_key_file
    key = load_checkpoint_key(key_file if key_file.is_absolute() else REPO / key_file)
    # An earlier gateway process's chain: a year and a half old, then last week.
    cipher = provision_data_keys(root / "data-keys")  # the ring `gateway setup` made there
    asyncio.run(
        write_chain(
            root / "audit.duckdb", key, [[days_ago(550)] * 8, [days_ago(7)] * 2], cipher=cipher
        )
    )
    old = days_ago(120).isoformat()
    (root / "decisions.jsonl").write_text(
        "".join(json.dumps({"decision_id": f"old-{n}", "timestamp": old}) + "\n" for n in range(6))
    )
    rotate_file(root / "decisions.jsonl")  # a segment closed four months ago
    with ExitStack() as processes:
        yield Deployment(gateway, port, upstream_config, archive, processes)


async def traffic(gateway: PrivateGateway, count: int) -> list[str]:
    """Requests through the gateway; the request ids of those the policy allowed.

    Each allowed one left a decision (decision_id = request id). Under CPU load a decision past
    its 50 ms budget is refused (authz.engine_error) before it is logged.
    """
    token = gateway.mint("alice", ("reader",))
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(ssl=gateway.ssl_context())
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> tuple[int, str]:
            async with session.get(gateway.url("/api/tickets?limit=1"), headers=headers) as r:
                return r.status, r.headers["X-Request-Id"]

        answers = await asyncio.gather(*(one() for _ in range(count)))
    assert {status for status, _ in answers} <= {200, 403}
    return [request_id for status, request_id in answers if status == 200]


def admin_get(gateway: PrivateGateway, path: str) -> tuple[int, str]:
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{gateway.admin_port}{path}", timeout=30
        ) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_archive_run_on_a_running_gateway_archives_every_table(deployment):
    """The CLI asks the running gateway; every table's old rows move; the chain stays intact."""
    before = emp_rows(deployment.emp)
    upstream = deployment.start_upstream()
    deployment.start_gateway()
    gw = deployment.gateway
    await traffic(gw, 5)
    status, report = deployment.archive_run()
    assert status == 0, report
    assert report["trigger"] == "admin"  # the running gateway did it, not the CLI process
    found = tables(report)
    assert {name: t["status"] for name, t in found.items()} == {
        "audit_events": "archived", "audit_checkpoints": "archived",
        "decision_log": "archived", "ingest_records": "archived",
        "ingest_quarantine": "archived",
    }  # fmt: skip
    assert found["audit_events"]["rows"] == 8
    assert found["decision_log"]["rows"] == 6
    assert found["ingest_records"]["rows"] == 30
    assert found["ingest_quarantine"]["rows"] == 2
    # What left the EMP service's store is in its archive, once.
    stop(gw.process)  # the stores can be read once their owners stop
    stop(upstream)
    kept = emp_rows(deployment.emp)
    assert sorted(kept + archived(deployment.archive, "ingest_records", RECORDS)) == sorted(before)
    assert len(kept) == 5
    [event] = [e for e in gw.audit() if e["kind"] == "archive.completed"]
    assert event["detail"]["run_id"] == report["run_id"]
    verified = subprocess.run(
        [*GATEWAY, "--config", str(gw.config_file), "audit", "verify"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "(1-8 archived)" in verified.stdout


async def test_the_live_verify_and_metrics_after_a_run(deployment):
    """/audit/verify stays intact across the cut; the metrics count the rows and the run."""
    deployment.start_upstream()
    deployment.start_gateway()
    gw = deployment.gateway
    status, report = deployment.archive_run()
    assert status == 0, report
    code, body = admin_get(gw, "/audit/verify")
    assert code == 200, body
    chains = json.loads(body)["chains"]
    assert any(c["archived_through"] == 8 and c["first_seq"] == 9 for c in chains), chains
    _, metrics = admin_get(gw, "/metrics")
    assert 'gateway_archive_rows_total{table="audit_events"} 8.0' in metrics
    assert 'gateway_archive_rows_total{table="ingest_records"} 30.0' in metrics
    assert 'gateway_archive_runs_total{outcome="completed"} 1.0' in metrics
    assert "gateway_archive_last_success_timestamp_seconds 0.0" not in metrics


async def test_archive_run_on_a_stopped_gateway_runs_in_the_cli(deployment):
    """With the gateway stopped the CLI opens the store itself, and audits through the inbox."""
    deployment.start_upstream()
    status, report = deployment.archive_run()
    assert status == 0, report
    assert report["trigger"] == "cli"
    assert tables(report)["audit_events"]["rows"] == 8
    gw = deployment.gateway
    assert [e["kind"] for e in gw.audit()] == ["archive.completed"]
    assert list((gw.root / "audit-inbox").glob("*.ndjson"))  # the row, for the next start
    verified = subprocess.run(
        [*GATEWAY, "--config", str(gw.config_file), "audit", "verify"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout


async def test_an_upstream_killed_mid_run_loses_nothing_and_the_rerun_completes(deployment):
    """The EMP service dies after its export: the run fails and says so; the next completes."""
    crashing = [PYTHON, str(REPO / "tests/fixtures/crashing_upstream.py"),
                str(deployment.upstream_config), str(deployment.upstream_port), "deleted"]  # fmt: skip
    before = emp_rows(deployment.emp)
    process = deployment.start_upstream(crashing)
    deployment.start_gateway()
    gw = deployment.gateway
    status, report = deployment.archive_run()
    assert status == 1
    found = tables(report)
    assert found["audit_events"]["status"] == "archived"  # the gateway's own part went on
    assert found["ingest_records"]["status"] == "failed"
    assert process.wait(timeout=10) == 3
    upstream = deployment.start_upstream()
    status, report = deployment.archive_run()
    assert status == 0, report
    assert tables(report)["ingest_records"]["rows"] == 30
    assert len(tables(report)["ingest_records"]["discarded"]) == 1  # the crashed run's file
    stop(gw.process)
    stop(upstream)
    kept = emp_rows(deployment.emp)
    assert sorted(kept + archived(deployment.archive, "ingest_records", RECORDS)) == sorted(before)
    assert len(committed_archives(deployment.archive, "ingest_records")) == 1
    kinds = [e["kind"] for e in gw.audit() if e["kind"].startswith("archive.")]
    assert kinds == ["archive.failed", "archive.completed"]


async def test_decisions_written_during_runs_are_all_kept(deployment):
    """Requests flowing while runs rotate the decision log: every decision is in the log."""
    deployment.start_upstream()
    deployment.start_gateway()
    gw = deployment.gateway
    stop_runs = asyncio.Event()
    runs: list[dict] = []

    async def keep_archiving() -> None:
        while not stop_runs.is_set():
            runs.append((await asyncio.to_thread(deployment.archive_run))[1])

    runner = asyncio.create_task(keep_archiving())
    allowed: list[str] = []
    while len(runs) < 3:
        allowed += await traffic(gw, 10)
    stop_runs.set()
    await runner
    assert all(run["outcome"] == "completed" for run in runs), runs
    stop(gw.process)
    log_path = gw.root / "decisions.jsonl"
    ids = [e["decision_id"] for e in read_log(log_path)]
    assert sorted(ids) == sorted(allowed)  # each once; the 6 old ones were archived
    assert len(allowed) >= 30
    assert segments(log_path)


async def test_the_schedule_runs_by_itself(make_gateway, tmp_path):
    """With retention.enabled the gateway runs on its own, audited as trigger "schedule"."""
    retention = (f'[retention]\narchive_dir = "{tmp_path / "archive"}"\n'
                 "start_delay_seconds = 0.5\nupstream = false\n")  # fmt: skip
    gw = make_gateway("http://127.0.0.1:9", extra=retention)
    deadline = time.monotonic() + 20
    while not (events := [e for e in gw.audit() if e["kind"].startswith("archive.")]):
        assert time.monotonic() < deadline, "no scheduled run"
        await asyncio.sleep(0.2)
    assert events[0]["kind"] == "archive.completed"
    assert events[0]["detail"]["trigger"] == "schedule"


async def test_the_archive_route_is_not_reachable_through_the_gateway(stack, client):
    """/internal/archive exists only behind the gateway: no route names it."""
    token = stack.mint("root", ("admin",))
    async with client.post(
        stack.url("/internal/archive"), json={"run_id": "0123456789ab"},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:  # fmt: skip
        body = await response.json()
    assert (response.status, body["reason_id"]) == (404, "route.not_found")

"""The archival run in a gateway process: every run audited and counted; failures keep rows."""

from __future__ import annotations

import asyncio
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.archive import audit_event, days_ago, write_chain
from support.datakeys import CIPHER

from gateway.archive.job import ArchiveBusy, ArchiveJob, record_report
from gateway.archive.report import TableResult
from gateway.audit import AuditWriter
from gateway.auditchain import verify
from gateway.config import ConfigError, RetentionConfig, load_config
from gateway.metrics import GatewayMetrics
from gateway.policy.decisionlog import DecisionLog

KEY = Ed25519PrivateKey.generate()


def old_line(n: int) -> str:
    return json.dumps({"decision_id": f"old-{n}", "timestamp": days_ago(200).isoformat()})


@pytest.fixture
async def gateway(tmp_path):
    """A gateway's audit writer over a store holding an earlier process's old chain."""
    db = tmp_path / "audit.duckdb"
    await write_chain(db, KEY, [[days_ago(500)] * 6, [days_ago(2)] * 2])
    (tmp_path / "decisions.jsonl").write_text("".join(old_line(n) + "\n" for n in range(4)))
    writer = AuditWriter(
        jsonl_path=str(tmp_path / "audit.jsonl"), db_path=db, flush_interval_seconds=3600,
        batch_size=10_000, checkpoint_key=KEY, cipher=CIPHER,
    )  # fmt: skip
    await writer.start()
    decisions = DecisionLog(tmp_path / "decisions.jsonl")
    writer.emit(audit_event(900, days_ago(0)))
    yield writer, decisions
    decisions.close()
    await writer.close()


def job_for(tmp_path, writer, decisions, metrics, observe=None, upstream=None) -> ArchiveJob:
    return ArchiveJob(
        retention=RetentionConfig(archive_dir=tmp_path / "archive"),
        store=writer,
        checkpoint_key=KEY,
        decision_log=tmp_path / "decisions.jsonl",
        rotate=decisions.rotate,
        upstream=upstream,
        record=lambda report: record_report(report, emit=writer.emit, metrics=metrics),
        observe=observe,
    )


def events_of(tmp_path, kind: str) -> list[dict]:
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


async def test_a_run_is_audited_and_counted(gateway, tmp_path):
    """archive.completed carries each table's counts, files and checks; the metrics follow."""
    writer, decisions = gateway
    metrics = GatewayMetrics()
    report = await job_for(tmp_path, writer, decisions, metrics).run("admin")
    assert report.outcome == "completed"
    [event] = events_of(tmp_path, "archive.completed")
    tables = {t["table"]: t for t in event["detail"]["tables"]}
    assert (tables["audit_events"]["rows"], tables["audit_checkpoints"]["rows"]) == (6, 1)
    assert tables["decision_log"]["rows"] == 4
    assert event["detail"]["trigger"] == "admin"
    assert event["detail"]["run_id"] in tables["audit_events"]["files"][0]
    assert metrics.archive_rows.labels("audit_events")._value.get() == 6
    assert metrics.archive_runs.labels("completed")._value.get() == 1
    assert metrics.archive_last_success._value.get() > 0
    reports = await writer.run(lambda cursor: verify(cursor, KEY.public_key(), CIPHER))
    assert all(r.intact for r in reports), [r.problems for r in reports]


async def test_a_failed_verification_is_audited_and_keeps_the_rows(gateway, tmp_path):
    """An archive that does not read back fails the run: archive.failed, and no row goes."""
    writer, decisions = gateway
    metrics = GatewayMetrics()

    def tamper(table, step):
        if step == "exported":
            for parquet in (tmp_path / "archive" / table).glob("*.parquet"):
                parquet.write_bytes(parquet.read_bytes().replace(b"PAR1", b"PAR2", 1))

    before = await writer.query("SELECT count(*) FROM audit_events", [])
    report = await job_for(tmp_path, writer, decisions, metrics, observe=tamper).run("cli")
    assert report.outcome == "failed"
    [event] = events_of(tmp_path, "archive.failed")
    assert {t["status"] for t in event["detail"]["tables"]} == {"failed"}
    after = await writer.query("SELECT count(*) FROM audit_events WHERE kind = 'request'", [])
    assert after == before
    assert metrics.archive_runs.labels("failed")._value.get() == 1
    assert metrics.archive_last_success._value.get() == 0


async def test_the_upstream_part_is_in_the_same_event(gateway, tmp_path):
    """The EMP service's answer (or its absence) becomes part of the run's one event."""
    writer, decisions = gateway

    async def upstream(run_id: str) -> list[TableResult]:
        result = TableResult("ingest_records")
        result.fail(f"the EMP service could not be asked ({run_id})")
        return [result]

    report = await job_for(tmp_path, writer, decisions, None, upstream=upstream).run("schedule")
    assert report.outcome == "failed"
    [event] = events_of(tmp_path, "archive.failed")
    tables = {t["table"]: t["status"] for t in event["detail"]["tables"]}
    assert tables == {"audit_events": "archived", "audit_checkpoints": "archived",
                      "decision_log": "archived", "ingest_records": "failed"}  # fmt: skip


async def test_one_run_at_a_time(gateway, tmp_path):
    """A run asked for while one is in progress is refused, not queued twice."""
    writer, decisions = gateway
    started = asyncio.Event()
    release = asyncio.Event()

    async def upstream(_run_id: str) -> list[TableResult]:
        started.set()
        await release.wait()
        return []

    job = job_for(tmp_path, writer, decisions, None, upstream=upstream)
    first = asyncio.create_task(job.run("schedule"))
    await started.wait()
    with pytest.raises(ArchiveBusy):
        await job.run("admin")
    release.set()
    assert (await first).outcome == "completed"


async def test_closing_stops_a_run_at_its_next_step(gateway, tmp_path):
    """A stopping gateway ends the run between steps: nothing half-deleted, all rows kept."""
    writer, decisions = gateway
    job_holder: list[ArchiveJob] = []

    def stop_during_export(_table, step):
        if step == "exported":
            job_holder[0]._stopping = True  # what close() sets, seen from the worker thread

    job = job_for(tmp_path, writer, decisions, None, observe=stop_during_export)
    job_holder.append(job)
    report = await job.run("schedule")
    assert {t.status for t in report.tables} == {"failed"}
    assert "stopping" in report.tables[0].error
    rows = await writer.query("SELECT count(*) FROM audit_events WHERE kind = 'request'", [])
    assert rows == [(9,)]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("audit_days = 0", "retention.audit_days = 0"),
        ("decision_log_days = -5", "retention.decision_log_days"),
        ("audit_days = 36501", "1 to 36500 days"),
        ("audit_days = true", "expected int, got bool"),
        ("audit_days = 1.5", "expected int, got float"),
        ("interval_seconds = 1", "interval_seconds must be at least 60"),
        ("keep_days = 3", "unknown key retention.keep_days"),
    ],
    ids=[
        "zero",
        "negative",
        "a typo of a century",
        "a boolean",
        "a fraction",
        "a busy loop",
        "an unknown key",
    ],
)
def test_a_bad_retention_setting_stops_the_start(tmp_path, setting, message):
    """No window value can mean "archive everything"; the key is named."""
    path = tmp_path / "gateway.toml"
    path.write_text(f"[retention]\n{setting}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_the_defaults_are_a_year_of_audit_and_a_quarter_of_decisions(tmp_path):
    """Absent settings mean the documented windows."""
    path = tmp_path / "gateway.toml"
    path.write_text("")
    retention = load_config(path, env={}).retention
    assert (retention.audit_days, retention.decision_log_days) == (365, 90)
    assert retention.enabled
    assert retention.upstream


def test_the_shipped_config_loads_with_its_retention(tmp_path):
    """config/gateway.toml documents the same windows as the defaults."""
    config = load_config(None, env={})
    assert config.retention == RetentionConfig()

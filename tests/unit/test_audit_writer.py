"""The audit writer on a real DuckDB file: lines at once, rows in batches, nothing lost when a
flush fails or the writer closes."""

from __future__ import annotations

import json

import duckdb
import pytest

from gateway.audit import (
    AuditWriter,
    inbox_dir,
    protocol_error_event,
    record_offline,
    system_event,
)


@pytest.fixture
async def writer(tmp_path):
    audit = AuditWriter(
        jsonl_path=str(tmp_path / "audit.jsonl"),
        db_path=tmp_path / "audit.duckdb",
        flush_interval_seconds=3600,  # flushes happen when the test says
        batch_size=10_000,
    )
    await audit.start()
    yield audit
    await audit.close()


def events(n: int) -> list[dict]:
    return [
        protocol_error_event(f"req-{i}", 400, "request.malformed_http", "127.0.0.1")
        for i in range(n)
    ]


async def test_lines_are_written_at_once_and_rows_on_flush(writer, tmp_path):
    """The JSON line exists as soon as emit returns; the DuckDB row after flush."""
    for event in events(3):
        writer.emit(event)
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["req-0", "req-1", "req-2"]
    await writer.flush()
    rows = writer._db.execute(
        "SELECT request_id, reason_id, status FROM audit_events ORDER BY 1"
    ).fetchall()
    assert rows == [(f"req-{i}", "request.malformed_http", 400) for i in range(3)]


async def test_failed_flush_keeps_the_events_for_the_next_one(writer):
    """A flush that fails (here: the table is gone) loses nothing; the next one writes it all."""
    for event in events(4):
        writer.emit(event)
    writer._db.execute("ALTER TABLE audit_events RENAME TO audit_events_away")
    with pytest.raises(duckdb.Error):
        await writer.flush()
    writer.emit(events(5)[4])
    writer._db.execute("ALTER TABLE audit_events_away RENAME TO audit_events")
    await writer.flush()
    count = writer._db.execute("SELECT count(*) FROM audit_events").fetchone()[0]
    assert count == 5
    assert writer.written == 5


async def test_close_drains_what_is_pending(tmp_path):
    """Closing (the SIGTERM path) writes every pending event before the file is released."""
    audit = AuditWriter(
        jsonl_path=str(tmp_path / "a.jsonl"),
        db_path=tmp_path / "a.duckdb",
        flush_interval_seconds=3600,
        batch_size=10_000,
    )
    await audit.start()
    for event in events(250):
        audit.emit(event)
    await audit.close()
    with duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True) as db:
        assert (
            db.execute("SELECT count(DISTINCT request_id) FROM audit_events").fetchone()[0] == 250
        )
    assert not list(tmp_path.glob(".audit-batch-*")), "spool files are removed"


async def test_events_from_other_processes_reach_the_table_once(writer, tmp_path):
    """The CLI's events (JSON line at once, row via the inbox) are loaded once, then removed."""
    event = system_event("keys.rotated", subject="ops", active_kid="k2", retired_kids=["k1"])
    record_offline(str(tmp_path / "audit.jsonl"), tmp_path / "audit.duckdb", event)
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["kind"] == "keys.rotated"
    inbox = inbox_dir(tmp_path / "audit.duckdb")
    [spooled] = list(inbox.glob("*.ndjson"))
    assert oct(spooled.stat().st_mode & 0o777) == "0o600"
    # A crash between insert and unlink leaves the file: the next flush must not load it twice.
    (inbox / "copy.ndjson").write_text(spooled.read_text())
    await writer.flush()
    await writer.flush()
    rows = writer._db.execute(
        "SELECT kind, subject, detail->>'active_kid' FROM audit_events WHERE kind = 'keys.rotated'"
    ).fetchall()
    assert rows == [("keys.rotated", "ops", "k2")]
    assert list(inbox.glob("*")) == []


async def test_inbox_left_while_the_gateway_was_down_is_loaded_at_start(tmp_path):
    """Events recorded with no gateway running are in the table after the next start."""
    db = tmp_path / "audit.duckdb"
    record_offline("-", db, system_event("account.user_added", subject="ops", username="carol"))
    audit = AuditWriter(jsonl_path="-", db_path=db, flush_interval_seconds=3600, batch_size=10)
    await audit.start()
    await audit.close()
    with duckdb.connect(str(db)) as connection:
        kinds = connection.execute("SELECT kind FROM audit_events").fetchall()
    assert kinds == [("account.user_added",)]

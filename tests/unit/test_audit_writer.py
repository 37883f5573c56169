"""The audit writer on a real DuckDB file: lines at once, rows in batches, nothing lost when a
flush fails or the writer closes."""

from __future__ import annotations

import json

import duckdb
import pytest
from multidict import MultiDict
from support.datakeys import CIPHER

from gateway.audit import (
    AuditWriter,
    inbox_dir,
    protocol_error_event,
    record_offline,
    system_event,
)
from gateway.auditcrypt import decrypt_detail
from gateway.auditsearch import parse_search, search_events


@pytest.fixture
async def writer(tmp_path):
    audit = AuditWriter(
        jsonl_path=str(tmp_path / "audit.jsonl"),
        db_path=tmp_path / "audit.duckdb",
        flush_interval_seconds=3600,  # flushes happen when the test says
        batch_size=10_000,
        cipher=CIPHER,
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
        cipher=CIPHER,
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
        "SELECT kind, subject, event_id, detail FROM audit_events WHERE kind = 'keys.rotated'"
    ).fetchall()
    opened = [(kind, subject, decrypt_detail(CIPHER, event_id, detail)["active_kid"])
              for kind, subject, event_id, detail in rows]  # fmt: skip
    assert opened == [("keys.rotated", "ops", "k2")]
    assert list(inbox.glob("*")) == []


async def test_inbox_left_while_the_gateway_was_down_is_loaded_at_start(tmp_path):
    """Events recorded with no gateway running are in the table after the next start."""
    db = tmp_path / "audit.duckdb"
    record_offline("-", db, system_event("account.user_added", subject="ops", username="carol"))
    audit = AuditWriter(
        jsonl_path="-", db_path=db, flush_interval_seconds=3600, batch_size=10, cipher=CIPHER
    )
    await audit.start()
    await audit.close()
    with duckdb.connect(str(db)) as connection:
        kinds = connection.execute("SELECT kind FROM audit_events").fetchall()
    assert kinds == [("account.user_added",)]


async def test_a_worker_without_the_store_hands_sealed_batches_to_the_owner(writer, tmp_path):
    """`serve --workers`: a hand-off writer leaves its sealed rows and a signed checkpoint in
    the inbox; the owner stores them as they are, and both chains verify."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    from gateway.auditchain import verify  # noqa: PLC0415

    key = Ed25519PrivateKey.generate()
    writer._checkpoint_key = key
    worker = AuditWriter(
        jsonl_path=str(tmp_path / "audit.jsonl"), db_path=tmp_path / "audit.duckdb",
        flush_interval_seconds=3600, batch_size=10_000, checkpoint_key=key, handoff=True,
    )  # fmt: skip
    await worker.start()
    assert not worker.owns_store
    batch = events(5)  # one request id each, and the event id is the request id
    for event in batch[:3]:
        worker.emit(event)
    await worker.flush()
    handed = sorted(inbox_dir(tmp_path / "audit.duckdb").glob("sealed-*.ndjson"))
    assert len(handed) == 1
    for event in batch[3:]:
        writer.emit(event)
    await writer.flush()
    assert list(inbox_dir(tmp_path / "audit.duckdb").glob("*.ndjson")) == []
    rows = writer._db.execute("SELECT chain, count(*) FROM audit_events GROUP BY 1").fetchall()
    assert dict(rows) == {worker.chain.chain_id: 3, writer.chain.chain_id: 2}
    reports = verify(writer._db, key.public_key(), CIPHER)
    assert [(r.chain in {worker.chain.chain_id, writer.chain.chain_id}, r.intact,
             r.checkpoints) for r in reports] == [(True, True, 1), (True, True, 1)]  # fmt: skip
    await worker.close()


async def test_concurrent_flushes_load_an_inbox_file_once(writer, tmp_path):
    """The flusher and a query's flush at the same moment: the CLI's event is stored once."""
    import asyncio  # noqa: PLC0415

    db_path = tmp_path / "audit.duckdb"
    record_offline(str(tmp_path / "cli.jsonl"), db_path, system_event("keys.rotated"))
    await asyncio.gather(writer.flush(), writer.flush(), writer.flush())
    kinds = writer._db.execute("SELECT kind FROM audit_events").fetchall()
    assert kinds == [("keys.rotated",)]


async def test_a_failed_flush_does_not_take_an_inbox_event_twice(writer, tmp_path, monkeypatch):
    """An insert that fails (after the inbox was read) keeps the inbox event pending; the next
    flush stores it once, sealed once."""
    import gateway.audit  # noqa: PLC0415

    db_path = tmp_path / "audit.duckdb"
    record_offline(str(tmp_path / "cli.jsonl"), db_path, system_event("keys.rotated"))
    real_insert = gateway.audit._insert

    def failing_insert(*args, **kwargs):
        monkeypatch.setattr(gateway.audit, "_insert", real_insert)  # the next one works
        raise duckdb.IOException("disk full")

    monkeypatch.setattr(gateway.audit, "_insert", failing_insert)
    with pytest.raises(duckdb.IOException):
        await writer.flush()
    await writer.flush()
    kinds = writer._db.execute("SELECT kind, seq FROM audit_events").fetchall()
    assert kinds == [("keys.rotated", 1)]


async def test_a_read_without_a_flush_merges_the_events_not_stored_yet(writer):
    """The console's read (flush=False) answers the same pages as a flushing read: stored
    events and the ones still in memory, newest first, filtered, with working cursors."""

    for index, event in enumerate(events(7)):
        event["subject"] = "bob" if index % 2 else "alice"
        writer.emit(event)
    await writer.flush()
    for index in range(6):
        event = protocol_error_event(f"late-{index}", 400, "request.malformed_http", "127.0.0.1")
        event["subject"] = "bob" if index % 2 else "alice"
        writer.emit(event, {"changes": {"title": f"sealed {index}"}})
    assert writer.backlog == 6

    async def pages(query: dict[str, str], *, flush: bool) -> list[list[str]]:
        found, cursor = [], None
        while True:
            given = dict(query, **({"cursor": cursor} if cursor else {}))
            items, cursor = await search_events(
                writer, parse_search(MultiDict(given)), None, flush=flush
            )
            found.append([item["request_id"] for item in items])
            if cursor is None:
                return found

    merged = await pages({"limit": "4"}, flush=False)
    bobs = await pages({"limit": "2", "subject": "bob"}, flush=False)
    assert writer.backlog == 6  # nothing was flushed to answer
    newest, _ = await search_events(writer, parse_search(MultiDict(limit="1")), None, flush=False)
    assert newest[0]["sealed_detail"] == {"changes": {"title": "sealed 5"}}
    assert [len(page) for page in merged] == [4, 4, 4, 1]
    assert merged[0][:2] == ["late-5", "late-4"]
    assert merged == await pages({"limit": "4"}, flush=True)  # flushes, then the same pages
    assert bobs == await pages({"limit": "2", "subject": "bob"}, flush=True)

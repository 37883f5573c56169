"""Archiving the audit store: old chain prefixes to verified Parquet, an anchor, nothing lost."""

from __future__ import annotations

import asyncio
import json
import shutil

import duckdb
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.archive import archived, committed_archives, days_ago, rows, run_crashing, write_chain
from support.datakeys import CIPHER

from gateway.archive.audit_store import archive_audit
from gateway.auditchain import verify

KEY = Ed25519PrivateKey.generate()
CUTOFF_DAYS = 365
EVENT_COLUMNS = "event_id, chain, seq, prev_hash, hash, raw, CAST(time AS VARCHAR), detail"
EVENTS = f"SELECT {EVENT_COLUMNS} FROM audit_events ORDER BY event_id"  # noqa: S608 - test SQL
# Two chains: an old process's (all old, then a young tail) and a current one (old and young).
OLD_CHAIN = [[days_ago(420)] * 4, [days_ago(400)] * 3, [days_ago(10)] * 2]
NEW_CHAIN = [[days_ago(380)] * 5, [days_ago(370), days_ago(30)], [days_ago(1)] * 3]


def no_steps(_table: str, _step: str) -> None:
    return None


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store with two chains, each batch closed by a signed checkpoint."""
    db = tmp_path_factory.mktemp("audit") / "audit.duckdb"

    async def write():
        await write_chain(db, KEY, OLD_CHAIN)
        await write_chain(db, KEY, NEW_CHAIN, start=100)

    asyncio.run(write())
    return db


@pytest.fixture
def store(template, tmp_path):
    db = tmp_path / "audit.duckdb"
    shutil.copy(template, db)
    return db


def run(db, root, *, observe=no_steps, run_id="run000000001"):
    with duckdb.connect(str(db)) as connection:
        return archive_audit(
            connection.cursor(), root=root, run_id=run_id, cutoff=days_ago(CUTOFF_DAYS),
            key=KEY, cipher=CIPHER, observe=observe,
        )  # fmt: skip


def problems(db) -> list[str]:
    with duckdb.connect(str(db), read_only=True) as connection:
        return [p for r in verify(connection, KEY.public_key(), CIPHER) for p in r.problems]


def test_old_rows_go_to_the_archive_and_young_rows_stay(store, tmp_path):
    """Rows older than the window leave the store, exactly as they were; younger rows stay."""
    before = rows(store, EVENTS)
    events, checkpoints = run(store, tmp_path / "archive")
    assert (events.status, events.rows) == ("archived", 7 + 5)
    assert (checkpoints.status, checkpoints.rows) == ("archived", 2 + 1)
    kept = rows(store, EVENTS)
    moved = sorted(archived(tmp_path / "archive", "audit_events", EVENT_COLUMNS))
    assert sorted(kept + moved) == before  # every value of every row, nothing twice
    old = "bool_and(time < now() - INTERVAL 365 DAY)"
    assert archived(tmp_path / "archive", "audit_events", old) == [(True,)]


def test_the_cut_waits_for_a_checkpoint(store, tmp_path):
    """The current chain's old part ends mid-batch: only up to the checkpoint before it goes."""
    run(store, tmp_path / "archive")
    cut = rows(store, "SELECT chain, min(seq) FROM audit_events GROUP BY chain ORDER BY 2")
    # old chain: batches of 4 and 3 went, the young tail (seq 8-9) stayed; new chain: the
    # batch of 5 went, and the batch (370 days, 30 days) stayed whole: its old row is not
    # covered by a checkpoint of its own.
    assert sorted(seq for _, seq in cut) == [6, 8]


def test_the_manifest_names_each_chain_cut_and_its_checks(store, tmp_path):
    """The manifest says what the file holds: rows, hashes, times and each chain's last link."""
    run(store, tmp_path / "archive")
    [parquet] = committed_archives(tmp_path / "archive", "audit_events")
    manifest = json.loads(parquet.with_name(parquet.stem + ".manifest.json").read_text())
    assert manifest["rows"] == 12
    assert manifest["committed_at"]
    assert sorted(c["last_seq"] for c in manifest["chains"]) == [5, 7]
    for chain in manifest["chains"]:
        assert chain["first_seq"] == 1
        assert len(chain["last_hash"]) == 64
    assert manifest["verification"]["events"] == {"rows": True, "checksum": True, "sha256": True}
    assert manifest["verification"]["chains"] == []
    assert manifest["verification"]["cut"] == []


def test_the_chain_verifies_across_the_cut(store, tmp_path):
    """After archival `verify` is intact: each kept part starts at its signed anchor."""
    run(store, tmp_path / "archive")
    with duckdb.connect(str(store), read_only=True) as connection:
        reports = verify(connection, KEY.public_key(), CIPHER)
    assert all(r.intact for r in reports), [r.problems for r in reports]
    assert sorted((r.archived_through, r.first_seq) for r in reports) == [(5, 6), (7, 8)]


def test_a_second_run_continues_from_the_anchor(store, tmp_path):
    """A later run with a later cutoff archives the next part and still verifies."""
    run(store, tmp_path / "archive")
    with duckdb.connect(str(store)) as connection:
        results = archive_audit(
            connection.cursor(), root=tmp_path / "archive", run_id="run000000002",
            cutoff=days_ago(5), key=KEY, cipher=CIPHER, observe=no_steps,
        )  # fmt: skip
    assert results[0].status == "archived", results[0].error
    assert problems(store) == []
    assert len(committed_archives(tmp_path / "archive", "audit_events")) == 2


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        ("DELETE FROM audit_events WHERE seq = 8", "missing (rows were deleted)"),
        ("DELETE FROM audit_archive_anchors", "missing (rows were deleted)"),
        ("UPDATE audit_archive_anchors SET signature = repeat('0', 128)", "bad signature"),
        ("UPDATE audit_archive_anchors SET seq = seq + 1", "bad signature"),
    ],
    ids=["a kept row deleted", "the anchor deleted", "the anchor forged", "the anchor moved"],
)
def test_a_deletion_without_an_anchor_is_still_found(store, tmp_path, tamper, expected):
    """Archival does not blind `verify`: rows gone without a valid anchor are reported."""
    run(store, tmp_path / "archive")
    with duckdb.connect(str(store)) as connection:
        connection.execute(tamper)
    assert any(expected in problem for problem in problems(store)), problems(store)


def test_plain_deletion_of_old_rows_is_broken(store):
    """Without archival, deleting the same old rows is what `verify` reports."""
    with duckdb.connect(str(store)) as connection:
        connection.execute("DELETE FROM audit_events WHERE time < now() - INTERVAL 365 DAY")
    assert any("missing (rows were deleted)" in problem for problem in problems(store))


def test_an_archived_row_put_back_is_found(store, tmp_path):
    """A row restored into the store below its anchor is reported, not silently accepted."""
    run(store, tmp_path / "archive")
    [parquet] = committed_archives(tmp_path / "archive", "audit_events")
    with duckdb.connect(str(store)) as connection:
        connection.execute(
            "INSERT INTO audit_events SELECT * FROM read_parquet(?) WHERE seq = 1 LIMIT 1",
            [str(parquet)],
        )
    assert any("present though archived" in problem for problem in problems(store))


def rewrite_one_row(parquet):
    """Replace the archive with one whose first row's detail is edited."""
    edited = str(parquet) + ".edited"
    with duckdb.connect() as connection:
        connection.execute(
            "COPY (SELECT * REPLACE (CASE WHEN seq = 1 THEN '{\"n\": -1}' ELSE detail END "  # noqa: S608 - a test's own file
            f"AS detail) FROM read_parquet(?)) TO '{edited}' (FORMAT parquet)",
            [str(parquet)],
        )
    shutil.move(edited, parquet)


def test_an_archive_that_does_not_verify_deletes_nothing(store, tmp_path):
    """An archive changed after export fails verification: every row stays, the run fails."""
    root = tmp_path / "archive"
    before = rows(store, "SELECT count(*) FROM audit_events")

    def tamper(table, step):
        if step == "exported":
            [parquet] = (root / table).glob("*.parquet")
            rewrite_one_row(parquet)

    events, checkpoints = run(store, root, observe=tamper)
    assert (events.status, checkpoints.status) == ("failed", "failed")
    assert "did not verify" in events.error
    assert events.verification["events"]["checksum"] is False
    assert rows(store, "SELECT count(*) FROM audit_events") == before
    assert rows(store, "SELECT count(*) FROM archive_log") == [(0,)]
    assert problems(store) == []
    # The next run removes the failed file and archives afresh: nothing is there twice.
    events, _ = run(store, root, run_id="run000000002")
    assert events.status == "archived"
    assert len(events.discarded) == 1
    assert len(list((root / "audit_events").glob("*.parquet"))) == 1


def test_a_changed_file_between_check_and_delete_deletes_nothing(store, tmp_path):
    """The delete re-checks the file's SHA-256 inside its transaction."""
    root = tmp_path / "archive"

    def tamper(table, step):
        if step == "verified":
            [parquet] = (root / table).glob("*.parquet")
            rewrite_one_row(parquet)

    events, _ = run(store, root, observe=tamper)
    assert events.status == "failed"
    assert "changed after it was verified" in events.error
    assert rows(store, "SELECT count(*) FROM audit_events") == [(19,)]


CRASH = """
import sys, os
import duckdb
from datetime import UTC, datetime, timedelta
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from empsecrets.fieldcrypt import DataKeyRing, FieldCipher
from gateway.archive.audit_store import archive_audit

db, root, key_file, ring_file, stop_at = sys.argv[1:]
key = serialization.load_pem_private_key(Path(key_file).read_bytes(), None)
cipher = FieldCipher(DataKeyRing.loads(Path(ring_file).read_text()))

def observe(table, step):
    if step == stop_at:
        os._exit(3)  # no cleanup, no rollback, no close: as a kill -9 would

connection = duckdb.connect(db)
archive_audit(connection.cursor(), root=Path(root), run_id="crashed00001",
              cutoff=datetime.now(UTC) - timedelta(days=365), key=key, cipher=cipher,
              observe=observe)
os._exit(0)
"""


@pytest.mark.parametrize("step", ["exported", "verified", "deleted", "committed"])
def test_a_run_killed_at_any_step_loses_nothing_and_the_rerun_completes(store, tmp_path, step):
    """A process killed mid-run leaves every row in the store or in one committed archive."""
    root = tmp_path / "archive"
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    before = rows(store, EVENTS)
    ring_file = tmp_path / "ring.json"  # the child opens the store's values with the same ring
    ring_file.write_text(CIPHER.ring.dumps())
    run_crashing(CRASH, str(store), str(root), str(key_file), str(ring_file), step)
    events, _ = run(store, root, run_id="rerun0000001")
    assert events.status in {"archived", "nothing"}, events.error
    kept = rows(store, EVENTS)
    moved = archived(root, "audit_events", EVENT_COLUMNS)
    assert sorted(kept + moved) == before  # no row lost, none archived twice
    assert problems(store) == []
    assert len(committed_archives(root, "audit_events")) == 1
    leftovers = {p.name for p in (root / "audit_events").iterdir()}
    assert len(leftovers) == 2  # one file and its manifest, no half-written rest


def test_rows_without_a_chain_are_archived_by_time(tmp_path):
    """Events stored before the chain existed (chain NULL) go by their time alone."""
    db = tmp_path / "audit.duckdb"
    asyncio.run(write_chain(db, KEY, [[days_ago(2)]]))
    with duckdb.connect(str(db)) as connection:
        connection.execute(
            "INSERT INTO audit_events (event_id, time, kind) VALUES "
            "('legacy-old', now() - INTERVAL 400 DAY, 'request'), "
            "('legacy-new', now() - INTERVAL 1 DAY, 'request')"
        )
    events, _ = run(db, tmp_path / "archive")
    assert (events.status, events.rows) == ("archived", 1)
    assert archived(tmp_path / "archive", "audit_events", "event_id") == [("legacy-old",)]
    assert rows(db, "SELECT count(*) FROM audit_events") == [(2,)]


def test_nothing_old_means_no_file(tmp_path):
    """A store with only young rows is left alone, and no archive file is made."""
    db = tmp_path / "audit.duckdb"
    asyncio.run(write_chain(db, KEY, [[days_ago(1)] * 3]))
    events, checkpoints = run(db, tmp_path / "archive")
    assert (events.status, checkpoints.status) == ("nothing", "nothing")
    assert not (tmp_path / "archive" / "audit_events").exists()

"""The audit hash chain: every edit, deletion, insertion and reordering of a copy is detected."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import shutil
import subprocess
import sys

import duckdb
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.datakeys import CIPHER
from support.stack import REPO

from gateway.audit import AuditWriter, record_offline, system_event
from gateway.auditchain import GENESIS, canonical, digest, verify
from gateway.testing import data_keys_config, provision_data_keys

KEY = Ed25519PrivateKey.generate()


def event(i: int) -> dict:
    decision = "deny" if i % 3 == 0 else "allow"
    return {
        "event_id": f"ev-{i:03d}", "time": f"2026-11-23T01:{i % 60:02d}:00.000+00:00",
        "kind": "request", "request_id": f"req-{i}", "subject": f"user-{i % 4}",
        "roles": ["reader"], "issuer": "https://localhost:8443", "method": "GET",
        "path": f"/api/tickets/{i}", "route": "tickets.get", "decision": decision,
        "reason_id": "authz.denied" if decision == "deny" else None,
        "status": 403 if decision == "deny" else 200, "latency_ms": 1.25 + i,
        "upstream_ms": None, "policy_revision": "abc", "reasons": [], "remote_addr": "127.0.0.1",
        "user_agent": "test", "detail": {"n": i, "note": "é ünïcode"},
    }  # fmt: skip


@pytest.fixture(scope="module")
def sealed_store(tmp_path_factory):
    """An audit store with 30 chained events in three batches, each closed by a checkpoint."""
    root = tmp_path_factory.mktemp("chain")
    db = root / "audit.duckdb"

    async def write():
        writer = AuditWriter(
            jsonl_path=str(root / "audit.jsonl"), db_path=db, flush_interval_seconds=3600,
            batch_size=10_000, checkpoint_key=KEY, cipher=CIPHER,
        )  # fmt: skip
        await writer.start()
        for batch in range(3):
            for i in range(batch * 10, batch * 10 + 10):
                writer.emit(event(i))
            await writer.flush()
        await writer.close()
        return writer.chain.chain_id

    chain_id = asyncio.run(write())
    return db, chain_id


@pytest.fixture
def copy(sealed_store, tmp_path):
    """A copy of the sealed store, to tamper with."""
    source, _ = sealed_store
    target = tmp_path / "copy.duckdb"
    shutil.copy(source, target)
    return target


def problems(db) -> list[str]:
    with duckdb.connect(str(db), read_only=True) as connection:
        reports = verify(connection, KEY.public_key(), CIPHER)
    return [p for r in reports for p in r.problems]


def tamper(db, sql: str, params: list | None = None) -> None:
    with duckdb.connect(str(db)) as connection:
        connection.execute(sql, params or [])


def test_an_untouched_store_verifies(copy, sealed_store):
    """30 events, seq 1-30, 3 checkpoints, no problem; the first links to the genesis hash."""
    _, chain_id = sealed_store
    with duckdb.connect(str(copy), read_only=True) as connection:
        (report,) = verify(connection, KEY.public_key(), CIPHER)
        first = connection.execute("SELECT prev_hash FROM audit_events WHERE seq = 1").fetchone()
    assert (report.chain, report.events, report.first_seq, report.last_seq) == (chain_id, 30, 1, 30)
    assert (report.checkpoints, report.problems) == (3, [])
    assert first == (GENESIS,)


def test_the_json_lines_carry_the_same_seal(sealed_store):
    """Each JSON line is the sealed event: its hash recomputes from its own content."""
    db, _ = sealed_store
    lines = [json.loads(x) for x in (db.parent / "audit.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, 31))
    assert all(digest(e) == e["hash"] for e in lines)
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(lines))


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        pytest.param("UPDATE audit_events SET decision = 'deny' WHERE seq = 3",
                     "seq 3: column decision differs from the sealed event", id="edit_a_column"),
        pytest.param("UPDATE audit_events SET detail = '{\"n\": 99}' WHERE seq = 7",
                     "seq 7: an encrypted column does not open", id="plaintext_in_the_detail"),
        pytest.param("UPDATE audit_events SET detail = (SELECT detail FROM audit_events "
                     "WHERE seq = 2) WHERE seq = 7",
                     "seq 7: an encrypted column does not open", id="detail_swapped_from_a_row"),
        pytest.param("UPDATE audit_events SET user_agent = raw WHERE seq = 9",
                     "seq 9: an encrypted column does not open", id="ciphertext_moved_to_a_column"),
        pytest.param("UPDATE audit_events SET raw = substr(raw, 1, length(raw) - 4) || 'AAA=' "
                     "WHERE seq = 6",
                     "seq 6: an encrypted column does not open", id="ciphertext_bits_changed"),
        pytest.param("DELETE FROM audit_events WHERE seq = 5",
                     "seq 5: missing (rows were deleted)", id="delete_a_row"),
        pytest.param("DELETE FROM audit_events WHERE seq BETWEEN 11 AND 13",
                     "seq 11-13: missing (rows were deleted)", id="delete_a_range"),
        pytest.param("DELETE FROM audit_events WHERE seq = 30",
                     "checkpoint at seq 30: its event is missing (deleted)", id="truncate_the_tail"),
        pytest.param("UPDATE audit_events SET seq = CASE seq WHEN 8 THEN 9 ELSE 8 END "
                     "WHERE seq IN (8, 9)",
                     "seq 8: chain fields differ from the sealed event (moved)", id="reorder_two_rows"),
        pytest.param("UPDATE audit_checkpoints SET signature = repeat('0', 128) WHERE seq = 20",
                     "checkpoint at seq 20: bad signature", id="forge_a_checkpoint"),
    ],
)  # fmt: skip
def test_every_kind_of_tampering_is_detected(copy, sql, expected):
    """Edits, deletions, reordering and forged checkpoints are each named."""
    tamper(copy, sql)
    found = problems(copy)
    assert any(p.startswith(expected) for p in found), found


def reseal(connection, seq: int, change) -> None:
    """Edit a row's sealed event as someone holding the data keys could: open, change, seal."""
    event_id, raw = connection.execute(
        "SELECT event_id, raw FROM audit_events WHERE seq = ?", [seq]
    ).fetchone()
    context = f"audit_events.raw:{event_id}"
    edited = change(CIPHER.open(raw, context))
    connection.execute(
        "UPDATE audit_events SET raw = ? WHERE seq = ?", [CIPHER.seal(edited, context), seq]
    )


def test_an_edit_by_a_data_key_holder_is_caught_by_the_hash(copy):
    """raw opened, edited and sealed again (the data keys are not the chain's keys): the hash
    no longer matches what was sealed."""
    with duckdb.connect(str(copy)) as connection:
        reseal(connection, 4, lambda raw: raw.replace('"deny"', '"allow"'))
        connection.execute("UPDATE audit_events SET decision = 'allow' WHERE seq = 4")
    assert "seq 4: hash does not match the sealed event (edited)" in problems(copy)


def test_an_inserted_row_is_detected(copy):
    """A forged event slipped in with an existing seq is reported as an insertion."""
    with duckdb.connect(str(copy)) as connection:
        connection.execute(
            "INSERT INTO audit_events SELECT * REPLACE ('forged' AS event_id) FROM audit_events "
            "WHERE seq = 4"
        )
    assert "seq 4: appears more than once (a row was inserted)" in problems(copy)


def test_a_consistent_rewrite_without_the_key_is_caught_by_the_checkpoints(copy):
    """Re-sealing an edited event and every later one still disagrees with the signed heads."""
    with duckdb.connect(str(copy)) as connection:
        rows = connection.execute(
            "SELECT seq, event_id, raw FROM audit_events ORDER BY seq"
        ).fetchall()
        head = None
        for seq, event_id, raw in rows:
            context = f"audit_events.raw:{event_id}"
            sealed = json.loads(CIPHER.open(raw, context))
            if seq == 16:  # event 15: a denial made to look allowed
                sealed["decision"] = "allow"
            if head is not None:
                sealed["prev_hash"] = head
            sealed.pop("hash")
            sealed["hash"] = head = hashlib.sha256(canonical(sealed).encode()).hexdigest()
            connection.execute(
                "UPDATE audit_events SET raw = ?, hash = ?, prev_hash = ?, decision = ? "
                "WHERE seq = ?",
                [
                    CIPHER.seal(canonical(sealed), context),
                    head,
                    sealed["prev_hash"],
                    sealed["decision"],
                    seq,
                ],
            )
    found = problems(copy)
    assert found == [
        "checkpoint at seq 20: the event's hash differs (rewritten)",
        "checkpoint at seq 30: the event's hash differs (rewritten)",
    ]


def test_cli_events_from_the_inbox_are_chained_too(tmp_path):
    """An event another process left in the inbox is sealed into the writer's chain at load."""
    db = tmp_path / "audit.duckdb"
    record_offline("-", db, system_event("keys.rotated", subject="ops", active_kid="k2"))

    async def write():
        writer = AuditWriter(jsonl_path="-", db_path=db, flush_interval_seconds=3600,
                             batch_size=10, checkpoint_key=KEY, cipher=CIPHER)  # fmt: skip
        await writer.start()
        writer.emit(event(1))
        await writer.close()

    asyncio.run(write())
    with duckdb.connect(str(db), read_only=True) as connection:
        kinds = connection.execute("SELECT seq, kind FROM audit_events ORDER BY seq").fetchall()
        (report,) = verify(connection, KEY.public_key(), CIPHER)
    assert kinds == [(1, "request"), (2, "keys.rotated")]
    assert report.problems == []


def test_the_cli_exits_non_zero_naming_the_first_broken_link(copy, tmp_path):
    """`gateway audit verify --db COPY`: 0 when intact, 1 with the broken seq named."""
    key_file = tmp_path / "checkpoint.key"
    key_file.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)  # a key file others can read is refused
    provision_data_keys(tmp_path / "data-keys", CIPHER.ring)  # the ring the store was written with
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[audit]\ncheckpoint_key_file = "{key_file}"\n' + data_keys_config(tmp_path / "data-keys")
    )
    command = [sys.executable, "-m", "gateway", "--config", str(config), "audit", "verify",
               "--db", str(copy)]  # fmt: skip
    intact = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert intact.returncode == 0, intact.stderr
    assert "30 events" in intact.stdout
    assert "intact" in intact.stdout
    tamper(copy, "DELETE FROM audit_events WHERE seq = 12")
    broken = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert broken.returncode == 1
    assert "seq 12: missing (rows were deleted)" in broken.stdout

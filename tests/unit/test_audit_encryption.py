"""The audit store's detail, user_agent and raw are encrypted at rest: nothing planted in them
reaches a file in plaintext, readers open them or fail closed, rotation re-encrypts every value,
and a store written before encryption is sealed when a writer opens it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import duckdb
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.archive import committed_archives, days_ago, write_chain
from support.datakeys import CIPHER
from support.stack import REPO

from empsecrets.fieldcrypt import DataKeyError, DataKeyRing, FieldCipher, sealed_key_id
from gateway.archive.audit_store import archive_audit
from gateway.audit import HOURLY_QUERY, AuditWriter, system_event
from gateway.auditchain import Chain, verify
from gateway.auditcrypt import ENCRYPTED_COLUMNS, reencrypt, row_line
from gateway.auditsearch import exported, run_search, search_events
from gateway.console.events import event_view
from gateway.pipeline import Denial
from gateway.testing import data_keys_config, provision_data_keys

if TYPE_CHECKING:
    from pathlib import Path

KEY = Ed25519PrivateKey.generate()
PLANTED_AGENT = "curl/8.5 planted-agent-4f1c9e"
PLANTED_DETAIL = "planted-detail-9b27d3"


def planted_event(n: int) -> dict[str, Any]:
    """A system event carrying known text in detail and in user_agent, and ingest counts."""
    event = system_event(
        "test.planted", subject=f"user-{n}", note=f"{PLANTED_DETAIL}-{n}",
        validation={"stream": "readings", "received": 3, "accepted": 2, "quarantined": 1,
                    "rejected": 0, "failures": [{"value": PLANTED_DETAIL}]},
    )  # fmt: skip
    event["user_agent"] = PLANTED_AGENT
    return event


async def open_writer(db: Path, cipher: FieldCipher | None = CIPHER) -> AuditWriter:
    writer = AuditWriter(
        jsonl_path=str(db.parent.parent / f"{db.stem}.jsonl"), db_path=db,
        flush_interval_seconds=3600, batch_size=100_000, checkpoint_key=KEY, cipher=cipher,
        plaintext=cipher is None,
    )  # fmt: skip
    await writer.start()
    return writer


@pytest.fixture
def store(tmp_path) -> Path:
    """A store (alone in its directory) holding 20 planted events in two batches."""
    db = tmp_path / "store" / "audit.duckdb"

    async def write() -> None:
        writer = await open_writer(db)
        for batch in range(2):
            for n in range(batch * 10, batch * 10 + 10):
                writer.emit(planted_event(n))
            await writer.flush()
        await writer.close()

    asyncio.run(write())
    return db


def files_holding(directory: Path, *needles: str) -> list[str]:
    """The files under directory (database, WAL, spool leftovers) that hold any needle."""
    found = []
    for path in directory.rglob("*"):
        data = path.read_bytes() if path.is_file() else b""
        if any(needle.encode() in data for needle in needles):
            found.append(path.name)
    return found


def problems(db: Path, cipher: FieldCipher = CIPHER) -> list[str]:
    with duckdb.connect(str(db), read_only=True) as connection:
        return [p for r in verify(connection, KEY.public_key(), cipher) for p in r.problems]


def search(db: Path, cipher: FieldCipher = CIPHER, **filters: Any) -> list[dict[str, Any]]:
    with duckdb.connect(str(db), read_only=True) as connection:
        items, _ = run_search(connection.cursor(), {"limit": 1000, **filters}, cipher)
    return items


def key_ids(db: Path) -> set[str | None]:
    """The data key id of every non-NULL value of the encrypted columns."""
    columns = ", ".join(ENCRYPTED_COLUMNS)
    with duckdb.connect(str(db), read_only=True) as connection:
        rows = connection.execute(f"SELECT {columns} FROM audit_events").fetchall()  # noqa: S608
    return {sealed_key_id(value) for row in rows for value in row if value is not None}


async def test_planted_values_are_in_no_file_of_the_store_and_readers_see_them(tmp_path):
    """After flush and after close, neither planted string is in audit.duckdb, its WAL or the
    spool directory; search and verify still read them."""
    db = tmp_path / "store" / "audit.duckdb"
    writer = await open_writer(db)
    for n in range(5):
        writer.emit(planted_event(n))
    await writer.flush()
    assert files_holding(db.parent, PLANTED_AGENT, PLANTED_DETAIL) == []  # the WAL included
    await writer.close()
    assert files_holding(db.parent, PLANTED_AGENT, PLANTED_DETAIL) == []
    assert not list(db.parent.glob(".audit-batch-*")), "spool files are removed"
    [event, *_] = search(db)
    assert event["user_agent"] == PLANTED_AGENT
    assert event["detail"]["note"].startswith(PLANTED_DETAIL)
    assert problems(db) == []
    assert key_ids(db) == {CIPHER.ring.current}


def test_the_spooled_row_carries_ciphertext_only():
    """The NDJSON line read_json loads: the three columns sealed, the ingest counts plain."""
    raw = Chain().seal(planted_event(1))
    row = json.loads(row_line(raw, CIPHER, json.dumps({"changes": {"title": PLANTED_DETAIL}})))
    assert PLANTED_AGENT not in json.dumps(row)
    assert PLANTED_DETAIL not in json.dumps(row)
    assert {sealed_key_id(row[name]) for name in ENCRYPTED_COLUMNS} == {CIPHER.ring.current}
    assert row["validation"] == {"stream": "readings", "received": 3, "accepted": 2,
                                 "quarantined": 1, "rejected": 0}  # fmt: skip


async def test_the_hourly_view_counts_from_the_plain_summary(store):
    """validation_hourly needs no key: it reads the plaintext ingest counts."""
    with duckdb.connect(str(store), read_only=True) as connection:
        rows = connection.execute(HOURLY_QUERY, [2]).fetchall()
    assert [(stream, batches, received, rejected) for _, stream, batches, received, _, _,
            rejected, _ in rows] == [("readings", 20, 60, 0)]  # fmt: skip


def tamper(db: Path, sql: str) -> None:
    with duckdb.connect(str(db)) as connection:
        connection.execute(sql)


@pytest.mark.parametrize(
    ("sql", "search_fails"),
    [
        pytest.param("UPDATE audit_events SET detail = (SELECT detail FROM audit_events "
                     "WHERE seq = 2) WHERE seq = 5", False, id="detail swapped from another row"),
        pytest.param("UPDATE audit_events SET user_agent = detail WHERE seq = 5", False,
                     id="a ciphertext moved to another column"),
        pytest.param("UPDATE audit_events SET user_agent = 'curl/8.5' WHERE seq = 5", False,
                     id="plaintext written in"),
        pytest.param("UPDATE audit_events SET raw = (SELECT raw FROM audit_events "
                     "WHERE seq = 2) WHERE seq = 5", True, id="raw swapped from another row"),
        pytest.param("UPDATE audit_events SET raw = replace(raw, substr(raw, 40, 4), 'AAAA') "
                     "WHERE seq = 5", True, id="raw's ciphertext bytes changed"),
    ],
)  # fmt: skip
def test_a_value_that_does_not_open_fails_verify_and_search(store, sql, search_fails):
    """Verify names the row. The search shows events from raw alone: a raw that does not open
    refuses the page; a tampered column is never shown, and raw still reads true."""
    tamper(store, sql)
    found = problems(store)
    assert any(p.startswith("seq 5: an encrypted column does not open") for p in found), found
    if search_fails:
        with pytest.raises(DataKeyError):
            search(store)
    else:
        assert {e["user_agent"] for e in search(store)} == {PLANTED_AGENT}


async def test_the_search_endpoint_answers_500_for_a_value_that_does_not_open(store):
    """GET /admin/audit: internal.error, never the event."""
    tamper(store, "UPDATE audit_events SET raw = (SELECT raw FROM audit_events WHERE seq = 1)")
    writer = await open_writer(store)
    try:
        with pytest.raises(Denial) as refused:
            await search_events(writer, {"limit": 10}, None)
    finally:
        await writer.close()
    assert refused.value.reason_id == "internal.error"


def test_a_ring_without_the_key_opens_nothing(store):
    """Another deployment's ring (or one missing a key) cannot read the store."""
    stranger = FieldCipher(DataKeyRing.generate())
    assert all("does not open" in p for p in problems(store, stranger))
    with pytest.raises(DataKeyError, match="not in the ring"):
        search(store, stranger)


def test_reencryption_moves_every_value_to_the_new_key(store):
    """After a rotation's pass every value is under the new key; with the old key removed from
    the ring everything still opens, verifies and searches."""
    rotated = FieldCipher(CIPHER.ring.rotated())
    with duckdb.connect(str(store)) as connection:
        done = reencrypt(connection, rotated, spool=store.parent, batch_size=7)
    assert (done.rows, done.values, done.plaintext) == (20, 60, 0)  # 3 columns, none NULL
    assert key_ids(store) == {rotated.ring.current}
    retired = FieldCipher(rotated.ring.without({CIPHER.ring.current}))
    assert problems(store, retired) == []
    assert {e["user_agent"] for e in search(store, retired)} == {PLANTED_AGENT}
    with duckdb.connect(str(store)) as connection:  # a second pass has nothing to do
        assert reencrypt(connection, rotated, spool=store.parent).rows == 0


def test_reencryption_stops_at_a_value_that_does_not_open(store):
    """A tampered value is never re-sealed as if it were plaintext; the pass names the row."""
    tamper(store, "UPDATE audit_events SET detail = (SELECT detail FROM audit_events "
                  "WHERE seq = 1) WHERE seq = 3")  # fmt: skip
    rotated = FieldCipher(CIPHER.ring.rotated())
    with duckdb.connect(str(store)) as connection, pytest.raises(DataKeyError, match="detail"):
        reencrypt(connection, rotated, spool=store.parent)
    assert any("does not open" in p for p in problems(store, rotated))


# --- a store written before encryption --------------------------------------------------------

OLD_COLUMNS = (
    "event_id VARCHAR, time TIMESTAMPTZ, kind VARCHAR, request_id VARCHAR, subject VARCHAR, "
    "roles VARCHAR[], issuer VARCHAR, method VARCHAR, path VARCHAR, route VARCHAR, "
    "decision VARCHAR, reason_id VARCHAR, status INTEGER, latency_ms DOUBLE, upstream_ms DOUBLE, "
    "policy_revision VARCHAR, reasons VARCHAR[], remote_addr VARCHAR, user_agent VARCHAR, "
    "detail JSON, chain VARCHAR, seq BIGINT, prev_hash VARCHAR, hash VARCHAR, raw VARCHAR"
)


def old_store(db: Path, events: list[dict[str, Any]]) -> None:
    """What the writer made before encryption: detail a JSON column, every value plaintext."""
    db.parent.mkdir(parents=True, exist_ok=True)
    chain = Chain()
    lines = []
    for event in events:
        raw = chain.seal(event)
        lines.append(raw[:-1] + ',"raw":' + json.dumps(raw) + "}\n")
    batch = db.parent / "old-batch.ndjson"
    batch.write_text("".join(lines))
    columns = {c.split(" ")[0]: c.split(" ", 1)[1] for c in OLD_COLUMNS.split(", ")}
    with duckdb.connect(str(db)) as connection:
        connection.execute(f"CREATE TABLE audit_events ({OLD_COLUMNS}, PRIMARY KEY (event_id))")
        connection.execute(
            "INSERT INTO audit_events SELECT * FROM read_json(?, format = 'newline_delimited', "  # noqa: S608 - test SQL
            f"columns = {columns!r})",
            [str(batch)],
        )
        connection.execute(
            "INSERT INTO audit_events (event_id, time, kind, user_agent, detail) VALUES "
            "('legacy', now(), 'request', ?, ?)",  # from before the chain too
            [PLANTED_AGENT, json.dumps({"note": PLANTED_DETAIL})],
        )
    batch.unlink()


async def test_an_old_plaintext_store_is_sealed_when_the_writer_opens_it(tmp_path):
    """detail becomes VARCHAR, every value is sealed (and the file rewritten), the ingest counts
    are filled in, and the chain still verifies and searches to the same events."""
    db = tmp_path / "store" / "audit.duckdb"
    old_store(db, [planted_event(n) for n in range(12)])
    with duckdb.connect(str(db), read_only=True) as connection:
        chained = connection.execute("SELECT raw FROM audit_events WHERE raw IS NOT NULL")
        before = {e["event_id"]: e for e in (json.loads(raw) for (raw,) in chained.fetchall())}
    writer = await open_writer(db)
    writer.emit(planted_event(99))
    await writer.close()
    with duckdb.connect(str(db), read_only=True) as connection:
        [(kind,)] = connection.execute(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_name = 'audit_events' AND column_name = 'detail'"
        ).fetchall()
        [(counted,)] = connection.execute(
            "SELECT count(*) FROM audit_events WHERE validation IS NOT NULL"
        ).fetchall()
    assert kind == "VARCHAR"
    assert counted == 13  # the 12 old chained events and the new one
    # Compacted into a fresh file: no freed page keeps the plaintext that was sealed.
    assert files_holding(db.parent, PLANTED_AGENT, PLANTED_DETAIL) == []
    assert key_ids(db) == {CIPHER.ring.current}
    assert problems(db) == []
    after = {e["event_id"]: e for e in search(db)}
    assert {k: after[k] for k in before} == before
    assert after["legacy"]["detail"] == {"note": PLANTED_DETAIL}


# --- archives ---------------------------------------------------------------------------------


def test_archives_hold_ciphertext_and_verify_opened(tmp_path):
    """The Parquet file has no planted text; it verifies with the ring, and its rows restored
    into a scratch store verify only with a ring that holds their key."""
    db = tmp_path / "store" / "audit.duckdb"
    old = [[days_ago(400)] * 4, [days_ago(1)]]
    asyncio.run(write_chain(db, KEY, old, cipher=CIPHER))
    with duckdb.connect(str(db)) as connection:
        [events, _] = archive_audit(
            connection.cursor(), root=tmp_path / "archive", run_id="run000000001",
            cutoff=days_ago(365), key=KEY, cipher=CIPHER, observe=lambda *_: None,
        )  # fmt: skip
    assert (events.status, events.rows) == ("archived", 4)
    [parquet] = committed_archives(tmp_path / "archive", "audit_events")
    assert b"\xc3\xa9 \xc3\xbcn\xc3\xafcode" not in parquet.read_bytes()  # the detail's note
    scratch = tmp_path / "scratch.duckdb"
    with duckdb.connect(str(scratch)) as connection:
        connection.execute("CREATE TABLE audit_events AS SELECT * FROM read_parquet(?)",
                           [str(parquet)])  # fmt: skip
        connection.execute("CREATE TABLE audit_checkpoints AS SELECT * FROM read_parquet(?)",
                           [str(parquet).replace("audit_events", "audit_checkpoints")])  # fmt: skip
    assert problems(scratch) == []
    assert problems(scratch, FieldCipher(DataKeyRing.generate()))  # a stranger's ring


# --- the command line -------------------------------------------------------------------------


def cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), *args],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture
def deployment(store, tmp_path) -> Path:
    """A config whose checkpoint key and data key ring are those the store was written with."""
    key_file = tmp_path / "checkpoint.key"
    key_file.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    provision_data_keys(tmp_path / "data-keys", CIPHER.ring)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[audit]\ncheckpoint_key_file = "{key_file}"\ndb_path = "{store}"\n'
        f'jsonl_path = "{tmp_path / "cli.jsonl"}"\n'
        f"[server]\nadmin_port = 9\n"  # nothing answers there: the store must be opened here
        "[retention]\nupstream = false\n" + data_keys_config(tmp_path / "data-keys")
    )
    return config


def test_rotate_gateway_data_key_offline_reencrypts_the_store(deployment, store, tmp_path):
    """`gateway secrets rotate gateway_data_key` with the gateway stopped: a dry run counts and
    changes nothing; the rotation makes a new current key, keeps the old one, and re-encrypts
    every value; both are audited."""
    planned = cli(deployment, "secrets", "rotate", "gateway_data_key", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert (plan["mode"], plan["rows"], plan["values"], plan["new_key_id"]) == (
        "offline", 20, 60, None,
    )  # fmt: skip
    assert key_ids(store) == {CIPHER.ring.current}
    done = cli(deployment, "secrets", "rotate", "gateway_data_key", "--batch-size", "6")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["previous_key_id"], summary["keys_in_ring"]) == (CIPHER.ring.current, 2)
    assert summary["values"] == 60
    ring = provision_data_keys(tmp_path / "data-keys").ring
    assert ring.current == summary["new_key_id"] != CIPHER.ring.current
    assert key_ids(store) == {ring.current}
    retired = FieldCipher(ring.without({CIPHER.ring.current}))
    assert problems(store, retired) == []
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "cli.jsonl").read_text().splitlines()]
    assert kinds == ["secrets.rotation_planned", "secrets.rotated"]
    verified = cli(deployment, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_ring_that_cannot_be_read_refuses_verify_and_archive(deployment):
    """No ring, no reading: exit 2 naming encryption.data_keys, never a fallback."""
    env = {"GATEWAY__ENCRYPTION__DATA_KEYS": "keystore:no-such-ring"}
    for args in (("audit", "verify"), ("archive", "run")):
        refused = cli(deployment, *args, env=env)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert "encryption.data_keys" in refused.stderr, args


def test_setup_makes_the_ring_once(tmp_path):
    """`gateway keys init` makes the ring where the config points, and never replaces it."""
    config = tmp_path / "gateway.toml"
    secrets = tmp_path / "secrets"
    config.write_text(
        f'[audit]\ncheckpoint_key_file = "{secrets}/checkpoint.key"\n'
        f'[upstream]\nsecret_file = "{secrets}/upstream.secret"\n'
        f'[issuer]\nkey_dir = "{tmp_path}/keys"\n'
        f'[identity]\nmfa.secret_key_file = "{secrets}/totp.key"\n'
        f'sessions.key_file = "{secrets}/session.key"\n'
        f'[validation]\nmodel_key_file = "{secrets}/model.key"\n'
        + data_keys_config(tmp_path / "data-keys")
    )
    first = cli(config, "keys", "init")
    assert first.returncode == 0, first.stderr
    assert "wrote keystore:gateway-data-keys" in first.stdout
    ring = provision_data_keys(tmp_path / "data-keys").ring
    again = cli(config, "keys", "init", "--force")
    assert again.returncode == 0, again.stderr
    assert "gateway-data-keys" not in again.stdout
    assert provision_data_keys(tmp_path / "data-keys").ring.current == ring.current


def test_the_bench_baseline_alone_may_write_plaintext(tmp_path):
    """A writer that owns a store without a cipher is refused unless it says it is the bench's."""
    with pytest.raises(ValueError, match="encrypted"):
        AuditWriter(jsonl_path="-", db_path=tmp_path / "a.duckdb", flush_interval_seconds=1,
                    batch_size=1)  # fmt: skip


# --- the store-only detail (RequestContext.sealed_detail) ----------------------------------------

PLANTED_TITLE = "planted-title-0c4e8a"


async def test_store_only_detail_is_sealed_in_the_store_and_nowhere_else(tmp_path):
    """A sealed field's value: "***" in the JSON line and the chain, the value itself only in
    the store (encrypted, also through a worker's hand-off); the console shows it, the export
    does not, and the chain verifies."""
    db = tmp_path / "store" / "audit.duckdb"
    owner = await open_writer(db)
    worker = AuditWriter(
        jsonl_path=str(tmp_path / "worker.jsonl"), db_path=db, flush_interval_seconds=3600,
        batch_size=100, checkpoint_key=KEY, handoff=True,
    )  # fmt: skip
    await worker.start()
    for writer, n in ((owner, 1), (worker, 2)):
        event = system_event("test.write", subject=f"user-{n}", changes={"title": "***"})
        writer.emit(event, {"changes": {"title": f"{PLANTED_TITLE}-{n}"}})
    await worker.close()
    await owner.flush()
    assert files_holding(db.parent, PLANTED_TITLE) == []
    await owner.close()
    lines = (tmp_path / "audit.jsonl").read_text() + (tmp_path / "worker.jsonl").read_text()
    assert PLANTED_TITLE not in lines
    assert files_holding(db.parent, PLANTED_TITLE) == []
    assert problems(db) == []
    found = {e["subject"]: e for e in search(db)}
    assert found["user-2"]["sealed_detail"] == {"changes": {"title": f"{PLANTED_TITLE}-2"}}
    assert found["user-1"]["detail"]["changes"] == {"title": "***"}  # the chained event
    assert "sealed_detail" not in exported(found["user-1"])
    view = event_view(found["user-1"])
    assert view["changes"] == [("title", f"{PLANTED_TITLE}-1")]
    assert PLANTED_TITLE not in view["raw"]


async def test_store_only_detail_moved_to_another_row_does_not_open(tmp_path):
    """It is outside the chain, but bound to its row: a copy fails verify and the search."""
    db = tmp_path / "store" / "audit.duckdb"
    writer = await open_writer(db)
    for n in range(3):
        writer.emit(system_event("test.write", subject=f"user-{n}"), {"changes": {"n": n}})
    await writer.close()
    tamper(db, "UPDATE audit_events SET sealed_detail = (SELECT sealed_detail FROM "
               "audit_events WHERE seq = 1) WHERE seq = 2")  # fmt: skip
    assert any(p.startswith("seq 2: an encrypted column does not open") for p in problems(db))
    with pytest.raises(DataKeyError):
        search(db)

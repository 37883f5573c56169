"""The verify and restore examples of docs/security/retention.md, run against a real run's files.

The SQL and the script are read from the page itself, so an example that stops working fails
here; only placeholders (a file name, a date) are filled in.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import subprocess
import sys

import duckdb
import pytest
from support.archive import REPO, days_ago, write_chain

from emparchive.files import ensure_log
from empsecrets.fieldcrypt import DataKeyRing, FieldCipher
from empsecrets.providers import Keystore
from gateway.archive.audit_store import archive_audit
from gateway.archive.decisions import archive_decision_log
from gateway.auditchain import ensure_checkpoint_key, load_checkpoint_key
from gateway.policy.decisionlog import rotate_file
from upstream.archive.tables import Archiver
from upstream.cli import main as upstream_main
from upstream.config import EncryptionConfig, RetentionConfig
from upstream.database import Database
from upstream.sealing import load_sealer

PAGE = (REPO / "docs/security/retention.md").read_text()
SQL_BLOCKS = re.findall(r"```sql\n(.*?)```", PAGE, re.DOTALL)
SCRIPT = re.search(r"python - <<'EOF'\n(.*?)EOF\n", PAGE, re.DOTALL)


@pytest.fixture(scope="module")
def var(tmp_path_factory):
    """A working directory whose var/ holds committed archives of every gateway table and the
    EMP service's records, as a day of runs leaves them."""
    work = tmp_path_factory.mktemp("deployment")
    (work / "config").mkdir()
    shutil.copy(REPO / "config/gateway.toml", work / "config/gateway.toml")
    var = work / "var"
    key_file = var / "secrets" / "audit-checkpoint.key"
    ensure_checkpoint_key(key_file)
    key = load_checkpoint_key(key_file)
    # Where the shipped config reads it from, as `gateway setup` leaves it: the keystore.
    keystore = Keystore.create(var / "secrets/keystore.json", var / "secrets/keystore.master")
    keystore.put("audit-checkpoint-key", key_file.read_text())
    ring = DataKeyRing.generate()  # the audit store's data keys, where setup makes them
    keystore.put("gateway-data-keys", ring.dumps())
    cipher = FieldCipher(ring)
    audit = var / "audit.duckdb"
    asyncio.run(write_chain(audit, key, [[days_ago(400)] * 5, [days_ago(1)]], cipher=cipher))
    log_path = var / "decisions.jsonl"
    log_path.write_text(
        "".join(
            json.dumps(
                {
                    "decision_id": f"d{n}",
                    "timestamp": days_ago(100).isoformat(),
                    "note": 'a, "quoted"\ttab',
                }
            )
            + "\n"
            for n in range(3)
        )
    )
    rotate_file(log_path)
    with duckdb.connect(str(audit)) as connection:
        ensure_log(connection)
        common = {"root": var / "archive", "run_id": "5f0c2a9e41d7", "observe": lambda *_: None}
        archive_audit(connection.cursor(), cutoff=days_ago(365), key=key, cipher=cipher, **common)
        archive_decision_log(connection.cursor(), log_path=log_path, cutoff=days_ago(90), **common)
    emp = var / "emp.duckdb"
    assert upstream_main(["db", "init", "--db", str(emp)]) == 0
    with duckdb.connect(str(emp)) as connection:
        connection.execute(
            "INSERT INTO ingest_records (stream, batch_id, batch_seq, record_index, record, "
            "received_at) SELECT 's', uuid(), i, 0, json_object('i', i), "
            "now()::TIMESTAMP - INTERVAL 300 DAY FROM range(4) t(i)"
        )

    async def archive_records() -> None:
        settings = EncryptionConfig().provider_settings(emp)
        database = Database.open(emp, load_sealer("keystore:emp-data-keys", settings))
        try:
            await Archiver(RetentionConfig(archive_dir=var / "archive")).run(
                database, "5f0c2a9e41d7", lambda *_: None
            )
        finally:
            database.close()

    asyncio.run(archive_records())
    return work


def fill(sql: str, work) -> str:
    """Put the test's own file names in place of the page's example ones."""

    def actual(match: re.Match[str]) -> str:
        table = match.group(1)
        [found] = (work / "var/archive" / table).glob("*.parquet")
        return f"var/archive/{table}/{found.name}"

    return re.sub(r"var/archive/(\w+)/[^'*]+?\.parquet", actual, sql)


def test_the_page_has_the_examples():
    """Three SQL examples and the restore script: without them this file would check nothing."""
    assert len(SQL_BLOCKS) == 3
    assert SCRIPT is not None


def test_the_manifest_matches_the_file(var):
    """sha256sum of each archive equals its manifest's sha256, and the row count its rows."""
    for manifest in (var / "var/archive").rglob("*.manifest.json"):
        document = json.loads(manifest.read_text())
        parquet = manifest.with_name(document["file"])
        assert hashlib.sha256(parquet.read_bytes()).hexdigest() == document["sha256"]
        [(count,)] = duckdb.execute(
            "SELECT count(*) FROM read_parquet(?)", [str(parquet)]
        ).fetchall()
        assert count == document["rows"]


def test_searching_old_audit_events(var, monkeypatch):
    """The search example finds archived events by subject and time."""
    monkeypatch.chdir(var)
    sql = SQL_BLOCKS[0].replace("'alice'", "'user-1'").replace("2025-01-01", "2000-01-01")
    found = duckdb.sql(sql).fetchall()
    assert len(found) == 2  # events 1 and 4 of the archived five


def test_restoring_ingest_records(var, monkeypatch):
    """INSERT ... BY NAME brings the archived records back, values intact."""
    monkeypatch.chdir(var)
    [comment, *_] = SQL_BLOCKS[1].splitlines()
    assert comment == "-- duckdb var/emp.duckdb"
    with duckdb.connect("var/emp.duckdb") as connection:
        assert connection.execute("SELECT count(*) FROM ingest_records").fetchall() == [(0,)]
        connection.execute(fill(SQL_BLOCKS[1], var))
        restored = connection.execute(
            "SELECT CAST(record AS VARCHAR) FROM ingest_records ORDER BY batch_seq"
        ).fetchall()
    assert restored == [(json.dumps({"i": i}, separators=(",", ":")),) for i in range(4)]


def test_rebuilding_a_decision_log_segment(var, monkeypatch):
    """The COPY example writes the segment back byte for byte."""
    monkeypatch.chdir(var)
    [parquet] = (var / "var/archive/decision_log").glob("*.parquet")
    manifest = json.loads(parquet.with_name(parquet.stem + ".manifest.json").read_text())
    duckdb.execute(SQL_BLOCKS[2].replace("<file>.parquet", parquet.name))
    restored = (var / "restored.jsonl").read_bytes()
    assert hashlib.sha256(restored).hexdigest() == manifest["segment_sha256"]


def test_verifying_the_archived_chain(var, tmp_path):
    """The restore script plus `gateway audit verify --db` say the archived chain is intact."""
    scratch = tmp_path / "audit-archive.duckdb"
    script = SCRIPT.group(1).replace("/tmp/audit-archive.duckdb", str(scratch))  # noqa: S108
    subprocess.run([sys.executable, "-c", script], cwd=var, check=True, timeout=60)
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", "--db", str(scratch)],
        cwd=var, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 events, seq 1-5, 1 checkpoints: intact" in done.stdout

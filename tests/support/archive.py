"""Test support for retention: stores with old rows, and what the committed archives hold.

An archive counts only when the store recorded it (archive_log) or its manifest says committed;
files an interrupted run left are not archives, and the next run removes them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from empsecrets.fieldcrypt import FieldCipher
from gateway.audit import AuditWriter
from support.datakeys import CIPHER

REPO = Path(__file__).resolve().parent.parent.parent


def days_ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


def audit_event(n: int, when: datetime, **overrides: Any) -> dict[str, Any]:
    """A request event of a given time, with non-ASCII detail and nulls to round-trip."""
    event = {
        "event_id": f"ev-{n:05d}", "time": when.isoformat(timespec="milliseconds"),
        "kind": "request", "request_id": f"req-{n}", "subject": f"user-{n % 3}",
        "roles": ["reader"], "issuer": "https://localhost:8443", "method": "GET",
        "path": f"/api/tickets/{n}", "route": "tickets.get", "decision": "allow",
        "reason_id": None, "status": 200, "latency_ms": 1.5 + n, "upstream_ms": None,
        "policy_revision": "rev", "reasons": [], "remote_addr": "127.0.0.1",
        "user_agent": "test", "detail": {"n": n, "note": "é ünïcode"},
    }  # fmt: skip
    event.update(overrides)
    return event


async def write_chain(
    db: Path, key: Any, batches: list[list[datetime]], start: int = 0, cipher: FieldCipher = CIPHER
) -> str:
    """One writer's chain: each batch of event times flushed with its signed checkpoint."""
    writer = AuditWriter(
        jsonl_path=str(db.parent / "seed-audit.jsonl"), db_path=db, flush_interval_seconds=3600,
        batch_size=100_000, checkpoint_key=key, cipher=cipher,
    )  # fmt: skip
    await writer.start()
    n = start
    for times in batches:
        for when in times:
            writer.emit(audit_event(n, when))
            n += 1
        await writer.flush()
    await writer.close()
    return writer.chain.chain_id


def rows(db: Path, query: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(db), read_only=True) as connection:
        connection.execute("SET TimeZone = 'UTC'")
        return connection.execute(query).fetchall()


def committed_archives(root: Path, table: str) -> list[Path]:
    """The Parquet files of a table whose manifests say committed."""
    found = []
    for manifest in sorted((root / table).glob("*.manifest.json")):
        document = json.loads(manifest.read_text())
        if document.get("committed_at"):
            found.append(manifest.with_name(document["file"]))
    return found


def archived(root: Path, table: str, columns: str = "*", order: str = "") -> list[tuple[Any, ...]]:
    """Every row of a table's committed archives (duplicates kept, so a test can count them)."""
    files = committed_archives(root, table)
    if not files:
        return []
    order_by = f" ORDER BY {order}" if order else ""
    with duckdb.connect() as connection:
        connection.execute("SET TimeZone = 'UTC'")
        return connection.execute(
            f"SELECT {columns} FROM read_parquet(?){order_by}",  # noqa: S608 - the test's own
            [[str(f) for f in files]],
        ).fetchall()


def run_crashing(script: str, *args: str) -> int:
    """Run a Python snippet in a child process that exits hard (os._exit) at a chosen step."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, timeout=120
    )
    assert done.returncode == 3, done.stderr.decode()  # 3: it stopped where it was told to
    return done.returncode

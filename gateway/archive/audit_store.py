"""Archiving the audit store: the oldest part of each hash chain, with its checkpoints.

A chain is cut at its newest checkpoint before its first row inside the window, so the last
archived row is covered by a signed checkpoint that goes into the archive with it. The archive
is read back, its chains verified, and the first kept row checked to link to the last archived
one. Then, in one transaction, the rows are deleted and a signed archive anchor (chain, seq,
hash) is recorded, so `gateway audit verify` accepts the chain starting after the anchor. It
still reports rows deleted without one. Must never delete a row that is not in a verified file.
The Parquet files hold the rows as stored, their sensitive columns encrypted (verification
opens them with the data key ring, which keeps its old keys for these archives).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import duckdb

from emparchive.files import (
    ArchiveError,
    ArchiveFile,
    Content,
    check,
    committed_files,
    content,
    ensure_log,
    export,
    log_committed,
    mark_committed,
    recover,
    sha256_file,
    write_manifest,
)
from gateway.archive.report import TableResult
from gateway.auditchain import ANCHORS_TABLE, anchor_message, key_id, verify

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from empsecrets.fieldcrypt import FieldCipher

    Observe = Callable[[str, str], None]

EVENTS = "audit_events"
CHECKPOINTS = "audit_checkpoints"

_CUTS = "SELECT unnest(CAST(? AS VARCHAR[])) AS chain, unnest(CAST(? AS BIGINT[])) AS last_seq"
# The same predicates select the rows to export and, later, the rows to delete.
_EVENTS_WHERE = (
    "(audit_events.chain IS NULL AND audit_events.time < CAST(? AS TIMESTAMPTZ)) OR EXISTS "  # noqa: S608 - fixed SQL
    f"(SELECT 1 FROM ({_CUTS}) cut WHERE cut.chain = audit_events.chain "
    "AND audit_events.seq <= cut.last_seq)"
)
_CHECKPOINTS_WHERE = (
    f"EXISTS (SELECT 1 FROM ({_CUTS}) cut WHERE cut.chain = audit_checkpoints.chain "  # noqa: S608 - fixed SQL
    "AND audit_checkpoints.seq <= cut.last_seq)"
)
_SELECT_EVENTS = f"SELECT * FROM audit_events WHERE {_EVENTS_WHERE}"  # noqa: S608 - fixed SQL
_SELECT_CHECKPOINTS = f"SELECT * FROM audit_checkpoints WHERE {_CHECKPOINTS_WHERE}"  # noqa: S608
# Per chain: its first row, the end of its prefix older than the cutoff, and the newest
# checkpoint within that prefix (the cut, when the chain has checkpoints at all).
_SPANS = """
WITH young AS (
    SELECT chain, min(seq) AS first_young FROM audit_events
    WHERE chain IS NOT NULL AND time >= CAST(? AS TIMESTAMPTZ) GROUP BY chain
), spans AS (
    SELECT e.chain, min(e.seq) AS first_seq,
           max(e.seq) FILTER (WHERE y.first_young IS NULL OR e.seq < y.first_young) AS prefix_end
    FROM audit_events e LEFT JOIN young y ON y.chain = e.chain
    WHERE e.chain IS NOT NULL GROUP BY e.chain
)
SELECT s.chain, s.first_seq, s.prefix_end,
       (SELECT max(k.seq) FROM audit_checkpoints k
        WHERE k.chain = s.chain AND k.seq <= s.prefix_end) AS signed_end,
       (SELECT count(*) FROM audit_checkpoints k WHERE k.chain = s.chain) AS checkpoints
FROM spans s WHERE s.prefix_end IS NOT NULL ORDER BY s.chain
"""
_HASH_AT = "SELECT hash FROM audit_events WHERE chain = ? AND seq = ?"
_NEXT_KEPT = (
    "SELECT seq, prev_hash FROM audit_events WHERE chain = ? AND seq > ? ORDER BY seq LIMIT 1"
)
_TIMES = (
    "SELECT CAST(min(time) AS VARCHAR), CAST(max(time) AS VARCHAR) "  # noqa: S608 - fixed SQL
    f"FROM audit_events WHERE {_EVENTS_WHERE}"
)
_INSERT_ANCHOR = "INSERT INTO audit_archive_anchors VALUES (?, ?, ?, ?, ?, ?, ?)"
_ANCHOR_COLUMNS = "chain, seq, hash, signed_at, key_id, signature, archive"


@dataclass(frozen=True)
class Cut:
    """One chain's archived part: seq first_seq..last_seq, the last with hash last_hash."""

    chain: str
    first_seq: int
    last_seq: int
    last_hash: str


@dataclass
class AuditPlan:
    """What this run archives of the audit store."""

    cutoff: str
    cuts: list[Cut]
    events: Content
    checkpoints: Content
    first_time: str = ""
    last_time: str = ""

    def event_params(self) -> list[Any]:
        """Parameters of the events predicate."""
        return [self.cutoff, *self.checkpoint_params()]

    def checkpoint_params(self) -> list[Any]:
        """Parameters of the checkpoints predicate."""
        return [[c.chain for c in self.cuts], [c.last_seq for c in self.cuts]]


@dataclass(frozen=True)
class _Files:
    events: ArchiveFile
    checkpoints: ArchiveFile
    events_sha256: str
    checkpoints_sha256: str


def archive_audit(
    cursor: duckdb.DuckDBPyConnection,
    *,
    root: Path,
    run_id: str,
    cutoff: datetime,
    key: Ed25519PrivateKey | None,
    cipher: FieldCipher,
    observe: Observe,
) -> list[TableResult]:
    """Archive the events older than cutoff and their checkpoints; one result per table."""
    events, checkpoints = TableResult(EVENTS), TableResult(CHECKPOINTS)
    try:
        _archive(cursor, events, checkpoints, root=root, run_id=run_id, cutoff=cutoff, key=key,
                 cipher=cipher, observe=observe)  # fmt: skip
    except (ArchiveError, duckdb.Error, OSError) as exc:
        for result in (events, checkpoints):
            result.fail(str(exc))
    return [events, checkpoints]


def _archive(
    cursor: duckdb.DuckDBPyConnection,
    events: TableResult,
    checkpoints: TableResult,
    *,
    root: Path,
    run_id: str,
    cutoff: datetime,
    key: Ed25519PrivateKey | None,
    cipher: FieldCipher,
    observe: Observe,
) -> None:
    ensure_log(cursor)
    cursor.execute(ANCHORS_TABLE)
    for result in (events, checkpoints):
        found = recover(root / result.table, committed_files(cursor, result.table))
        result.discarded, result.problems = found.discarded, found.problems
    plan = plan_audit(cursor, cutoff)
    if plan.events.rows == 0:
        return
    files = _export(cursor, plan, root, run_id)
    events.files = [files.events.parquet.name]
    checkpoints.files = [files.checkpoints.parquet.name]
    observe(EVENTS, "exported")
    verification = _verify(cursor, plan, files, key, cipher)
    events.verification = verification
    _write_manifests(plan, files, run_id, verification)
    if not _passed(verification):
        raise ArchiveError(f"the archive did not verify: {_failures(verification)}")
    observe(EVENTS, "verified")
    _commit(cursor, plan, files, run_id=run_id, key=key, observe=observe)
    observe(EVENTS, "committed")
    mark_committed(files.events)
    mark_committed(files.checkpoints)
    events.status, events.rows = "archived", plan.events.rows
    checkpoints.status, checkpoints.rows = "archived", plan.checkpoints.rows


def plan_audit(cursor: duckdb.DuckDBPyConnection, cutoff: datetime) -> AuditPlan:
    """Where each chain is cut, and the content of what would be archived."""
    at = cutoff.astimezone(UTC).isoformat()
    cursor.execute("SET TimeZone = 'UTC'")
    cuts: list[Cut] = []
    for chain, first_seq, prefix_end, signed_end, checkpoints in cursor.execute(
        _SPANS, [at]
    ).fetchall():
        last = signed_end if checkpoints else prefix_end
        if last is None or last < first_seq:
            continue  # no checkpoint inside the old part yet: the chain waits for the next run
        row = cursor.execute(_HASH_AT, [chain, last]).fetchone()
        if row is None:
            raise ArchiveError(f"chain {chain}: seq {last} is missing; run `gateway audit verify`")
        cuts.append(Cut(chain, int(first_seq), int(last), str(row[0])))
    plan = AuditPlan(at, cuts, Content(0, ""), Content(0, ""))
    plan.events = content(cursor, _SELECT_EVENTS, plan.event_params())
    plan.checkpoints = content(cursor, _SELECT_CHECKPOINTS, plan.checkpoint_params())
    times = cursor.execute(_TIMES, plan.event_params()).fetchone()
    if times is not None and times[0] is not None:
        plan.first_time, plan.last_time = str(times[0]), str(times[1])
    return plan


def _export(cursor: duckdb.DuckDBPyConnection, plan: AuditPlan, root: Path, run_id: str) -> _Files:
    events = ArchiveFile.new(root, EVENTS, plan.first_time, plan.last_time, run_id)
    checkpoints = ArchiveFile(root / CHECKPOINTS, events.stem)
    events_sha = export(
        cursor, f"{_SELECT_EVENTS} ORDER BY chain NULLS FIRST, seq, event_id", plan.event_params(),
        events,
    )  # fmt: skip
    checkpoints_sha = export(
        cursor, f"{_SELECT_CHECKPOINTS} ORDER BY chain, seq", plan.checkpoint_params(), checkpoints
    )
    return _Files(events, checkpoints, events_sha, checkpoints_sha)


def _verify(
    cursor: duckdb.DuckDBPyConnection,
    plan: AuditPlan,
    files: _Files,
    key: Ed25519PrivateKey | None,
    cipher: FieldCipher,
) -> dict[str, Any]:
    """Read both files back, walk the archived chains, and check each cut links to what stays."""
    return {
        "events": check(files.events, plan.events, files.events_sha256),
        "checkpoints": check(files.checkpoints, plan.checkpoints, files.checkpoints_sha256),
        "chains": _chain_problems(cursor, plan, files, key, cipher),
        "cut": _cut_problems(cursor, plan),
    }


def _chain_problems(
    cursor: duckdb.DuckDBPyConnection,
    plan: AuditPlan,
    files: _Files,
    key: Ed25519PrivateKey | None,
    cipher: FieldCipher,
) -> list[str]:
    """`verify` over the archive files, linked to each chain's previous anchor (if any)."""
    anchors = cursor.execute(
        f"SELECT {_ANCHOR_COLUMNS} FROM audit_archive_anchors "  # noqa: S608 - fixed SQL
        "WHERE list_contains(CAST(? AS VARCHAR[]), chain)",
        [[c.chain for c in plan.cuts]],
    ).fetchall()
    with duckdb.connect() as memory:
        for name, target in ((EVENTS, files.events), (CHECKPOINTS, files.checkpoints)):
            path = str(target.parquet).replace("'", "''")
            # A view takes no parameters: the path is quoted (our own file name, under config).
            memory.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{path}')")  # noqa: S608
        memory.execute(ANCHORS_TABLE)
        for anchor in anchors:
            memory.execute(_INSERT_ANCHOR, list(anchor))
        public = key.public_key() if key else None
        reports = {r.chain: r for r in verify(memory, public, cipher)}
        problems = [f"chain {r.chain}: {p}" for r in reports.values() for p in r.problems]
        for cut in plan.cuts:
            report = reports.get(cut.chain)
            last = memory.execute(_HASH_AT, [cut.chain, cut.last_seq]).fetchone()
            if report is None or report.last_seq != cut.last_seq or last != (cut.last_hash,):
                problems.append(
                    f"chain {cut.chain}: the archive does not end at seq {cut.last_seq}"
                )
    return problems


def _cut_problems(cursor: duckdb.DuckDBPyConnection, plan: AuditPlan) -> list[str]:
    """The first kept row of each chain must link to the last archived one."""
    problems = []
    for cut in plan.cuts:
        kept = cursor.execute(_NEXT_KEPT, [cut.chain, cut.last_seq]).fetchone()
        if kept is not None and (kept[0], kept[1]) != (cut.last_seq + 1, cut.last_hash):
            problems.append(
                f"chain {cut.chain}: seq {kept[0]} does not link to the archived seq {cut.last_seq}"
            )
    return problems


def _passed(verification: dict[str, Any]) -> bool:
    files_ok = all(all(verification[name].values()) for name in ("events", "checkpoints"))
    return files_ok and not verification["chains"] and not verification["cut"]


def _failures(verification: dict[str, Any]) -> str:
    failed = [
        f"{name} {check_name}"
        for name in ("events", "checkpoints")
        for check_name, ok in verification[name].items()
        if not ok
    ]
    return "; ".join([*failed, *verification["chains"], *verification["cut"]][:5])


def _write_manifests(
    plan: AuditPlan, files: _Files, run_id: str, verification: dict[str, Any]
) -> None:
    common = {"run_id": run_id, "cutoff": plan.cutoff, "committed_at": None,
              "min_time": plan.first_time, "max_time": plan.last_time}  # fmt: skip
    write_manifest(files.events, {
        **common, "table": EVENTS, "rows": plan.events.rows, "checksum": plan.events.checksum,
        "sha256": files.events_sha256, "checkpoints_file": files.checkpoints.parquet.name,
        "chains": [
            {"chain": c.chain, "first_seq": c.first_seq, "last_seq": c.last_seq,
             "last_hash": c.last_hash}
            for c in plan.cuts
        ],
        "verification": verification,
    })  # fmt: skip
    write_manifest(files.checkpoints, {
        **common, "table": CHECKPOINTS, "rows": plan.checkpoints.rows,
        "checksum": plan.checkpoints.checksum, "sha256": files.checkpoints_sha256,
        "events_file": files.events.parquet.name,
        "verification": {"checkpoints": verification["checkpoints"]},
    })  # fmt: skip


def _commit(
    cursor: duckdb.DuckDBPyConnection,
    plan: AuditPlan,
    files: _Files,
    *,
    run_id: str,
    key: Ed25519PrivateKey | None,
    observe: Observe,
) -> None:
    """In one transaction: re-check, delete, anchor each chain, record the archives."""
    cursor.begin()
    try:
        _recheck(cursor, plan, files)
        _delete(cursor, plan)
        for cut in plan.cuts:
            cursor.execute(_INSERT_ANCHOR, _anchor(cut, files.events.parquet.name, key))
        log_committed(cursor, table=EVENTS, target=files.events, run_id=run_id,
                      rows=plan.events, sha256=files.events_sha256)  # fmt: skip
        log_committed(cursor, table=CHECKPOINTS, target=files.checkpoints, run_id=run_id,
                      rows=plan.checkpoints, sha256=files.checkpoints_sha256)  # fmt: skip
        observe(EVENTS, "deleted")  # still inside the transaction: a crash here keeps every row
        cursor.commit()
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            cursor.rollback()
        raise


def _delete(cursor: duckdb.DuckDBPyConnection, plan: AuditPlan) -> None:
    """Delete exactly the archived rows (the counts are checked: anything else rolls back)."""
    deleted = cursor.execute(
        f"DELETE FROM audit_checkpoints WHERE {_CHECKPOINTS_WHERE}",  # noqa: S608 - fixed SQL
        plan.checkpoint_params(),
    ).fetchone()
    removed = cursor.execute(
        f"DELETE FROM audit_events WHERE {_EVENTS_WHERE}",  # noqa: S608 - fixed SQL
        plan.event_params(),
    ).fetchone()
    if (removed, deleted) != ((plan.events.rows,), (plan.checkpoints.rows,)):
        raise ArchiveError("the delete did not remove exactly the archived rows")


def _recheck(cursor: duckdb.DuckDBPyConnection, plan: AuditPlan, files: _Files) -> None:
    """Inside the deleting transaction: the rows and files are still what was verified."""
    if content(cursor, _SELECT_EVENTS, plan.event_params()) != plan.events:
        raise ArchiveError("the audit rows changed after the export")
    if content(cursor, _SELECT_CHECKPOINTS, plan.checkpoint_params()) != plan.checkpoints:
        raise ArchiveError("the audit checkpoints changed after the export")
    problems = _cut_problems(cursor, plan)
    if problems:
        raise ArchiveError(problems[0])
    if (sha256_file(files.events.parquet), sha256_file(files.checkpoints.parquet)) != (
        files.events_sha256, files.checkpoints_sha256,
    ):  # fmt: skip
        raise ArchiveError("an archive file changed after it was verified")


def _anchor(cut: Cut, archive: str, key: Ed25519PrivateKey | None) -> list[Any]:
    at = datetime.now(UTC).isoformat(timespec="milliseconds")
    if key is None:  # a store without a checkpoint key: unsigned, as its checkpoints are
        return [cut.chain, cut.last_seq, cut.last_hash, at, "", "", archive]
    signature = key.sign(anchor_message(cut.chain, cut.last_seq, cut.last_hash, at)).hex()
    public = key_id(key.public_key())
    return [cut.chain, cut.last_seq, cut.last_hash, at, public, signature, archive]

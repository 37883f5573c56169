"""Archiving ``ingest_records`` and ``ingest_quarantine``: the rows older than their window.

Rows are chosen by their time and by a bound read at the start (the highest ``batch_seq`` or
``id`` then), so the same predicate picks the same rows at export and at delete, whatever
arrives in between. Export and read-back run beside the readers; the delete is one transaction
on the writer thread that first re-checks the rows and the file, and records the archive in
``archive_log``. A pending quarantine row is never archived: it awaits a person's decision.
"""

import asyncio
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from emparchive.files import (
    ArchiveError,
    ArchiveFile,
    Content,
    check,
    committed_files,
    content,
    export,
    log_committed,
    mark_committed,
    recover,
    sha256_file,
    write_manifest,
)
from upstream.config import RetentionConfig
from upstream.database import Database
from upstream.errors import ApiError

Observe = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class TableSpec:
    """How one table's old rows are found: `where` takes (cutoff, bound)."""

    name: str
    time_column: str
    where: str
    bound: str
    order: str

    @property
    def select(self) -> str:
        """The rows to archive (and later delete)."""
        return f"SELECT * FROM {self.name} WHERE {self.where}"  # noqa: S608  # nosec B608  # fixed names


INGEST_RECORDS = TableSpec(
    name="ingest_records",
    time_column="received_at",
    where="received_at < CAST(? AS TIMESTAMP) AND batch_seq <= ?",
    bound="SELECT coalesce(max(batch_seq), 0) FROM ingest_records",
    order="batch_seq, record_index",
)
INGEST_QUARANTINE = TableSpec(
    name="ingest_quarantine",
    time_column="reviewed_at",
    where="status <> 'pending' AND reviewed_at < CAST(? AS TIMESTAMP) AND id <= ?",
    bound="SELECT coalesce(max(id), 0) FROM ingest_quarantine",
    order="id",
)


@dataclass(slots=True)
class TableResult:
    """One table's part of a run, in the shape the gateway reads (gateway/archive/report.py)."""

    table: str
    status: str = "nothing"
    rows: int = 0
    files: list[str] = field(default_factory=list)
    verification: dict[str, bool] = field(default_factory=dict)
    error: str | None = None
    discarded: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Plan:
    params: list[object]
    rows: Content
    first: str
    last: str


class Archiver:
    """Archives the ingest tables with the windows of [retention]; one run at a time."""

    def __init__(self, retention: RetentionConfig) -> None:
        self._retention = retention
        self._lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        """Whether a run is in progress."""
        return self._lock.locked()

    async def run(self, database: Database, run_id: str, observe: Observe) -> list[dict[str, Any]]:
        """Archive each table; a table that fails keeps every row, the other goes on."""
        retention = self._retention
        async with self._lock:
            now = datetime.now(UTC).replace(tzinfo=None)  # the columns are UTC TIMESTAMPs
            results = []
            for spec, days in (
                (INGEST_RECORDS, retention.ingest_records_days),
                (INGEST_QUARANTINE, retention.ingest_quarantine_days),
            ):
                result = TableResult(spec.name)
                cutoff = now - timedelta(days=days)
                try:
                    await _archive(
                        database, spec, result, cutoff=cutoff, root=retention.archive_dir,
                        run_id=run_id, observe=observe,
                    )  # fmt: skip
                except (ArchiveError, ApiError, duckdb.Error, OSError) as error:
                    result.status, result.error = "failed", str(error)
                results.append(asdict(result))
            return results


async def _archive(
    database: Database,
    spec: TableSpec,
    result: TableResult,
    *,
    cutoff: datetime,
    root: Path,
    run_id: str,
    observe: Observe,
) -> None:
    committed = await database.read(lambda cursor: committed_files(cursor, spec.name))
    found = await asyncio.to_thread(recover, root / spec.name, committed)
    result.discarded, result.problems = found.discarded, found.problems
    plan = await database.read(lambda cursor: _plan(cursor, spec, cutoff))
    if plan.rows.rows == 0:
        return
    target = ArchiveFile.new(root, spec.name, plan.first, plan.last, run_id)
    ordered = f"{spec.select} ORDER BY {spec.order}"
    sha = await database.read(lambda cursor: export(cursor, ordered, plan.params, target))
    result.files = [target.parquet.name]
    observe(spec.name, "exported")
    result.verification = await asyncio.to_thread(check, target, plan.rows, sha)
    manifest = {
        "table": spec.name, "run_id": run_id, "cutoff": str(plan.params[0]),
        "rows": plan.rows.rows, "checksum": plan.rows.checksum, "sha256": sha,
        "min_time": plan.first, "max_time": plan.last, "committed_at": None,
        "verification": result.verification,
    }  # fmt: skip
    await asyncio.to_thread(write_manifest, target, manifest)
    if not all(result.verification.values()):
        failed = [name for name, ok in result.verification.items() if not ok]
        raise ArchiveError(f"{target.parquet.name} did not verify: {', '.join(failed)}")
    observe(spec.name, "verified")
    await database.write(lambda cursor: _commit(cursor, spec, plan, target, sha, run_id, observe))
    observe(spec.name, "committed")
    await asyncio.to_thread(mark_committed, target)
    result.status, result.rows = "archived", plan.rows.rows


def _plan(cursor: duckdb.DuckDBPyConnection, spec: TableSpec, cutoff: datetime) -> _Plan:
    bound = cursor.execute(spec.bound).fetchone()
    params: list[object] = [cutoff.isoformat(sep=" "), int(bound[0]) if bound else 0]
    rows = content(cursor, spec.select, params)
    times = cursor.execute(
        f"SELECT CAST(min({spec.time_column}) AS VARCHAR), "  # noqa: S608  # nosec B608  # fixed names
        f"CAST(max({spec.time_column}) AS VARCHAR) FROM {spec.name} WHERE {spec.where}",
        params,
    ).fetchone()
    first, last = (str(times[0]), str(times[1])) if times and times[0] else ("", "")
    return _Plan(params, rows, first, last)


def _commit(  # noqa: PLR0917  # the writer thread's one transaction
    cursor: duckdb.DuckDBPyConnection,
    spec: TableSpec,
    plan: _Plan,
    target: ArchiveFile,
    sha: str,
    run_id: str,
    observe: Observe,
) -> None:
    """Re-check the rows and the file, delete exactly the rows, record the archive."""
    if content(cursor, spec.select, plan.params) != plan.rows:
        raise ArchiveError(f"{spec.name}: the rows changed after the export")
    if sha256_file(target.parquet) != sha:
        raise ArchiveError(f"{target.parquet.name} changed after it was verified")
    deleted = cursor.execute(
        f"DELETE FROM {spec.name} WHERE {spec.where}",  # noqa: S608  # nosec B608  # fixed names
        plan.params,
    ).fetchone()
    if deleted != (plan.rows.rows,):
        raise ArchiveError(f"{spec.name}: the delete did not remove exactly the archived rows")
    log_committed(cursor, table=spec.name, target=target, run_id=run_id, rows=plan.rows, sha256=sha)
    observe(spec.name, "deleted")  # still inside the transaction: a crash here keeps every row

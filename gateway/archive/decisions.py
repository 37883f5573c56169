"""Archiving the decision log: closed segments whose newest line is older than the window.

The run rotates the log first (the writer goes on in a new file; gateway/policy/decisionlog.py).
Then each closed segment whose lines are all older than the window goes to Parquet, one row a
line: its number, time, decision id and the exact text. The archive is read back and matched,
the audit store records it, and only then is the segment removed. A segment is archived whole,
so a line is kept at least the window and at most the window plus one run interval. Never
touches the file a writer has open.
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
    read_manifest,
    recover,
    sha256_file,
    write_manifest,
)
from gateway.archive.report import TableResult
from gateway.policy.decisionlog import segments

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    Observe = Callable[[str, str], None]

TABLE = "decision_log"
# One row per line, read as text (no JSON line holds a raw control character, so \x01 never
# splits one); the time and id are read from the line when it is JSON.
_LINES = (
    "SELECT ordinality AS line_no, CASE WHEN json_valid(line) THEN TRY_CAST("
    "json_extract_string(line, '$.timestamp') AS TIMESTAMPTZ) END AS time, "
    "CASE WHEN json_valid(line) THEN json_extract_string(line, '$.decision_id') END "
    "AS decision_id, line FROM read_csv(?, columns = {'line': 'VARCHAR'}, delim = chr(1), "
    "quote = '', escape = '', header = false, auto_detect = false, "
    "max_line_size = 67108864) WITH ORDINALITY"
)
_SPAN = (
    "SELECT CAST(min(time) AS VARCHAR), CAST(max(time) AS VARCHAR), "  # noqa: S608 - fixed SQL
    f"max(time) < CAST(? AS TIMESTAMPTZ) FROM ({_LINES})"
)


@dataclass(frozen=True)
class Segment:
    """A closed segment old enough to archive."""

    path: Path
    first: str
    last: str


def archive_decision_log(
    cursor: duckdb.DuckDBPyConnection,
    *,
    log_path: Path,
    root: Path,
    run_id: str,
    cutoff: datetime,
    observe: Observe,
) -> TableResult:
    """Archive every closed segment older than cutoff; the cursor is the audit store's."""
    result = TableResult(TABLE)
    try:
        ensure_log(cursor)
        found = recover(root / TABLE, committed_files(cursor, TABLE))
        result.discarded, result.problems = found.discarded, found.problems
        _remove_archived_segments(root / TABLE, log_path)
        for segment in old_segments(cursor, log_path, cutoff):
            result.rows += _archive_segment(
                cursor, segment, result, root=root, run_id=run_id, observe=observe
            )
    except (ArchiveError, duckdb.Error, OSError) as exc:
        result.fail(str(exc))
        return result
    if result.files:
        result.status = "archived"
    return result


def old_segments(
    cursor: duckdb.DuckDBPyConnection, log_path: Path, cutoff: datetime
) -> list[Segment]:
    """The closed segments whose newest line is older than cutoff."""
    cursor.execute("SET TimeZone = 'UTC'")
    at = cutoff.astimezone(UTC)
    old = []
    for path in segments(log_path):
        first, last, before = cursor.execute(_SPAN, [at.isoformat(), str(path)]).fetchone() or (
            None, None, None,
        )  # fmt: skip
        if before is None:  # no line with a time (torn or empty): its file's age decides
            modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            before = modified < at
            first = last = modified.isoformat()
        if before:
            old.append(Segment(path, str(first), str(last)))
    return old


def _archive_segment(
    cursor: duckdb.DuckDBPyConnection,
    segment: Segment,
    result: TableResult,
    *,
    root: Path,
    run_id: str,
    observe: Observe,
) -> int:
    rotated = segment.path.name.rsplit(".", 1)[-1]  # several segments may share their times
    target = ArchiveFile.new(root, TABLE, segment.first, segment.last, run_id, part=rotated)
    source = content(cursor, _LINES, [str(segment.path)])
    source_sha = sha256_file(segment.path)
    sha = export(cursor, f"{_LINES} ORDER BY line_no", [str(segment.path)], target)
    result.files.append(target.parquet.name)
    observe(TABLE, "exported")
    verification: dict[str, Any] = check(target, source, sha)
    verification["lines"] = _line_count(segment.path) == source.rows
    result.verification[target.parquet.name] = verification
    write_manifest(target, {
        "table": TABLE, "run_id": run_id, "rows": source.rows, "checksum": source.checksum,
        "sha256": sha, "min_time": segment.first, "max_time": segment.last,
        "segment": segment.path.name, "segment_sha256": source_sha, "committed_at": None,
        "verification": verification,
    })  # fmt: skip
    if not all(verification.values()):
        failed = [name for name, ok in verification.items() if not ok]
        raise ArchiveError(f"{target.parquet.name} did not verify: {', '.join(failed)}")
    observe(TABLE, "verified")
    _commit(cursor, segment, target, run_id=run_id, source=source, sha=sha,
            source_sha=source_sha, observe=observe)  # fmt: skip
    segment.path.unlink()
    observe(TABLE, "committed")
    mark_committed(target)
    return source.rows


def _commit(
    cursor: duckdb.DuckDBPyConnection,
    segment: Segment,
    target: ArchiveFile,
    *,
    run_id: str,
    source: Content,
    sha: str,
    source_sha: str,
    observe: Observe,
) -> None:
    """Record the archive in the audit store, once the segment and file are still as checked."""
    if sha256_file(segment.path) != source_sha or sha256_file(target.parquet) != sha:
        raise ArchiveError(f"{segment.path.name} or its archive changed after it was verified")
    cursor.begin()
    try:
        log_committed(cursor, table=TABLE, target=target, run_id=run_id, rows=source, sha256=sha)
        observe(TABLE, "deleted")
        cursor.commit()
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            cursor.rollback()
        raise


def _remove_archived_segments(directory: Path, log_path: Path) -> None:
    """A run that stopped between recording an archive and removing its segment: remove it now."""
    if not directory.is_dir():
        return
    for manifest_path in directory.glob("*.manifest.json"):
        manifest = read_manifest(manifest_path) or {}
        name = manifest.get("segment")
        if not manifest.get("committed_at") or not isinstance(name, str):
            continue
        segment = log_path.with_name(name)
        if segment.exists() and sha256_file(segment) == manifest.get("segment_sha256"):
            segment.unlink()


def _line_count(path: Path) -> int:
    """Lines in a file, a last one without its newline included."""
    count, last = 0, b"\n"
    with path.open("rb") as handle:
        while piece := handle.read(1 << 20):
            count += piece.count(b"\n")
            last = piece[-1:]
    return count + (last != b"\n")

"""One archive file: a Parquet export of rows, read back and matched, its manifest beside it.

`<archive_dir>/<table>/<from>_<to>_<run>.parquet` and `<same stem>.manifest.json`. A file is
archived only once the store has recorded it in `archive_log`, in the transaction that deleted
its rows. Anything else in the directory was left by an interrupted run, and its rows are still
in the store, so `recover` removes it. Never deletes a row; never trusts a file it has not just
read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import duckdb

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

FORMAT = "emp-archive/1"
PARTIAL = ".partial"  # an export still being written; never a complete file

ARCHIVE_LOG = """
CREATE TABLE IF NOT EXISTS archive_log (
    table_name VARCHAR NOT NULL, file VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
    rows BIGINT NOT NULL, sha256 VARCHAR NOT NULL, checksum VARCHAR NOT NULL,
    committed_at TIMESTAMP NOT NULL, PRIMARY KEY (table_name, file)
)
"""
_LOG_ENTRY = (
    "INSERT INTO archive_log (table_name, file, run_id, rows, sha256, checksum, committed_at) "
    "VALUES (?, ?, ?, ?, ?, ?, CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP))"
)
# Each row as JSON, hashed; the sorted hashes hashed again. Equal for the same rows in any
# order; different when any value of any row differs. The time zone is fixed so that a
# TIMESTAMPTZ reads the same on every connection.
_CONTENT = (
    "SELECT count(*), sha256(coalesce(string_agg(row_hash, '' ORDER BY row_hash), '')) FROM "
    "(SELECT sha256(CAST(to_json(archived_row) AS VARCHAR)) AS row_hash FROM ({}) archived_row)"
)


class ArchiveError(Exception):
    """An archive could not be made or did not match its rows: nothing was deleted."""


@dataclass(frozen=True)
class Content:
    """What a set of rows is: how many, and the checksum of their values."""

    rows: int
    checksum: str


def content(
    cursor: duckdb.DuckDBPyConnection, relation: str, params: Sequence[Any] = ()
) -> Content:
    """The row count and content checksum of a SELECT (the store's rows or a file's)."""
    cursor.execute("SET TimeZone = 'UTC'")
    row = cursor.execute(_CONTENT.format(relation), list(params)).fetchone()
    if row is None:
        raise ArchiveError("the content query returned nothing")
    return Content(int(row[0]), str(row[1]))


@dataclass(frozen=True)
class ArchiveFile:
    """Where one run's archive of one table goes."""

    directory: Path
    stem: str

    @classmethod
    def new(
        cls, root: Path, table: str, first: str, last: str, run_id: str, *, part: str = ""
    ) -> ArchiveFile:
        """`<root>/<table>/<first>_<last>_<run_id>[_<part>]`, the times as 20260101T000000Z."""
        stem = f"{_stamp(first)}_{_stamp(last)}_{run_id}"
        return cls(root / table, f"{stem}_{part}" if part else stem)

    @property
    def parquet(self) -> Path:
        """The archive itself."""
        return self.directory / f"{self.stem}.parquet"

    @property
    def manifest(self) -> Path:
        """What it holds and how it was checked (JSON)."""
        return self.directory / f"{self.stem}.manifest.json"


def _stamp(moment: str) -> str:
    digits = re.sub(r"\D", "", moment)[:14].ljust(14, "0")
    return f"{digits[:8]}T{digits[8:]}Z"


def export(
    cursor: duckdb.DuckDBPyConnection, select: str, params: Sequence[Any], target: ArchiveFile
) -> str:
    """COPY the rows to Parquet, written aside, synced, then renamed; the file's SHA-256."""
    target.directory.mkdir(parents=True, exist_ok=True)
    partial = target.parquet.with_name(target.parquet.name + PARTIAL)
    # The target is quoted, not bound: DuckDB versions disagree on where a bound target falls
    # among the select's parameters. It is our own path (the configured folder, our name).
    target_sql = "'" + str(partial).replace("'", "''") + "'"
    copy = f"COPY ({select}) TO {target_sql} (FORMAT parquet, COMPRESSION zstd)"
    cursor.execute(copy, list(params))
    _sync(partial)
    try:
        # A link, not a rename: it never replaces a file (an archive is never overwritten).
        os.link(partial, target.parquet)
    except FileExistsError:
        raise ArchiveError(f"{target.parquet} exists already; nothing was replaced") from None
    finally:
        partial.unlink()
    _sync(target.directory)
    return sha256_file(target.parquet)


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while piece := handle.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def read_back(path: Path) -> Content:
    """The rows of an archive file, read from disk by a connection of its own."""
    with duckdb.connect() as connection:
        return content(connection, "SELECT * FROM read_parquet(?)", [str(path)])


def check(target: ArchiveFile, expected: Content, sha256: str) -> dict[str, bool]:
    """Read the file back: rows and checksum as selected, bytes as written."""
    found = read_back(target.parquet)
    return {
        "rows": found.rows == expected.rows,
        "checksum": found.checksum == expected.checksum,
        "sha256": sha256_file(target.parquet) == sha256,
    }


def write_manifest(target: ArchiveFile, document: dict[str, Any]) -> None:
    """The manifest beside the file, written whole (a reader never sees half of it)."""
    _write_json(target.manifest, {"format": FORMAT, "file": target.parquet.name, **document})


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A manifest, or None when it is missing or unreadable."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def mark_committed(target: ArchiveFile) -> None:
    """Say in the manifest that the store recorded the archive and deleted its rows."""
    document = read_manifest(target.manifest) or {}
    document["committed_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    _write_json(target.manifest, document)


def ensure_log(cursor: duckdb.DuckDBPyConnection) -> None:
    """The store's record of committed archives."""
    cursor.execute(ARCHIVE_LOG)


def log_committed(
    cursor: duckdb.DuckDBPyConnection,
    *,
    table: str,
    target: ArchiveFile,
    run_id: str,
    rows: Content,
    sha256: str,
) -> None:
    """Record an archive in the transaction that deletes its rows."""
    cursor.execute(
        _LOG_ENTRY, [table, target.parquet.name, run_id, rows.rows, sha256, rows.checksum]
    )


def committed_files(cursor: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    """The file names of a table's committed archives."""
    rows = cursor.execute("SELECT file FROM archive_log WHERE table_name = ?", [table]).fetchall()
    return {str(name) for (name,) in rows}


@dataclass
class Recovery:
    """What a run found left by earlier ones."""

    discarded: list[str] = field(default_factory=list)  # uncommitted: removed, rows still stored
    repaired: list[str] = field(default_factory=list)  # committed: the manifest now says so
    problems: list[str] = field(default_factory=list)  # committed archives that are not whole


def recover(directory: Path, committed: set[str]) -> Recovery:
    """Remove what interrupted runs left (their rows are still in the store); finish the rest."""
    found = Recovery()
    if not directory.is_dir():
        return found
    for partial in [*directory.glob(f"*{PARTIAL}"), *directory.glob("*.tmp")]:
        partial.unlink()  # an export or manifest that was never completed
    stems = {p.name.removesuffix(".parquet") for p in directory.glob("*.parquet")}
    stems |= {p.name.removesuffix(".manifest.json") for p in directory.glob("*.manifest.json")}
    for stem in sorted(stems):
        target = ArchiveFile(directory, stem)
        manifest = read_manifest(target.manifest)
        if target.parquet.name in committed or (manifest or {}).get("committed_at"):
            if not target.parquet.exists() or manifest is None:
                found.problems.append(f"{stem}: committed, but its file or manifest is missing")
            elif not manifest.get("committed_at"):
                mark_committed(target)  # the run stopped between its commit and this mark
                found.repaired.append(stem)
            continue
        target.parquet.unlink(missing_ok=True)
        target.manifest.unlink(missing_ok=True)
        found.discarded.append(stem)
    return found


def _write_json(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    _sync(path.parent)


def _sync(path: Path) -> None:
    """Sync a file or a directory: a rename is durable only once its directory is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

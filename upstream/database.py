"""Runs blocking DuckDB work off the event loop: reads on a small pool, writes on one thread.

It must never run a query on the event loop, and never lets two writes race: a single
writer thread makes DuckDB write-write conflicts rare and the service's own reference
checks race-free.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import duckdb

from upstream.errors import ApiError, MigrationError, ReasonId
from upstream.migrations import discover_migrations, ensure_current
from upstream.sealing import Sealer, reseal_batch

T = TypeVar("T")
Cursor = duckdb.DuckDBPyConnection
Work = Callable[[Cursor], T]

# Measured on a 2-core box: point reads peak at ~2,000/s with 2-4 threads and fall off
# beyond; DuckDB parallelises inside each query, so more Python threads only contend.
READER_THREADS = 4
WRITE_ATTEMPTS = 5
_RETRY_PAUSE_SECONDS = 0.002


class Database:
    """One DuckDB connection shared by per-call cursors (each is its own connection).

    `sealer` seals and opens the sensitive columns; a key rotation replaces it whole, so a
    call reads it once and uses that one throughout.
    """

    def __init__(self, connection: duckdb.DuckDBPyConnection, sealer: Sealer) -> None:
        self._connection = connection
        self.sealer = sealer
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="duckdb-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="duckdb-write")

    @classmethod
    def open(cls, path: Path, sealer: Sealer) -> "Database":
        """Connect to an existing, fully migrated database file, or raise MigrationError.

        Rows not sealed under the current key (written before encryption, or left by a
        rotation that was interrupted) are sealed before the first request.
        """
        if not path.is_file():
            raise MigrationError(
                f"database {path} does not exist; run `python -m upstream db init`"
            )
        connection = duckdb.connect(str(path))
        try:
            ensure_current(connection, discover_migrations())
        except BaseException:
            connection.close()
            raise
        database = cls(connection, sealer)
        try:
            database.reseal_all(sealer)
        except BaseException:
            database.close()
            raise
        return database

    def reseal_all(self, sealer: Sealer) -> dict[str, int]:
        """Seal every row under `sealer`'s current key, a batch per transaction; counts by table.

        Blocking: call it from a thread. Each batch runs on the writer thread, between other
        writes; rows written meanwhile are sealed under the current key already.
        """
        self.sealer = sealer
        totals: dict[str, int] = {}
        while True:
            counts = self._writer.submit(
                self._run_write, lambda cursor: reseal_batch(cursor, sealer)
            ).result()
            for table, count in counts.items():
                totals[table] = totals.get(table, 0) + count
            if not any(counts.values()):
                return totals

    def close(self) -> None:
        """Finish queued work, then release the database file."""
        self._readers.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self._connection.close()

    async def read(self, work: Work[T]) -> T:
        """Run ``work(cursor)`` on a reader thread, outside any explicit transaction."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, work)

    async def write(self, work: Work[T]) -> T:
        """Run ``work(cursor)`` in one transaction on the writer thread, retrying conflicts."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, self._run_write, work)

    def _run_read(self, work: Work[T]) -> T:
        with self._connection.cursor() as cursor:
            return work(cursor)

    def _run_write(self, work: Work[T]) -> T:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return self._run_transaction(work)
            except duckdb.TransactionException:
                # Another connection (e.g. a checkpoint) won a write-write conflict;
                # the transaction is gone, so running it again is safe.
                if attempt == WRITE_ATTEMPTS:
                    break
                time.sleep(_RETRY_PAUSE_SECONDS * attempt)
        raise ApiError(503, ReasonId.BUSY, "the database is busy; retry the request")

    def _run_transaction(self, work: Work[T]) -> T:
        with self._connection.cursor() as cursor:
            cursor.begin()
            try:
                result = work(cursor)
                cursor.commit()
            except BaseException:
                # The transaction may already be aborted; rolling back is then a no-op error.
                with contextlib.suppress(duckdb.Error):
                    cursor.rollback()
                raise
            return result

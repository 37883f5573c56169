"""The archival run: the audit store, the decision log, then the EMP service's tables.

One run at a time. Each table succeeds or fails on its own, and a failed table keeps every
row. The run's report becomes one audit event (`archive.completed` or `archive.failed`) and
the metrics; the caller says how to record it (the running gateway's writer, or the CLI's
inbox). The gateway never opens the EMP service's database: it asks the service to archive its
own tables, with the windows of the service's own config.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aiohttp
import structlog
from aiohttp import web

from emparchive.files import ArchiveError
from gateway.archive.audit_store import CHECKPOINTS, EVENTS, archive_audit
from gateway.archive.decisions import TABLE as DECISIONS
from gateway.archive.decisions import archive_decision_log
from gateway.archive.report import RunReport, TableResult
from gateway.audit import system_event
from gateway.policy.decisionlog import rotate_file

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import duckdb
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from empsecrets.fieldcrypt import FieldCipher
    from gateway.app import GatewayState
    from gateway.config import RetentionConfig
    from gateway.metrics import GatewayMetrics

T = TypeVar("T")
log = structlog.get_logger("gateway.archive")

UPSTREAM_TABLES = ("ingest_records", "ingest_quarantine")
TABLES = (EVENTS, CHECKPOINTS, DECISIONS, *UPSTREAM_TABLES)  # the closed set of metric labels
UPSTREAM_ARCHIVE_PATH = "/internal/archive"
_STOP_WAIT_SECONDS = 30.0


class AuditStore(Protocol):
    """Runs work on a cursor of the audit store, in a thread (AuditWriter.run, or the CLI's)."""

    @property
    def cipher(self) -> FieldCipher:
        """What opens the store's encrypted columns (archives are verified opened)."""
        ...

    async def run(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """The work's result."""
        ...


class ArchiveBusy(Exception):  # noqa: N818 - a state, like asyncio's InvalidStateError
    """A run is already in progress."""


class ArchiveStopped(ArchiveError):  # noqa: N818 - a state, like ArchiveBusy
    """The gateway is stopping: the run ends at its next step, keeping what is not committed."""


class UpstreamArchive:
    """Asks the EMP service to archive its tables (POST /internal/archive with the secret).

    A connection of its own per run (once a day): the request path's pool is never held.
    """

    def __init__(self, base_url: str, secret: Callable[[], str], timeout_seconds: float) -> None:
        self._url = base_url.rstrip("/") + UPSTREAM_ARCHIVE_PATH
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def __call__(self, run_id: str) -> list[TableResult]:
        """The service's result for each of its tables; all failed when it cannot be asked."""
        headers = {"X-Gateway-Secret": self._secret(), "X-Request-Id": run_id,
                   "X-Gateway-Subject": "gateway:archive"}  # fmt: skip
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.post(self._url, json={"run_id": run_id}, headers=headers) as response,
            ):
                body = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return _failed(UPSTREAM_TABLES, f"the EMP service could not be asked: {exc!r}")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("tables"), list):  # noqa: PLR2004
            error = body.get("error") if isinstance(body, dict) else None
            return _failed(UPSTREAM_TABLES, f"the EMP service answered {status}: {error}")
        return [TableResult.from_dict(item) for item in body["tables"] if isinstance(item, dict)]


class ArchiveJob:
    """Runs archival now (`run`) or every retention.interval_seconds (`start`)."""

    def __init__(
        self,
        *,
        retention: RetentionConfig,
        store: AuditStore,
        checkpoint_key: Ed25519PrivateKey | None,
        decision_log: Path | None,
        rotate: Callable[[], object] | None,
        upstream: Callable[[str], Any] | None,
        record: Callable[[RunReport], None],
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        self._retention = retention
        self._store = store
        self._key = checkpoint_key
        self._decision_log = decision_log
        self._rotate = rotate
        self._upstream = upstream
        self._record = record
        self._observer = observe  # each step of each table; tests stop the process there
        self._lock = asyncio.Lock()
        self._stopping = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """Whether a run is in progress."""
        return self._lock.locked()

    async def run(self, trigger: str) -> RunReport:
        """One run; ArchiveBusy when one is already in progress."""
        if self._lock.locked():
            raise ArchiveBusy("an archival run is in progress; try again when it has finished")
        async with self._lock:
            report = RunReport(trigger)
            now = datetime.now(UTC)
            log.info("archive.started", run_id=report.run_id, trigger=trigger)
            report.tables += await self._archive_audit(report.run_id, now)
            if self._decision_log is not None:
                report.tables.append(await self._archive_decisions(report.run_id, now))
            if self._upstream is not None:
                report.tables += await self._upstream(report.run_id)
            report.finish()
            self._record(report)
            return report

    def start(self) -> None:
        """Run every interval, the first time start_delay_seconds from now."""
        self._task = asyncio.create_task(self._run_periodically(), name="archive")

    async def close(self) -> None:
        """Stop the schedule; a run in progress ends at its next step (nothing half-deleted)."""
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STOP_WAIT_SECONDS):
                if self._task is not None:
                    await self._task
                async with self._lock:
                    pass

    async def _run_periodically(self) -> None:
        delay = self._retention.start_delay_seconds
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            if self._stopping:
                return
            try:
                await self.run("schedule")
            except ArchiveBusy:
                pass  # a run asked for on the admin port is on it
            except Exception:  # the next interval tries again; nothing was half-deleted
                log.exception("archive.run_crashed")
            delay = self._retention.interval_seconds

    def _observe(self, table: str, step: str) -> None:
        log.debug("archive.step", table=table, step=step)
        if self._observer is not None:
            self._observer(table, step)
        if self._stopping:
            raise ArchiveStopped("the gateway is stopping; the run will be redone")

    async def _archive_audit(self, run_id: str, now: datetime) -> list[TableResult]:
        cutoff = now - timedelta(days=self._retention.audit_days)
        root = self._retention.archive_dir
        try:
            cipher = self._store.cipher
            return await self._store.run(
                lambda cursor: archive_audit(
                    cursor,
                    root=root,
                    run_id=run_id,
                    cutoff=cutoff,
                    key=self._key,
                    cipher=cipher,
                    observe=self._observe,
                )
            )
        except Exception as exc:  # the store could not be reached (a failed flush, a closed file)
            log.exception("archive.audit_failed")
            return _failed((EVENTS, CHECKPOINTS), repr(exc))

    async def _archive_decisions(self, run_id: str, now: datetime) -> TableResult:
        cutoff = now - timedelta(days=self._retention.decision_log_days)
        log_path, root = self._decision_log, self._retention.archive_dir
        assert log_path is not None  # noqa: S101 - only called with a log
        try:
            if self._rotate is not None:
                self._rotate()  # on the loop, like the writer: no line is split or lost
            return await self._store.run(
                lambda cursor: archive_decision_log(
                    cursor,
                    log_path=log_path,
                    root=root,
                    run_id=run_id,
                    cutoff=cutoff,
                    observe=self._observe,
                )
            )
        except Exception as exc:
            log.exception("archive.decision_log_failed")
            return _failed((DECISIONS,), repr(exc))[0]


def _failed(tables: tuple[str, ...], error: str) -> list[TableResult]:
    results = [TableResult(table) for table in tables]
    for result in results:
        result.fail(error)
    return results


def record_report(
    report: RunReport,
    *,
    emit: Callable[[dict[str, Any]], None],
    metrics: GatewayMetrics | None,
    subject: str = "gateway:archive",
) -> None:
    """One audit event per run, the metrics, and a log line."""
    emit(system_event(f"archive.{report.outcome}", subject=subject, **report.as_dict()))
    rows = {t.table: t.rows for t in report.tables if t.table in TABLES and t.status == "archived"}
    if metrics is not None:
        metrics.observe_archive(report.outcome, rows, time.time())
    failed = [t.table for t in report.tables if t.status == "failed" or t.problems]
    if failed:
        log.warning("archive.failed", run_id=report.run_id, failed=failed, rows=rows)
    else:
        log.info("archive.completed", run_id=report.run_id, rows=rows)


def gateway_job(state: GatewayState) -> ArchiveJob:
    """The job of the running gateway: its audit writer's store, its decision-log writer."""
    config = state.config
    audit, writer = state.audit, state.decision_log
    assert audit is not None  # noqa: S101 - built only where the audit store is open
    ask_upstream = None
    if config.retention.upstream:
        ask_upstream = UpstreamArchive(
            config.upstream.url,
            state.upstream_secret.current,
            config.retention.upstream_timeout_seconds,
        )
    log_path = config.decision_log.path
    return ArchiveJob(
        retention=config.retention,
        store=audit,
        checkpoint_key=state.checkpoint_key,
        decision_log=log_path,
        rotate=writer.rotate if writer is not None else lambda: rotate_file(log_path),
        upstream=ask_upstream,
        record=lambda report: record_report(report, emit=audit.emit, metrics=state.metrics),
    )


def add_archive_api(admin: web.Application, job: Callable[[], ArchiveJob | None]) -> None:
    """POST /archive/run on the admin port: `gateway archive run` while the gateway runs.

    It takes no parameters: it runs the configured policy now, nothing a caller could widen.
    """

    async def run_now(_request: web.Request) -> web.Response:
        current = job()
        if current is None:  # another worker's admin port, or the store is not open
            return web.json_response({"error": "this process does not own the audit store"},
                                     status=503)  # fmt: skip
        try:
            report = await current.run("admin")
        except ArchiveBusy as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response(report.as_dict())

    admin.router.add_post("/archive/run", run_now)

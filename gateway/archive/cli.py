"""`gateway archive run`: archive what is past its retention window, now.

A stopped gateway's store is opened here. A running gateway holds its DuckDB file (one writer
process per file), so it is asked to run on its admin port instead. The run is audited either
way, and prints its report. Exit status: 0 when no table failed, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import getpass
import json
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import duckdb

from gateway import keys
from gateway.archive.job import ArchiveJob, UpstreamArchive, record_report
from gateway.audit import record_offline
from gateway.auditcrypt import load_cipher

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from empsecrets.fieldcrypt import FieldCipher
    from gateway.config import GatewayConfig

T = TypeVar("T")
ADMIN_PATH = "/archive/run"


def register(sub: Any) -> None:
    """Add `archive run` to the gateway's command line."""
    archive = sub.add_parser("archive", help="retention: old rows to verified Parquet archives")
    commands = archive.add_subparsers(dest="what", required=True)
    run = commands.add_parser(
        "run",
        help="archive what is older than the [retention] windows now (asks a running gateway)",
    )
    run.set_defaults(func=cmd_archive_run)


def cmd_archive_run(config: GatewayConfig, _args: argparse.Namespace) -> int:
    """Run here when the gateway is stopped, else ask it; print the report."""
    path = config.audit.db_path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no audit store (audit.db_path); start the gateway once")
    try:
        connection = duckdb.connect(str(path))
    except duckdb.IOException:
        report = asyncio.run(_ask_running_gateway(config))
    else:
        with connection:
            report = asyncio.run(_run_here(config, connection))
    print(json.dumps(report, indent=2))  # noqa: T201
    return 0 if report.get("outcome") == "completed" else 1


class _OwnStore:
    """The audit store this process opened (the gateway is stopped)."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, cipher: FieldCipher) -> None:
        self._connection = connection
        self.cipher = cipher

    async def run(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        return await asyncio.to_thread(self._on_cursor, work)

    def _on_cursor(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        cursor = self._connection.cursor()
        try:
            return work(cursor)
        finally:
            cursor.close()


async def _run_here(config: GatewayConfig, connection: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """The run in this process; its event waits in the inbox for the gateway's next start."""
    from gateway.policy.decisionlog import rotate_file  # noqa: PLC0415 - the CLI stays light

    retention, log_path = config.retention, config.decision_log.path
    audit = config.audit
    upstream = None
    if retention.upstream:
        secret = keys.read_secret(config.upstream.secret_file)
        upstream = UpstreamArchive(
            config.upstream.url, lambda: secret, retention.upstream_timeout_seconds
        )
    job = ArchiveJob(
        retention=retention,
        store=_OwnStore(connection, load_cipher(config)),  # no ring: refused (exit 2)
        checkpoint_key=keys.checkpoint_key(config),
        decision_log=log_path,
        rotate=lambda: rotate_file(log_path),  # no writer runs: the store's lock says so
        upstream=upstream,
        record=lambda report: record_report(
            report,
            emit=lambda event: record_offline(audit.jsonl_path, audit.db_path, event),
            metrics=None,
            subject=getpass.getuser(),  # like every CLI event: who ran it
        ),
    )
    report = await job.run("cli")
    return report.as_dict()


async def _ask_running_gateway(config: GatewayConfig) -> dict[str, Any]:
    """POST to the admin port of the gateway that holds the store; it runs and audits."""
    server = config.server
    url = f"http://{server.admin_host}:{server.admin_port}{ADMIN_PATH}"
    # The upstream's part may take its whole timeout; the gateway's own tables come first.
    timeout = aiohttp.ClientTimeout(total=config.retention.upstream_timeout_seconds + 3600)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url) as response,
        ):
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, ValueError) as exc:
        raise ValueError(
            f"{config.audit.db_path} is open in another process, and the gateway's admin port "
            f"({url}) did not answer: {exc}"
        ) from None
    if not isinstance(body, dict) or "outcome" not in body:
        error = body.get("error") if isinstance(body, dict) else body
        raise ValueError(f"the gateway refused the run: {error}")
    return body

"""`gateway serve --workers N`: N processes behind one port, supervised.

The supervisor starts N copies of `gateway serve --worker I/N` and stays out of the request
path. Each worker binds the API (and redirect) port with SO_REUSEPORT, so the kernel spreads
connections over them, and keeps its own audit hash chain. What one process must own:

- worker 0 owns the audit DuckDB file (one writer process per file). The others hand their
  sealed batches, each closed by a signed checkpoint of their chain, to its inbox; worker 0
  loads them at its next flush. An audit search that lands on another worker is asked of
  worker 0 over a unix socket in `server.run_dir` (0700);
- worker 0 serves the admin port: /metrics there adds up every worker's series (Prometheus
  multiprocess mode, files in `server.run_dir/prometheus`, wiped at each start), and runs the
  activity job.

State that must be shared lives in Redis (`identity.state_url`): with memory:// each worker
would keep its own revoked tokens and login counters, so more than one worker refuses to start.
A worker that dies is started again; one that dies before it listens stops everything (a
configuration that cannot start will not start on the second try either).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web

from gateway.config import ConfigError

if TYPE_CHECKING:
    from gateway.audit import AuditWriter
    from gateway.config import GatewayConfig

log = structlog.get_logger("gateway.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SUPERVISOR_ENV = "GATEWAY_SUPERVISOR_PID"  # a worker stops when this process is gone
SEARCH_SOCKET = "audit-search.sock"
_RESTART_DELAY_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerSlot:
    """Which worker this process is: index of count (0 of 1 when not supervised)."""

    index: int = 0
    count: int = 1
    run_dir: Path = Path("var/run")

    @property
    def owner(self) -> bool:
        """Owns the audit store, the admin port and the activity job."""
        return self.index == 0

    @property
    def shared(self) -> bool:
        """More than one worker: ports with SO_REUSEPORT, metrics in multiprocess mode."""
        return self.count > 1

    @property
    def listening_marker(self) -> Path:
        """Written once this worker listens: dying after it is a crash, before it a failed start."""
        return self.run_dir / f"worker-{self.index}.listening"

    def mark_listening(self) -> None:
        """Tell the supervisor this worker is up."""
        if self.shared:
            self.listening_marker.touch()

    @property
    def search_socket(self) -> Path:
        """Worker 0's internal audit-search socket."""
        return self.run_dir / SEARCH_SOCKET

    @classmethod
    def parse(cls, text: str, run_dir: Path) -> WorkerSlot:
        """The worker's "I/N", as the supervisor passes it."""
        index, _, count = text.partition("/")
        if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
            raise ConfigError(f"--worker {text!r}: expected I/N with 0 <= I < N")
        return cls(int(index), int(count), run_dir)


def check_worker_config(config: GatewayConfig, workers: int) -> None:
    """Refuse settings that would silently diverge or clash between workers."""
    if not 1 <= workers <= 64:  # noqa: PLR2004 - a sane bound, not a tuning knob
        raise ConfigError("--workers must be from 1 to 64")
    if workers == 1:
        return
    if config.identity.enabled and not config.identity.state_url.startswith("redis"):
        raise ConfigError(
            "--workers > 1 needs identity.state_url = redis://...: with memory:// each worker "
            "would keep its own revoked tokens, refresh families and login counters"
        )
    if config.logging.destination == "file":
        raise ConfigError(
            "--workers > 1 with logging.destination = file: the workers would rotate one "
            "file against each other; log to stderr or syslog"
        )


def supervise(
    config: GatewayConfig, config_file: Path | None, *, workers: int, allow_plaintext: bool
) -> int:
    """Start the workers, pass signals on, restart one that dies; the exit status."""
    check_worker_config(config, workers)
    run_dir = config.server.run_dir
    metrics_dir = run_dir / "prometheus"
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    run_dir.chmod(0o700)
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counters of a previous run would add up
    metrics_dir.mkdir(mode=0o700)
    command = [sys.executable, "-m", "gateway"]
    if config_file is not None:
        command += ["--config", str(config_file)]
    command.append("serve")
    if allow_plaintext:
        command.append("--allow-plaintext")
    return _Supervisor(command, workers, metrics_dir).run()


class _Supervisor:
    """The loop of `supervise`: children by index, the signal that stops them."""

    def __init__(self, command: list[str], workers: int, metrics_dir: Path) -> None:
        self._command = command
        self._workers = workers
        self._metrics_dir = metrics_dir
        self._env = {
            **os.environ,
            MULTIPROC_ENV: str(metrics_dir.absolute()),
            SUPERVISOR_ENV: str(os.getpid()),
        }
        self._running: dict[int, subprocess.Popen[bytes]] = {}
        self._run_dir = metrics_dir.parent
        self._stopping = False
        self._status = 0

    def run(self) -> int:
        for index in range(self._workers):
            self._start(index)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._forward)
        while self._running:
            time.sleep(0.1)
            for index, process in list(self._running.items()):
                code = process.poll()
                if code is not None:
                    self._exited(index, process, code)
        log.info("workers.stopped", exit_code=self._status)
        return self._status

    def _start(self, index: int) -> None:
        self._slot(index).listening_marker.unlink(missing_ok=True)
        command = [*self._command, "--worker", f"{index}/{self._workers}"]
        process = subprocess.Popen(command, env=self._env)  # noqa: S603 - our own command line
        self._running[index] = process
        log.info("workers.started", worker=index, pid=process.pid)

    def _forward(self, signum: int, _frame: Any) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
        for process in self._running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    def _slot(self, index: int) -> WorkerSlot:
        return WorkerSlot(index, self._workers, self._run_dir)

    def _exited(self, index: int, process: subprocess.Popen[bytes], code: int) -> None:
        del self._running[index]
        _mark_dead(process.pid, self._metrics_dir)
        if self._stopping:
            self._status = max(self._status, code)
        elif not self._slot(index).listening_marker.exists():
            log.error("workers.failed_to_start", worker=index, exit_code=code)
            self._status = 2
            self._forward(signal.SIGTERM, None)
        else:
            log.error("workers.died", worker=index, exit_code=code)
            time.sleep(_RESTART_DELAY_SECONDS)
            self._start(index)


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    from prometheus_client import multiprocess  # noqa: PLC0415 - the supervisor's only use

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]


# --- the audit search, asked of worker 0 -------------------------------------------------------


def search_app(audit: AuditWriter) -> web.Application:
    """Worker 0's internal app on its unix socket: run one audit search, answer JSON."""
    from gateway.auditsearch import run_search  # noqa: PLC0415 - auditsearch imports pipeline

    async def search(request: web.Request) -> web.Response:
        query: dict[str, Any] = await request.json()
        if "cursor" in query:
            query["cursor"] = tuple(query["cursor"])
        items, following = await audit.run(lambda cursor: run_search(cursor, query, audit.cipher))
        return web.json_response({"items": items, "next": following})

    app = web.Application()
    app.router.add_post("/search", search)
    return app


async def start_search_socket(audit: AuditWriter, path: Path) -> web.AppRunner:
    """Listen on the unix socket (owner-only permissions) for the other workers' searches."""
    await asyncio.to_thread(path.unlink, missing_ok=True)  # a previous run's socket file
    runner = web.AppRunner(search_app(audit), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    await asyncio.to_thread(path.chmod, 0o600)  # run_dir is 0700 too
    return runner


class RemoteSearch:
    """Another worker's way to run an audit search: over worker 0's unix socket."""

    def __init__(self, path: Path) -> None:
        self._path = path

    async def __call__(self, search: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        """The page of events and the next cursor, as worker 0 answers them."""
        connector = aiohttp.UnixConnector(path=str(self._path))
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.post("http://worker-0/search", json=search) as response,
        ):
            if response.status != 200:  # noqa: PLR2004 - HTTP OK
                raise RuntimeError(f"the audit store's worker answered {response.status}")
            body = await response.json()
        return body["items"], body["next"]

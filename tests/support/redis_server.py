"""A real redis-server on a free loopback port, in a temp directory, always stopped.

Tests of the shared state (state store, login limits) run against it, never against a fake.
The binary comes from the Debian package `redis-server`; a missing binary fails the test.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from typing import TYPE_CHECKING

from gateway.testing import free_port, stop, wait_for_port

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def redis_binary() -> str:
    """The path of redis-server, or a RuntimeError that says how to install it."""
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "redis-server is not on PATH: the Redis tests need a real server; "
            "install it with `apt-get install -y redis-server` (Debian package redis-server)"
        )
    return found


class RedisServer:
    """One redis-server process without persistence, bound to 127.0.0.1 on a fixed free port.

    stop() and start() keep the port, so clients configured with url reconnect after a restart.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._binary = redis_binary()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            self._binary,
            "--save", "",
            "--appendonly", "no",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--dir", str(self.directory),
        ]  # fmt: skip
        with (self.directory / "redis.log").open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, timeout=10.0, process=self._process)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) if it runs."""
        if self._process is not None:
            self.resume()  # a stopped process would hold SIGTERM until continued
            stop(self._process)
            self._process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it keeps the port but answers nothing, like a hung host."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        if self.running and self._process is not None:
            self._process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def redis_server_process(directory: Path) -> Iterator[RedisServer]:
    """A started RedisServer, stopped on exit whatever happened (for tests that stop it)."""
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A started redis-server's URL (redis://127.0.0.1:N/0), stopped on exit."""
    with redis_server_process(directory) as server:
        yield server.url

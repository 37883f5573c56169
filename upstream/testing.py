"""Helpers for tests that need a real EMP service process (ours and the gateway's e2e).

`run_upstream` picks a free port, waits for ``/healthz`` and always stops the process;
it must never leave a server running after the ``with`` block.
"""

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

STARTUP_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def upstream_command(*args: str) -> list[str]:
    """``python -m upstream ARGS`` with the running interpreter."""
    return [sys.executable, "-m", "upstream", *args]


@dataclass(frozen=True, slots=True)
class UpstreamProcess:
    """A running service: its base URL, process and combined output file."""

    url: str
    process: "subprocess.Popen[bytes]"
    log: Path


def _is_healthy(url: str) -> bool:
    try:
        with urlopen(f"{url}/healthz", timeout=1) as response:  # noqa: S310  # nosec B310  # our own http URL
            return bool(response.status == 200)  # noqa: PLR2004  # HTTP OK
    except (URLError, ConnectionError):
        return False


def _wait_until_healthy(service: UpstreamProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            output = service.log.read_text(encoding="utf-8", errors="replace")
            raise RuntimeError(f"upstream exited with {service.process.returncode}:\n{output}")
        if _is_healthy(service.url):
            return
        time.sleep(0.05)
    raise RuntimeError(f"upstream was not healthy within {timeout}s")


def _stop(process: "subprocess.Popen[bytes]") -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def run_upstream(
    *, config_file: Path, log: Path, port: int | None = None, extra_args: tuple[str, ...] = ()
) -> Iterator[UpstreamProcess]:
    """Run ``python -m upstream serve`` until the block ends; output goes to ``log``."""
    port = port or free_port()
    command = upstream_command(
        "serve", "--config", str(config_file), "--port", str(port), *extra_args
    )
    # Output goes to a file, not a pipe nobody drains, so the server can never block on it.
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)  # noqa: S603  # nosec B603  # our own module, fixed arguments
    service = UpstreamProcess(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        _wait_until_healthy(service, STARTUP_TIMEOUT_SECONDS)
        yield service
    finally:
        _stop(process)

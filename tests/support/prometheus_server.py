"""A real Prometheus on a free loopback port, and promtool, for tests of the alert rules, the
gateway's /metrics and the Grafana dashboard. A started server is always stopped.

Both binaries come from the Debian package `prometheus` (`make test-deps` installs it). A
missing binary fails the test with a message saying how to install it. It never skips.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.testing import free_port, running
from support.stack import REPO

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

PROMETHEUS_CONFIG = REPO / "config/prometheus.yml"
ALERT_RULES = REPO / "config/prometheus/alerts.yml"
RULE_TESTS = REPO / "config/prometheus/alerts_test.yml"
DASHBOARD = REPO / "config/grafana/emp-gateway.json"

T = TypeVar("T")


def binary(name: str) -> str:
    """The path of prometheus or promtool, or a RuntimeError that says how to install it."""
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"{name} is not on PATH: the Prometheus tests need the real tools; install them with "
            "`make test-deps` or `apt-get install -y prometheus` (Debian package prometheus, "
            "which ships promtool)"
        )
    return found


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool. The caller checks returncode, stdout and stderr."""
    return subprocess.run(
        [binary("promtool"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_until(probe: Callable[[], T | None], *, what: str, timeout: float = 20.0) -> T:
    """Poll probe every 0.2 s until it returns something truthy. Past timeout, AssertionError
    names what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {timeout}s (last: {result!r})")
        time.sleep(0.2)


@dataclass(frozen=True)
class PrometheusServer:
    """A running Prometheus on 127.0.0.1:port, with its HTTP API."""

    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET /api/v1/<path>. The whole answer ({status, data} or {status, error}), even for
        a 4xx."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        request = urllib.request.Request(f"{self.url}/api/v1/{path}{query}")  # noqa: S310 - http://127.0.0.1
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - same
                answer: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as error:  # a bad query is 400 with the same JSON shape
            answer = json.load(error)
        return answer

    def ready(self) -> bool:
        """Whether /-/ready answers 200 (the TSDB is open and the config is loaded)."""
        ready_url = f"{self.url}/-/ready"
        with (
            contextlib.suppress(OSError),  # not listening yet, or 503 while starting
            urllib.request.urlopen(ready_url, timeout=2) as response,  # noqa: S310 - http://127.0.0.1
        ):
            return bool(response.status == 200)
        return False


def write_config(
    directory: Path, *, targets: list[str], rule_files: list[Path], job: str, interval: str
) -> Path:
    """A prometheus.yml that scrapes targets as `job` and loads rule_files, both every interval."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
    }
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML: no YAML writer needed
    return path


@contextlib.contextmanager
def prometheus_server(
    directory: Path,
    *,
    targets: list[str],
    rule_files: list[Path],
    job: str = "gateway",
    interval: str = "1s",
) -> Iterator[PrometheusServer]:
    """A started Prometheus that scrapes targets. It is ready when yielded and stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(
        directory, targets=targets, rule_files=rule_files, job=job, interval=interval
    )
    port = free_port()
    command = [
        binary("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with running(command, port=port, log_file=directory / "prometheus.log", cwd=directory):
        server = PrometheusServer(port, directory)
        wait_until(server.ready, what=f"Prometheus ready on {server.url}")
        yield server

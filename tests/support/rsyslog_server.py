"""A real rsyslogd on a free loopback port, in a temp directory, always stopped.

It receives RFC 5424 over TCP (or TLS with the gtls driver) with octet-counted framing and
writes each message as received (%rawmsg%, one per line) to received.log. The binaries come
from the Debian packages `rsyslog` and `rsyslog-gnutls`; a missing one fails the test.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.testing import free_port, stop, wait_for_port

if TYPE_CHECKING:
    from collections.abc import Iterator

GTLS_DRIVER = Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so")
_EVENT_ID = re.compile(r'\[emp@32473 event_id="([^"\\\]]*)"')


def rsyslogd_binary() -> str:
    """The path of rsyslogd, or a RuntimeError that says how to install it."""
    found = shutil.which("rsyslogd") or shutil.which("/usr/sbin/rsyslogd")
    if found is None:
        raise RuntimeError(
            "rsyslogd is not found: the SIEM tests need a real rsyslog; run `make test-deps` "
            "(Debian packages rsyslog and rsyslog-gnutls)"
        )
    return found


@dataclass(frozen=True)
class ServerTls:
    """The certificate rsyslog presents (gtls driver, no client authentication)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


class RsyslogServer:
    """One rsyslogd (foreground, -n) bound to 127.0.0.1 on a fixed free port.

    stop() and start() keep the port and the output file, like a SIEM restarted in place.
    """

    def __init__(self, directory: Path, *, tls: ServerTls | None = None) -> None:
        self.directory = directory
        self.port = free_port()
        self.output = directory / "received.log"
        self.parsed_output = directory / "parsed.jsonl"
        self._tls = tls
        self._binary = rsyslogd_binary()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the rsyslogd process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start rsyslogd and wait until it accepts connections."""
        if self.running:
            return
        if self._tls is not None and not GTLS_DRIVER.exists():
            raise RuntimeError(f"{GTLS_DRIVER} is missing: apt-get install -y rsyslog-gnutls")
        work = self.directory / "work"
        work.mkdir(parents=True, exist_ok=True)
        config = self.directory / "rsyslog.conf"
        config.write_text(self._config(work), encoding="utf-8")
        command = [
            self._binary, "-n", "-f", str(config), "-i", str(self.directory / "rsyslogd.pid"),
        ]  # fmt: skip
        with (self.directory / "rsyslogd.log").open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, timeout=10.0, process=self._process)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop rsyslogd (SIGTERM, then SIGKILL) if it runs: what it took is in output."""
        if self._process is not None:
            stop(self._process)
            self._process = None

    def messages(self) -> list[str]:
        """The messages received so far, as rsyslog got them (without the framing)."""
        if not self.output.exists():
            return []
        return self.output.read_text(encoding="utf-8").splitlines()

    def parsed(self) -> list[dict[str, str]]:
        """rsyslog's own reading of each message: header fields, structured data, msg."""
        if not self.parsed_output.exists():
            return []
        text = self.parsed_output.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line]

    def event_ids(self) -> list[str]:
        """The event_id of each received message, from its structured data, duplicates kept."""
        found = []
        for message in self.messages():
            match = _EVENT_ID.search(message)
            if match is not None:
                found.append(match.group(1))
        return found

    def wait_for_ids(self, expected: set[str], *, timeout: float = 20.0) -> list[str]:
        """The received event ids once all of expected arrived (or timeout passed)."""
        deadline = time.monotonic() + timeout
        while True:
            ids = self.event_ids()
            if expected <= set(ids) or time.monotonic() > deadline:
                return ids
            time.sleep(0.05)

    def _config(self, work: Path) -> str:
        # maxMessageSize: the default 8k would cut a large event's JSON; the gateway does not.
        # Direct main queue: a message is in the file before rsyslog reads the next one, so a
        # stop loses nothing it has taken off the socket.
        lines = [f'global(workDirectory="{work}" maxMessageSize="256k"']
        imtcp = 'module(load="imtcp"'
        if self._tls is not None:
            lines += [
                f'  defaultNetstreamDriverCAFile="{self._tls.ca_file}"',
                f'  defaultNetstreamDriverCertFile="{self._tls.cert_file}"',
                f'  defaultNetstreamDriverKeyFile="{self._tls.key_file}"',
            ]
            imtcp += ' streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon"'
        lines += [
            ")",
            'main_queue(queue.type="Direct")',
            imtcp + ")",
            'template(name="raw" type="string" string="%rawmsg%\\n")',
            # What rsyslog's own RFC 5424 parser made of each message, one JSON object a line.
            'template(name="parsed" type="list" option.jsonf="on") {',
            '  property(outname="pri" name="pri" format="jsonf")',
            '  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")',
            '  property(outname="hostname" name="hostname" format="jsonf")',
            '  property(outname="app_name" name="app-name" format="jsonf")',
            '  property(outname="procid" name="procid" format="jsonf")',
            '  property(outname="msgid" name="msgid" format="jsonf")',
            '  property(outname="structured_data" name="structured-data" format="jsonf")',
            '  property(outname="msg" name="msg" format="jsonf")',
            "}",
            'ruleset(name="siem") {',
            f'  action(type="omfile" file="{self.output}" template="raw")',
            f'  action(type="omfile" file="{self.parsed_output}" template="parsed")',
            "}",
            f'input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="siem")',
        ]
        return "\n".join(lines) + "\n"


@contextlib.contextmanager
def rsyslog_server(
    directory: Path, *, tls: ServerTls | None = None, started: bool = True
) -> Iterator[RsyslogServer]:
    """An RsyslogServer (started unless told not), stopped on exit whatever happened."""
    server = RsyslogServer(directory, tls=tls)
    try:
        if started:
            server.start()
        yield server
    finally:
        server.stop()

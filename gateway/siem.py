"""SIEM shipping: audit events as RFC 5424 syslog over TCP or TLS, RFC 6587 octet-counted.

Never drops an event. A bounded memory buffer comes first, then a disk spool (fsync'd, 0600).
When the spool is full, events wait in memory. Never logs an event's contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import re
import socket
import ssl
import struct
import termios
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING, Any, Literal

import structlog

from gateway.tls import client_context

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from gateway.config import SiemConfig

log = structlog.get_logger("gateway.siem")

# RFC 5612 reserves private enterprise number 32473 for documentation; a deployment that owns a
# number may change it, and SIEM parsers key on it.
SD_ID = "emp@32473"
SD_FIELDS = (
    "event_id", "request_id", "kind", "subject", "decision", "reason_id", "route", "status",
)  # fmt: skip
SD_VALUE_MAX_CHARS = 512  # the MSG JSON keeps the whole value; SD is for indexing
NILVALUE = "-"
BOM = b"\xef\xbb\xbf"  # RFC 5424 section 6.4: MSG is UTF-8 when it starts with a BOM
SEVERITY_WARNING = 4  # a denied request
SEVERITY_NOTICE = 5  # an allowed request
SEVERITY_INFO = 6  # an event without a decision (CLI actions, key rotations, reloads)
# RFC 5424 section 6: header field lengths.
HOSTNAME_MAX = 255
APP_NAME_MAX = 48
PROCID_MAX = 128
MSGID_MAX = 32
SD_NAME_MAX = 32

FailureReason = Literal["connect", "send", "spool_full", "spool_write", "spool_corrupt"]

_NOT_PRINTABLE = re.compile(r"[^\x21-\x7e]")  # header fields are PRINTUSASCII (RFC 5424 6.2)
_SD_NAME_FORBIDDEN = re.compile(r'[^\x21-\x7e]|[= \]"]')  # SD-NAME (RFC 5424 6.3.2)
# Control characters and lone surrogates (undecodable request bytes, via surrogateescape):
# allowed by no receiver's line handling, and a lone surrogate cannot even be encoded as UTF-8.
_SD_VALUE_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SD_VALUE_ESCAPE = re.compile(r'(["\\\]])')  # RFC 5424 6.3.3
_SD_VALUE_SPECIAL = re.compile(r'[\x00-\x1f\x7f-\x9f\ud800-\udfff"\\\]]')  # either of the two
_TIME_MAX_CHARS = 64

BATCH_EVENTS = 32  # formatting 32 events takes ~1 ms of the event loop
IN_FLIGHT_MAX_EVENTS = 5000  # written but not yet confirmed; past it, wait for confirmation
ACK_POLL_SECONDS = 0.05
IDLE_POLL_SECONDS = 0.5  # how soon an idle connection notices the SIEM closed it
HANG_UP_SECONDS = 1.0  # at shutdown, how long the SIEM gets to answer the TLS close_notify
SEGMENT_MAX_BYTES = 4 * 1024 * 1024  # one spool file; it is read whole when its turn comes
SPOOL_RETRY_SECONDS = 1.0
SPOOL_BATCH_EVENTS = 10_000  # one write and one fsync for up to this many events
_SEGMENT_NAME = re.compile(r"^\d{16}\.ndjson$")
CORRUPT_FILE = "corrupt.lines"  # spool lines that are not JSON objects: kept, never sent
LOCK_FILE = ".lock"


def header_field(value: object, limit: int) -> str:
    """A header field: printable US-ASCII (others become "_"), at most limit chars, or "-"."""
    if value is None:
        return NILVALUE
    text = _NOT_PRINTABLE.sub("_", str(value)[:limit])
    return text or NILVALUE


def sd_name(name: str) -> str:
    """An SD-NAME: printable US-ASCII without '=', space, ']' or '"', at most 32 chars."""
    return _SD_NAME_FORBIDDEN.sub("_", name)[:SD_NAME_MAX] or "_"


def sd_value(value: object) -> str:
    r"""A PARAM-VALUE: truncated, control characters replaced, '"', '\\' and ']' escaped."""
    text = str(value)[:SD_VALUE_MAX_CHARS]
    if _SD_VALUE_SPECIAL.search(text) is None:
        return text  # the common case, one scan
    text = _SD_VALUE_UNSAFE.sub("\ufffd", text)
    return _SD_VALUE_ESCAPE.sub(r"\\\1", text)


_SD_PARAMS = tuple((key, sd_name(key)) for key in SD_FIELDS)
_SD_ID = sd_name(SD_ID)


def severity(event: dict[str, Any]) -> int:
    """The syslog severity: a deny is a warning, an allow a notice, anything else info."""
    decision = event.get("decision")
    if decision == "deny":
        return SEVERITY_WARNING
    if decision == "allow":
        return SEVERITY_NOTICE
    return SEVERITY_INFO


def rfc3339(value: object) -> str:
    """The event time as an RFC 5424 TIMESTAMP in UTC, or "-" when it is not a zoned time."""
    moment: datetime
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str) and len(value) <= _TIME_MAX_CHARS:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return NILVALUE
    else:
        return NILVALUE
    if moment.tzinfo is None:
        return NILVALUE  # a local time of unknown zone would mislead a correlation
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def structured_data(event: dict[str, Any]) -> str:
    """The one SD-ELEMENT: event_id (the dedupe key) and the fields a SIEM indexes on."""
    params = [_SD_ID]
    for key, name in _SD_PARAMS:
        value = event.get(key)
        if value is None or isinstance(value, dict | list):
            continue  # RFC 5424 has no NILVALUE inside SD: an absent value is an absent param
        params.append(f'{name}="{sd_value(value)}"')
    return "[" + " ".join(params) + "]"


def format_rfc5424(
    event: dict[str, Any], *, app_name: str, hostname: str, facility: int, procid: object = None
) -> bytes:
    """One RFC 5424 message: header, structured data, then BOM and the event as compact JSON.

    The JSON is ASCII (json.dumps escapes the rest), so no byte of it can be invalid UTF-8.
    """
    body = json.dumps(event, separators=(",", ":"), default=str)
    return _message(
        event, body, app_name=app_name, hostname=hostname, facility=facility, procid=procid
    )


def _message(
    event: dict[str, Any], body: str, *, app_name: str, hostname: str, facility: int, procid: object
) -> bytes:
    header = " ".join(
        (
            f"<{facility * 8 + severity(event)}>1",
            rfc3339(event.get("time")),
            header_field(hostname, HOSTNAME_MAX),
            header_field(app_name, APP_NAME_MAX),
            header_field(procid, PROCID_MAX),
            header_field(event.get("kind"), MSGID_MAX),
        )
    )
    return f"{header} {structured_data(event)} ".encode() + BOM + body.encode()


def frame_octet_counted(message: bytes) -> bytes:
    """RFC 6587 section 3.4.1 framing: the length in decimal, a space, the message."""
    return b"%d %b" % (len(message), message)


class SpoolFullError(Exception):
    """The spool holds spool_max_bytes already: the events stay in memory."""


class _LinkBrokenError(Exception):
    """The SIEM closed the connection, reset it, or stopped taking data."""


@dataclass(eq=False, slots=True)
class _Source:
    """Events in order (memory, or one spool file being sent); the first `sent` are on the wire."""

    lines: deque[str]
    path: Path | None = None
    size: int = 0
    sent: int = 0

    @property
    def unsent(self) -> int:
        """How many events wait to be written."""
        return len(self.lines) - self.sent

    def take(self, limit: int) -> list[str]:
        """The next events to write, marked as written."""
        taken = list(islice(self.lines, self.sent, self.sent + limit))
        self.sent += len(taken)
        return taken

    def confirm(self, count: int) -> None:
        """Forget the first count events: they reached the SIEM."""
        for _ in range(count):
            self.lines.popleft()
        self.sent -= count


@dataclass(slots=True)
class _Batch:
    """Events written on the connection and not yet confirmed."""

    source: _Source
    count: int
    written_at: float
    acked_at: float | None = None  # when the peer's TCP was seen to hold all of its bytes


@dataclass(slots=True)
class _Segment:
    """One spool file: its events and bytes, counted when written (or at start)."""

    path: Path
    events: int = 0
    size: int = 0


@dataclass
class _Spool:
    """Append-only NDJSON files in one directory (0700), each 0600, named in order."""

    directory: Path
    max_bytes: int
    events: int = 0
    size: int = 0
    segments: deque[_Segment] = field(default_factory=deque)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _active: _Segment | None = None
    _next_seq: int = 0
    _lock_fd: int | None = None

    def open(self) -> None:
        """Take the directory (one process at a time) and count what a previous run left."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # an existing, wider directory is narrowed
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"siem.spool_dir {self.directory} is in use by another process; "
                "give each gateway process its own spool_dir"
            ) from None
        self._lock_fd = fd
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink()  # a rewrite cut short: the original is still there
        for path in sorted(self.directory.iterdir()):
            if _SEGMENT_NAME.match(path.name):
                data = path.read_bytes()
                events = data.count(b"\n") + (not data.endswith(b"\n") and bool(data))
                self.segments.append(_Segment(path, events, len(data)))
                self.events += events
                self.size += len(data)
        if self.segments:
            self._next_seq = int(self.segments[-1].path.name.split(".")[0]) + 1

    @property
    def opened(self) -> bool:
        """Whether this process holds the directory."""
        return self._lock_fd is not None

    def close(self) -> None:
        """Release the directory."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def append(self, lines: list[str], *, force: bool = False) -> None:
        """Write lines to the newest file and fsync it; SpoolFullError past max_bytes."""
        async with self.lock:
            if self.size >= self.max_bytes and not force:
                raise SpoolFullError
            if self._active is None or self._active.size >= SEGMENT_MAX_BYTES:
                self._active = _Segment(self.directory / f"{self._next_seq:016d}.ndjson")
                self._next_seq += 1
                self.segments.append(self._active)
            active = self._active
            data = "".join(line + "\n" for line in lines).encode()
            try:
                await asyncio.to_thread(_append_durably, active.path, data)
            except OSError:
                if active.events == 0:  # nothing in it: do not leave an empty segment listed
                    self.segments.remove(active)
                    self._active = None
                raise
            active.events += len(lines)
            active.size += len(data)
            self.events += len(lines)
            self.size += len(data)

    async def take_oldest(self) -> tuple[_Source, int] | None:
        """The oldest file's events to send, and how many of its lines were set aside as corrupt."""
        async with self.lock:
            if not self.segments:
                return None
            segment = self.segments.popleft()
            if segment is self._active:
                self._active = None  # sealed: new events go to a new file
        good, corrupt = await asyncio.to_thread(
            _read_segment, segment.path, self.directory / CORRUPT_FILE
        )
        self.events -= segment.events - len(good)
        source = _Source(deque(good), segment.path, segment.size)
        if not good:
            await self.confirmed(source, 0)  # nothing to send: an empty or all-corrupt file
        return source, corrupt

    async def confirmed(self, source: _Source, count: int) -> None:
        """Count events of source as delivered; remove its file once all of them are."""
        self.events -= count
        if not source.lines and source.path is not None:
            await asyncio.to_thread(source.path.unlink, missing_ok=True)
            self.size -= source.size
            source.path = None

    async def put_back(self, source: _Source) -> None:
        """At close: rewrite a file partly delivered so that only what is left is sent again."""
        if source.path is None:
            return
        if not source.lines:
            await asyncio.to_thread(source.path.unlink, missing_ok=True)
            return
        data = "".join(line + "\n" for line in source.lines).encode()
        await asyncio.to_thread(_replace_durably, source.path, data)


def _append_durably(path: Path, data: bytes) -> None:
    """Append and fsync; on failure cut the file back so that no half line stays behind."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                if created:
                    path.unlink()
            raise
    finally:
        os.close(fd)
    if created:
        _fsync_directory(path.parent)  # the new name must survive a crash too


def _replace_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_segment(path: Path, corrupt_path: Path) -> tuple[list[str], int]:
    """A spool file's events; lines that are not JSON objects (a torn write) go to corrupt_path."""
    good: list[str] = []
    corrupt: list[bytes] = []
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict):
            good.append(line.decode())
        else:
            corrupt.append(line + b"\n")
    if corrupt:
        _append_durably(corrupt_path, b"".join(corrupt))
    return good, len(corrupt)


def _unsent_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes written but not yet acknowledged by the peer's TCP: ours, then the kernel's."""
    pending = writer.transport.get_write_buffer_size()
    sock = writer.get_extra_info("socket")
    if sock is None:
        return pending
    request = getattr(termios, "TIOCOUTQ", None)  # Linux's SIOCOUTQ; elsewhere: ours only
    if request is None:
        return pending
    try:
        raw = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except OSError:
        return pending
    queued: int = struct.unpack("i", raw)[0]
    return pending + queued


def tls_context(config: SiemConfig) -> ssl.SSLContext:
    """The verifying client context (TLS 1.2+), with the client certificate when configured."""
    for name in ("ca_file", "client_cert_file", "client_key_file"):
        path = getattr(config, name)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{path}: siem.{name} not found")
    context = client_context(config.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.client_cert_file is not None:
        context.load_cert_chain(config.client_cert_file, config.client_key_file)
    return context


class SiemShipper:
    """Ships audit events to a SIEM, at least once, in the background.

    submit() never blocks and never drops. An event leaves memory or the spool only once it
    is confirmed: written, drained, acknowledged by the peer's TCP, and the connection stayed
    open for delivery_grace_seconds after that. Syslog over TCP has no application-level
    acknowledgement, so this is the best the transport gives; events of a batch that was not
    confirmed are sent again after a reconnection, and event_id in the structured data is the
    dedupe key. on_failure gets a FailureReason; on_up gets True/False on each change;
    `delivered` counts the events confirmed since start.
    """

    def __init__(
        self,
        config: SiemConfig,
        *,
        on_failure: Callable[[FailureReason], None] | None = None,
        on_up: Callable[[bool], None] | None = None,
    ) -> None:
        self._config = config
        self._on_failure = on_failure
        self._on_up = on_up
        self._ssl = tls_context(config) if config.transport == "tls" else None
        self._hostname = config.hostname or socket.gethostname()
        self._procid = os.getpid()
        self._memory = _Source(deque())
        self._overflow: list[str] = []  # past the memory bound, on their way to the spool
        self._spool = _Spool(config.spool_dir, config.spool_max_bytes)
        self._reading: _Source | None = None  # the spool file being sent
        self._in_flight: deque[_Batch] = deque()
        self._work = asyncio.Event()
        self._spool_work = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._spooler: asyncio.Task[None] | None = None
        self._up = False
        self._spool_full = False
        self._closed = False
        self._stopping = False
        self.delivered = 0

    @property
    def backlog(self) -> int:
        """Events not yet confirmed: in memory (within the bound and past it) and spooled."""
        return len(self._memory.lines) + len(self._overflow) + self._spool.events

    @property
    def up(self) -> bool:
        """Whether a connection to the SIEM is open."""
        return self._up

    @property
    def spool_full(self) -> bool:
        """Whether the spool refuses writes: events past the memory bound then stay in memory."""
        return self._spool_full

    async def start(self) -> None:
        """Open the spool (events a previous run left are sent first) and start shipping."""
        await asyncio.to_thread(self._spool.open)
        if self._spool.events:
            log.info("siem.spool_loaded", events=self._spool.events, bytes=self._spool.size)
        self._sender = asyncio.create_task(self._run(), name="siem-sender")
        self._spooler = asyncio.create_task(self._spool_overflow(), name="siem-spooler")

    def submit(self, event: dict[str, Any]) -> None:
        """Queue one audit event (a snapshot is taken now); never blocks, never drops."""
        if self._closed:
            raise RuntimeError("the SIEM shipper is closed: close it after the audit writer")
        line = json.dumps(event, separators=(",", ":"), default=str)
        if len(self._memory.lines) < self._config.memory_buffer:
            self._memory.lines.append(line)
            self._work.set()
            return
        self._overflow.append(line)
        self._spool_work.set()

    # timeout bounds the delivery only: spooling what is left must finish, so no asyncio.timeout.
    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Deliver what can be within timeout, then spool everything left so nothing is lost."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        # A poll: backlog and up change in many places, and this runs once, at shutdown.
        while self.backlog and self._up and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(ACK_POLL_SECONDS)
        self._stopping = True  # the loops end even if a cancellation were swallowed on the way
        async with self._spool.lock:  # never cancel the spool writer in the middle of a write
            for task in (self._sender, self._spooler):
                if task is not None:
                    task.cancel()
        for task in (self._sender, self._spooler):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._spool_everything_left()

    async def _spool_everything_left(self) -> None:
        left = list(self._memory.lines) + self._overflow
        try:
            if left and not self._spool.opened:
                await asyncio.to_thread(self._spool.open)  # closed without a start: take it now
            if left:
                # Past spool_max_bytes too: at shutdown the disk is the only place left.
                await self._spool.append(left, force=True)
                self._memory.lines.clear()
                self._overflow.clear()
            if self._reading is not None:
                await self._spool.put_back(self._reading)
        except (OSError, RuntimeError):
            log.critical(
                "siem.events_lost_at_close", events=len(left), spool_dir=str(self._spool.directory)
            )
            raise
        finally:
            self._spool.close()
        if self.backlog:
            log.warning("siem.closed_with_backlog", events=self.backlog)

    async def _spool_overflow(self) -> None:
        """Move events past the memory bound to disk in fsync'd batches, off the event loop."""
        while not self._stopping:
            await self._spool_work.wait()
            self._spool_work.clear()
            while self._overflow:
                batch = self._overflow[:SPOOL_BATCH_EVENTS]
                try:
                    await self._spool.append(batch)
                except SpoolFullError:
                    self._set_spool_full(full=True)
                    await asyncio.sleep(SPOOL_RETRY_SECONDS)
                    continue
                except OSError as exc:
                    self._report("spool_write", exc)
                    await asyncio.sleep(SPOOL_RETRY_SECONDS)
                    continue
                self._set_spool_full(full=False)
                del self._overflow[: len(batch)]
                self._work.set()

    def _set_spool_full(self, *, full: bool) -> None:
        if full == self._spool_full:
            return
        self._spool_full = full
        if full:
            log.error(
                "siem.spool_full",
                spool_bytes=self._spool.size,
                max_bytes=self._spool.max_bytes,
                held_in_memory=len(self._overflow),
            )
            self._notify_failure("spool_full")
        else:
            log.info("siem.spool_accepting", spool_bytes=self._spool.size)

    async def _run(self) -> None:
        """Connect, ship until the link breaks, back off (with jitter), and again."""
        config = self._config
        delay = config.retry_initial_seconds
        while not self._stopping:
            try:
                reader, writer = await self._connect()
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                self._report("connect", exc)
            else:
                delay = config.retry_initial_seconds
                self._set_up(up=True)
                try:
                    await self._ship(reader, writer)
                except _LinkBrokenError as exc:
                    if self._in_flight or self.backlog:
                        self._report("send", exc)
                    else:  # an idle connection the SIEM closed (an idle timeout): not a failure
                        log.info("siem.closed_by_peer", host=config.host, port=config.port)
                except (OSError, TimeoutError) as exc:
                    self._report("send", exc)
                except Exception:  # a bug must not stop shipping for good: log it and reconnect
                    log.exception("siem.sender_error")
                    self._notify_failure("send")
                finally:
                    self._rewind()
                    self._set_up(up=False)
                    await self._hang_up(writer)
            # Jitter spreads the reconnections of many gateways; it is not a secret.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311  # nosec B311
            delay = min(delay * 2, config.retry_max_seconds)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        config = self._config
        if self._ssl is None:
            connecting = asyncio.open_connection(config.host, config.port)
        else:
            connecting = asyncio.open_connection(
                config.host,
                config.port,
                ssl=self._ssl,
                server_hostname=config.server_name or config.host,
                ssl_handshake_timeout=config.connect_timeout_seconds,
            )
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # meets a refused connection, and close() would then wait for the sender forever.
        async with asyncio.timeout(config.connect_timeout_seconds):
            return await connecting

    async def _hang_up(self, writer: asyncio.StreamWriter) -> None:
        if not self._closed:
            writer.transport.abort()  # a broken link: nothing to flush
            return
        writer.close()  # at shutdown: TLS close_notify, then FIN
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(HANG_UP_SECONDS):
                await writer.wait_closed()
        writer.transport.abort()  # a no-op once closed; a SIEM that did not answer is cut

    async def _ship(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Write batches (the spool first, then memory) and confirm them, until the link breaks."""
        while True:
            _check_link(reader, writer)
            self._observe_acks(writer)
            await self._confirm_delivered()
            if self._reading is None and self._spool.segments:
                await self._take_spool_file()
            batch = self._next_batch()
            if batch is None:
                poll = ACK_POLL_SECONDS if self._in_flight else IDLE_POLL_SECONDS
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(poll):
                        await self._work.wait()
                self._work.clear()
                continue
            source, lines = batch
            writer.write(b"".join(self._frame(line) for line in lines))
            async with asyncio.timeout(self._config.send_timeout_seconds):
                await writer.drain()
            self._in_flight.append(_Batch(source, len(lines), time.monotonic()))
            # drain() does not yield while the buffer is low: let the rest of the gateway run.
            await asyncio.sleep(0)

    def _frame(self, line: str) -> bytes:
        message = _message(
            json.loads(line),
            line,  # the snapshot submit() took is the MSG: one serialisation per event
            app_name=self._config.app_name,
            hostname=self._hostname,
            facility=self._config.facility,
            procid=self._procid,
        )
        return frame_octet_counted(message)

    def _next_batch(self) -> tuple[_Source, list[str]] | None:
        in_flight = sum(batch.count for batch in self._in_flight)
        room = min(BATCH_EVENTS, IN_FLIGHT_MAX_EVENTS - in_flight)
        if room <= 0:
            return None
        for source in (self._reading, self._memory):
            if source is not None and source.unsent:
                return source, source.take(room)
        return None

    async def _take_spool_file(self) -> None:
        taken = await self._spool.take_oldest()
        if taken is None:
            return
        source, corrupt = taken
        self._reading = source if source.lines else None
        if corrupt:
            log.error(
                "siem.spool_corrupt_lines",
                lines=corrupt,
                kept_in=str(self._spool.directory / CORRUPT_FILE),
            )
            self._notify_failure("spool_corrupt")

    def _observe_acks(self, writer: asyncio.StreamWriter) -> None:
        """Stamp the batches whose bytes the peer's TCP now holds (nothing left unsent)."""
        if not self._in_flight or self._in_flight[-1].acked_at is not None:
            return
        if _unsent_bytes(writer):
            return
        now = time.monotonic()
        for batch in reversed(self._in_flight):
            if batch.acked_at is not None:
                break
            batch.acked_at = now

    async def _confirm_delivered(self) -> None:
        """Forget batches acknowledged at least delivery_grace_seconds ago on a live link."""
        config = self._config
        now = time.monotonic()
        while self._in_flight:
            batch = self._in_flight[0]
            if batch.acked_at is None:
                if now - batch.written_at > config.send_timeout_seconds:
                    raise _LinkBrokenError("the SIEM stopped acknowledging data")
                return
            # A SIEM that stops with our bytes unread in its socket resets the connection; the
            # grace gives that reset time to arrive before the events are forgotten.
            if now - batch.acked_at < config.delivery_grace_seconds:
                return
            self._in_flight.popleft()
            batch.source.confirm(batch.count)
            self.delivered += batch.count
            if batch.source is not self._memory:
                await self._spool.confirmed(batch.source, batch.count)
                if not batch.source.lines:
                    self._reading = None

    def _rewind(self) -> None:
        """After a broken link: what was not confirmed is sent again."""
        self._in_flight.clear()
        self._memory.sent = 0
        if self._reading is not None:
            self._reading.sent = 0

    def _set_up(self, *, up: bool) -> None:
        self._up = up
        if up:
            log.info("siem.connected", host=self._config.host, port=self._config.port)
        if self._on_up is not None:
            try:
                self._on_up(up)
            except Exception:
                log.exception("siem.callback_failed", callback="on_up")

    def _report(self, reason: FailureReason, exc: BaseException) -> None:
        log.warning(
            "siem.delivery_failed",
            reason=reason,
            error=type(exc).__name__,
            detail=str(exc)[:200],
            host=self._config.host,
            port=self._config.port,
            backlog=self.backlog,
        )
        self._notify_failure(reason)

    def _notify_failure(self, reason: FailureReason) -> None:
        if self._on_failure is not None:
            try:
                self._on_failure(reason)
            except Exception:
                log.exception("siem.callback_failed", callback="on_failure")


def _check_link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Raise when the SIEM closed or reset the connection (a syslog receiver never writes)."""
    error = reader.exception()
    if error is not None:
        raise _LinkBrokenError(f"the connection failed: {type(error).__name__}")
    if reader.at_eof() or writer.transport.is_closing():
        raise _LinkBrokenError("the SIEM closed the connection")

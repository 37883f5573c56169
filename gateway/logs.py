"""Operational logging (structlog): level, format and destination from config, secrets masked.

Every line, ours and the standard library's (aiohttp's), passes MaskSecrets just before the
renderer; no processor may follow it. The audit trail is separate (gateway.audit).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import ecs_logging
import structlog

from gateway.masking import MaskSecrets

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from io import TextIOWrapper

    from structlog.typing import Processor

    from gateway.config import LoggingConfig

HANDLER_NAME = "gateway.logs"  # the root handler configure_logging installs (and replaces)
SYSLOG_IDENT = "emp-gateway: "  # the RFC 3164 TAG, so rsyslog can route our lines
# The active mask, for secrets the gateway loads after logging is set up (register_secret).
_ACTIVE: list[MaskSecrets] = []


def configure_logging(config: LoggingConfig, *, literals: Iterable[str] = ()) -> MaskSecrets:
    """Route structlog and the stdlib root logger to the configured destination, masked.

    Returns the mask, so that a caller can register more secrets with add_literal().
    """
    level = logging.getLevelNamesMapping()[config.level.upper()]
    mask = MaskSecrets(keys=config.mask_keys, patterns=config.mask_patterns, literals=literals)
    ecs = config.format == "json"
    before = _before_mask(ecs=ecs)
    renderer = _renderer(ecs=ecs)
    handler = _handler(config)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*before, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, mask, renderer],
        )
    )
    _install_root_handler(handler, level)
    stream = _stream(config)
    if stream is not None:
        # Our own lines skip the stdlib handler: ~50 us a line instead of ~100 (measured).
        processors: list[Processor] = [*before, mask, renderer]
        factory: Callable[..., Any] = structlog.PrintLoggerFactory(file=stream)
    else:
        # A file or syslog has one writer per process, the root handler, so rotation and
        # reconnects happen in one place; the mask runs in its formatter.
        processors = [*before, structlog.stdlib.ProcessorFormatter.wrap_for_formatter]
        factory = structlog.stdlib.LoggerFactory()
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _ACTIVE[:] = [mask]
    return mask


def active_mask() -> MaskSecrets:
    """The mask logging uses (a plain one before logging is configured).

    For the other outputs that must not carry a credential: the audit detail, the decision log.
    """
    return _ACTIVE[-1] if _ACTIVE else MaskSecrets()


def register_secret(value: str) -> str:
    """Mask this secret (e.g. the upstream secret, once read) from now on; returns the value.

    It covers every later log line and audit detail.
    """
    for mask in _ACTIVE:
        mask.add_literal(value)
    return value


def syslog_address(text: str) -> str | tuple[str, int]:
    """A unix socket path ("/dev/log") or a (host, port) for UDP ("logs.example:514")."""
    if text.startswith("/"):
        return text
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # "[::1]:514"
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:  # noqa: PLR2004 - the UDP port range
        raise ValueError(f"{text!r} is neither an absolute socket path nor host:port")
    return host, int(port)


def _before_mask(*, ecs: bool) -> list[Processor]:
    """What runs before the mask: everything that adds a value, the traceback text included."""
    processors: list[Processor] = [structlog.contextvars.merge_contextvars]
    if not ecs:  # the ECS formatter writes log.level from the method name itself
        processors.append(structlog.processors.add_log_level)
    timestamp_key = "@timestamp" if ecs else "timestamp"
    processors += [
        structlog.processors.TimeStamper(fmt="iso", utc=True, key=timestamp_key),
        structlog.processors.format_exc_info,
    ]
    return processors


def _renderer(*, ecs: bool) -> Processor:
    if ecs:
        # Its __call__ is annotated with dict where structlog says MutableMapping; same thing here.
        return cast("Processor", ecs_logging.StructlogFormatter())
    return structlog.dev.ConsoleRenderer(colors=False)


def _stream(config: LoggingConfig) -> TextIO | None:
    if config.destination == "stdout":
        return sys.stdout
    if config.destination == "stderr":
        return sys.stderr
    return None


def _handler(config: LoggingConfig) -> logging.Handler:
    stream = _stream(config)
    if stream is not None:
        return _StreamHandler(stream)
    if config.destination == "file":
        return _private_file_handler(config)
    return _SysLogHandler(syslog_address(config.syslog_address))


def _private_file_handler(config: LoggingConfig) -> logging.Handler:
    path = Path(config.file_path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing directory is kept
    return _PrivateRotatingFileHandler(
        path, maxBytes=config.file_max_bytes, backupCount=config.file_backups, encoding="utf-8"
    )


def _install_root_handler(handler: logging.Handler, level: int) -> None:
    """One handler of ours on the root logger; a second configure_logging replaces it."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    handler.set_name(HANDLER_NAME)
    root.addHandler(handler)
    root.setLevel(level)


class _QuietErrors(logging.Handler):
    """A lost line is reported without the record: its fields are not masked yet."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """Say on stderr that a line was lost and why; never print the record (as stdlib does)."""
        del record
        error = sys.exc_info()[1]
        reason = type(error).__name__ if error is not None else "unknown error"
        if isinstance(error, OSError) and error.errno is not None:
            reason = f"{reason} errno {error.errno}"
        with contextlib.suppress(OSError, ValueError):  # stderr itself may be what failed
            sys.stderr.write(f"gateway: a log line was lost ({reason})\n")


class _StreamHandler(_QuietErrors, logging.StreamHandler[TextIO]):
    """stderr or stdout, for the stdlib loggers' lines (aiohttp's)."""


class _SysLogHandler(_QuietErrors, logging.handlers.SysLogHandler):
    """Syslog over a unix datagram socket or UDP, tagged with SYSLOG_IDENT."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        super().__init__(address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        self.ident = SYSLOG_IDENT


class _PrivateRotatingFileHandler(_QuietErrors, logging.handlers.RotatingFileHandler):
    """A rotating log file only its owner can read (0600), whatever the umask says."""

    def _open(self) -> TextIOWrapper:
        descriptor = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(descriptor, 0o600)  # a file left by an older run with wider permissions
        return open(descriptor, "a", encoding=self.encoding, errors=self.errors)  # noqa: PTH123 - a descriptor, not a path

"""Operational logging (structlog): level and format from config, one processor list.

The audit trail is separate (gateway.audit). Masking of secrets in log lines arrives with the
observability issue; until then, code must never pass a credential to a logger.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from gateway.config import LoggingConfig


def configure_logging(config: LoggingConfig) -> None:
    """Route structlog to stderr with the configured level and renderer."""
    level = logging.getLevelNamesMapping()[config.level.upper()]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if config.format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

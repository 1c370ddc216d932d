"""structlog, configured once: JSON lines when stderr is not a terminal, ISO UTC timestamps, no secrets."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# Presigned URLs carry their signature and, with temporary credentials, the session token.
_PRESIGNED = re.compile(
    r"(?i)([?&](?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId)=)[^&\s\"']+"
)
_SECRET_FIELD = re.compile(r"(?i)secret|password|token|credential|authorization|access_key")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """Strip signatures and credentials from presigned query strings."""
    return _PRESIGNED.sub(r"\1" + REDACTED, text)


def _redact_event(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if _SECRET_FIELD.search(key) and value is not None:
            event[key] = REDACTED
        elif isinstance(value, str) and "=" in value:
            event[key] = redact(value)
    return event


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog for the whole process; safe to call again (tests, re-exec)."""
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # botocore and aiohttp log through the standard library; keep their chatter out of our stream.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("aiobotocore").setLevel(logging.WARNING)


def get(name: str | None = None, **context: Any) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name).bind(**context) if context else structlog.get_logger(name)

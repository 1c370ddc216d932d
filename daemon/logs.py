"""structlog, configured once: JSON lines when stderr is not a terminal, ISO UTC timestamps, no secrets."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# Query parameters that carry a credential: presigned URLs of S3 (SigV4 and SigV2) and GCS hold the
# signature, the access key id and, with temporary credentials, the session token; Azure SAS its `sig`.
CREDENTIAL_PARAMS = re.compile(
    r"(?i)X-Amz-(?:Signature|Credential|Security-Token)|X-Goog-(?:Signature|Credential)|Signature|"
    r"AWSAccessKeyId|x-amz-security-token|sig|token|access_token"
)
_PRESIGNED = re.compile(rf"(?i)([?&](?:{CREDENTIAL_PARAMS.pattern.removeprefix('(?i)')})=)[^&\s\"'#]+")
# scheme://USER[:PASSWORD]@host: whatever sits before the '@' of the authority is a credential.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#\"']+@")
_SECRET_FIELD = re.compile(r"(?i)secret|password|token|credential|authorization|access_key")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """Strip signatures and credentials from presigned query strings, and userinfo from URLs."""
    return _USERINFO.sub(r"\1" + REDACTED + "@", _PRESIGNED.sub(r"\1" + REDACTED, text))


def redact_url(url: str) -> str:
    """A URL as it may appear in an error message: userinfo and every query value redacted.

    Stricter than `redact`: any query value may be a credential, and a user who pasted the URL
    knows what it held; the parameter names stay, so the message still says what was wrong.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[' in the host: show nothing of it
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rsplit("@", 1)[1]
    shown = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme or netloc else parts.path
    if parts.query:
        params = parse_qsl(parts.query, keep_blank_values=True)
        shown += "?" + "&".join(f"{k}={REDACTED}" for k, _ in params) if params else "?" + REDACTED
    if parts.fragment:
        shown += "#" + REDACTED
    return redact(shown)


def is_presigned(url: str) -> bool:
    """Whether `url` carries a credential in its query string (a presigned or SAS URL)."""
    try:
        params = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    except ValueError:
        return False
    return any(CREDENTIAL_PARAMS.fullmatch(k) for k, _ in params)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value) if ("=" in value or "@" in value) else value
    if isinstance(value, dict):
        return {k: REDACTED if _is_secret_key(k, v) else _scrub(v) for k, v in value.items()}
    if type(value) in (list, tuple):  # exactly: a named tuple cannot be rebuilt from an iterable
        return type(value)(_scrub(v) for v in value)
    return value


def _is_secret_key(key: Any, value: Any) -> bool:
    return isinstance(key, str) and bool(_SECRET_FIELD.search(key)) and value is not None


def _redact_event(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        event[key] = REDACTED if _is_secret_key(key, value) else _scrub(value)
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

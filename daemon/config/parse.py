"""Value parsers for settings: text (flag, environment) or YAML values in, typed values out.

Each raises ValueError with a message that says what is accepted; the loader adds the setting's
name, so messages here describe only the value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

# The numeric parsers live in quantities; the schema reads every parser from this module.
from daemon.config.quantities import duration, integer, show, size  # noqa: F401
from daemon.logs import redact_url
from daemon.storage.options import StorageURL

Parser = Callable[[Any], Any]

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Linux's largest NR_CPUS; a range beyond it would only build a huge tuple ("0-100000000").
MAX_CPU = 8191


def _scalar(value: Any, expected: str) -> str:
    """Text of a flag, variable or YAML scalar; a list or mapping is refused before str() expands it."""
    if isinstance(value, bool | int | float | str):
        return str(value)
    raise ValueError(f"{expected}, got a {type(value).__name__}")


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _scalar(value, "expected true or false").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {show(value)}")


def choice(*allowed: str) -> Parser:
    def parse(value: Any) -> str:
        expected = f"expected one of {', '.join(allowed)}"
        if _scalar(value, expected) not in allowed:
            raise ValueError(f"{expected}, got {show(value)}")
        return str(value)

    return parse


def text(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a string, got {value} (quote it in YAML)")
    return str(value)


def optional(parser: Parser) -> Parser:
    """Empty text or null means 'not set'."""

    def parse(value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return parser(value)

    return parse


def name(value: Any) -> str:
    """A project or job id: it becomes one segment of every key, so only key-safe characters.

    Only text: YAML reads `job_id: 0123` as the number 83 and `job_id: .nan` as a float, so a
    number here is never what was written.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_of(value)} {show(value)}: quote it in YAML")
    if not _SAFE_NAME.fullmatch(value):
        raise ValueError(
            f"{show(value)} is not a safe name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _type_of(value: Any) -> str:
    return {bool: "the boolean", int: "the number", float: "the number"}.get(type(value), "a " + type(value).__name__)


def absolute_path(value: Any) -> str:
    s = text(value)
    if not s.startswith("/"):
        raise ValueError(f"must be an absolute path, got {show(s)}")
    if _CONTROL.search(s):
        # Often a trailing newline from a mounted file; a NUL would fail every system call later.
        raise ValueError(f"control characters (newline, tab, NUL...) are not accepted in a path, got {show(s)}")
    return str(PurePosixPath(s))


def local_path(value: Any) -> str:
    """A folder on this machine; a relative one (from a flag) is taken from the current folder."""
    s = text(value)
    if not s or _CONTROL.search(s):
        raise ValueError(f"expected a folder path without control characters, got {show(s)}")
    return os.path.abspath(s)


_METRIC = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]{0,127}")


def metric_name(value: Any) -> str:
    """A metric as trainer_state.json names it (eval_loss, eval/accuracy)."""
    s = text(value)
    if not _METRIC.fullmatch(s):
        raise ValueError(f"expected a metric name such as eval_loss, got {show(s)}")
    return s


def storage_url(value: Any) -> str:
    # StorageURL's messages never echo userinfo or query values (presigned URLs, access keys).
    return str(StorageURL.parse(text(value)))


def http_url(value: Any) -> str:
    s = text(value)
    shown = redact_url(s)
    if _CONTROL.search(s):
        raise ValueError(f"control characters are not accepted in a URL, got {shown!r}")
    try:
        parts = urlsplit(s)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number or out of range
    except ValueError:
        raise ValueError(f"expected http(s)://HOST[:PORT], got {shown!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected http(s)://HOST[:PORT], got {shown!r}")
    if parts.username or parts.password:
        raise ValueError("credentials do not belong in the endpoint URL; use the AWS credential chain")
    if parts.query or parts.fragment:
        raise ValueError(f"queries and fragments do not belong in the endpoint URL, got {shown!r}")
    return s.rstrip("/")


def listen_address(value: Any) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT; port 0 picks a free port."""
    s = text(value)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]*):(\d{1,5})", s)
    if not m:
        raise ValueError(f"expected HOST:PORT such as 0.0.0.0:9477, got {show(s)}")
    host = m.group(1) or m.group(3) or "0.0.0.0"
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port}")
    return host, port


def string_list(value: Any) -> tuple[str, ...]:
    """A YAML list, or comma-separated text from a flag or the environment."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"expected a list of strings, got {show(value)}")


def command_list(value: Any) -> tuple[str, ...]:
    """Start commands: a YAML list of shell command lines (a single string is one command)."""
    if isinstance(value, str):
        return (value,)
    return string_list(value)


def cpu_list(value: Any) -> tuple[int, ...] | None:
    """CPU affinity: '0-3,6' or a list of integers; empty means no pinning."""
    if value is None or value == "" or value == []:
        return None
    expected = f"expected CPU numbers (0-{MAX_CPU}) and ranges such as 0-3,6, got {show(value)}"
    items = value if isinstance(value, list) else _scalar(value, expected).split(",")
    cpus: set[int] = set()
    for item in items:
        m = re.fullmatch(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?", _scalar(item, expected))
        if isinstance(item, bool) or not m:
            raise ValueError(expected)
        low, high = int(m.group(1)), int(m.group(2) or m.group(1))
        if high < low or high > MAX_CPU:
            raise ValueError(expected)
        cpus.update(range(low, high + 1))
    return tuple(sorted(cpus))
